//! Lesson 09 — the real Stable Diffusion 1.5: tokens → CLIP text states → a guided sampler over 4 × 64 × 64 latents →
//! the VAE's decoder → pixels, with SD 1.5's own architecture and, given its weights, its own images.
//!
//! `lesson09 tour` (the default) runs every stage on a tiny random model of SD 1.5's exact layout (no weights can be
//! downloaded here) and prints what each stage makes; `--full-size` also builds the real 1.07 B-parameter networks
//! (random weights) and times one UNet step against its FLOP count (the study `studies::sd_full_size`).
//! `lesson09 generate --weights PATH --prompt …` and `lesson09 img2img --weights PATH --image IN.png …` draw real
//! images from a diffusers folder or an original `.safetensors` file (README: how to get SD 1.5). Chapter 09 walks
//! through this file; the flags every drawing command shares are `pipelines::stable_diffusion::DrawArgs`.
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use scratch_diffusion::cli::{lesson_main, markdown_table, Run};
use scratch_diffusion::data::png::read_png_text;
use scratch_diffusion::model::{sigmas_of_schedule, timestep_of_sigma};
use scratch_diffusion::pipelines::stable_diffusion::{DrawArgs, Edit, GenerateParams, StableDiffusion};
use scratch_diffusion::pipelines::stable_diffusion::{Img2ImgArgs, InpaintArgs};
use scratch_diffusion::sampling::SamplerStep;
use scratch_diffusion::sd::weights::kind_of_dtype;
use scratch_diffusion::sd::{SdConfig, SdModels};
use scratch_diffusion::studies::{sd_files, sd_full_size};
use scratch_diffusion::text::bpe::CLIP_CONTEXT_LEN;
use serde_json::json;
use std::time::Instant;
use tch::{Kind, Tensor};

/// The random weights of the tiny model come from this seed.
const TINY_MODEL_SEED: i64 = 9;

#[derive(Parser, Debug)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true, allow_negative_numbers = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    tour: TourArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every stage on a tiny random SD 1.5-layout model and explain it (the default without a subcommand).
    Tour(TourArgs),
    /// txt2img: draw images for --prompt (with --weights PATH: SD 1.5's own; without: the tiny random model).
    Generate(DrawArgs),
    /// img2img ([SDEdit]): redraw --image IN.png towards --prompt; --strength 0 keeps it, 1 ignores it.
    Img2img(Img2ImgArgs),
    /// Inpainting with SD's inpainting model: redraw --image where --mask is white (without --weights: a tiny random
    /// model of its layout).
    Inpaint(InpaintArgs),
}

#[derive(Args, Debug)]
struct TourArgs {
    #[command(flatten)]
    draw: DrawArgs,
    /// Also build SD 1.5 at full size (random weights, ~4.3 GB of f32) and time one guided UNet step.
    #[arg(long)]
    full_size: bool,
}

fn main() {
    lesson_main(|| match Cli::parse() {
        Cli { command: Some(Command::Generate(a)), .. } => draw(Edit::Txt2img, a),
        Cli { command: Some(Command::Img2img(a)), .. } => draw(a.edit(), a.draw),
        Cli { command: Some(Command::Inpaint(a)), .. } => draw(a.edit(), a.draw),
        Cli { command: Some(Command::Tour(a)), .. } | Cli { tour: a, .. } => tour(a),
    })
}

// ANCHOR: load
/// The pipeline of `--weights` (or the tiny random one), in `--dtype`, and the settings of `flags`.
fn pipeline(run: &Run, flags: &DrawArgs, inpainting: bool) -> Result<(StableDiffusion, GenerateParams)> {
    let kind = kind_of_dtype(&flags.dtype)?;
    let mut sd = match &flags.weights {
        Some(path) => {
            println!("loading SD weights from {} ...", path.display());
            StableDiffusion::load_in(path, run.device, kind)?
        }
        None => tiny_model(run, inpainting, kind)?,
    };
    let p = flags.params(run.quick, run.seed)?;
    // LoRAs (their update computed in f32), embeddings, ControlNets, TAESD: the files users download
    for said in flags.extras.attach(&mut sd, &p.prompt, run)? {
        println!("{said}");
    }
    sd.set_kind(kind); // the ControlNets and TAESD in the model's dtype
    Ok((sd, p))
}
// ANCHOR_END: load

/// The tiny random model of SD 1.5's layout (or of its inpainting model, whose UNet reads 9 channels): the same
/// whatever --seed is (which picks the noise).
fn tiny_model(run: &Run, inpainting: bool, kind: Kind) -> Result<StableDiffusion> {
    tch::manual_seed(TINY_MODEL_SEED);
    let mut config = SdConfig::tiny();
    config.unet.in_channels = if inpainting { 9 } else { 4 };
    StableDiffusion::new(SdModels::new_in(config, run.device, kind)?, "tiny-random")
}

