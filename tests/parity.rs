//! Parity with the reference implementations: `tests/parity/make_reference.py` builds diffusers' `AutoencoderKL` and
//! `UNet2DConditionModel` and transformers' `CLIPTextModel` from tiny SD-shaped configs with random weights and
//! writes the weights and their outputs for fixed inputs; our `AutoencoderKl`, `UNet` and `TextEncoder` load the
//! same files (the references' names, no key map) and must agree to 1e-4 in f32. Our CLIP tokenizer, with the
//! vocabulary in data/clip, must give OpenAI's `simple_tokenizer` ids on `tests/parity/tokenizer_corpus.txt`. A whole
//! `StableDiffusionPipeline` of SD 1.5's layout shrunk, saved as a diffusers folder, must load into our pipeline and
//! give the same 4-step txt2img from the same seeds. The
//! tests skip, saying why, when Python or a reference is missing (`./run.sh test` installs them into .venv).
use scratch_diffusion::checkpoint;
use scratch_diffusion::nn::controlnet::{ControlNet, ControlNetConfig, ControlScale};
use scratch_diffusion::nn::text_encoder::{Activation, TextEncoder, TextEncoderConfig};
use scratch_diffusion::nn::unet::{UNet, UNetConfig};
use scratch_diffusion::nn::vae::{AutoencoderKl, VaeConfig};
use scratch_diffusion::text::Bpe;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{nn::VarStore, Device, Tensor};

/// The venv's python (SCRATCH_DIFFUSION_VENV or .venv, as run.sh), else python3 on the PATH.
fn python() -> PathBuf {
    let p = scratch_diffusion::cli::venv_python();
    if p.exists() {
        p
    } else {
        PathBuf::from("python3")
    }
}

