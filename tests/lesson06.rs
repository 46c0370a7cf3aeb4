//! Lesson 06 end to end: `--quick` trains the whole pipeline and writes its figures, metrics and weights; `sample`
//! draws 28×28 grayscale PNGs from saved weights (the quick run's, and the shipped ones when they are there); bad
//! prompts and bad flags exit with a one-line message.
mod common;
use common::*;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_lesson06");

#[test]
fn quick_run_writes_figures_and_weights_that_sample_reads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let args = ["--quick", "--steps", "10", "--clip-steps", "5", "--eval-samples", "2", "--sample-steps", "3"];
    assert_ok(&run_lesson(BIN, &[&args[..], &["--sweep", "0,3", "--out", d]].concat()));
    assert_files(
        dir.path(),
        &[
            "loss.png",
            "prompt_samples.png",
            "attribute_control.png",
            "guidance_sweep.png",
            "cross_attention.png",
            "metrics.json",
            "weights/pipeline.json",
            "weights/merges.txt",
            "weights/text_encoder.safetensors",
            "weights/unet.safetensors",
            "weights/attribute_bins.json",
        ],
    );
    let m = metrics(dir.path());
    assert_eq!((m["train_steps"].as_i64(), m["clip"]["steps"].as_i64()), (Some(10), Some(5)));
    assert!(m["train_seconds_total"].as_f64().unwrap() > 0.0 && m["parameters"].as_i64().unwrap() > 0);
    assert_eq!(m["network"]["cross_attention_dim"], m["clip"]["config"]["text"]["hidden_size"]);
    assert_eq!(m["tokenizer"]["context_len"].as_i64(), Some(40));
    assert_eq!(m["captions"], "varied");
    // issue 18: held-out phrasings graded for the digit (3 templates × 2 forms × 10 digits) and for the attributes
    assert_eq!(m["held_out_prompt_accuracy"]["per_prompt"].as_array().unwrap().len(), 60);
    assert_eq!(m["held_out_attributes"]["pairs"].as_array().unwrap().len(), 30);
    assert!(dir.path().join("held_out_samples.png").exists());
    let per_digit = m["prompt_accuracy"]["per_digit"].as_array().unwrap();
    assert!(per_digit.len() == 10 && per_digit.iter().all(|a| (0.0..=1.0).contains(&a.as_f64().unwrap())));
    assert_eq!(m["prompt_accuracy"]["per_prompt"].as_array().unwrap().len(), 50);
    assert_eq!(m["attributes"]["pairs"].as_array().unwrap().len(), 30);
    assert_eq!(m["guidance_sweep"].as_array().unwrap().len(), 2);
    assert!(m["samples"]["fd_over_floor"].as_f64().unwrap().is_finite());

    // sampling from the run's weights: free text, any case, a word in a script no caption has, punctuation, a
    // negative prompt (English words are pieces the varied captions' distractor words trained, so none is unknown)
    let (w, s) = (dir.path().join("weights"), dir.path().join("samples"));
    let (w, s) = (w.to_str().unwrap(), s.to_str().unwrap());
    let sample = |extra: &[&str]| run_lesson(BIN, &[&["sample", "--weights", w, "--out", s][..], extra].concat());
    let out = sample(&["--prompt", "A BOLD 7, пожалуйста!", "--negative", "a thin 7", "--num", "3", "--steps", "3"]);
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"пожалуйста\""), "a note names the unknown word");
    assert_grayscale_digits(Path::new(s), 3);
    // issue 18: a prompt naming no digit, or two, is drawn with a note saying what to expect
    let says = |prompt: &str, note: &str| {
        let out = sample(&["--prompt", prompt, "--num", "1", "--steps", "2"]);
        assert_ok(&out);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(note),
            "{prompt}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    let one = sample(&["--prompt", "a bold one", "--num", "1", "--steps", "2"]);
    assert!(!String::from_utf8_lossy(&one.stdout).contains("names"), "one digit named: no note");
    says("a bold", "names no digit");
    // issue 18: `tokens` shows how the tokenizer reads a prompt, and which tokens no caption had
    let tokens = run_lesson(BIN, &["tokens", "--weights", w, "--prompt", "Draw the digit 2, пожалуйста."]);
    assert_ok(&tokens);
    let text = String::from_utf8_lossy(&tokens.stdout);
    assert!(text.contains("\"<start>\"") && text.contains("never in a training caption"), "{text}");
    says("3 and 5", "names 2 digits (3, 5)");
    // `eval` grades a saved pipeline as training does, on all 64 held-out templates
    let e = dir.path().join("eval");
    let eval = ["eval", "--weights", w, "--out", e.to_str().unwrap(), "--eval-samples", "2", "--sample-steps", "2"];
    assert_ok(&run_lesson(BIN, &[&eval[..], &["--sweep", "2"]].concat()));
    let graded = metrics(&e);
    assert_eq!(graded["held_out_prompt_accuracy"]["per_prompt"].as_array().unwrap().len(), 10 * 128);
    assert_eq!(graded["weights"].as_str(), Some(w));
    assert!(e.join("held_out_samples.png").exists());
    assert_user_error(&sample(&["--prompt", "   "]), "the prompt is empty");
    assert_user_error(&sample(&["--prompt", "зебра переход"]), "\"зебра\", \"переход\"");
    assert_user_error(&sample(&["--prompt", &"7 ".repeat(50)]), "at most 38");
    assert_user_error(&sample(&["--prompt", "7", "--negative", "зебра"]), "negative prompt");

    // --resume: the mini-CLIP run is complete and is reloaded, the UNet continues from its checkpoint at step 10
    let resumed = ["--quick", "--steps", "12", "--clip-steps", "5", "--eval-samples", "2", "--sample-steps", "3"];
    let resumed = [&resumed[..], &["--sweep", "3", "--resume", "--out", d]].concat();
    assert_ok(&run_lesson(BIN, &resumed));
    let m = metrics(dir.path());
    assert_eq!((m["train_steps"].as_i64(), m["resumed_from"].as_i64()), (Some(12), Some(10)));
}