fn draw(edit: Edit, args: DrawArgs) -> Result<()> {
    let run = args.common.init("lesson09")?;
    let (mut sd, p) = pipeline(&run, &args, matches!(edit, Edit::Inpaint { .. }))?;
    sd.encode_ahead_and_release(&[&p.prompt, &p.negative_prompt])?; // one prompt: the text encoder's 0.5 GB go
    if args.weights.is_none() {
        println!("no --weights: the tiny random model draws noise-like images (README: how to get SD 1.5's weights)");
    }
    let started = Instant::now();
    let mut last = Instant::now();
    let preview = args.extras.preview.then(|| run.path("preview.png")); // x̂₀ by TAESD, every step
    let mut on_step = |i: usize, s: SamplerStep| {
        let step_s = seconds(last);
        println!("image {i} step {:>3}: σ {:>8.4} -> {:>8.4} ({step_s:.1} s)", s.i, s.sigma, s.sigma_next);
        if let Some(Err(e)) = preview.as_ref().map(|path| sd.write_preview(path, s.denoised)) {
            println!("warning: no preview: {e:#}");
        }
        last = Instant::now();
    };
    let strength = edit.strength();
    let mut paths = Vec::new(); // each image is written as soon as it is decoded
    let mut save = |i: usize, drawn: &GenerateParams, image: &Tensor| {
        paths.push(sd.save_png(&run, drawn, i, image, strength)?);
        println!("wrote {}", paths[i].display());
        Ok(())
    };
    let generated = sd.draw(&edit, &p, &mut on_step, &mut save)?;
    for w in &generated.warnings {
        println!("warning: {w}");
    }
    let elapsed = seconds(started);
    println!("{} image(s) in {elapsed:.1} s", paths.len());
    let infotext = sd.infotext(&generated.params, 0, strength); // img2img: the input's size
    run.write_metrics(json!({"command": edit.command(),
        "model": sd.model_name, "seconds": elapsed, "images": paths, "infotext": infotext}))?;
    Ok(())
}

