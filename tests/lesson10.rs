//! Lesson 10 end to end: `--quick` trains the noise-aware classifier and the noised CLIP, sweeps classifier-free,
//! classifier and CLIP guidance on the shipped models, runs the thresholding study on lesson 06's pipeline, and
//! writes its figures, tables and metrics; bad flags are refused with a message.
mod common;
use common::*;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_lesson10");

/// The shipped models lesson 10 guides; without them (a checkout without data/) the run cannot start.
fn shipped() -> bool {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    ["data/lesson04/unet.safetensors", "data/lesson05/unet.safetensors", "data/lesson06/pipeline.json"]
        .iter()
        .all(|p| root.join(p).exists())
}

#[test]
fn quick_run_writes_the_comparison_and_the_thresholding_study() {
    if !shipped() {
        println!("skipped: the shipped lesson 04, 05 and 06 models are missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let args = [
        "--quick",
        "--cfg-scales",
        "1,3",
        "--classifier-scales",
        "0,4",
        "--clip-scales",
        "4",
        "--threshold-scales",
        "10",
    ];
    assert_ok(&run_lesson(BIN, &[&args[..], &["--out", d]].concat()));
    assert_files(
        dir.path(),
        &[
            "accuracy_by_timestep.png",
            "guidance_comparison.png",
            "guidance_samples.png",
            "thresholding.png",
            "thresholding_samples.png",
            "loss.png",
            "loss.csv",
            "metrics.json",
            "results.md",
            "run.json",
        ],
    );
    let m = metrics(dir.path());
    let scales =
        |key: &str| -> Vec<f64> { m[key].as_array().unwrap().iter().map(|r| r["scale"].as_f64().unwrap()).collect() };
    assert_eq!(scales("classifier_free"), [1.0, 3.0]);
    assert_eq!(scales("classifier_guidance"), [0.0, 4.0]);
    assert_eq!(scales("clip_guidance"), [4.0]);
    for row in m["classifier_free"].as_array().unwrap().iter().chain(m["clip_guidance"].as_array().unwrap()) {
        let acc = row["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc) && row["samples"]["fd_over_floor"].as_f64().unwrap().is_finite());
    }
    // none, static and the two default percentiles at w = 10
    let t = m["thresholding"].as_array().unwrap();
    let names: Vec<&str> = t.iter().map(|r| r["threshold"].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "static", "dynamic (p = 0.995)", "dynamic (p = 0.95)"]);
    for r in t {
        let s = r["ink_saturation"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&s), "{s}");
    }
    // the noise-aware readers are measured from t = 0 to the last timestep
    let by_t = m["accuracy_by_timestep"].as_array().unwrap();
    assert_eq!(by_t.len(), 3);
    assert_eq!(by_t[0]["points"].as_array().unwrap().len(), 11);
    let results = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    for anchor in ["comparison", "matched", "thresholding", "accuracy_by_timestep"] {
        assert!(results.contains(&format!("<!-- ANCHOR: {anchor} -->")), "{anchor}");
    }
}

#[test]
fn bad_flags_exit_with_a_readable_message() {
    assert_user_error(&run_lesson(BIN, &["--quick", "--classifier-scales", "1,x"]), "--classifier-scales");
    assert_user_error(&run_lesson(BIN, &["--quick", "--percentiles", "1.5"]), "--percentiles");
    assert_user_error(&run_lesson(BIN, &["--quick", "--num-samples", "5"]), "--num-samples");
    assert_user_error(&run_lesson(BIN, &["--quick", "--clip-images", "1"]), "--clip-images");
    assert_user_error(&run_lesson(BIN, &["--quick", "--num-samples", "25"]), "multiple of 10");
    assert_user_error(&run_lesson(BIN, &["--quick", "--clip-images", "64"]), "lower --batch");
}
