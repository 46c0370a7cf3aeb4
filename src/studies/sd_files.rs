//! Lesson 09's tour of the files SD 1.5 users download — a LoRA, a textual-inversion embedding, a ControlNet — made
//! for the tiny random model in the layouts they circulate in (kohya's LoRA, diffusers' `learned_embeds`, an original
//! `control_model.*` file) and loaded through `lesson09 generate`'s own flags ([`ExtrasArgs`]), so `--quick` runs the
//! whole path a user's files take. Random weights draw nothing recognisable: the tour reports how much each file
//! changes the image (mean |Δ| in 8-bit levels against the plain image from the same seed) and checks that a LoRA at
//! multiplier 0 changes nothing.
use crate::cli::Run;
use crate::data::png::write_png_rgb_with_text;
use crate::nn::controlnet::{ControlNet, ControlNetConfig};
use crate::nn::taesd::{Taesd, TaesdConfig};
use crate::pipelines::stable_diffusion::{ExtrasArgs, GenerateParams, Preprocessor, StableDiffusion};
use crate::sd::embeddings::write_random_embedding;
use crate::sd::lora::{write_random_kohya, Component};
use crate::sd::weights::save_controlnet_single_file;
use anyhow::{ensure, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The LoRA's name (its file is `NAME.safetensors` in the LoRA folder, as `<lora:NAME:W>` finds it).
pub const LORA_NAME: &str = "tiny-style";
/// The embedding's token (diffusers' layout: the file's key).
pub const TOKEN: &str = "tiny-token";
/// The ControlNet's file name: SD 1.5's ControlNets are named like this (`control_v11p_sd15_canny`).
pub const CONTROLNET_FILE: &str = "control_tiny_sd15_canny.safetensors";
/// A random TAESD (diffusers' names), for `generate --taesd`.
pub const TAESD_FILE: &str = "taesd.safetensors";

/// What each file did to the image.
#[derive(Debug, serde::Serialize)]
pub struct FilesReport {
    /// (what was added, mean |Δ| against the plain image in 8-bit levels).
    pub changes: Vec<(String, f64)>,
    /// A LoRA at multiplier 0 gives the plain image bit for bit.
    pub multiplier_zero_identical: bool,
    /// What `ExtrasArgs::attach` said for the run with everything.
    pub attached: Vec<String>,
    /// The PNG parameters of the image with everything (the web UI's ControlNet and Lora hashes entries).
    pub infotext: String,
}

impl FilesReport {
    /// The changes as a markdown table (results.md's `files`).
    pub fn table(&self) -> String {
        let rows: Vec<Vec<String>> =
            [(format!("nothing: `<lora:{LORA_NAME}:0>`"), if self.multiplier_zero_identical { 0.0 } else { f64::NAN })]
                .iter()
                .chain(&self.changes)
                .map(|(what, levels)| vec![what.clone(), format!("{levels:.1}")])
                .collect();
        crate::cli::markdown_table(
            &["added to the tiny model", "mean absolute change of the image (of 255 levels)"],
            &rows,
        )
    }
}

/// Writes the three files and a control image for the model `make` builds into `run`'s `files/` folder, then draws
/// `p` plain, with each file alone and with all three; `make` must build the same model each time (merging a LoRA
/// changes the weights).
pub fn tour(make: &dyn Fn() -> Result<StableDiffusion>, run: &Run, p: &GenerateParams) -> Result<FilesReport> {
    let dir = run.path("files");
    let (lora_dir, embedding_dir) = (dir.join("lora"), dir.join("embeddings"));
    for d in [&lora_dir, &embedding_dir] {
        std::fs::create_dir_all(d)?;
    }
    let base = make()?;
    tch::manual_seed(run.seed as i64 + 1000); // the files' random values, apart from the model's
                                              // ANCHOR: tour_files
                                              // a LoRA on the first transformer's attention and feed-forward, a resnet convolution (LoCon) and the text encoder
    let t = "down_blocks.0.attentions.0.transformer_blocks.0";
    let modules: Vec<(Component, String, i64, f64)> =
        ["attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.2"]
            .iter()
            .map(|m| (Component::Unet, format!("{t}.{m}"), 4, 4.0))
            .chain([
                (Component::Unet, "down_blocks.0.resnets.0.conv1".to_string(), 4, 4.0),
                (Component::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj".to_string(), 4, 4.0),
            ])
            .collect();
    let named: Vec<(Component, &str, i64, f64)> = modules.iter().map(|(c, m, r, a)| (*c, m.as_str(), *r, *a)).collect();
    write_random_kohya(&base.models, &named, 0.1, &lora_dir.join(format!("{LORA_NAME}.safetensors")))?;
    // a two-vector embedding in diffusers' learned_embeds layout
    let width = base.models.config.text.hidden_size;
    write_random_embedding(TOKEN, 2, width, 1.0, &embedding_dir.join("learned_embeds.safetensors"))?;
    // a ControlNet for this UNet with SD's hint encoder, every weight random (zero convolutions too: they are zero
    // only before training), as an original control_model.* file
    let vs = VarStore::new(Device::Cpu);
    let config = ControlNetConfig {
        unet: base.models.config.unet.clone(),
        hint_channels: 3,
        hint_embedding_channels: vec![16, 32, 96, 256],
        hint_stride: 2,
    };
    let control = ControlNet::new(vs.root(), config);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0)); // drawn in name order: the HashMap's order changes from run to run
    tch::no_grad(|| {
        for (_, mut v) in vars {
            let fan_in = if v.dim() > 1 { v.size()[1..].iter().product::<i64>() } else { 1 };
            v.copy_(&(v.randn_like() * (1.0 / fan_in as f64).sqrt()));
        }
    });
    save_controlnet_single_file(&vs, &control, &dir.join(CONTROLNET_FILE))?;
    // the control image: a bright disc on dark ground, whose Canny edges are a circle
    let (h, w) = (p.height, p.width);
    let yy = Tensor::arange(h, (Kind::Float, Device::Cpu)).view([h, 1]) - h as f64 / 2.0;
    let xx = Tensor::arange(w, (Kind::Float, Device::Cpu)).view([1, w]) - w as f64 / 2.0;
    let disc = (yy.square() + xx.square()).le((h.min(w) as f64 / 3.0).powi(2)).to_kind(Kind::Float);
    let image = (disc * 0.8 + 0.1).expand([3, h, w], false); // (3, H, W)
    write_png_rgb_with_text(&dir.join("control_source.png"), &image, "Description", "a disc")?;
    // ANCHOR_END: tour_files
    // a random TAESD under diffusers' AutoencoderTiny names (for `generate --taesd`; the tour does not draw with it)
    let taesd_vs = VarStore::new(Device::Cpu);
    let _taesd = Taesd::new(taesd_vs.root(), TaesdConfig::sd());
    let mut named: Vec<(String, Tensor)> = taesd_vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, dir.join(TAESD_FILE))?;

    let draw = |prompt: &str, extras: &ExtrasArgs| -> Result<(Tensor, String, Vec<String>)> {
        let mut sd = make()?;
        let p = GenerateParams { prompt: prompt.into(), batch: 1, ..p.clone() };
        let attached = extras.attach(&mut sd, &p.prompt, run)?;
        let generated = sd.txt2img(&p, &mut |_, _| {}, &mut |_, _, _| Ok(()))?;
        Ok((generated.images, sd.infotext(&p, 0, None), attached))
    };
    let none = ExtrasArgs::default();
    let with_files = ExtrasArgs {
        lora_dir: Some(lora_dir.clone()),
        embedding_dir: Some(embedding_dir.clone()),
        ..ExtrasArgs::default()
    };
    let with_control = ExtrasArgs {
        controlnets: vec![dir.join(CONTROLNET_FILE)],
        control_images: vec![dir.join("control_source.png")],
        preprocessors: vec![Preprocessor::Canny],
        control_scales: vec![1.0],
        control_end: 1.0,
        ..with_files.clone()
    };
    let (plain, _, _) = draw(&p.prompt, &none)?;
    let levels = |images: &Tensor| ((images - &plain).abs() * 255.0).mean(Kind::Float).double_value(&[]);
    let (zero, _, _) = draw(&format!("{} <lora:{LORA_NAME}:0>", p.prompt), &with_files)?;
    let mut changes = Vec::new();
    for (what, prompt, extras) in [
        (format!("LoRA `<lora:{LORA_NAME}:0.8>`"), format!("{} <lora:{LORA_NAME}:0.8>", p.prompt), &with_files),
        (format!("embedding `{TOKEN}` (2 vectors)"), format!("{} in {TOKEN} style", p.prompt), &with_files),
        ("ControlNet, canny hint of a disc".to_string(), p.prompt.clone(), &with_control),
    ] {
        changes.push((what, levels(&draw(&prompt, extras)?.0)));
    }
    let all = format!("{} in {TOKEN} style <lora:{LORA_NAME}:0.8>", p.prompt);
    let (images, infotext, attached) = draw(&all, &with_control)?;
    changes.push(("all three".into(), levels(&images)));
    write_png_rgb_with_text(&run.path("files_all_three.png"), &images.get(0), "parameters", &infotext)?;
    let report = FilesReport { changes, multiplier_zero_identical: zero.equal(&plain), attached, infotext };
    ensure!(report.multiplier_zero_identical, "a LoRA at multiplier 0 changed the image");
    Ok(report)
}
