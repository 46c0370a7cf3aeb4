//! Lesson 02 end to end: `--quick` writes its figures and metrics, annealed Langevin beats plain Langevin on the
//! mode weights, and a wrong data directory is an error, not a panic.
mod common;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_lesson02");

#[test]
fn quick_run_writes_outputs_and_annealing_fixes_the_mode_weights() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("none.safetensors");
    let out = run_lesson(
        BIN,
        &["--quick", "--out", dir.path().to_str().unwrap(), "--toy-checkpoint", ckpt.to_str().unwrap()],
    );
    assert_ok(&out);
    assert_files(
        dir.path(),
        &[
            "samples_2d.png",
            "trajectories.png",
            "mode_weights.png",
            "loss.png",
            "loss.csv",
            "metrics.json",
            "mnist_samples.png",
            "mnist_annealing.png",
            "ncsn_mnist.safetensors",
        ],
    );
    let m = metrics(dir.path());
    let plain = m["mode_weight_error_plain"].as_f64().unwrap();
    let annealed = m["mode_weight_error_annealed"].as_f64().unwrap();
    assert!(plain > 0.2 && annealed < 0.1, "plain {plain}, annealed {annealed}");
    assert!(m["energy_distance_annealed"].as_f64().unwrap() < m["energy_distance_plain"].as_f64().unwrap());
    assert_eq!(m["slow_mixing_fraction_escaped"].as_f64().unwrap(), 0.0);
    assert_eq!(m["mnist"]["test_dsm_loss_per_sigma"].as_array().unwrap().len(), 10);
}

#[test]
fn a_missing_mnist_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let out = run_lesson(
        BIN,
        &[
            "--quick",
            "--steps-per-level",
            "2",
            "--out",
            dir.path().to_str().unwrap(),
            "--data-dir",
            empty.path().to_str().unwrap(),
        ],
    );
    assert_user_error(&out, "train-images-idx3-ubyte.gz not found");
    assert_user_error(&run_lesson(BIN, &["--mnist-eps", "abc"]), "--mnist-eps");
}