/// Runs the reference script once per test run into a folder under cargo's target tmpdir (the tests share it);
/// None (and a message) when diffusers is not available.
fn reference() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let py = python();
        let has = Command::new(&py).args(["-c", "import diffusers, transformers, safetensors"]).output();
        if !matches!(&has, Ok(o) if o.status.success()) {
            println!(
                "skipped: {} cannot import diffusers and transformers (./run.sh test installs them)",
                py.display()
            );
            return None;
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("parity-reference");
        let _ = std::fs::remove_dir_all(&dir);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/make_reference.py");
        let out = Command::new(&py).arg(script).arg(&dir).output().expect("python runs");
        assert!(out.status.success(), "make_reference.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
        Some(dir)
    })
    .as_deref()
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// Loads the reference's `NAME.safetensors` into `vs` (our model already built on it) and returns its
/// `NAME_reference.safetensors`. Every tensor of the file must be used: the names match both ways.
fn load_reference(dir: &Path, name: &str, vs: &mut VarStore) -> HashMap<String, Tensor> {
    let weights = dir.join(format!("{name}.safetensors"));
    checkpoint::load(vs, &weights)
        .unwrap_or_else(|e| panic!("{name}: the reference's weights load under our names: {e:#}"));
    assert_eq!(read(&weights).len(), vs.variables().len(), "{name}: the file and our model have the same tensors");
    read(&dir.join(format!("{name}_reference.safetensors")))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn our_autoencoder_matches_diffusers_autoencoder_kl() {
    let Some(dir) = reference() else { return };
    tch::set_num_threads(1);
    // the config of make_reference.py
    let config = VaeConfig {
        in_channels: 3,
        out_channels: 3,
        block_out_channels: vec![8, 16],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 4,
        scaling_factor: 1.0,
    };
    let mut vs = VarStore::new(Device::Cpu);
    let vae = AutoencoderKl::new(vs.root(), config);
    let r = load_reference(dir, "vae", &mut vs);
    tch::no_grad(|| {
        let q = vae.encode(&r["x"]);
        let moments = Tensor::cat(&[&q.mean, &q.logvar], 1);
        let (de, dd) = (max_diff(&moments, &r["moments"]), max_diff(&vae.decode(&r["z"]), &r["decoded"]));
        println!("max |ours − diffusers|: encoder moments {de:.2e}, decoder {dd:.2e}");
        assert!(de <= 1e-4, "encoder moments differ by {de}");
        assert!(dd <= 1e-4, "decoder output differs by {dd}");
    });
}

#[test]
fn our_unet_matches_diffusers_unet_2d_condition_model() {
    let Some(dir) = reference() else { return };
    tch::set_num_threads(1);
    let mut vs = VarStore::new(Device::Cpu);
    let unet = UNet::new(vs.root(), reference_unet_config());
    let r = load_reference(dir, "unet", &mut vs);
    let eps = tch::no_grad(|| unet.forward_cond(&r["sample"], &r["timestep"], Some(&r["context"]), None, false));
    let d = max_diff(&eps, &r["eps"]);
    println!("max |ours − diffusers|: UNet output {d:.2e}");
    assert!(d <= 1e-4, "UNet output differs by {d}");
}

/// UNET_CONFIG of make_reference.py: CrossAttnDownBlock2D + DownBlock2D, UpBlock2D + CrossAttnUpBlock2D.
fn reference_unet_config() -> UNetConfig {
    UNetConfig {
        in_channels: 4,
        out_channels: 4,
        block_out_channels: vec![64, 128],
        layers_per_block: 1,
        attention: vec![true, false],
        head_dim: 32,
        dropout: 0.0,
        cross_attention_dim: Some(32),
        attention_heads: Some(2),
        pooled_context_embedding: false,
    }
}

/// Our ControlNet reads diffusers' `ControlNetModel` under its own names (a two-stage hint encoder with stride 2, RGB
/// hints twice the latent size) and gives the same residuals, at scale 1 and in guess mode at 0.7, and the UNet with
/// them added gives the same ε̂ as diffusers' with `down_block_additional_residuals`.
#[test]
fn our_controlnet_matches_diffusers_controlnet_model() {
    let Some(dir) = reference() else { return };
    tch::set_num_threads(1);
    let mut unet_vs = VarStore::new(Device::Cpu);
    let unet = UNet::new(unet_vs.root(), reference_unet_config());
    load_reference(dir, "unet", &mut unet_vs);
    let config = ControlNetConfig {
        unet: reference_unet_config(),
        hint_channels: 3,
        hint_embedding_channels: vec![16, 32],
        hint_stride: 2,
    };
    let mut vs = VarStore::new(Device::Cpu);
    let control = ControlNet::new(vs.root(), config);
    let r = load_reference(dir, "controlnet", &mut vs);
    let cond = (Some(&r["context"]), None);
    for (prefix, scale) in [("", 1.0, false), ("guess_", 0.7, true)]
        .map(|(p, s, g)| (p, ControlScale { conditioning_scale: s, guess_mode: g }))
    {
        let res = tch::no_grad(|| control.residuals(&r["sample"], &r["timestep"], cond, &r["hint"], scale, false));
        for (i, d) in res.down.iter().enumerate() {
            let want = &r[&format!("{prefix}down_{i}")];
            let diff = max_diff(d, want) / want.abs().max().double_value(&[]).max(1e-6);
            assert!(diff <= 1e-5, "{prefix}down_{i} differs by {diff} of its size");
        }
        let want = &r[&format!("{prefix}mid")];
        let diff = max_diff(&res.mid, want) / want.abs().max().double_value(&[]).max(1e-6);
        assert!(diff <= 1e-5, "{prefix}mid differs by {diff} of its size");
        if prefix.is_empty() {
            let eps = tch::no_grad(|| unet.forward_controlled(&r["sample"], &r["timestep"], cond, &res, false));
            let d = max_diff(&eps, &r["eps_controlled"]);
            println!("max |ours − diffusers|: controlled UNet output {d:.2e}, {} residuals", res.down.len());
            assert!(d <= 1e-4, "the controlled UNet's output differs by {d}");
        }
    }
    // the same network from its diffusers folder, config.json read into our config
    let (_fvs, folder) =
        scratch_diffusion::sd::weights::load_controlnet_diffusers(&dir.join("controlnet-diffusers"), Device::Cpu)
            .unwrap_or_else(|e| panic!("the save_pretrained folder loads: {e:#}"));
    // config.json reads as the network the test built (head_dim is unused where the number of heads is given)
    let unet = UNetConfig { head_dim: control.config.unet.head_dim, ..folder.config.unet.clone() };
    assert_eq!(ControlNetConfig { unet, ..folder.config.clone() }, control.config);
    let scale = ControlScale { conditioning_scale: 1.0, guess_mode: false };
    let a = tch::no_grad(|| folder.residuals(&r["sample"], &r["timestep"], cond, &r["hint"], scale, false));
    let b = tch::no_grad(|| control.residuals(&r["sample"], &r["timestep"], cond, &r["hint"], scale, false));
    assert!(a.mid.equal(&b.mid) && a.down.iter().zip(&b.down).all(|(x, y)| x.equal(y)));
}

#[test]
fn our_text_encoder_matches_transformers_clip_text_model() {
    let Some(dir) = reference() else { return };
    tch::set_num_threads(1);
    // TEXT_CONFIG of make_reference.py
    let config = TextEncoderConfig {
        vocab_size: 99,
        max_position_embeddings: 16,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        hidden_act: Activation::QuickGelu,
        causal: true,
        layer_norm_eps: 1e-5,
    };
    // transformers 4 saves CLIPTextModel under `text_model.`, transformers 5 without it: ours goes where the file has it
    let prefixed = read(&dir.join("text_encoder.safetensors")).keys().any(|k| k.starts_with("text_model."));
    let mut vs = VarStore::new(Device::Cpu);
    let encoder = TextEncoder::new(if prefixed { vs.root() / "text_model" } else { vs.root() }, config);
    let r = load_reference(dir, "text_encoder", &mut vs);
    let hidden = tch::no_grad(|| encoder.forward(&r["ids"], None));
    let d = max_diff(&hidden, &r["hidden"]);
    println!("max |ours − transformers|: last hidden state {d:.2e}");
    assert!(d <= 1e-4, "text encoder output differs by {d}");
}

#[test]
fn our_tokenizer_matches_openai_simple_tokenizer_on_the_corpus() {
    let Some(dir) = reference() else { return };
    let path = dir.join("tokens.json");
    if !path.exists() {
        println!("skipped: clip-anytorch's simple_tokenizer.py or ftfy is not installed (./run.sh test installs them)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bpe = Bpe::load_clip_vocab_gz(root.join("data/clip/bpe_simple_vocab_16e6.txt.gz")).unwrap();
    assert_eq!(bpe.vocab_size(), 49_408);
    let lines: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(lines.len() >= 16, "the whole corpus was tokenised");
    for line in &lines {
        let text = line["text"].as_str().unwrap();
        let want: Vec<i64> = line["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(bpe.encode(text), want, "token ids of {text:?}");
    }
}

/// The whole pipeline: make_reference.py saves a StableDiffusionPipeline of SD 1.5's layout shrunk as a diffusers
/// folder (tokenizer built from data/clip's vocabulary, SD 1.5's DDIMScheduler config) and runs a 4-step txt2img
/// with a negative prompt and w = 7.5 for seeds 7 and 8. Ours loads the folder (its configs give SdConfig::tiny),
/// draws the same starting noise from the same seeds, and must give the same latents and pixels.
#[test]
fn our_pipeline_matches_diffusers_stable_diffusion_pipeline() {
    use scratch_diffusion::pipelines::stable_diffusion::{GenerateParams, SdSampler, StableDiffusion};
    use scratch_diffusion::sd::SdConfig;
    let Some(dir) = reference() else { return };
    let r = read(&dir.join("pipeline_reference.safetensors"));
    if r.is_empty() {
        println!("skipped: clip-anytorch is not installed, so the reference pipeline has no tokenizer");
        return;
    }
    tch::set_num_threads(1);
    let sd = StableDiffusion::load(&dir.join("tiny-sd"), Device::Cpu).unwrap();
    assert_eq!(sd.models.config, SdConfig::tiny(), "the folder's configs read as our tiny preset");
    // make_reference.py's PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE
    let p = GenerateParams {
        negative_prompt: "blurry, low quality".into(),
        steps: 4,
        cfg_scale: 7.5,
        seed: 7,
        width: 64,
        height: 64,
        sampler: SdSampler::Ddim,
        batch: 2,
        ..GenerateParams::new("a photo of an astronaut riding a horse on mars, 4k")
    };
    let noise = Tensor::cat(&[sd.initial_noise(7, 64, 64), sd.initial_noise(8, 64, 64)], 0);
    assert_eq!(max_diff(&noise, &r["latents"]), 0.0, "seed s draws torch.Generator().manual_seed(s)'s noise");
    let (latents, warnings) = sd.txt2img_latents(&p, &mut |_, _| {}).unwrap();
    assert!(warnings.is_empty());
    let images = sd.decode(&latents).permute([0, 2, 3, 1]); // (B, H, W, 3) as diffusers' "np" output
                                                            // random weights and w = 7.5 make the latents large (|z| up to ~56): they are compared relative to their size
    let scale = r["final_latents"].abs().max().double_value(&[]);
    let (dl, di) = (max_diff(&latents, &r["final_latents"]) / scale, max_diff(&images, &r["images"]));
    println!("max |ours − diffusers|: final latents {dl:.2e} of their largest value ({scale:.1}), images {di:.2e}");
    let inside = r["images"].gt(0.0).logical_and(&r["images"].lt(1.0)).to_kind(tch::Kind::Float).mean(None);
    assert!(inside.double_value(&[]) > 0.5, "most pixels are not clamped, so the comparison sees them");
    assert!(dl <= 1e-5, "final latents differ by {dl} of their size");
    assert!(di <= 1e-4, "images differ by {di}");
}

/// Our Canny against OpenCV's `cv2.Canny(image, 100, 200)` (ControlNet's annotator) on the first 64 MNIST test digits
/// and four synthetic images: the same edge pixels, all of them.
#[test]
fn our_canny_matches_opencv_canny() {
    let Some(dir) = reference() else { return };
    let path = dir.join("canny_reference.safetensors");
    if !path.exists() {
        println!("skipped: make_reference.py wrote no Canny reference (opencv-python-headless is not installed)");
        return;
    }
    let r = read(&path);
    let (images, edges) = (&r["images"], &r["edges"]); // (N, 28, 28) uint8 each
    let (n, h, w) = images.size3().unwrap();
    let (mut differing, mut total) = (0, 0);
    for i in 0..n {
        let pixels = Vec::<u8>::try_from(images.get(i).flatten(0, -1)).unwrap();
        let gray = scratch_diffusion::data::canny::Gray { height: h as usize, width: w as usize, pixels };
        let ours = scratch_diffusion::data::canny::canny(&gray, &scratch_diffusion::data::canny::ANNOTATOR);
        let theirs = Vec::<u8>::try_from(edges.get(i).flatten(0, -1)).unwrap();
        let diff = ours.pixels.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        if diff > 0 {
            println!("image {i}: {diff} pixels differ");
        }
        differing += diff;
        total += theirs.iter().filter(|&&p| p == 255).count();
    }
    println!("OpenCV's Canny: {total} edge pixels over {n} images; ours differs in {differing}");
    assert_eq!(differing, 0, "our Canny differs from OpenCV's in {differing} pixels");
}

/// The reference folder and `NAME_reference.safetensors` of one of make_reference.py's pipeline functions; None (and
/// a message) when the reference has no pipeline.
fn pipeline_reference(name: &str) -> Option<(&'static Path, HashMap<String, Tensor>)> {
    let dir = reference()?;
    let path = dir.join(format!("{name}_reference.safetensors"));
    if !path.exists() {
        println!("skipped: clip-anytorch is not installed, so the reference pipeline has no tokenizer");
        return None;
    }
    tch::set_num_threads(1);
    Some((dir, read(&path)))
}

/// make_reference.py's `sd_files`: the files SD 1.5 users download, made for tiny-sd with random values, and
/// diffusers' outputs with them.
fn sd_files() -> Option<(&'static Path, HashMap<String, Tensor>)> {
    pipeline_reference("sd_files")
}

/// max |a − b| / max |b|.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    max_diff(a, b) / b.abs().max().double_value(&[])
}

const PROMPT: &str = "a photo of an astronaut riding a horse on mars, 4k";
const NEGATIVE: &str = "blurry, low quality";

/// make_reference.py's 4-step DDIM settings (SEED 7, w = 7.5, 64²).
fn reference_params() -> scratch_diffusion::pipelines::stable_diffusion::GenerateParams {
    use scratch_diffusion::pipelines::stable_diffusion::{GenerateParams, SdSampler};
    GenerateParams {
        negative_prompt: NEGATIVE.into(),
        steps: 4,
        cfg_scale: 7.5,
        seed: 7,
        width: 64,
        height: 64,
        sampler: SdSampler::Ddim,
        batch: 1,
        ..GenerateParams::new(PROMPT)
    }
}

/// A kohya-layout LoRA with LoCon convolutions (3×3 resnet convs, a shortcut, the time projection, down- and
/// upsamplers, the 1×1 proj_in/proj_out) on the UNet and the text encoder, loaded by diffusers' `load_lora_weights`
/// and fused at 0.5 (text encoder) and 0.8 (UNet); and the same LoRA as diffusers saves it (PEFT keys, α in the
/// metadata). Ours merges either file: the same text states and UNet output.
#[test]
fn kohya_and_peft_loras_match_diffusers_fused_lora() {
    use scratch_diffusion::pipelines::stable_diffusion::StableDiffusion;
    use scratch_diffusion::sd::lora::{LoraFile, LoraFormat, LoraUse};
    let Some((dir, r)) = sd_files() else { return };
    if !r.contains_key("lora_states") {
        println!("skipped: peft is not installed, so diffusers loads no LoRA (./run.sh test installs it)");
        return;
    }
    for (file, format) in [
        (dir.join("lora_kohya.safetensors"), LoraFormat::Kohya),
        (dir.join("lora-peft/pytorch_lora_weights.safetensors"), LoraFormat::Peft),
    ] {
        let mut sd = StableDiffusion::load(&dir.join("tiny-sd"), Device::Cpu).unwrap();
        let (base, _) = sd.encode_prompt(PROMPT).unwrap();
        assert!(relative(&base, &r["lora_states"]) > 1e-3, "the text encoder's LoRA changes its states");
        let lora = LoraFile::open(&file, &sd.models).unwrap();
        assert_eq!((lora.format, lora.modules.len()), (format, 15), "{}", file.display());
        sd.add_loras(&[LoraUse { path: file.clone(), te: 0.5, unet: 0.8 }], "", None).unwrap();
        let (states, _) = sd.encode_prompt(PROMPT).unwrap();
        let eps = tch::no_grad(|| {
            sd.models.unet.forward_cond(&r["sample"], &r["timestep"], Some(&r["lora_states"]), None, false)
        });
        let (ds, de) = (relative(&states, &r["lora_states"]), relative(&eps, &r["lora_eps"]));
        println!("{}: text states {ds:.2e}, UNet {de:.2e} (relative)", file.display());
        assert!(ds <= 1e-4 && de <= 1e-4, "{}: states {ds}, eps {de}", file.display());
    }
}

/// diffusers' `load_textual_inversion` of a 2-vector diffusers embedding and a kohya one (`emb_params`): the prompt
/// naming both gives the same text states with ours (`--embedding-dir`).
#[test]
fn textual_inversion_matches_diffusers_load_textual_inversion() {
    use scratch_diffusion::pipelines::stable_diffusion::StableDiffusion;
    use scratch_diffusion::sd::embeddings::Embeddings;
    let Some((dir, r)) = sd_files() else { return };
    let mut sd = StableDiffusion::load(&dir.join("tiny-sd"), Device::Cpu).unwrap();
    sd.embeddings = Embeddings::load_dir(&dir.join("embeddings"), sd.models.config.text.hidden_size).unwrap();
    let (states, _) = sd.encode_prompt("a photo of <cat-toy> in tinystyle style").unwrap();
    let (plain, _) = sd.encode_prompt("a photo of cat-toy in a style").unwrap();
    let d = relative(&states, &r["ti_states"]);
    println!("text states with two embeddings: {d:.2e} relative");
    assert!(d <= 1e-5, "{d}");
    assert!(relative(&plain, &r["ti_states"]) > 1e-2, "the embeddings change the states");
}

/// `StableDiffusionControlNetPipeline` with a random `ControlNetModel` (SD's 16/32/96/256 hint encoder): a 4-step
/// image at scale 0.8 for the middle two steps (start 0.25, end 0.75), and in guess mode at 1.0, from the diffusers folder and from the
/// original single file (control_model.* keys, made by inverting diffusers' converter and checked against it).
#[test]
fn controlnet_pipeline_matches_diffusers_from_the_folder_and_the_original_file() {
    use scratch_diffusion::nn::controlnet::ControlScale;
    use scratch_diffusion::pipelines::stable_diffusion::StableDiffusion;
    let Some((dir, r)) = sd_files() else { return };
    for control in [dir.join("controlnet-sd"), dir.join("control_tiny_sd15.safetensors")] {
        for (name, scale, window, guess_mode) in
            [("control_images", 0.8, (0.25, 0.75), false), ("guess_images", 1.0, (0.0, 1.0), true)]
        {
            let mut sd = StableDiffusion::load(&dir.join("tiny-sd"), Device::Cpu).unwrap();
            let scale = ControlScale { conditioning_scale: scale, guess_mode };
            sd.add_control(&control, r["hint"].copy(), "none", scale, window).unwrap();
            let (latents, _) = sd.txt2img_latents(&reference_params(), &mut |_, _| {}).unwrap();
            let images = sd.decode(&latents).permute([0, 2, 3, 1]); // (1, H, W, 3), diffusers' "np"
            let d = max_diff(&images, &r[name]);
            println!("{} {name}: images {d:.2e}", control.display());
            assert!(d <= 1e-4, "{}: {name} differ by {d}", control.display());
        }
    }
}

/// `StableDiffusionImg2ImgPipeline` with its defaults (the VAE posterior sampled with the generator, then the noise;
/// strength 0.75, 4 DDIM steps): the same image from the same seed.
#[test]
fn img2img_matches_diffusers_img2img_pipeline_defaults() {
    use scratch_diffusion::pipelines::stable_diffusion::{Posterior, StableDiffusion};
    let Some((dir, r)) = sd_files() else { return };
    let sd = StableDiffusion::load(&dir.join("tiny-sd"), Device::Cpu).unwrap();
    let p = reference_params();
    let out =
        sd.img2img(&r["img2img_input"], 0.75, Posterior::Sample, &p, &mut |_, _| {}, &mut |_, _, _| Ok(())).unwrap();
    let d = max_diff(&out.images.permute([0, 2, 3, 1]), &r["img2img_images"]);
    let mean =
        sd.img2img(&r["img2img_input"], 0.75, Posterior::Mean, &p, &mut |_, _| {}, &mut |_, _, _| Ok(())).unwrap();
    let d_mean = max_diff(&mean.images.permute([0, 2, 3, 1]), &r["img2img_mean_images"]);
    let apart = max_diff(&r["img2img_mean_images"], &r["img2img_images"]);
    println!("img2img: sampled posterior {d:.2e}, posterior mean {d_mean:.2e} (the two images differ by {apart:.2})");
    assert!(d <= 1e-4, "images differ by {d}");
    assert!(d_mean <= 1e-4, "with the posterior's mean (diffusers' sample_mode=\"argmax\"): {d_mean}");
    assert!(apart > 1e-2, "sampling the posterior matters ({apart})");
}

/// make_reference.py's `fast_path`: LCM, TAESD and the inpainting model on tiny-sd.
fn fast_path() -> Option<(&'static Path, HashMap<String, Tensor>)> {
    pipeline_reference("fast_path")
}

/// diffusers' `AutoencoderTiny` (TAESD's layout, random weights) from its `save_pretrained` folder: the same latents
/// from pixels and the same pixels from latents (diffusers maps [−1, 1] to TAESD's [0, 1] at both ends).
#[test]
fn our_taesd_matches_diffusers_autoencoder_tiny() {
    use scratch_diffusion::sd::weights::load_taesd;
    let Some((dir, r)) = fast_path() else { return };
    let (_, taesd) = load_taesd(&dir.join("taesd-tiny"), Device::Cpu).unwrap();
    let latents = tch::no_grad(|| taesd.encode(&r["taesd_x"]));
    let pixels = tch::no_grad(|| taesd.decode(&r["taesd_z"])) * 2.0 - 1.0;
    let (de, dd) = (relative(&latents, &r["taesd_latents"]), relative(&pixels, &r["taesd_decoded"]));
    println!("TAESD: encode {de:.2e}, decode {dd:.2e} (relative)");
    assert!(de <= 1e-5 && dd <= 1e-5, "encode {de}, decode {dd}");
}

/// `StableDiffusionPipeline` with diffusers' `LCMScheduler` (4 steps, w = 1.5, the starting noise and the re-noising
/// from one generator), decoded by the VAE and by TAESD: the same images.
#[test]
fn lcm_sampling_matches_diffusers_lcm_scheduler_with_the_vae_and_with_taesd() {
    use scratch_diffusion::pipelines::stable_diffusion::{SdSampler, StableDiffusion};
    use scratch_diffusion::sd::weights::load_taesd;
    let Some((dir, r)) = fast_path() else { return };
    let p = scratch_diffusion::pipelines::stable_diffusion::GenerateParams {
        sampler: SdSampler::Lcm,
        cfg_scale: 1.5,
        ..reference_params()
    };
    for (name, taesd) in [("lcm_images", false), ("lcm_taesd_images", true)] {
        let mut sd = StableDiffusion::load(&dir.join("tiny-sd"), Device::Cpu).unwrap();
        if taesd {
            sd.taesd = Some(load_taesd(&dir.join("taesd-tiny"), Device::Cpu).unwrap());
        }
        let out = sd.txt2img(&p, &mut |_, _| {}, &mut |_, _, _| Ok(())).unwrap();
        let d = max_diff(&out.images.permute([0, 2, 3, 1]), &r[name]);
        println!("{name}: {d:.2e}");
        assert!(d <= 1e-4, "{name} differ by {d}");
    }
}

/// `StableDiffusionInpaintPipeline` with a random 9-channel UNet (SD 1.5 inpainting's layout): 4 DDIM steps, w = 7.5,
/// the starting noise and then the masked image's posterior from one generator; the same image.
#[test]
fn inpainting_matches_diffusers_inpaint_pipeline() {
    use scratch_diffusion::pipelines::stable_diffusion::StableDiffusion;
    let Some((dir, r)) = fast_path() else { return };
    let sd = StableDiffusion::load(&dir.join("tiny-sd-inpaint"), Device::Cpu).unwrap();
    assert_eq!(sd.models.config.unet.in_channels, 9);
    let p = reference_params();
    let out = sd.inpaint(&r["inpaint_image"], &r["inpaint_mask"], &p, &mut |_, _| {}, &mut |_, _, _| Ok(())).unwrap();
    let d = max_diff(&out.images.permute([0, 2, 3, 1]), &r["inpaint_images"]);
    println!("inpainting: {d:.2e}");
    assert!(d <= 1e-4, "images differ by {d}");
    let plain = StableDiffusion::load(&dir.join("tiny-sd"), Device::Cpu).unwrap();
    let e = plain.inpaint(&r["inpaint_image"], &r["inpaint_mask"], &p, &mut |_, _| {}, &mut |_, _, _| Ok(()));
    assert!(format!("{:#}", e.err().unwrap()).contains("inpainting model"));
}
