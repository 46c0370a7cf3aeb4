//! Lesson 12 end to end: `--quick` fine-tunes lesson 06's shipped pipeline by DreamBooth, LoRA and textual
//! inversion and grades each; the files it writes follow kohya's and diffusers' layouts and round-trip through
//! `lesson12 sample` (`--lora FILE:W`, `<lora:NAME:W>` with `--lora-dir`, `--embedding`); a file for another model is
//! refused by name.
mod common;
use common::*;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_lesson12");

#[test]
fn quick_run_fine_tunes_grades_and_its_files_load() {
    if !Path::new(env!("CARGO_MANIFEST_DIR")).join("data/lesson06/pipeline.json").exists() {
        println!("skipped: no shipped lesson 06 pipeline");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_ok(&run_lesson(BIN, &["--quick", "--ranks", "1,4", "--out", d]));
    assert_files(
        dir.path(),
        &[
            "concept.png",
            "style.png",
            "training_images.png",
            "dreambooth.safetensors",
            "lora_r4_prior.safetensors",
            "locon_r4_prior.safetensors",
            "ti_2.safetensors",
            "outlined_locon_r4.safetensors",
            "metrics.json",
            "results.md",
        ],
    );
    let m = metrics(dir.path());
    let rows = m["rows"].as_array().unwrap();
    // frozen, DreamBooth ×2, LoRA r4 without prior, LoCon r4, ranks 1 and 4 with, textual inversion
    assert_eq!(rows.len(), 8);
    for r in rows {
        for key in ["fidelity", "drift", "read_as_seven", "plain_crossbar"] {
            let v = r["grade"][key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} = {v} in {r}");
        }
    }
    assert_eq!(rows[0]["grade"]["drift"].as_f64(), Some(0.0), "the frozen model drifts from nothing");
    // the LoRA file is kohya's: every key lora_unet_<path>.{lora_down.weight, lora_up.weight, alpha}
    let lora = dir.path().join("lora_r4_prior.safetensors");
    let tensors = tch::Tensor::read_safetensors(&lora).unwrap();
    assert!(tensors.iter().all(|(k, _)| k.starts_with("lora_unet_")
        && (k.ends_with(".lora_down.weight") || k.ends_with(".lora_up.weight") || k.ends_with(".alpha"))));
    assert!(tensors
        .iter()
        .any(|(k, _)| k == "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight"));
    let embedding = tch::Tensor::read_safetensors(dir.path().join("ti_2.safetensors")).unwrap();
    assert_eq!(embedding.len(), 1);
    assert_eq!((embedding[0].0.as_str(), embedding[0].1.size()[0]), ("sks", 2));

    // sample with the files, by flag and by the prompt syntax
    let s = dir.path().join("samples");
    let sample = |extra: &[&str]| {
        let base = ["sample", "--num", "2", "--steps", "3", "--out", s.to_str().unwrap()];
        run_lesson(BIN, &[&base[..], extra].concat())
    };
    let (lora, emb) = (lora.to_str().unwrap(), dir.path().join("ti_2.safetensors"));
    assert_ok(&sample(&["--prompt", "a sks seven", "--lora", &format!("{lora}:0.8")]));
    assert_grayscale_digits(&s, 2);
    assert_ok(&sample(&["--prompt", "a sks seven", "--embedding", emb.to_str().unwrap()]));
    assert_ok(&sample(&["--prompt", "a seven <lora:outlined_locon_r4:0.5>", "--lora-dir", d]));
    assert_user_error(&sample(&["--prompt", "a seven <lora:missing:1>", "--lora-dir", d]), "missing");
    // a LoRA for another network (SD 1.5's module names) names the first key it cannot place
    let foreign = dir.path().join("foreign.safetensors");
    let t = tch::Tensor::zeros([4, 320], (tch::Kind::Float, tch::Device::Cpu));
    tch::Tensor::write_safetensors(
        &[
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                t.shallow_clone(),
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
                t.tr().contiguous(),
            ),
        ],
        &foreign,
    )
    .unwrap();
    assert_user_error(
        &sample(&["--prompt", "a seven", "--lora", foreign.to_str().unwrap()]),
        "lora_unet_down_blocks_0",
    );
}

#[test]
fn bad_flags_exit_with_a_readable_message() {
    assert_user_error(&run_lesson(BIN, &["--quick", "--ranks", "1,x"]), "--ranks");
    assert_user_error(&run_lesson(BIN, &["--quick", "--batch", "0"]), "--batch");
    assert_user_error(
        &run_lesson(BIN, &["sample", "--prompt", "a seven", "--lora", "/nonexistent.safetensors"]),
        "nonexistent",
    );
}
