//! Lesson 09 — the real Stable Diffusion 1.5: tokens → CLIP text states → a guided sampler over 4 × 64 × 64 latents →
//! the VAE's decoder → pixels, with SD 1.5's own architecture and, given its weights, its own images.
//!
//! `lesson09 tour` (the default) runs every stage on a tiny random model of SD 1.5's exact layout (no weights can be
//! downloaded here) and prints what each stage makes; `--full-size` also builds the real 1.07 B-parameter networks
//! (random weights) and times one UNet step against its FLOP count (`studies::sd_full_size`). `lesson09 generate --weights PATH --prompt …`
//! and `lesson09 img2img --weights PATH --image IN.png …` draw real images from a diffusers folder or an original
//! `.safetensors` file (README: how to get SD 1.5). Chapter 09 walks through this file.
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use scratch_diffusion::cli::{lesson_main, CommonArgs, Run};
use scratch_diffusion::data::png::{read_png_rgb, read_png_text, write_png_rgb_with_text};
use scratch_diffusion::pipelines::stable_diffusion::{GenerateParams, SdSampler, StableDiffusion};
use scratch_diffusion::sd::weights::kind_of_dtype;
use scratch_diffusion::sd::{SdConfig, SdModels};
use scratch_diffusion::studies::sd_full_size;
use scratch_diffusion::text::bpe::CLIP_CONTEXT_LEN;
use serde_json::json;
use std::path::PathBuf;
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
}

#[derive(Args, Debug)]
struct TourArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    draw: DrawFlags,
    /// Also build SD 1.5 at full size (random weights, ~4.3 GB of f32) and time one guided UNet step.
    #[arg(long)]
    full_size: bool,
}

#[derive(Args, Debug)]
struct DrawArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    draw: DrawFlags,
}

#[derive(Args, Debug)]
struct Img2ImgArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    draw: DrawFlags,
    /// The PNG to start from (its width and height must be multiples of 8).
    #[arg(long)]
    image: PathBuf,
    /// How much of the sampler's grid runs: 0 returns the image (through the VAE), 1 starts from pure noise.
    #[arg(long, default_value_t = 0.75)]
    strength: f64,
}

/// What every drawing command takes; the names are the web UIs'.
#[derive(Args, Debug)]
struct DrawFlags {
    /// SD 1.x weights: a diffusers folder (unet/, vae/, text_encoder/) or an original .safetensors single file.
    /// Without it, the tiny random model of the tour.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Sampler steps [default: 20, or 4 with --quick].
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale w (1 = no guidance).
    #[arg(long, default_value_t = 7.0)]
    cfg_scale: f64,
    /// Image size, multiples of 8 [default: 512 with --weights, 64 for the tiny model].
    #[arg(long)]
    width: Option<i64>,
    #[arg(long)]
    height: Option<i64>,
    /// DDIM, Euler, "Euler a", "DPM++ 2M" or "DPM++ 2M Karras".
    #[arg(long, default_value = "Euler a")]
    sampler: String,
    /// Images; image i uses --seed + i.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Weights' dtype on the CPU: f32, or bf16 (half the memory; fast only where the CPU has bf16 units).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn main() {
    lesson_main(|| match Cli::parse() {
        Cli { command: Some(Command::Generate(a)), .. } => draw(a.common, a.draw, None),
        Cli { command: Some(Command::Img2img(a)), .. } => draw(a.common, a.draw, Some((a.image, a.strength))),
        Cli { command: Some(Command::Tour(a)), .. } | Cli { tour: a, .. } => tour(a),
    })
}

// ANCHOR: load
/// The pipeline of `--weights` (or the tiny random one), in `--dtype`, and the settings of `flags`.
fn pipeline(run: &Run, flags: &DrawFlags) -> Result<(StableDiffusion, GenerateParams)> {
    let kind = kind_of_dtype(&flags.dtype)?;
    let mut sd = match &flags.weights {
        Some(path) => {
            println!("loading SD weights from {} ...", path.display());
            StableDiffusion::load(path, run.device)?
        }
        None => {
            // the same tiny model whatever --seed is (which picks the noise)
            tch::manual_seed(TINY_MODEL_SEED);
            StableDiffusion::new(SdModels::new(SdConfig::tiny(), run.device)?, "tiny-random")?
        }
    };
    sd.models.set_kind(kind);
    let full = flags.weights.is_some();
    let p = GenerateParams {
        prompt: flags.prompt.clone(),
        negative_prompt: flags.negative_prompt.clone(),
        steps: flags.steps.unwrap_or(if run.quick { 4 } else { 20 }),
        cfg_scale: flags.cfg_scale,
        seed: run.seed,
        width: flags.width.unwrap_or(if full { 512 } else { 64 }),
        height: flags.height.unwrap_or(if full { 512 } else { 64 }),
        sampler: SdSampler::from_name(&flags.sampler).context("--sampler")?,
        batch: flags.batch,
    };
    p.check()?;
    Ok((sd, p))
}
// ANCHOR_END: load

