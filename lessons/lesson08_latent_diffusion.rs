//! Lesson 08 — latent diffusion: Stable Diffusion in miniature.
//!
//! `lesson08 train` (the default) trains a KL-autoencoder on MNIST, measures its latent scale, trains a text-
//! conditioned UNet on the 4 × 7 × 7 latents behind lesson 06's frozen tokenizer and text encoder, then grades the
//! pipeline (prompt accuracy, attributes, Fréchet distance), img2img and inpainting, and times sampling against
//! lesson 06's pixel-space pipeline (with `--ship` it saves the pipeline into data/lesson08/).
//! `lesson08 sample | img2img | inpaint` use the shipped (or any saved) pipeline, PNG in and out.
//! Chapter 08 walks through this file.
use anyhow::{ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use scratch_diffusion::cli::{
    ensure_writable_dir, lesson_main, log_line, positive, progress, write_atomic, CommonArgs,
};
use scratch_diffusion::data::captions::Attribute;
use scratch_diffusion::data::mnist;
use scratch_diffusion::data::png::read_png_gray;
use scratch_diffusion::data::png::write_png_gray;
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::eval::frechet::evaluate_samples;
use scratch_diffusion::eval::image_metrics::psnr;
use scratch_diffusion::eval::prompt_accuracy as grade;
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::nn::unet::UNetConfig;
use scratch_diffusion::nn::vae::{scaling_factor, VaeConfig};
use scratch_diffusion::pipelines::latent_diffusion::{self as ld, Draw, LatentDiffusion, LatentPipelineConfig};
use scratch_diffusion::pipelines::prompt_encoder::PromptEncoder;
use scratch_diffusion::pipelines::text_to_image::{self as t2i, TextToImage};
use scratch_diffusion::plot;
use scratch_diffusion::sampling::registry::Sampler;
use scratch_diffusion::studies::latent_edits::{img2img_study, inpaint_study, sampling_speed};
use scratch_diffusion::studies::prompts as figures;
use scratch_diffusion::text::captions::{caption_images_with, CONTEXT_LEN};
use scratch_diffusion::train::conditional::DEFAULT_P_UNCOND;
use scratch_diffusion::train::ddpm::EpsObjective;
use scratch_diffusion::train::latent_diffusion::{encode_moments, train_latent_unet, train_vae, VaeLoss};
use scratch_diffusion::train::recipe::{LOSS_WEIGHT, SCHEDULE};
use scratch_diffusion::train::text_cond::TextData;
use scratch_diffusion::train::trainer::{StepInfo, TrainRun, TrainerConfig};
use serde_json::json;
use std::path::PathBuf;
use tch::{Device, Tensor};

// ANCHOR: budget
/// Autoencoder training: steps of VAE_BATCH images at peak rate VAE_LR, and its loss weights ([`VaeLoss`]).
const VAE_STEPS: u64 = 600;
const VAE_BATCH: i64 = 64;
const VAE_LR: f64 = 2e-3;
const KL_WEIGHT: f64 = 1e-3;
const PERCEPTUAL_WEIGHT: f64 = 0.1;
/// Latent UNet training: lesson 04's recipe (cosine schedule, Min-SNR, AdamW with warm-up, EMA) at these budgets.
const STEPS: u64 = 3000;
const BATCH: i64 = 64;
const LR: f64 = 8e-3;
/// Captions per training image, as lesson 06.
const CAPTIONS_PER_IMAGE: usize = 4;
/// Sampling defaults: lesson 07's DPM-Solver++(2M) on a Karras grid, 20 steps, guidance w = 2.
const SAMPLER: Sampler = Sampler::DpmSolverPp2m;
const SAMPLE_STEPS: u64 = 20;
const GUIDANCE: f64 = 2.0;
/// img2img is graded at this strength (the target: ≥ 90 % of outputs read as the new digit).
const STRENGTH: f64 = 0.8;
// ANCHOR_END: budget
/// Images per evaluation prompt that the Fréchet distance uses: 10 × 50 prompts = lesson 04's n = 500.
const FD_PER_PROMPT: i64 = 10;

#[derive(Parser, Debug)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true, allow_negative_numbers = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train the autoencoder and the latent UNet, then grade the pipeline (the default without a subcommand).
    Train(TrainArgs),
    /// Draw digits for a prompt with a trained pipeline (by default the shipped one).
    Sample(DrawArgs),
    /// Redraw a PNG towards a prompt ([SDEdit]): --image IN.png --strength S.
    Img2img(Img2ImgArgs),
    /// Redraw the masked part of a PNG (white in --mask) to fit a prompt, keeping the rest.
    Inpaint(InpaintArgs),
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Autoencoder training steps [default: 600, or 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    vae_steps: Option<u64>,
    /// Weight of KL(q(z|x) ‖ N(0, I)) per image, against the summed L1 reconstruction error.
    #[arg(long, default_value_t = KL_WEIGHT)]
    kl_weight: f64,
    /// Weight of the squared distance of the classifier's features (our stand-in for LPIPS); 0 turns it off.
    #[arg(long, default_value_t = PERCEPTUAL_WEIGHT)]
    perceptual_weight: f64,
    /// Latent UNet training steps [default: 3000, or 30 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    #[arg(long, default_value_t = BATCH, value_parser = clap::value_parser!(i64).range(1..=4096))]
    batch: i64,
    /// Peak learning rate of the latent UNet.
    #[arg(long, default_value_t = LR, value_parser = positive)]
    lr: f64,
    /// Guidance scale w of the evaluation.
    #[arg(long, default_value_t = GUIDANCE)]
    guidance: f64,
    /// Sampler of the evaluation (lesson 07's names: ddpm, ddim, euler, euler_a, dpm_solver_pp_2m, ...).
    #[arg(long, default_value_t = SAMPLER.key().to_string())]
    sampler: String,
    /// Sampler steps of the evaluation [default: 20, or 5 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    sample_steps: Option<u64>,
    /// Samples per evaluation prompt (50 prompts) [default: 20, or 2 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(2..=1000))]
    eval_samples: Option<i64>,
    /// The lesson 06 pipeline whose tokenizer and frozen text encoder condition the UNet [default: data/lesson06].
    #[arg(long)]
    text_from: Option<PathBuf>,
    /// Continue interrupted training from OUT/vae_checkpoint.safetensors and OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
    /// Also save the pipeline into data/lesson08/, the weights the other subcommands use by default.
    #[arg(long)]
    ship: bool,
}

#[derive(Args, Debug)]
struct DrawArgs {
    /// The prompt, free text: "a bold 7", "Seven, leaning LEFT", "the number 3".
    #[arg(long)]
    prompt: String,
    /// A prompt to steer away from: ε̃ = ε_neg + w (ε_c − ε_neg).
    #[arg(long)]
    negative: Option<String>,
    /// Number of images (for img2img and inpaint: outputs per input, each from its own noise).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(i64).range(1..=10000))]
    num: i64,
    /// Guidance scale w: ε̃ = ε_∅ + w (ε_c − ε_∅); 1 is the plain conditional model.
    #[arg(long, default_value_t = GUIDANCE)]
    guidance: f64,
    /// Sampler steps.
    #[arg(long, default_value_t = SAMPLE_STEPS, value_parser = clap::value_parser!(u64).range(1..=1000))]
    steps: u64,
    /// Sampler: ddpm, ddim, euler, heun, euler_a, dpm_solver_2, dpm_solver_3, dpm_solver_pp_2m (or the UI names).
    #[arg(long, default_value_t = SAMPLER.key().to_string())]
    sampler: String,
    /// Seed of the noise: the same seed, the same images.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the PNGs go.
    #[arg(long, default_value = "out/lesson08/samples")]
    out: PathBuf,
    /// A saved pipeline (the weights/ folder of a lesson 08 run) [default: data/lesson08].
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Threads libtorch may use [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1024))]
    threads: Option<i32>,
}

