//! Lesson 05 end to end: `--quick` checks our attention against libtorch's, trains the class-conditional UNet,
//! samples every digit at each guidance scale and writes its figures and the per-scale grades; bad flags are refused
//! with a message.
mod common;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_lesson05");

#[test]
fn quick_run_writes_figures_and_one_grade_per_guidance_scale() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let args = ["--quick", "--steps", "10", "--num-samples", "20", "--sample-steps", "5", "--guidance", "0,1,3"];
    assert_ok(&run_lesson(BIN, &[&args[..], &["--out", d]].concat()));
    assert_files(
        dir.path(),
        &[
            "attention_toy.png",
            "loss.png",
            "loss.csv",
            "samples_by_class.png",
            "guidance_tradeoff.png",
            "cross_attention.png",
            "metrics.json",
            "checkpoint.safetensors",
        ],
    );
    let m = metrics(dir.path());
    for key in ["max_abs_diff_no_mask", "max_abs_diff_causal", "max_abs_diff_padding"] {
        assert!(m["attention_check"][key].as_f64().unwrap() < 1e-5, "{key}: our attention differs from libtorch's");
    }
    assert_eq!(m["train_steps"].as_i64().unwrap(), 10);
    assert!(m["train_seconds"].as_f64().unwrap() > 0.0 && m["parameters"].as_i64().unwrap() > 0);
    assert_eq!(m["network"]["unet"]["cross_attention_dim"].as_i64(), Some(16));
    assert_eq!(m["p_uncond"].as_f64(), Some(0.1));
    assert_eq!(m["samples_per_scale"].as_i64(), Some(20));
    let grades = m["guidance"].as_array().unwrap();
    let scales: Vec<f64> = grades.iter().map(|g| g["scale"].as_f64().unwrap()).collect();
    assert_eq!(scales, [0.0, 1.0, 3.0]);
    for g in grades {
        for key in ["accuracy", "mean_p_requested"] {
            let v = g[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
        assert!(g["diversity_over_real"].as_f64().unwrap() > 0.0);
        assert!(g["samples"]["fd_over_floor"].as_f64().unwrap().is_finite());
    }
}

#[test]
fn bad_flags_exit_with_a_readable_message() {
    assert_user_error(&run_lesson(BIN, &["--quick", "--p-uncond", "1.5"]), "--p-uncond");
    assert_user_error(&run_lesson(BIN, &["--quick", "--guidance", "1,x"]), "--guidance");
    assert_user_error(&run_lesson(BIN, &["--num-samples", "5"]), "--num-samples");
    assert_user_error(&run_lesson(BIN, &["--quick", "--dropout=-0.5"]), "--dropout"); // issue 17: it panicked
    assert_user_error(&run_lesson(BIN, &["--quick", "--guidance", "1,inf"]), "--guidance");
}