/// Writes image i of `images` (B, 3, H, W) as OUT/NAME_i.png with its parameters; returns the paths.
fn save_images(
    run: &Run,
    sd: &StableDiffusion,
    p: &GenerateParams,
    images: &Tensor,
    strength: Option<f64>,
) -> Result<Vec<PathBuf>> {
    (0..images.size()[0] as usize)
        .map(|i| {
            let path = run.path(&format!("image_{:02}_seed{}.png", i, p.seed + i as u64));
            write_png_rgb_with_text(
                &path,
                &images.get(i as i64),
                "parameters",
                &p.infotext(i, &sd.model_name, strength),
            )?;
            Ok(path)
        })
        .collect()
}

fn draw(common: CommonArgs, flags: DrawFlags, edit: Option<(PathBuf, f64)>) -> Result<()> {
    let run = common.init("lesson09")?;
    let (sd, p) = pipeline(&run, &flags)?;
    if flags.weights.is_none() {
        println!("no --weights: the tiny random model draws noise-like images (README: how to get SD 1.5's weights)");
    }
    let started = Instant::now();
    let mut last = Instant::now();
    let mut on_step = |i: usize, s: scratch_diffusion::sampling::SamplerStep| {
        println!(
            "image {i} step {:>3}: σ {:>8.4} -> {:>8.4} ({:.1} s)",
            s.i,
            s.sigma,
            s.sigma_next,
            last.elapsed().as_secs_f64()
        );
        last = Instant::now();
    };
    let (generated, strength) = match &edit {
        None => (sd.txt2img(&p, &mut on_step)?, None),
        Some((image, strength)) => (sd.img2img(&read_png_rgb(image)?, *strength, &p, &mut on_step)?, Some(*strength)),
    };
    for w in &generated.warnings {
        println!("warning: {w}");
    }
    let paths = save_images(&run, &sd, &p, &generated.images, strength)?;
    for path in &paths {
        println!("wrote {}", path.display());
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("{} image(s) in {seconds:.1} s", paths.len());
    run.write_metrics(json!({"command": if edit.is_some() { "img2img" } else { "generate" },
        "model": sd.model_name, "seconds": seconds, "images": paths, "infotext": p.infotext(0, &sd.model_name, strength)}))?;
    Ok(())
}

fn seconds(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

fn tour(args: TourArgs) -> Result<()> {
    let run = args.common.init("lesson09")?;
    let (sd, p) = pipeline(&run, &args.draw)?;
    let mut metrics = json!({"command": "tour", "model": sd.model_name});
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
    let (cond, _) = sd.encode_prompt(&p.prompt);
    let (uncond, _) = sd.encode_prompt(&p.negative_prompt);
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
    let table = scratch_diffusion::model::sigmas_of_schedule(&sd.schedule);
    let ts: Vec<String> = sigmas[..p.steps]
        .iter()
        .map(|&s| format!("{:.1}", scratch_diffusion::model::timestep_of_sigma(&table, s)))
        .collect();
    println!(
        "4. {} with {} steps: σ {:?}\n   timesteps {:?}",
        p.sampler.name(),
        p.steps,
        sigmas.iter().map(|s| (s * 1e4).round() / 1e4).collect::<Vec<_>>(),
        ts
    );

    // 5. One guided UNet evaluation: ∅ and the prompt in one batch of 2.
    let t0 = Instant::now();
    let x = &z_t * (1.0 + sigmas[0] * sigmas[0]).sqrt();
    let c_in = 1.0 / (1.0 + sigmas[0] * sigmas[0]).sqrt();
    let t = Tensor::from_slice(&[ts[0].parse::<f64>()?; 2]);
    let eps = tch::no_grad(|| {
        let x2 = Tensor::cat(&[&x, &x], 0) * c_in; // (2, 4, h, w)
        sd.models.unet.forward_cond(
            &x2.to_kind(sd.models.kind()),
            &t,
            Some(&Tensor::cat(&[&uncond, &cond], 0).to_kind(sd.models.kind())),
            None,
            false,
        )
    });
    let parts = eps.to_kind(Kind::Float).chunk(2, 0);
    let guided = &parts[0] + (&parts[1] - &parts[0]) * p.cfg_scale; // [CFG] ε̃ = ε_∅ + w (ε_c − ε_∅)
    let gap = (&parts[1] - &parts[0]).square().mean(Kind::Float).sqrt().double_value(&[]);
    println!(
        "5. UNet at σ = {:.3}: ε̂ {:?}, |ε_c − ε_∅| rms {gap:.4}, guided std {:.3} ({:.3} s)",
        sigmas[0],
        parts[0].size(),
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
    let paths = save_images(&run, &sd, &p, &images, None)?;
    let infotext = read_png_text(&paths[0], "parameters")?.context("the PNG's parameters chunk")?;
    println!("8. wrote {} with parameters:\n{infotext}", paths[0].display());
    metrics["parameters"] = json!({"text_encoder": n_text, "unet": n_unet, "vae": n_vae});
    metrics["tokens"] = json!({"ids": &encoded.ids[..encoded.len], "pieces": pieces});
    metrics["sigmas"] = json!(sigmas);
    metrics["sampling_s"] = json!(sampling_s);
    metrics["infotext"] = json!(infotext);
    // 9. (--full-size) SD 1.5's real networks, random weights: one guided UNet step against its FLOP count.
    if args.full_size {
        let report = sd_full_size::run(SdConfig::sd15(), run.device)?;
        println!("9. SD 1.5 at full size: {report}");
        metrics["full_size"] = serde_json::to_value(report)?;
    }
    let path = run.write_metrics(metrics)?;
    println!("wrote {}", path.display());
    Ok(())
}