#[derive(Args, Debug)]
struct Img2ImgArgs {
    /// The input digit: a 28×28 PNG (any colour type; white strokes on black, as MNIST).
    #[arg(long)]
    image: PathBuf,
    /// How far to noise the input before redrawing it, 0 (keep) to 1 (ignore it).
    #[arg(long, default_value_t = STRENGTH)]
    strength: f64,
    #[command(flatten)]
    draw: DrawArgs,
}

#[derive(Args, Debug)]
struct InpaintArgs {
    /// The input digit: a 28×28 PNG.
    #[arg(long)]
    image: PathBuf,
    /// A 28×28 PNG, white (> 0.5) where to redraw, black where to keep the input.
    #[arg(long)]
    mask: PathBuf,
    #[command(flatten)]
    draw: DrawArgs,
}

fn main() {
    lesson_main(|| match Cli::parse() {
        Cli { command: Some(Command::Sample(args)), .. } => draw_cmd(args, Edit::None),
        Cli { command: Some(Command::Img2img(a)), .. } => draw_cmd(a.draw, Edit::Img2Img(a.image, a.strength)),
        Cli { command: Some(Command::Inpaint(a)), .. } => draw_cmd(a.draw, Edit::Inpaint(a.image, a.mask)),
        Cli { command: Some(Command::Train(args)), .. } | Cli { train: args, .. } => train_cmd(args),
    })
}

