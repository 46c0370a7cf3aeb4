//! Lesson 13 end to end: `--quick` makes Canny hints, trains a ControlNet for lesson 06's shipped pipeline, measures
//! edge fidelity and prompt accuracy against the control weight and during training, and `sample` draws with the
//! ControlNet it saved, from an edge map or from a digit; bad flags are refused with a message.
mod common;
use common::*;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_lesson13");

#[test]
fn quick_run_trains_measures_and_samples() {
    if !Path::new(env!("CARGO_MANIFEST_DIR")).join("data/lesson06/pipeline.json").exists() {
        println!("skipped: no shipped lesson 06 pipeline");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_ok(&run_lesson(BIN, &["--quick", "--scales", "0,1", "--out", d]));
    assert_files(
        dir.path(),
        &[
            "control_by_step.png",
            "control_scale.png",
            "control_samples.png",
            "control_disagreement.png",
            "loss.png",
            "controlnet.safetensors",
            "controlnet.json",
            "metrics.json",
            "results.md",
        ],
    );
    let m = metrics(dir.path());
    let sweep = m["sweep"].as_array().unwrap();
    let modes: Vec<(f64, bool)> =
        sweep.iter().map(|r| (r["scale"].as_f64().unwrap(), r["guess_mode"].as_bool().unwrap())).collect();
    assert_eq!(modes, [(0.0, false), (1.0, false), (1.0, true)]);
    for r in sweep {
        let (f1, acc) = (r["grade"]["fidelity"].as_f64().unwrap(), r["grade"]["accuracy"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&f1) && (0.0..=1.0).contains(&acc), "{r}");
    }
    assert_eq!(m["baseline_fidelity"], sweep[0]["grade"]["fidelity"]);
    let steps: Vec<i64> = m["by_step"].as_array().unwrap().iter().map(|s| s["step"].as_i64().unwrap()).collect();
    assert_eq!(steps, [0, 10, 19]);
    assert_eq!(m["disagreement"].as_array().unwrap().len(), 3);

    // sample from a digit (Canny first) and from an edge map, with the ControlNet of this run
    let digit = dir.path().join("digit.png");
    let img = tch::Tensor::zeros([1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
    let _ = img.narrow(1, 6, 16).narrow(2, 12, 4).fill_(1.0); // a "1"
    scratch_diffusion::data::png::write_png_gray(&digit, &img).unwrap();
    let net = dir.path().join("controlnet.safetensors");
    let (net, digit) = (net.to_str().unwrap(), digit.to_str().unwrap());
    let s = dir.path().join("samples");
    let sample = |extra: &[&str]| {
        let base = ["sample", "--prompt", "a one", "--num", "2", "--steps", "3", "--controlnet", net];
        run_lesson(BIN, &[&base[..], &["--out", s.to_str().unwrap()], extra].concat())
    };
    assert_ok(&sample(&["--hint-from", digit]));
    assert_grayscale_digits(&s, 2);
    assert_ok(&sample(&["--hint", digit, "--guess-mode", "--control-start", "0.2", "--control-end", "0.8"]));
    assert_user_error(&sample(&[]), "--hint");
    assert_user_error(&sample(&["--hint", digit, "--control-start", "0.9", "--control-end", "0.1"]), "--control-start");
    assert_user_error(&sample(&["--hint", "/nonexistent.png"]), "nonexistent");
    assert_user_error(&sample(&["--hint", digit, "--negative", "a 7"]), "--negative");
    let small = dir.path().join("small.png");
    scratch_diffusion::data::png::write_png_gray(
        &small,
        &tch::Tensor::zeros([1, 20, 20], (tch::Kind::Float, tch::Device::Cpu)),
    )
    .unwrap();
    assert_user_error(&sample(&["--hint", small.to_str().unwrap()]), "give a 28×28 PNG");
    assert_user_error(&sample(&["--hint", digit, "--num", "300"]), "--num");
}

#[test]
fn bad_flags_exit_with_a_readable_message() {
    assert_user_error(&run_lesson(BIN, &["--quick", "--scales", "1,x"]), "--scales");
    assert_user_error(&run_lesson(BIN, &["--quick", "--scales=-1"]), "--scales");
    assert_user_error(&run_lesson(BIN, &["--quick", "--train-images", "8"]), "lower --batch");
    let missing = ["sample", "--prompt", "7", "--hint", "x.png", "--controlnet", "/nonexistent/c.safetensors"];
    assert_user_error(&run_lesson(BIN, &missing), "no ControlNet at /nonexistent/c.safetensors");
}
