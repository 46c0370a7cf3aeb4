//! Lesson 01 end to end: `--quick` writes its figures and metrics, shows the low-density effect, is reproducible,
//! and bad flags are refused with a message.
mod common;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_lesson01");

#[test]
fn quick_run_writes_outputs_and_shows_the_low_density_effect() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_lesson(BIN, &["--quick", "--out", dir.path().to_str().unwrap()]);
    assert_ok(&out);
    assert_files(
        dir.path(),
        &[
            "density.png",
            "score_fields.png",
            "score_error.png",
            "loss.png",
            "loss.csv",
            "metrics.json",
            "score_mlp.safetensors",
            "score_mlp.json",
        ],
    );
    let m = metrics(dir.path());
    let errs = m["score_error"].as_array().unwrap();
    assert_eq!(errs.len(), 10);
    // the score is learned worse in low-density regions at the smallest noise than at the largest
    let low_small = errs.last().unwrap()["low_density_rel_error"].as_f64().unwrap();
    let low_large = errs[0]["low_density_rel_error"].as_f64().unwrap();
    assert!(low_small > 5.0 * low_large, "{low_small} vs {low_large}");
    assert!(errs[0]["weighted_rel_error"].as_f64().unwrap() < 0.1);
    let csv = std::fs::read_to_string(dir.path().join("loss.csv")).unwrap();
    assert!(csv.starts_with("step,dsm_loss\n") && csv.lines().count() == 601);
}

#[test]
fn the_same_seed_gives_bit_identical_outputs() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&a, &b] {
        assert_ok(&run_lesson(BIN, &["--quick", "--steps", "200", "--seed", "7", "--out", d.path().to_str().unwrap()]));
    }
    for f in ["loss.csv", "score_mlp.safetensors", "score_fields.png"] {
        assert!(std::fs::read(a.path().join(f)).unwrap() == std::fs::read(b.path().join(f)).unwrap(), "{f} differs");
    }
    let (mut ma, mut mb) = (metrics(a.path()), metrics(b.path()));
    for m in [&mut ma, &mut mb] {
        m["wall_time_s"] = 0.into();
        m["run"] = serde_json::Value::Null; // the command (its --out) and the start time differ
    }
    assert_eq!(ma, mb);
}

#[test]
fn bad_flags_exit_with_a_readable_message() {
    assert_user_error(&run_lesson(BIN, &["--steps", "-5"]), "--steps");
    assert_user_error(&run_lesson(BIN, &["--steps", "0"]), "--steps");
    assert_user_error(&run_lesson(BIN, &["--device", "tpu"]), "unknown device 'tpu'");
    assert_user_error(&run_lesson(BIN, &["--lr", "-1"]), "not a positive number");
    assert_user_error(
        &run_lesson(BIN, &["--layout", "moons", "--out", "/tmp/sd-test-moons"]),
        "unknown layout 'moons'",
    );
    assert_user_error(&run_lesson(BIN, &["--quick", "--out", "/etc/hostname/sub"]), "--out");
}