enum Edit {
    None,
    Img2Img(PathBuf, f64),
    Inpaint(PathBuf, PathBuf),
}

fn draw_cmd(args: DrawArgs, edit: Edit) -> Result<()> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let sampler = Sampler::from_name(&args.sampler).context("--sampler")?;
    let draw = Draw { guidance: args.guidance, sampler, steps: args.steps as usize, seed: args.seed };
    let dir = args.weights.clone().unwrap_or_else(ld::shipped_dir);
    let pipe = LatentDiffusion::load(&dir, Device::Cpu).with_context(|| {
        format!(
            "no usable latent-diffusion weights in {}: make them with `./run.sh lesson 08 --ship`, or pass --weights \
             DIR (the weights/ folder of a lesson 08 run)",
            dir.display()
        )
    })?;
    let negative = args.negative.as_deref();
    let (n, s) = (args.num, pipe.config.image_size);
    // ANCHOR: draw_cmd
    let (images, what) = match &edit {
        Edit::None => (pipe.generate(&args.prompt, negative, n, &draw)?, String::new()),
        Edit::Img2Img(path, strength) => {
            let input = read_png_gray(path)?.expand([n, 1, -1, -1], false).contiguous(); // n copies, own noise each
            let out = pipe.img2img(&input, &args.prompt, negative, *strength, &draw)?;
            (out, format!(", img2img of {} at strength {strength}", path.display()))
        }
        Edit::Inpaint(path, mask_path) => {
            let input = read_png_gray(path)?.expand([n, 1, -1, -1], false).contiguous();
            let mask = read_png_gray(mask_path)?;
            let (_, pasted) = pipe.inpaint(&input, &mask, &args.prompt, negative, &draw)?;
            (pasted, format!(", inpainting {} under {}", path.display(), mask_path.display()))
        }
    };
    // ANCHOR_END: draw_cmd
    ensure_writable_dir(&args.out)?;
    for i in 0..n {
        write_png_gray(&args.out.join(format!("sample_{i:03}.png")), &images.get(i))?;
    }
    let title = format!("\"{}\", w = {}, {} × {}{what}", args.prompt, args.guidance, args.steps, sampler.ui_name());
    plot::image_grid(&args.out.join("grid.png"), &title, &images, 8, 3, &[])?;
    println!("{n} images ({s}×{s}) and grid.png in {}", args.out.display());
    Ok(())
}

