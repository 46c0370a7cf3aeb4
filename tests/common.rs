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

pub fn metrics(dir: &Path) -> serde_json::Value {
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
