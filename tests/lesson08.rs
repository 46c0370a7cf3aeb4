//! Lesson 08 end to end: `--quick` trains the autoencoder and the latent UNet behind the shipped lesson 06 text
//! encoder and writes its figures, metrics and weights; `sample`, `img2img` and `inpaint` read PNGs and write 28×28
//! grayscale PNGs from saved weights; bad inputs exit with a one-line message that names the problem.
mod common;
use common::*;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_lesson08");

#[test]
fn quick_run_writes_figures_and_weights_that_the_subcommands_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let args = ["--quick", "--vae-steps", "8", "--steps", "10", "--eval-samples", "2", "--sample-steps", "3"];
    assert_ok(&run_lesson(BIN, &[&args[..], &["--out", d]].concat()));
    assert_files(
        dir.path(),
        &[
            "loss.png",
            "vae_terms.csv",
            "reconstructions.png",
            "prompt_samples.png",
            "attribute_control.png",
            "guidance_sweep.png",
            "img2img.png",
            "inpainting.png",
            "metrics.json",
            "weights/pipeline.json",
            "weights/merges.txt",
            "weights/text_encoder.safetensors",
            "weights/unet.safetensors",
            "weights/vae.safetensors",
            "weights/vae.json",
        ],
    );
    let m = metrics(dir.path());
    assert_eq!((m["vae"]["steps"].as_i64(), m["unet"]["steps"].as_i64()), (Some(8), Some(10)));
    let psnr = m["vae"]["psnr_db"].as_f64().unwrap();
    assert!(psnr.is_finite() && psnr > 0.0, "PSNR {psnr}");
    let scale = m["vae"]["scaling_factor"].as_f64().unwrap();
    assert!(scale.is_finite() && scale > 0.0);
    assert_eq!(m["vae"]["config"]["scaling_factor"].as_f64(), Some(scale), "the measured scale is saved with the VAE");
    assert_eq!(m["prompt_accuracy"]["per_prompt"].as_array().unwrap().len(), 50);
    assert_eq!(m["img2img"].as_array().unwrap().len(), 6);
    assert_eq!(m["inpainting"]["unmasked_mae_pasted"].as_f64(), Some(0.0), "pasting keeps the unmasked pixels");
    assert!(m["speed"]["speedup"].as_f64().unwrap() > 0.0);

    // the subcommands, on the run's weights, each into its own folder
    let w = dir.path().join("weights");
    let w = w.to_str().unwrap();
    let out = |cmd: &str| dir.path().join(cmd);
    let draw = |cmd: &str, extra: &[&str]| {
        let o = out(cmd);
        run_lesson(BIN, &[&[cmd, "--weights", w, "--out", o.to_str().unwrap(), "--steps", "3"][..], extra].concat())
    };
    assert_ok(&draw("sample", &["--prompt", "A BOLD 7, please!", "--num", "3", "--sampler", "DPM++ 2M Karras"]));
    assert_grayscale_digits(&out("sample"), 3);
    let copy = dir.path().join("input.png");
    std::fs::copy(out("sample").join("sample_000.png"), &copy).unwrap();
    let input = copy.to_str().unwrap();
    assert_ok(&draw("img2img", &["--image", input, "--prompt", "three", "--strength", "0.6", "--num", "2"]));
    assert_grayscale_digits(&out("img2img"), 2);
    assert_ok(&draw("inpaint", &["--image", input, "--mask", input, "--prompt", "three", "--num", "2"]));
    assert_grayscale_digits(&out("inpaint"), 2);
    // `eval` grades the saved pipeline as training does, and its autoencoder on the test digits
    let e = out("eval");
    let eval = ["eval", "--weights", w, "--out", e.to_str().unwrap(), "--eval-samples", "2", "--sample-steps", "2"];
    assert_ok(&run_lesson(BIN, &[&eval[..], &["--sweep", "2"]].concat()));
    assert_eq!(metrics(&e)["held_out_attributes"]["pairs"].as_array().unwrap().len(), 30);
    let autoencoder: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(e.join("autoencoder.json")).unwrap()).unwrap();
    assert!(autoencoder["posterior_sigma_mean"].as_f64().unwrap() > 0.0, "{autoencoder}");

    // bad inputs: one line, naming the problem
    let grid = out("sample").join("grid.png");
    assert_user_error(
        &draw("img2img", &["--image", "/nonexistent.png", "--prompt", "3"]),
        "cannot open /nonexistent.png",
    );
    assert_user_error(&draw("img2img", &["--image", grid.to_str().unwrap(), "--prompt", "3"]), "28×28");
    assert_user_error(&draw("inpaint", &["--image", input, "--mask", grid.to_str().unwrap(), "--prompt", "3"]), "mask");
    assert_user_error(&draw("img2img", &["--image", input, "--prompt", "3", "--strength", "1.5"]), "--strength");
    assert_user_error(&draw("sample", &["--prompt", "зебра"]), "\"зебра\"");
    assert_user_error(&draw("sample", &["--prompt", "7", "--sampler", "magic"]), "unknown sampler");
    assert_user_error(&draw("sample", &["--prompt", "7", "--sampler", "pc"]), "predictor");

    // --resume: the finished autoencoder is reloaded, the latent UNet continues from its checkpoint at step 10
    let resumed = ["--quick", "--vae-steps", "8", "--steps", "12", "--eval-samples", "2", "--sample-steps", "3"];
    assert_ok(&run_lesson(BIN, &[&resumed[..], &["--resume", "--out", d]].concat()));
    let m = metrics(dir.path());
    assert_eq!((m["unet"]["steps"].as_i64(), m["unet"]["resumed_from"].as_i64()), (Some(12), Some(10)));
    assert_eq!(m["vae"]["psnr_db"].as_f64(), Some(psnr), "the same autoencoder, reloaded");
}

#[test]
fn sample_with_the_shipped_weights_writes_digits() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/lesson08/pipeline.json");
    if !shipped.exists() {
        println!("skipped: no shipped weights in data/lesson08 (make them with `./run.sh lesson 08 --ship`)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run_lesson(BIN, &["sample", "--prompt", "seven", "--num", "2", "--out", dir.path().to_str().unwrap()]);
    assert_ok(&out);
    assert_grayscale_digits(dir.path(), 2);
}

#[test]
fn missing_weights_and_flags_exit_with_a_readable_message() {
    let missing = run_lesson(BIN, &["sample", "--prompt", "7", "--weights", "/nonexistent/lesson08"]);
    assert_user_error(&missing, "no usable latent-diffusion weights in /nonexistent/lesson08");
    assert_user_error(&run_lesson(BIN, &["inpaint", "--prompt", "7", "--image", "x.png"]), "--mask");
    assert_user_error(&run_lesson(BIN, &["--quick", "--kl-weight", "-1"]), "--kl-weight");
}