fn train_cmd(args: TrainArgs) -> Result<()> {
    ensure!(args.kl_weight >= 0.0 && args.perceptual_weight >= 0.0, "--kl-weight and --perceptual-weight are ≥ 0");
    let sampler = Sampler::from_name(&args.sampler).context("--sampler")?;
    let run = args.common.init("lesson08")?;
    let data = mnist::load(&run.data_dir).context("lesson 08 trains on MNIST")?;
    let q = |quick: u64, full: u64| if run.quick { quick } else { full };
    let (vae_steps, steps) = (args.vae_steps.unwrap_or(q(20, VAE_STEPS)), args.steps.unwrap_or(q(30, STEPS)));
    let sample_steps = args.sample_steps.unwrap_or(q(5, SAMPLE_STEPS)) as usize;
    let eval_n = args.eval_samples.unwrap_or(q(2, 20) as i64);
    let text_dir = args.text_from.clone().unwrap_or_else(t2i::shipped_dir);
    let pixel = TextToImage::load(&text_dir, run.device).with_context(|| {
        format!("lesson 08 reuses lesson 06's text encoder: {} holds no lesson 06 pipeline", text_dir.display())
    })?;
    let clf = MnistClassifier::load_shipped(Device::Cpu)?;
    let started = std::time::Instant::now();
    let images = (&data.train_images * 2.0 - 1.0).to_device(run.device); // (60000, 1, 28, 28) in [−1, 1]

    // ANCHOR: vae
    let quick_vae = VaeConfig { block_out_channels: vec![8, 16, 16], norm_num_groups: 8, ..VaeConfig::mnist() };
    let vae_config = if run.quick { quick_vae } else { VaeConfig::mnist() };
    let loss = VaeLoss { kl_weight: args.kl_weight, perceptual_weight: args.perceptual_weight };
    let vae_cfg = TrainerConfig { seed: run.seed, ..TrainerConfig::mnist_vae(vae_steps as usize, VAE_BATCH, VAE_LR) };
    let bar = progress(vae_steps, "VAE");
    let mut terms = Vec::new(); // (L1, KL, perceptual) per step
    let (vae_vs, mut vae, vae_out) = train_vae(
        &vae_config,
        &images,
        loss,
        Some(&clf),
        &vae_cfg,
        TrainRun::new(run.device, &mut |s: StepInfo| {
            bar.inc(1);
            if (s.step + 1) % (vae_steps as usize / 5).max(1) == 0 {
                log_line(&bar, format!("VAE step {:>5}/{vae_steps}  loss {:.4}", s.step + 1, s.loss));
            }
        })
        .checkpoint(&run.path("vae_checkpoint.safetensors"), args.resume),
        &mut |t| terms.push(t),
    )?;
    bar.finish_and_clear();
    // reconstructions of the test set: PSNR and whether the classifier still reads them right
    let test_n = q(500, 10_000) as i64;
    let (test, test_labels) = (data.test_images.narrow(0, 0, test_n), data.test_labels.narrow(0, 0, test_n));
    let recon = tch::no_grad(|| {
        let x = (&test * 2.0 - 1.0).to_device(run.device);
        let chunks: Vec<Tensor> = x.split(1000, 0).iter().map(|c| vae.decode(&vae.encode(c).mean)).collect();
        ((Tensor::cat(&chunks, 0).clamp(-1.0, 1.0) + 1.0) / 2.0).to_device(Device::Cpu)
    });
    let (recon_psnr, recon_accuracy) = (psnr(&test, &recon), clf.accuracy(&recon, &test_labels));
    // [LDM] sec. 4.3.2: the latents' scale, measured on 10 000 training images
    let s = scaling_factor(&vae, &images.narrow(0, 0, q(1000, 10_000) as i64), 1000);
    vae.config.scaling_factor = s;
    // ANCHOR_END: vae
    println!(
        "VAE: {vae_steps} steps in {:.0} s; test reconstructions PSNR {recon_psnr:.2} dB, classifier accuracy \
         {recon_accuracy:.4} (on the originals {:.4}); scaling factor {s:.4}",
        vae_out.seconds,
        clf.accuracy(&test, &test_labels)
    );

    // ANCHOR: latent_unet
    let moments = encode_moments(&vae, &images, 1000); // (60000, 8, 7, 7): μ and log σ² of every training digit
    let tokenizer = pixel.prompts.tokenizer.clone();
    let captioned =
        caption_images_with(&data.train_images, &data.train_labels, CAPTIONS_PER_IMAGE, run.seed, tokenizer)?;
    let seen = captioned.captions.seen_tokens();
    let text = PromptEncoder::load(&text_dir, CONTEXT_LEN, &seen, run.device)?; // lesson 06's, frozen
    let quick_unet = UNetConfig { block_out_channels: vec![16, 32], head_dim: 16, ..UNetConfig::mnist_latent() };
    let mut unet_config = if run.quick { quick_unet } else { UNetConfig::mnist_latent() };
    unet_config.cross_attention_dim = Some(text.hidden_size());
    unet_config.pooled_context_embedding = true;
    let sched = NoiseSchedule::by_name(SCHEDULE, 1000)?;
    let cfg =
        TrainerConfig { bf16: false, seed: run.seed, ..TrainerConfig::mnist_unet(steps as usize, args.batch, args.lr) };
    let empty = text.tokenizer.encode_padded("", CONTEXT_LEN);
    let data_text = TextData {
        encoder: &text.text_encoder,
        captions: &captioned.captions,
        empty: &empty,
        p_uncond: DEFAULT_P_UNCOND,
    };
    let bar = progress(steps, "latent UNet");
    let (unet_vs, unet, outcome) = train_latent_unet(
        &unet_config,
        data_text,
        &moments,
        s,
        &EpsObjective::new(&sched, LOSS_WEIGHT, run.device),
        &cfg,
        TrainRun::new(run.device, &mut |st: StepInfo| {
            bar.inc(1);
            if (st.step + 1) % (steps as usize / 10).max(1) == 0 {
                log_line(&bar, format!("step {:>5}/{steps}  loss {:.4}", st.step + 1, st.loss));
            }
        })
        .checkpoint(&run.path("checkpoint.safetensors"), args.resume),
    )?;
    bar.finish_and_clear();
    // ANCHOR_END: latent_unet
    let train_seconds = started.elapsed().as_secs_f64();
    let parameters: i64 = unet_vs.variables().values().map(|t| t.numel() as i64).sum();
    println!(
        "latent UNet: {parameters} parameters, {steps} steps in {:.0} s; VAE + UNet training {:.0} s, all training \
         (with encoding and captions) {train_seconds:.0} s",
        outcome.seconds,
        vae_out.seconds + outcome.seconds
    );
    // ANCHOR: pipeline
    let config = LatentPipelineConfig {
        image_size: 28,
        context_len: CONTEXT_LEN,
        schedule: SCHEDULE.into(),
        num_train_timesteps: sched.num_steps(),
        seen_tokens: seen,
    };
    let bins = Some(captioned.bins.clone());
    let pipe = LatentDiffusion::new(config, text, (unet_vs, unet), (vae_vs, vae), bins)?;
    pipe.save(&run.path("weights"))?;
    // ANCHOR_END: pipeline
    let losses = [("autoencoder loss (per pixel)", vae_out.losses.as_slice()), ("latent UNet loss", &outcome.losses)];
    plot::loss_curve(&run.path("loss.png"), "Lesson 08: the autoencoder, then the latent UNet", &losses)?;
    let rows: Vec<(usize, Vec<f64>)> = terms.iter().enumerate().map(|(i, t)| (i, t.to_vec())).collect();
    run.write_loss_csv("vae_terms.csv", &["step", "l1_per_image", "kl_per_image", "perceptual"], &rows)?;
    let shown = Tensor::cat(&[test.narrow(0, 0, 16), recon.narrow(0, 0, 16)], 0);
    plot::image_grid(
        &run.path("reconstructions.png"),
        "test digits (top) and their VAE reconstructions",
        &shown,
        16,
        3,
        &[],
    )?;

    // ANCHOR: evaluate
    let draw = Draw { guidance: args.guidance, sampler, steps: sample_steps, seed: 0 };
    let attribute_n = (eval_n / 2).max(1);
    let mut generate =
        |prompt: &str, n: i64, seed: u64, w: f64| pipe.generate(prompt, None, n, &Draw { guidance: w, seed, ..draw });
    let mut at_w = |prompt: &str, n: i64, seed: u64| generate(prompt, n, seed, args.guidance);
    let (accuracy, samples, _) = grade::prompt_accuracy(&mut at_w, &clf, eval_n, 1000 * run.seed)?;
    let (attributes, pairs) =
        grade::attribute_directions(&mut at_w, &Attribute::ALL, attribute_n, 1000 * run.seed + 100)?;
    let following = attributes.fraction_following(&[Attribute::Thickness, Attribute::Slant]);
    let per_prompt = FD_PER_PROMPT.min(eval_n);
    let by_prompt = samples.view([-1, eval_n, 1, 28, 28]); // (50 prompts, eval_n, 1, 28, 28)
    let fd_samples = by_prompt.narrow(1, 0, per_prompt).reshape([-1, 1, 28, 28]);
    let quality = evaluate_samples(&clf, &fd_samples, &data.test_images);
    let sweep = figures::guidance_sweep(
        &mut generate,
        &clf,
        &[0.0, 1.0, 2.0, 3.0, 5.0],
        2,
        1000 * run.seed + 200,
        &run.path("guidance_sweep.png"),
    )?;
    // ANCHOR_END: evaluate
    let (acc, worst, fd) = (accuracy.overall, accuracy.worst_digit, quality.fd_over_floor);
    println!(
        "prompt accuracy {acc:.3} (worst digit {worst:.3}); thickness and slant follow the prompt in {:.0} % of pairs; \
         Fréchet distance {:.2}, floor {:.2}, ratio {fd:.2} (n = {})",
        100.0 * following,
        quality.frechet_distance,
        quality.frechet_floor,
        quality.n
    );
    figures::plot_prompt_samples(&run.path("prompt_samples.png"), &samples, &accuracy, 2)?;
    figures::plot_attribute_pairs(&run.path("attribute_control.png"), &attributes, &pairs, 3)?;

    // ANCHOR: edits
    let edit_n = q(20, 200) as i64;
    let (edit_images, edit_labels) = (data.test_images.narrow(0, 0, edit_n), data.test_labels.narrow(0, 0, edit_n));
    let strengths = [0.0, 0.2, 0.4, 0.6, STRENGTH, 1.0];
    let img2img =
        img2img_study(&pipe, &clf, (&edit_images, &edit_labels), &strengths, &draw, 6, &run.path("img2img.png"))?;
    let inpaint = inpaint_study(&pipe, &clf, &edit_images, &edit_labels, &draw, 8, &run.path("inpainting.png"))?;
    let speed = sampling_speed(&pixel, &pipe, q(4, 100) as i64, &draw)?;
    // ANCHOR_END: edits
    let at_strength = img2img.iter().find(|p| p.strength == STRENGTH).map_or(0.0, |p| p.new_digit);
    println!(
        "img2img at strength {STRENGTH}: {:.1} % read as the new digit; inpainting: unmasked error {:.4} (VAE alone \
         {:.4}), {:.1} % read right; sampling {:.1} images/s latent vs {:.1} pixel: {:.1}x",
        100.0 * at_strength,
        inpaint.unmasked_mae,
        inpaint.unmasked_mae_reconstruction,
        100.0 * inpaint.accuracy,
        speed.latent_images_per_s,
        speed.pixel_images_per_s,
        speed.speedup
    );
    if args.ship {
        let how = format!(
            "seed {}, {vae_steps} autoencoder steps of {VAE_BATCH}, {steps} latent UNet steps of {}, {:.0} s of \
             VAE + UNet training on {} threads, with the text encoder of {}",
            run.seed,
            args.batch,
            vae_out.seconds + outcome.seconds,
            tch::get_num_threads(),
            text_dir.display()
        );
        ship(&pipe, &how)?;
    }
    run.write_metrics(json!({
        "train_seconds_total": train_seconds,
        "vae": { "config": pipe.vae.config, "steps": vae_steps, "batch_size": VAE_BATCH, "lr": VAE_LR,
                 "loss": loss, "seconds": vae_out.seconds, "test_images": test_n, "psnr_db": recon_psnr,
                 "classifier_accuracy_on_reconstructions": recon_accuracy, "scaling_factor": s },
        "unet": { "config": pipe.unet.0.config, "parameters": parameters, "steps": steps, "batch_size": args.batch,
                  "lr": args.lr, "seconds": outcome.seconds, "resumed_from": outcome.resumed_from },
        "vae_plus_unet_seconds": vae_out.seconds + outcome.seconds,
        "sampler": sampler.key(), "sample_steps": sample_steps, "guidance": args.guidance,
        "prompt_accuracy": accuracy, "attributes": attributes,
        "attribute_fraction_following_thickness_slant": following, "samples": quality, "guidance_sweep": sweep,
        "img2img": img2img, "inpainting": inpaint, "speed": speed,
    }))?;
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}

/// --ship: the pipeline into data/lesson08/, with a README that says how it was made.
fn ship(pipe: &LatentDiffusion, how: &str) -> Result<()> {
    let dir = scratch_diffusion::cli::crate_root().join(ld::SHIPPED_DIR);
    pipe.save(&dir)?;
    let readme = format!(
        "# Lesson 08 pipeline\n\nWhat `lesson08 sample`, `img2img` and `inpaint` load by default: lesson 06's BPE \
         merges and frozen text encoder, the latent UNet, the autoencoder (its `scaling_factor` in vae.json) and the \
         attribute bins of the captions.\n\nMade by `./run.sh lesson 08 --ship --threads {}` ({how}).\n",
        tch::get_num_threads()
    );
    write_atomic(&dir.join("README.md"), readme.as_bytes())?;
    println!("shipped the pipeline to {}", dir.display());
    Ok(())
}
