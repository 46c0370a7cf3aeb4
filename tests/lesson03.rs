//! Lesson 03 end to end: `--quick` writes its figures and metrics; bad flags are refused with a message.
mod common;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_lesson03");

#[test]
fn quick_run_writes_outputs_and_grades_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_lesson(BIN, &["--quick", "--out", dir.path().to_str().unwrap()]);
    assert_ok(&out);
    assert_files(
        dir.path(),
        &[
            "schedules.png",
            "forward_noising.png",
            "toy_samples.png",
            "loss.png",
            "loss.csv",
            "samples.png",
            "trajectory.png",
            "metrics.json",
            "checkpoint.safetensors",
        ],
    );
    // the checkpoint is one file, its settings inside: no config beside it
    assert!(!dir.path().join("checkpoint.json").exists());
    let m = metrics(dir.path());
    // the 2-D DDPM gets the mode weights about right even after a short run (plain Langevin is off by ~0.3)
    assert!(m["toy"]["mode_weight_error"].as_f64().unwrap() < 0.1, "{}", m["toy"]);
    let s = &m["mnist"]["samples"];
    assert_eq!(s["n"].as_i64().unwrap(), 32);
    for k in ["frechet_distance", "frechet_floor", "class_entropy", "mean_confidence"] {
        assert!(s[k].as_f64().unwrap().is_finite(), "{k}: {s}");
    }
    assert_eq!(s["class_histogram"].as_array().unwrap().len(), 10);
    // a resume with another T or loss weighting is refused, naming the setting and both values
    let d = dir.path().to_str().unwrap();
    let out = run_lesson(BIN, &["--quick", "--timesteps", "500", "--resume", "--out", d]);
    assert_user_error(&out, "`timesteps` = 1000, this run has `timesteps` = 500");
    let out = run_lesson(BIN, &["--quick", "--loss-weight", "min-snr", "--resume", "--out", d]);
    assert_user_error(&out, "`loss_weight`");
}

#[test]
fn bad_flags_exit_with_a_readable_message() {
    assert_user_error(&run_lesson(BIN, &["--schedule", "quadratic", "--out", "/tmp/sd-test-l03"]), "quadratic");
    assert_user_error(&run_lesson(BIN, &["--variance", "large"]), "beta-tilde");
    assert_user_error(&run_lesson(BIN, &["--sample-steps", "0"]), "--sample-steps");
}
