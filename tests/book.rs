//! The book can never drift from the code: every `{{#include path:anchor}}` in book/src must name an existing file
//! and, when it names an anchor, that file must hold both `ANCHOR: name` and `ANCHOR_END: name`. Every figure the
//! book shows must exist too.
use std::path::{Path, PathBuf};

fn chapters() -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&src)
        .expect("book/src exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    v.sort();
    v
}

/// The `{{#include ...}}` targets of a markdown text.
fn includes(text: &str) -> Vec<String> {
    text.match_indices("{{#include ")
        .map(|(i, _)| text[i + 11..].split("}}").next().unwrap().trim().to_string())
        .collect()
}

#[test]
fn every_include_and_anchor_resolves() {
    let mut count = 0;
    for chapter in chapters() {
        let text = std::fs::read_to_string(&chapter).unwrap();
        for inc in includes(&text) {
            let (file, anchor) = match inc.split_once(':') {
                Some((f, a)) => (f, Some(a)),
                None => (inc.as_str(), None),
            };
            let path = chapter.parent().unwrap().join(file);
            let code = std::fs::read_to_string(&path)
                .unwrap_or_else(|_| panic!("{}: include {file} does not exist", chapter.display()));
            if let Some(a) = anchor.filter(|a| !a.chars().next().unwrap().is_ascii_digit()) {
                assert!(
                    code.contains(&format!("ANCHOR: {a}\n")),
                    "{}: anchor {a} missing in {file}",
                    chapter.display()
                );
                assert!(
                    code.contains(&format!("ANCHOR_END: {a}\n")),
                    "{}: ANCHOR_END {a} missing in {file}",
                    chapter.display()
                );
            }
            count += 1;
        }
    }
    assert!(count >= 6, "the chapters include code from the lessons ({count} includes found)");
}

#[test]
fn every_figure_exists() {
    for chapter in chapters() {
        let text = std::fs::read_to_string(&chapter).unwrap();
        for (i, _) in text.match_indices("](") {
            let target = text[i + 2..].split(')').next().unwrap();
            if target.ends_with(".png") {
                let p = chapter.parent().unwrap().join(target);
                assert!(p.exists(), "{}: figure {target} missing", chapter.display());
            }
        }
    }
}

#[test]
fn every_chapter_is_in_the_summary() {
    let summary = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src/SUMMARY.md")).unwrap();
    for chapter in chapters() {
        let name = chapter.file_name().unwrap().to_str().unwrap();
        assert!(name == "SUMMARY.md" || summary.contains(&format!("({name})")), "{name} is not listed in SUMMARY.md");
    }
}

/// mdBook's MathJax reads `\\(` … `\\)` in markdown (the markdown pass eats one backslash); a span written `\( … \)`
/// reaches the reader as plain text with brackets. Code blocks are left alone.
#[test]
fn inline_math_uses_double_backslashes() {
    let mut bad = Vec::new();
    for chapter in chapters() {
        let text = std::fs::read_to_string(&chapter).unwrap();
        for (k, block) in text.split("```").enumerate().filter(|(k, _)| k % 2 == 0) {
            for (i, _) in block.match_indices("\\(").chain(block.match_indices("\\)")) {
                if !block[..i].ends_with('\\') {
                    let line = block[..i].lines().last().unwrap_or("");
                    bad.push(format!("{} (block {k}): …{line}", chapter.display()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "single-backslash math, write \\\\( … \\\\):\n{}", bad.join("\n"));
}

/// The math renderer ships with the book (book/src/mathjax, loaded by book/theme/head.hbs): no page asks a CDN for it,
/// so a reader offline sees formulas, not TeX source.
#[test]
fn the_math_renderer_is_vendored_not_fetched() {
    let book = Path::new(env!("CARGO_MANIFEST_DIR")).join("book");
    let head = std::fs::read_to_string(book.join("theme/head.hbs")).unwrap();
    assert!(head.contains("mathjax/tex-chtml.js") && !head.contains("http"), "{head}");
    assert!(book.join("src/mathjax/tex-chtml.js").exists() && book.join("src/mathjax/LICENSE").exists());
    let fonts = book.join("src/mathjax/output/chtml/fonts/woff-v2");
    assert!(fonts.join("MathJax_Main-Regular.woff").exists(), "the fonts tex-chtml.js loads");
    let toml = std::fs::read_to_string(book.join("book.toml")).unwrap();
    assert!(toml.contains("mathjax-support = false"), "mdBook's own MathJax loads from a CDN");
}
