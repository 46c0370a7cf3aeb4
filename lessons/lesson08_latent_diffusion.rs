//! Lesson 08 — latent diffusion: Stable Diffusion in miniature.
//!
//! `lesson08 train` (the default) trains a KL-autoencoder on MNIST, measures its latent scale, trains a text-
//! conditioned UNet on the 4 × 7 × 7 latents behind lesson 06's frozen tokenizer and text encoder, then grades the
//! pipeline (prompt accuracy, attributes, Fréchet distance), img2img and inpainting, and times sampling against
//! lesson 06's pixel-space pipeline (with `--ship` it saves the pipeline into data/lesson08/).
//! `lesson08 sample | img2img | inpaint` use the shipped (or any saved) pipeline, PNG in and out.
//! Chapter 08 walks through this file.
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use scratch_diffusion::checkpoint;
use scratch_diffusion::cli::{crate_root, lesson_main, merge, non_negative, positive, CommonArgs, StepLog};
use scratch_diffusion::data::{captions::CaptionStyle, mnist};
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::nn::unet::UNetConfig;
use scratch_diffusion::nn::vae::{scaling_factor, VaeConfig};
use scratch_diffusion::pipelines::draw_cli::{draw_cmd, DrawArgs, Edit, Img2ImgArgs, InpaintArgs, STRENGTH};
use scratch_diffusion::pipelines::latent_diffusion::{self as ld, Draw, LatentDiffusion, LatentPipelineConfig};
use scratch_diffusion::pipelines::prompt_encoder::PromptEncoder;
use scratch_diffusion::pipelines::text_to_image::{self as t2i, TextToImage};
use scratch_diffusion::pipelines::{bundle, TokensArgs};
use scratch_diffusion::plot;
use scratch_diffusion::sampling::registry::Sampler;
use scratch_diffusion::studies::latent_edits::sampling_speed;
use scratch_diffusion::studies::latent_edits::{grade_saved, img2img_study, inpaint_study, reconstructions};
use scratch_diffusion::studies::latent_edits::{lesson08_results, summary as edits_summary};
use scratch_diffusion::studies::prompts::{grade_text_to_image, EvalArgs, GradeArgs};
use scratch_diffusion::text::captions::{caption_images_with, CONTEXT_LEN};
use scratch_diffusion::train::conditional::DEFAULT_P_UNCOND;
use scratch_diffusion::train::ddpm::EpsObjective;
use scratch_diffusion::train::latent_diffusion::{encode_moments, train_latent_unet, train_vae, VaeLoss};
use scratch_diffusion::train::recipe::{LOSS_WEIGHT, SCHEDULE};
use scratch_diffusion::train::text_cond::TextData;
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use serde_json::json;
use std::path::PathBuf;
use tch::Device;

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
/// Sampling: lesson 07's DPM-Solver++(2M) on a Karras grid; 20 steps at guidance w = 2, as lesson 06 (EvalArgs);
/// img2img graded at strength draw_cli::STRENGTH = 0.8 (the target: ≥ 90 % of outputs read as the new digit).
const SAMPLER: Sampler = Sampler::DpmSolverPp2m;
// ANCHOR_END: budget

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
    /// Show how the tokenizer reads a prompt: tokens, ids, and those no training caption had.
    Tokens(TokensArgs),
    /// Grade a saved pipeline (by default the shipped one) as training does, held-out phrasings included.
    Eval(GradeArgs),
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Autoencoder training steps [default: 600, or 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    vae_steps: Option<u64>,
    /// Weight of KL(q(z|x) ‖ N(0, I)) per image, against the summed L1 reconstruction error.
    #[arg(long, default_value_t = KL_WEIGHT, value_parser = non_negative)]
    kl_weight: f64,
    /// Weight of the squared distance of the classifier's features (our stand-in for LPIPS); 0 turns it off.
    #[arg(long, default_value_t = PERCEPTUAL_WEIGHT, value_parser = non_negative)]
    perceptual_weight: f64,
    /// Latent UNet training steps [default: 3000, or 30 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    #[arg(long, default_value_t = BATCH, value_parser = clap::value_parser!(i64).range(1..=4096))]
    batch: i64,
    /// Peak learning rate of the latent UNet.
    #[arg(long, default_value_t = LR, value_parser = positive)]
    lr: f64,
    #[command(flatten)]
    eval: EvalArgs,
    /// Sampler of the evaluation (lesson 07's names: ddpm, ddim, euler, euler_a, dpm_solver_pp_2m, ...).
    #[arg(long, default_value_t = SAMPLER.key().to_string())]
    sampler: String,
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

fn main() {
    lesson_main(|| match Cli::parse() {
        Cli { command: Some(Command::Sample(args)), .. } => draw_cmd(args, Edit::None),
        Cli { command: Some(Command::Img2img(a)), .. } => draw_cmd(a.draw, Edit::Img2Img(a.image, a.strength)),
        Cli { command: Some(Command::Inpaint(a)), .. } => draw_cmd(a.draw, Edit::Inpaint(a.image, a.mask)),
        Cli { command: Some(Command::Tokens(args)), .. } => args.run("08", ld::shipped_dir),
        Cli { command: Some(Command::Eval(args)), .. } => grade_saved(&args, SAMPLER),
        Cli { command: Some(Command::Train(args)), .. } | Cli { train: args, .. } => train_cmd(args),
    })
}

fn train_cmd(args: TrainArgs) -> Result<()> {
    let (sampler, run) = (Sampler::from_name(&args.sampler).context("--sampler")?, args.common.init("lesson08")?);
    let data = mnist::load(&run.data_dir).context("lesson 08 trains on MNIST")?;
    let q = |quick: u64, full: u64| if run.quick { quick } else { full };
    let (vae_steps, steps) = (args.vae_steps.unwrap_or(q(20, VAE_STEPS)), args.steps.unwrap_or(q(30, STEPS)));
    let (guidance, sample_steps, eval_n) = args.eval.resolve(run.quick);
    let text_dir = args.text_from.clone().unwrap_or_else(t2i::shipped_dir);
    let pixel = TextToImage::load(&text_dir, run.device).with_context(|| bundle::no_bundle(&text_dir, "06", "text"))?;
    let (clf, started) = (MnistClassifier::load_shipped(Device::Cpu)?, std::time::Instant::now());
    let images = (&data.train_images * 2.0 - 1.0).to_device(run.device); // (60000, 1, 28, 28) in [−1, 1]

    // ANCHOR: vae
    let vae_config = if run.quick { VaeConfig::mnist_tiny() } else { VaeConfig::mnist() };
    let loss = VaeLoss { kl_weight: args.kl_weight, perceptual_weight: args.perceptual_weight };
    let vae_cfg = TrainerConfig { seed: run.seed, ..TrainerConfig::mnist_vae(vae_steps as usize, VAE_BATCH, VAE_LR) };
    let log = StepLog::new(vae_steps, "VAE", 5);
    let mut terms = Vec::new(); // (L1, KL, perceptual) per step
    let vae_checkpoint = run.path("vae_checkpoint.safetensors");
    let logged = TrainRun::logged(run.device, &log).checkpoint(&vae_checkpoint, args.resume);
    let (vae_vs, mut vae, vae_out) =
        train_vae(&vae_config, &images, loss, Some(&clf), &vae_cfg, logged, &mut |t| terms.push(t))?;
    log.finish();
    // reconstructions of the test set: PSNR and whether the classifier still reads them right
    let (test, test_labels) = data.test(q(500, 10_000) as i64);
    let recon = reconstructions(&vae, &clf, (&test, &test_labels), run.device);
    // [LDM] sec. 4.3.2: the latents' scale, measured on 10 000 training images
    let s = scaling_factor(&vae, &images.narrow(0, 0, q(1000, 10_000) as i64), 1000);
    vae.config.scaling_factor = s;
    // ANCHOR_END: vae
    println!(
        "VAE: {vae_steps} steps in {:.0} s; test reconstructions PSNR {:.2} dB, classifier accuracy {:.4} (on the \
         originals {:.4}); scaling factor {s:.4}",
        vae_out.seconds, recon.psnr_db, recon.accuracy, recon.original_accuracy
    );

    // ANCHOR: latent_unet
    let moments = encode_moments(&vae, &images, 1000); // (60000, 8, 7, 7): μ and log σ² of every training digit
    let tokenizer = pixel.prompts.tokenizer.clone();
    let (labels, k) = (&data.train_labels, (CAPTIONS_PER_IMAGE, CaptionStyle::Varied)); // as lesson 06 trains
    let captioned = caption_images_with(&data.train_images, labels, k, run.seed, tokenizer)?;
    let seen = captioned.captions.seen_tokens();
    let text = PromptEncoder::load(&text_dir, CONTEXT_LEN, &seen, run.device)?; // lesson 06's, frozen
    let mut unet_config = if run.quick { UNetConfig::mnist_latent_tiny() } else { UNetConfig::mnist_latent() };
    unet_config.cross_attention_dim = Some(text.hidden_size());
    unet_config.pooled_context_embedding = true;
    let sched = NoiseSchedule::by_name(SCHEDULE, 1000)?;
    let cfg =
        TrainerConfig { bf16: false, seed: run.seed, ..TrainerConfig::mnist_unet(steps as usize, args.batch, args.lr) };
    let (empty, captions) = (text.tokenizer.encode_padded("", CONTEXT_LEN), &captioned.captions); // ∅, and (N, K, L)
    let text_data = TextData { encoder: &text.text_encoder, captions, empty: &empty, p_uncond: DEFAULT_P_UNCOND };
    let log = StepLog::new(steps, "latent UNet", 10);
    let (unet_vs, unet, outcome) = train_latent_unet(
        &unet_config,
        text_data,
        &moments,
        s,
        &EpsObjective::new(&sched, LOSS_WEIGHT, run.device),
        &cfg,
        TrainRun::logged(run.device, &log).checkpoint(&run.path("checkpoint.safetensors"), args.resume),
    )?;
    log.finish();
    // ANCHOR_END: latent_unet
    let train_seconds = started.elapsed().as_secs_f64();
    let parameters = checkpoint::num_parameters(&unet_vs);
    let (unet_s, vae_unet_s) = (outcome.seconds, vae_out.seconds + outcome.seconds);
    println!("latent UNet: {parameters} parameters, {steps} steps in {unet_s:.0} s; VAE + UNet {vae_unet_s:.0} s");
    // ANCHOR: pipeline
    let config = LatentPipelineConfig::mnist(SCHEDULE, seen);
    let pipe = LatentDiffusion::new(config, text, (unet_vs, unet), (vae_vs, vae), Some(captioned.bins.clone()))?;
    pipe.save(&run.path("weights"))?;
    // ANCHOR_END: pipeline
    let losses = [("autoencoder loss (per pixel)", vae_out.losses.as_slice()), ("latent UNet loss", &outcome.losses)];
    plot::loss_curve(&run.path("loss.png"), "Lesson 08: the autoencoder, then the latent UNet", &losses)?;
    let rows: Vec<(usize, Vec<f64>)> = terms.iter().enumerate().map(|(i, t)| (i, t.to_vec())).collect();
    run.write_loss_csv("vae_terms.csv", &["l1_per_image", "kl_per_image", "perceptual"], &rows)?;
    recon.plot(&run.path("reconstructions.png"), &test, 16)?;

    // ANCHOR: evaluate
    let draw = Draw { guidance, sampler, steps: sample_steps, seed: 0 };
    let at = |seed: u64, w: f64| Draw { guidance: w, seed, ..draw };
    let mut generate = |prompt: &str, n: i64, seed: u64, w: f64| pipe.generate(prompt, None, n, &at(seed, w));
    let mut generate_each = |prompts: &[String], seed: u64, w: f64| pipe.generate_each(prompts, &at(seed, w)); // held-out
    let (sweep, eval) = ([0.0, 1.0, 2.0, 3.0, 5.0], (guidance, eval_n, run.seed, q(3, 64) as usize)); // held-out templates
    let by = (&mut generate as _, &mut generate_each as _);
    let grades = grade_text_to_image(by, &clf, eval, &sweep, &data.test_images, &run.out)?;
    // ANCHOR_END: evaluate
    println!("{}", grades.summary());

    // ANCHOR: edits
    let (edit_images, edit_labels) = data.test(q(20, 200) as i64);
    let strengths = [0.0, 0.2, 0.4, 0.6, STRENGTH, 1.0];
    let img2img =
        img2img_study(&pipe, &clf, (&edit_images, &edit_labels), &strengths, &draw, 6, &run.path("img2img.png"))?;
    let inpaint = inpaint_study(&pipe, &clf, &edit_images, &edit_labels, &draw, 8, &run.path("inpainting.png"))?;
    let speed = sampling_speed(&pixel, &pipe, q(4, 100) as i64, &draw)?;
    // ANCHOR_END: edits
    println!("{}", edits_summary(STRENGTH, &img2img, &inpaint, &speed));
    if args.ship {
        let (seed, batch, text) = (run.seed, args.batch, text_dir.display());
        let how = format!(
            "seed {seed}, {vae_steps} autoencoder steps of {VAE_BATCH}, {steps} latent UNet steps of {batch}, \
             {vae_unet_s:.0} s of VAE + UNet training, with the text encoder of {text}"
        );
        bundle::ship(&crate_root().join(ld::SHIPPED_DIR), &ld::readme(&how), |dir| pipe.save(dir))?;
    }
    let mut metrics = json!({
        "train_seconds_total": train_seconds,
        "vae": { "config": pipe.vae.config, "steps": vae_steps, "batch_size": VAE_BATCH, "lr": VAE_LR,
                 "loss": loss, "seconds": vae_out.seconds, "test_images": test.size()[0], "psnr_db": recon.psnr_db,
                 "classifier_accuracy_on_reconstructions": recon.accuracy, "scaling_factor": s, "reconstructions": recon },
        "unet": { "config": pipe.unet.0.config, "parameters": parameters, "steps": steps, "batch_size": args.batch,
                  "lr": args.lr, "seconds": outcome.seconds, "resumed_from": outcome.resumed_from },
        "vae_plus_unet_seconds": vae_unet_s,
        "sampler": sampler.key(), "sample_steps": sample_steps, "guidance": guidance,
        "img2img": img2img, "inpainting": inpaint, "speed": speed,
    });
    merge(&mut metrics, json!(grades));
    let edits = (STRENGTH, img2img.as_slice(), &inpaint, &speed);
    run.write_results(&[("results", lesson08_results(&metrics, &grades, edits))])?;
    run.write_metrics(metrics)?;
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}