#[test]
fn sample_with_the_shipped_weights_writes_digits() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/lesson06/pipeline.json");
    if !shipped.exists() {
        println!("skipped: no shipped weights in data/lesson06 (make them with `./run.sh lesson 06 --ship`)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run_lesson(
        BIN,
        &["sample", "--prompt", "seven", "--num", "2", "--steps", "5", "--out", dir.path().to_str().unwrap()],
    );
    assert_ok(&out);
    assert_grayscale_digits(dir.path(), 2);
    // Imagen's dynamic thresholding at a large scale, and no thresholding, are options of the same command
    for threshold in [&["--threshold", "dynamic", "--threshold-percentile", "0.95"][..], &["--threshold", "none"]] {
        let d = dir.path().join(threshold[1]);
        let args = [&["sample", "--prompt", "seven", "--num", "2", "--steps", "5", "--guidance", "10"][..], threshold];
        assert_ok(&run_lesson(BIN, &[&args.concat()[..], &["--out", d.to_str().unwrap()]].concat()));
        assert_grayscale_digits(&d, 2);
    }
}

#[test]
fn bad_flags_exit_with_a_readable_message() {
    assert_user_error(&run_lesson(BIN, &["--quick", "--p-uncond", "1.5"]), "--p-uncond");
    assert_user_error(&run_lesson(BIN, &["--quick", "--sweep", "1,x"]), "--sweep");
    assert_user_error(&run_lesson(BIN, &["sample", "--num", "2"]), "--prompt");
    assert_user_error(&run_lesson(BIN, &["sample", "--prompt", "7", "--num", "0"]), "--num");
    assert_user_error(&run_lesson(BIN, &["sample", "--prompt", "7", "--threshold", "soft"]), "--threshold");
    assert_user_error(
        &run_lesson(BIN, &["sample", "--prompt", "7", "--threshold-percentile", "1.5"]),
        "--threshold-percentile",
    );
    let missing = run_lesson(BIN, &["sample", "--prompt", "7", "--weights", "/nonexistent/lesson06"]);
    assert_user_error(&missing, "no usable text-to-image weights in /nonexistent/lesson06");
}
