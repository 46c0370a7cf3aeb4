//! The book can never drift from the code: every `{{#include path:anchor}}` in book/src must name an existing file
//! and, when it names an anchor, that file must hold both `ANCHOR: name` and `ANCHOR_END: name`. Every figure the
//! book shows must exist too; each figures folder holds the files of one stamped run, unchanged (run.json), and the
//! numbers a chapter quotes from a run's files are checked against them (issue 19).
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
                    code.contains(&format!("ANCHOR: {a}\n")) || code.contains(&format!("ANCHOR: {a} -->")),
                    "{}: anchor {a} missing in {file}",
                    chapter.display()
                );
                assert!(
                    code.contains(&format!("ANCHOR_END: {a}\n")) || code.contains(&format!("ANCHOR_END: {a} -->")),
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

/// The numbers a chapter states from a run's files: each `<!-- metric FILE POINTER VALUE -->` marker (FILE relative
/// to book/src, POINTER a JSON pointer into it with spaces as %20, VALUE as the chapter rounds it) must hold, to VALUE's last decimal, of
/// the file the run wrote. The marker sits beside the prose or table that quotes the number, so a refreshed run that
/// changes it fails here until the chapter says the new number.
#[test]
fn numbers_quoted_from_runs_match_their_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src");
    let mut checked = 0;
    for chapter in chapters() {
        let text = std::fs::read_to_string(&chapter).unwrap();
        for (i, _) in text.match_indices("<!-- metric ") {
            let marker = text[i + 12..].split("-->").next().unwrap();
            let [file, pointer, value] = marker.split_whitespace().collect::<Vec<_>>()[..] else {
                panic!("{}: a metric marker is `<!-- metric FILE POINTER VALUE -->`: {marker:?}", chapter.display())
            };
            let json: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(src.join(file))
                    .unwrap_or_else(|_| panic!("{}: {file} does not exist", chapter.display())),
            )
            .unwrap();
            // RFC 6901 sec. 6, as in a URI fragment: a key's spaces are written %20
            let actual = json.pointer(&pointer.replace("%20", " ")).and_then(|v| v.as_f64());
            let actual = actual.unwrap_or_else(|| panic!("{}: no number at {pointer} in {file}", chapter.display()));
            let decimals = value.split_once('.').map_or(0, |(_, d)| d.len()) as i32;
            let stated: f64 = value.parse().unwrap();
            assert!(
                (actual - stated).abs() <= 0.5 * 10f64.powi(-decimals) + 1e-9,
                "{}: the chapter says {value} for {file}{pointer}, the run wrote {actual}",
                chapter.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} quoted numbers are checked against their runs");
}

/// Each chapter's figures, tables and numbers come from one run: lessons 01–09's figures folders hold the files of one
/// run each (run.json lists them with their SHA-256; metrics.json and results.md carry its stamp; no other file is
/// there), copied by `./run.sh book-refresh`, and so does every subfolder that keeps a comparison run. A run made from
/// uncommitted code cannot be in the book.
#[test]
fn figures_and_tables_of_each_chapter_come_from_one_run() {
    let figures = Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src/figures");
    let mut folders: Vec<PathBuf> = Vec::new();
    for dir in std::fs::read_dir(&figures).unwrap().filter_map(|e| e.ok().map(|e| e.path())) {
        folders
            .extend(std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()));
        folders.push(dir);
    }
    let mut runs = Vec::new();
    for dir in folders.iter().filter(|d| d.join("metrics.json").exists() || d.join("run.json").exists()) {
        let stamp = scratch_diffusion::cli::verify_run_folder(dir, true).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!stamp.commit.contains("+changes") && stamp.commit != "unknown", "{}: {stamp:?}", dir.display());
        runs.push(dir.strip_prefix(&figures).unwrap().to_path_buf());
    }
    for lesson in 1..=13 {
        let dir = PathBuf::from(format!("lesson{lesson:02}"));
        assert!(runs.contains(&dir), "book/src/figures/{} holds no stamped run", dir.display());
    }
}

/// What the chapters include from a run's results.md is there: the file, and the anchor, whose table the lesson wrote.
#[test]
fn chapters_include_the_tables_their_runs_wrote() {
    let mut tables = 0;
    for chapter in chapters() {
        let text = std::fs::read_to_string(&chapter).unwrap();
        for inc in includes(&text).iter().filter(|i| i.starts_with("figures/") && i.contains("results.md")) {
            let (file, anchor) = inc.split_once(':').unwrap_or((inc, ""));
            let md = std::fs::read_to_string(chapter.parent().unwrap().join(file))
                .unwrap_or_else(|_| panic!("{}: no {file}", chapter.display()));
            assert!(md.starts_with("<!-- run {"), "{file} has no run stamp");
            assert!(anchor.is_empty() || md.contains(&format!("ANCHOR: {anchor} -->")), "{file} has no table {anchor}");
            tables += 1;
        }
    }
    assert!(tables >= 8, "only {tables} tables are included from the runs' results.md");
}
