//! Lesson 04 end to end: `--quick` writes its figures and metrics, `--resume` continues from the checkpoint, and
//! bad flags are refused with a message.
mod common;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_lesson04");

#[test]
fn quick_run_writes_outputs_then_resume_continues_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_ok(&run_lesson(
        BIN,
        &["--quick", "--steps", "10", "--num-samples", "8", "--sample-steps", "10", "--out", d],
    ));
    assert_files(
        dir.path(),
        &[
            "architecture.png",
            "loss.png",
            "loss.csv",
            "samples_over_training.png",
            "samples.png",
            "trajectory.png",
            "metrics.json",
            "checkpoint.safetensors",
        ],
    );
    let m = metrics(dir.path());
    assert_eq!(m["train_steps"].as_i64().unwrap(), 10);
    assert!(m["resumed_from"].is_null());
    assert!(m["samples"]["fd_over_floor"].as_f64().unwrap().is_finite());
    // a longer run resumes from the 10-step checkpoint instead of starting over
    assert_ok(&run_lesson(
        BIN,
        &["--quick", "--steps", "14", "--num-samples", "8", "--sample-steps", "10", "--resume", "--out", d],
    ));
    let m = metrics(dir.path());
    assert_eq!(m["resumed_from"].as_i64().unwrap(), 10);
    assert_eq!(std::fs::read_to_string(dir.path().join("loss.csv")).unwrap().lines().count(), 1 + 14);
    // resuming with another learning rate is refused, naming the setting
    let out = run_lesson(BIN, &["--quick", "--steps", "16", "--lr", "0.5", "--resume", "--out", d]);
    assert_user_error(&out, "lr");
    // so are another schedule, another dropout, and fewer steps than the checkpoint has done
    let out = run_lesson(BIN, &["--quick", "--steps", "16", "--schedule", "linear", "--resume", "--out", d]);
    assert_user_error(&out, "`schedule` = \"cosine\", this run has `schedule` = \"linear\"");
    let out = run_lesson(BIN, &["--quick", "--steps", "16", "--dropout", "0.2", "--resume", "--out", d]);
    assert_user_error(&out, "`model.dropout`");
    let out = run_lesson(BIN, &["--quick", "--steps", "12", "--resume", "--out", d]);
    assert_user_error(&out, "already done 14 steps and this run asks for 12");
}

#[test]
fn bad_flags_exit_with_a_readable_message() {
    assert_user_error(&run_lesson(BIN, &["--batch", "0"]), "--batch");
    assert_user_error(&run_lesson(BIN, &["--device", "metal"]), "unknown device");
    assert_user_error(&run_lesson(BIN, &["--quick", "--dropout", "1.5"]), "--dropout");
    // issue 17: it panicked
}
