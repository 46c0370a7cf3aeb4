//! The library's layers import one way. `src/` is a stack of layers, each allowed to import only the layers above it
//! (the order below, also in `lib.rs`); `cli`, `plot`, `checkpoint` and `validate` are utilities that import nothing
//! of the crate but each other, so every layer may use them. Like `tests/book.rs` for the book, this test reads the
//! source:
//! every `crate::…` path in a module (its `use` lines and its inline paths, tests included) must point to its own
//! layer, a layer above it, or a utility. A failure names the file, the line and the arrow that runs backwards.
use std::path::Path;

/// Top to bottom: a module may import from the ones before it.
const LAYERS: [&str; 11] =
    ["data", "text", "diffusion", "model", "nn", "sampling", "sd", "train", "pipelines", "eval", "studies"];
/// Import nothing of the crate but each other.
const UTILITIES: [&str; 4] = ["cli", "plot", "checkpoint", "validate"];

/// The top-level module a file of `src/` belongs to: `src/nn/unet.rs` -> "nn", `src/model.rs` -> "model".
fn module_of(rel: &Path) -> String {
    let first = rel.components().next().expect("a path under src/").as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

/// Every `crate::NAME` in `line` outside comments (`//` to the end of the line).
fn crate_paths(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("crate::")
        .filter(|(i, _)| !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .filter(|(i, _)| code[..*i].matches('"').count() % 2 == 0) // not inside a string literal
        .map(|(i, m)| code[i + m.len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect())
        .collect()
}

/// Why `from` may not import `to`, or None if it may.
fn violation(from: &str, to: &str) -> Option<String> {
    if from == to || UTILITIES.contains(&to) && UTILITIES.contains(&from) {
        return None;
    }
    if UTILITIES.contains(&from) {
        return Some(format!("`{from}` is a utility and imports nothing of the crate but the other utilities"));
    }
    if UTILITIES.contains(&to) {
        return None;
    }
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    match (rank(from), rank(to)) {
        (Some(a), Some(b)) if b < a => None,
        (Some(_), Some(_)) => Some(format!("`{to}` is below `{from}` in the layer order {LAYERS:?}")),
        (None, _) => Some(format!("`{from}` is in no layer: add it to LAYERS or UTILITIES in tests/layering.rs")),
        (_, None) => Some(format!("`crate::{to}` is in no layer")),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_import_of_the_library_runs_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel.starts_with("bin") || rel == Path::new("lib.rs") {
            continue; // binaries are like lessons: they may import anything
        }
        let from = module_of(rel);
        for (n, line) in std::fs::read_to_string(file).unwrap().lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue; // doc links may point anywhere: they are not imports
            }
            for to in crate_paths(line) {
                if let Some(why) = violation(&from, &to) {
                    wrong.push(format!("src/{}:{}: {from} -> {to}: {why}\n    {}", rel.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{} imports run against the layers:\n{}", wrong.len(), wrong.join("\n"));
}

#[test]
fn the_checker_catches_a_backward_arrow_and_allows_the_forward_ones() {
    assert_eq!(crate_paths("use crate::train::ddpm::EpsModel; // crate::eval in a comment"), ["train"]);
    assert_eq!(crate_paths("let d = crate::model::sigma_like(&x, 1.0); my_crate::nn::x"), ["model"]);
    assert!(crate_paths(r#"x.expect("crate::path")"#).is_empty(), "a string is not an import");
    assert!(violation("sampling", "train").is_some(), "sampling may not import train");
    assert!(violation("nn", "model").is_none() && violation("studies", "data").is_none());
    assert!(violation("plot", "data").is_some(), "a utility imports nothing of the crate");
    assert!(violation("eval", "cli").is_none() && violation("checkpoint", "cli").is_none());
    assert!(violation("nn", "nn").is_none());
    assert!(violation("newlayer", "data").unwrap().contains("no layer"));
}