fn seconds(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

fn tour(args: TourArgs) -> Result<()> {
    let run = args.draw.common.init("lesson09")?;
    let (sd, p) = pipeline(&run, &args.draw, false)?;
    sd.check_unet_input()?;
    let [n_text, n_unet, n_vae] = sd.models.num_parameters();
    println!("model {}: text encoder {n_text}, UNet {n_unet}, VAE {n_vae} parameters", sd.model_name);

    // ANCHOR: tour_tokens
    // 1. Tokens: CLIP's byte-level BPE; <|startoftext|>, the pieces, <|endoftext|>, padded with it to 77.
    let encoded = sd.tokenizer.encode_padded(&p.prompt, CLIP_CONTEXT_LEN);
    let pieces: Vec<String> = encoded.ids[..encoded.len].iter().map(|&id| sd.tokenizer.decode(&[id])).collect();
    println!(
        "1. tokens of {:?}: {} of {CLIP_CONTEXT_LEN} used\n   ids    {:?}\n   pieces {:?}",
        p.prompt,
        encoded.len,
        &encoded.ids[..encoded.len],
        pieces
    );
    // ANCHOR_END: tour_tokens

    // 2. Text states τ(y): (1, 77, D) for the prompt and for the negative prompt (∅ = "").
    let t0 = Instant::now();
    let (cond, _) = sd.encode_prompt(&p.prompt)?;
    let (uncond, _) = sd.encode_prompt(&p.negative_prompt)?;
    println!(
        "2. text encoder: {:?} per prompt, std {:.3} ({:.3} s for both)",
        cond.size(),
        cond.std(true).double_value(&[]),
        seconds(t0)
    );

    // 3. Starting noise: x_T ~ N(0, I) of shape (1, 4, H/8, W/8), from seed + i alone.
    let z_t = sd.initial_noise(p.seed, p.width, p.height);
    println!("3. noise for seed {}: {:?} (a {}×{} image)", p.seed, z_t.size(), p.width, p.height);

    // 4. The sampler's σ grid and the fractional timesteps the UNet is called with.
    let sigmas = p.sampler.sigmas(&sd.schedule, p.steps);
    let table = sigmas_of_schedule(&sd.schedule);
    let ts: Vec<String> = sigmas[..p.steps].iter().map(|&s| format!("{:.1}", timestep_of_sigma(&table, s))).collect();
    println!(
        "4. {} with {} steps: σ {:?}\n   timesteps {:?}",
        p.sampler.name(),
        p.steps,
        sigmas.iter().map(|s| (s * 1e4).round() / 1e4).collect::<Vec<_>>(),
        ts
    );

    // 5. One guided UNet evaluation at σ₀, as a sampler step makes it: ∅ and the prompt in one batch of 2.
    let t0 = Instant::now();
    let x = &z_t * (1.0 + sigmas[0] * sigmas[0]).sqrt(); // σ-space: x = x_T √(1 + σ₀²)
    let (eps_uncond, eps_cond) = sd.eps_branches(&x, sigmas[0], &cond, &uncond); // (1, 4, h, w) each
    let guided = &eps_uncond + (&eps_cond - &eps_uncond) * p.cfg_scale; // [CFG] ε̃ = ε_∅ + w (ε_c − ε_∅)
    let gap = (&eps_cond - &eps_uncond).square().mean(Kind::Float).sqrt().double_value(&[]);
    println!(
        "5. UNet at σ = {:.3}: ε̂ {:?}, |ε_c − ε_∅| rms {gap:.4}, guided std {:.3} ({:.3} s)",
        sigmas[0],
        eps_uncond.size(),
        guided.std(true).double_value(&[]),
        seconds(t0)
    );

    // 6. The whole loop, then 7. the VAE decoder.
    let t0 = Instant::now();
    let (latents, _) = sd.txt2img_latents(&p, &mut |i, s| {
        println!("6. image {i} step {}: σ {:.4} -> {:.4}", s.i, s.sigma, s.sigma_next)
    })?;
    let sampling_s = seconds(t0);
    let t0 = Instant::now();
    let images = sd.decode(&latents);
    println!(
        "7. VAE decoder: latents {:?} -> pixels {:?} ({:.3} s; sampling took {sampling_s:.3} s)",
        latents.size(),
        images.size(),
        seconds(t0)
    );

    // 8. The PNG carries its parameters, as the web UIs write them.
    let paths = sd.save_pngs(&run, &p, &images, None)?;
    let infotext = read_png_text(&paths[0], "parameters")?.context("the PNG's parameters chunk")?;
    println!("8. wrote {} with parameters:\n{infotext}", paths[0].display());
    // the tables of results.md, what chapter 09 shows of each stage
    let token_rows: Vec<Vec<String>> =
        (0..encoded.len).map(|i| vec![i.to_string(), encoded.ids[i].to_string(), format!("`{}`", pieces[i])]).collect();
    let grid_rows: Vec<Vec<String>> = (0..sigmas.len())
        .map(|i| {
            vec![i.to_string(), format!("{:.4}", sigmas[i]), ts.get(i).cloned().unwrap_or_else(|| "(the end)".into())]
        })
        .collect();
    let stage = |what: String, shape: String, out: String| vec![what, shape, out];
    let std = |t: &Tensor| format!("std {:.3}", t.std(true).double_value(&[]));
    let stage_rows = [
        stage("text states τ(y), prompt and negative".into(), format!("{:?} each", cond.size()), std(&cond)),
        stage(format!("starting noise x_T, seed {}", p.seed), format!("{:?}", z_t.size()), std(&z_t)),
        stage(
            format!("one guided UNet evaluation at σ₀ = {:.3}", sigmas[0]),
            format!("ε̂ {:?}", eps_uncond.size()),
            format!("rms of ε_c − ε_∅ {gap:.4}, guided {}", std(&guided)),
        ),
        stage(
            format!("the loop: {} steps of {}", p.steps, p.sampler.name()),
            format!("latents {:?}", latents.size()),
            std(&latents),
        ),
        stage(
            "VAE decoder".into(),
            format!("pixels {:?}", images.size()),
            format!("in [{:.2}, {:.2}]", images.min().double_value(&[]), images.max().double_value(&[])),
        ),
    ];
    // 9. (the tiny model) The files users download: a LoRA, an embedding and a ControlNet, through generate's flags.
    let files = match args.draw.weights {
        Some(_) => None,
        None => Some(sd_files::tour(&|| tiny_model(&run, false, kind_of_dtype(&args.draw.dtype)?), &run, &p)?),
    };
    for (what, levels) in files.iter().flat_map(|f| &f.changes) {
        println!("9. {what}: the image changes by {levels:.1} levels (mean |Δ| of 255)");
    }
    let mut tables = vec![
        ("tokens", markdown_table(&["position", "id", "piece"], &token_rows)),
        ("grid", markdown_table(&["step", "σ", "timestep of the UNet"], &grid_rows)),
        ("stages", markdown_table(&["stage", "shape", "what came out"], &stage_rows)),
    ];
    tables.extend(files.as_ref().map(|f| ("files", f.table())));
    run.write_results(&tables)?;
    let mut metrics = json!({"command": "tour", "model": sd.model_name,
        "parameters": {"text_encoder": n_text, "unet": n_unet, "vae": n_vae},
        "tokens": {"ids": &encoded.ids[..encoded.len], "pieces": pieces},
        "sigmas": sigmas, "sampling_s": sampling_s, "infotext": infotext});
    metrics["files"] = serde_json::to_value(&files)?;
    // 10. (--full-size) SD 1.5's real networks, random weights: one guided UNet step against its FLOP count.
    if args.full_size {
        let report = sd_full_size::run(SdConfig::sd15(), run.device)?;
        println!("10. SD 1.5 at full size: {report}");
        metrics["full_size"] = serde_json::to_value(report)?;
    }
    let path = run.write_metrics(metrics)?;
    println!("wrote {}", path.display());
    Ok(())
}
