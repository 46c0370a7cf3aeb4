//! Helpers for the integration tests: running a lesson binary and reading what it wrote.
#![allow(dead_code)]
use std::path::Path;
use std::process::{Command, Output};

/// Runs a lesson binary with `args` on one thread (the test harness runs several at once on 2 cores); returns its
/// output.
pub fn run_lesson(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).args(["--threads", "1"]).output().expect("lesson binary runs")
}

/// Asserts the run succeeded, printing its output if not.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "lesson failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts a run failed with a readable one-line error (no panic, no backtrace) that contains `needle`.
pub fn assert_user_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "panic instead of an error: {err}");
    assert!(err.contains(needle), "error should mention {needle:?}: {err}");
}

/// What a lesson run wrote into `dir`: metrics.json, after checking that it, results.md and the files of run.json
/// carry one run stamp ([`verify_run_folder`](scratch_diffusion::cli::verify_run_folder)).
pub fn metrics(dir: &Path) -> serde_json::Value {
    let stamp = scratch_diffusion::cli::verify_run_folder(dir, false).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(stamp.command.contains("--threads 1"), "{stamp:?}");
    let text = std::fs::read_to_string(dir.join("metrics.json")).expect("metrics.json written");
    serde_json::from_str(&text).expect("metrics.json is JSON")
}

pub fn assert_files(dir: &Path, names: &[&str]) {
    for n in names {
        let p = dir.join(n);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{} missing or empty", p.display());
        if n.ends_with(".png") {
            assert_eq!(&std::fs::read(&p).unwrap()[1..4], b"PNG", "{n} is a PNG");
        }
    }
}

/// (width, height, bit depth, colour type) from a PNG's IHDR chunk.
pub fn png_header(path: &Path) -> (u32, u32, u8, u8) {
    let bytes = std::fs::read(path).unwrap_or_else(|_| panic!("{} missing", path.display()));
    assert_eq!((&bytes[..8], &bytes[12..16]), (&b"\x89PNG\r\n\x1a\n"[..], &b"IHDR"[..]), "{}", path.display());
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20), bytes[24], bytes[25])
}

/// `dir` holds exactly `n` 28×28 8-bit grayscale PNGs sample_000.png … and a grid.png (what `sample` writes).
pub fn assert_grayscale_digits(dir: &Path, n: usize) {
    for i in 0..n {
        assert_eq!(png_header(&dir.join(format!("sample_{i:03}.png"))), (28, 28, 8, 0), "8-bit grayscale 28×28");
    }
    assert!(!dir.join(format!("sample_{n:03}.png")).exists(), "exactly {n} images");
    assert_files(dir, &["grid.png"]);
}
