//! Lesson 11 — cascades and priors: two ways text-to-image worked at scale beside latent diffusion.
//!
//! `--part cascade`: a text-conditioned base model at 14×14 behind lesson 06's frozen text encoder, and a
//! super-resolution model 14 → 28 that reads the base's image upsampled, trained with Gaussian conditioning
//! augmentation and without; the cascade sampled with the augmentation level swept, graded by Fréchet distance and
//! prompt accuracy against lesson 06's direct 28×28 model. `--part unclip`: a CLIP image tower against the same frozen
//! text encoder, a diffusion prior from text embeddings to image embeddings, a decoder that draws from an image
//! embedding; image variations, interpolations, and text → prior → decoder against lesson 06. Without `--part`, both.
//! Chapter 11 walks through this file.
use anyhow::{Context, Result};
use clap::Parser;
use scratch_diffusion::cli::{lesson_main, merge, Run, StepLog};
use scratch_diffusion::data::captions::CaptionStyle;
use scratch_diffusion::data::mnist::{self, Mnist};
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::nn::class_cond::ClassCondConfig;
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::nn::clip::digit_prompts;
use scratch_diffusion::nn::encoder_unet::EncoderUNetConfig;
use scratch_diffusion::nn::super_resolution::SR_IN_CHANNELS;
use scratch_diffusion::nn::unclip::PriorConfig;
use scratch_diffusion::nn::unet::UNetConfig;
use scratch_diffusion::pipelines::text_to_image::{shipped_dir, Draw, PipelineConfig, TextToImage, DEFAULT_GUIDANCE};
use scratch_diffusion::studies::guidance_methods::pooled_text_states;
use scratch_diffusion::studies::{cascade as cascades, unclip as unclips};
use scratch_diffusion::text::captions::{caption_images_with, CaptionedImages};
use scratch_diffusion::train::cascade::{downsample, train_super_resolution};
use scratch_diffusion::train::ddpm::{EpsObjective, LossWeight};
use scratch_diffusion::train::noise_aware::train_noisy_clip;
use scratch_diffusion::train::text_cond::{train_text_cond_unet, TextData};
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use scratch_diffusion::train::unclip::{train_decoder, train_prior};
use serde_json::{json, Value};
use tch::{Device, Tensor};

/// [CDM] sec. 4.2 draws the training level uniformly up to a maximum; a tenth of the schedule here (ᾱ ≥ 0.9).
const MAX_LEVEL: usize = 100;
/// Steps of lesson 06's recipe timed to know its training time on this CPU.
const DIRECT_TIMED_STEPS: u64 = 100;
/// Lesson 06's peak learning rate, for every UNet here.
const LR: f64 = 1e-2;
/// [unCLIP] sec. 2.1: four extra context tokens, the embedding dropped 10 % of the time.
const DECODER_TOKENS: i64 = 4;
const P_DROP: f64 = 0.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Cascade,
    Unclip,
    Both,
}

#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    common: scratch_diffusion::cli::CommonArgs,
    /// Which half to run.
    #[arg(long, value_enum, default_value_t = Part::Both)]
    part: Part,
    /// Steps of the 14×14 base model and of each super-resolution model [default: 1500 each, or 10 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    base_steps: Option<u64>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    sr_steps: Option<u64>,
    /// Steps of the CLIP image tower, the prior and the decoder [default: 800, 3000, 1500, or 10 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    clip_steps: Option<u64>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    prior_steps: Option<u64>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    decoder_steps: Option<u64>,
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(i64).range(2..=4096))]
    batch: i64,
    /// Training digits (with their captions) [default: 30000, or 512 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(256..=60000))]
    train_images: Option<i64>,
    /// Samples each grade draws, one per prompt "a handwritten d" in turn [default: 200, or 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(10..=250))]
    num_samples: Option<i64>,
    /// Augmentation levels the cascade is sampled at (0: the base model's samples as they are).
    #[arg(long, value_delimiter = ',', default_values_t = [0, 25, 50, 100, 200, 400])]
    #[arg(value_parser = clap::value_parser!(u64).range(0..=1000))]
    levels: Vec<u64>,
    /// Continue interrupted training from the checkpoints in OUT.
    #[arg(long)]
    resume: bool,
}

/// What both parts use.
struct Shared {
    run: Run,
    data: Mnist,
    direct: TextToImage,
    clf: MnistClassifier,
    sched: NoiseSchedule,
    objective: EpsObjective,
    captioned: CaptionedImages,
    full: Tensor,         // the training digits in [−1, 1], (M, 1, 28, 28), on the run's device
    prompts: Vec<String>, // one per sample, "a handwritten d" for d = i mod 10
    asked: Tensor,        // the digits they ask for
    sample_steps: usize,
}

fn main() {
    lesson_main(|| {
        let args = Args::parse();
        let s = shared(&args)?;
        let mut sections = vec![];
        let mut metrics =
            json!({ "batch_size": args.batch, "lr": LR, "samples": s.prompts.len(), "sample_steps": s.sample_steps });
        if args.part != Part::Unclip {
            let (more, m) = cascade(&s, &args)?;
            sections.extend(more);
            merge(&mut metrics, json!({ "cascade": m }));
        }
        if args.part != Part::Cascade {
            let (more, m) = unclip(&s, &args)?;
            sections.extend(more);
            merge(&mut metrics, json!({ "unclip": m }));
        }
        s.run.write_results(&sections.iter().map(|(a, b)| (*a, b.clone())).collect::<Vec<_>>())?;
        s.run.write_metrics(metrics)?;
        println!("outputs in {} ({:.1} s)", s.run.out.display(), s.run.elapsed_s());
        Ok(())
    })
}

fn shared(args: &Args) -> Result<Shared> {
    let run = args.common.init("lesson11")?;
    let q = |quick: i64, full: i64| if run.quick { quick } else { full };
    let (m, n) = (args.train_images.unwrap_or(q(512, 30000)), args.num_samples.unwrap_or(q(20, 200)));
    anyhow::ensure!(args.batch <= m, "--batch ({}) must not exceed --train-images ({m}): lower --batch", args.batch);
    let data = mnist::load(&run.data_dir).context("lesson 11 trains on MNIST")?;
    let direct = TextToImage::load(&shipped_dir(), run.device)
        .context("lesson 06's shipped pipeline (./run.sh lesson 06 --ship): its text encoder and its direct model")?;
    let sched = NoiseSchedule::by_name(&direct.config.schedule, direct.config.num_train_timesteps)?;
    let objective = EpsObjective::new(&sched, LossWeight::Uniform, run.device);
    let images = data.train_images.narrow(0, 0, m); // (M, 1, 28, 28) in [0, 1]
    let labels = data.train_labels.narrow(0, 0, m);
    let captioned =
        caption_images_with(&images, &labels, (2, CaptionStyle::Varied), run.seed, direct.prompts.tokenizer.clone())?;
    let full = (&images * 2.0 - 1.0).to_device(run.device);
    let prompts: Vec<String> = digit_prompts().into_iter().cycle().take(n as usize).collect();
    let asked = Tensor::from_slice(&(0..n).map(|i| i % 10).collect::<Vec<_>>());
    let sample_steps = if run.quick { 5 } else { 20 };
    let clf = MnistClassifier::load_shipped(Device::Cpu)?;
    Ok(Shared { run, data, direct, clf, sched, objective, captioned, full, prompts, asked, sample_steps })
}

/// Lesson 06's recipe for `steps` steps of `batch`, seeded by the run.
fn recipe(s: &Shared, steps: u64, batch: i64) -> TrainerConfig {
    TrainerConfig { seed: s.run.seed, ..TrainerConfig::mnist_unet(steps as usize, batch, LR) }
}

fn cascade(s: &Shared, args: &Args) -> Result<(Vec<(&'static str, String)>, Value)> {
    let steps = |flag: Option<u64>, full| flag.unwrap_or(if s.run.quick { 10 } else { full });
    let (base_steps, sr_steps) = (steps(args.base_steps, 1500), steps(args.sr_steps, 1500));
    let text = &s.direct.prompts;
    // ANCHOR: base
    let base_config = UNetConfig {
        block_out_channels: vec![32, 64], // 14×14 → 7×7
        attention: vec![false, true],
        cross_attention_dim: Some(text.hidden_size()),
        pooled_context_embedding: true,
        ..UNetConfig::mnist()
    };
    let empty = text.tokenizer.encode_padded("", text.context_len);
    let captions = &s.captioned.captions;
    let text_data = TextData { encoder: &text.text_encoder, captions, empty: &empty, p_uncond: 0.1 };
    let log = StepLog::new(base_steps, "base 14×14", 10);
    let (cfg, ckpt) = (recipe(s, base_steps, args.batch), s.run.path("base_checkpoint.safetensors"));
    let train = TrainRun::logged(s.run.device, &log).checkpoint(&ckpt, args.resume);
    let low = downsample(&s.full); // (M, 1, 14, 14): the base stage's data
    let (base_vs, base_unet, base_out) =
        train_text_cond_unet(&base_config, text_data, &low, &s.objective, &cfg, train)?;
    log.finish();
    let config = PipelineConfig { image_size: 14, ..s.direct.config.clone() };
    let (bpe, text_config) = (text.tokenizer.clone(), text.text_encoder.config.clone());
    let base = TextToImage::new(config, bpe, text_config, text.text_vs(), base_vs, base_unet, None)?;
    // ANCHOR_END: base

    // ANCHOR: super_resolution
    let sr_config = UNetConfig { in_channels: SR_IN_CHANNELS, ..UNetConfig::mnist() };
    let mut sr = Vec::new(); // (trained with augmentation, without)
    for (name, max_level) in [("sr_augmented", MAX_LEVEL), ("sr_plain", 0)] {
        let log = StepLog::new(sr_steps, name, 10);
        let (cfg, ckpt) = (recipe(s, sr_steps, args.batch), s.run.path(&format!("{}_checkpoint.safetensors", name)));
        let train = TrainRun::logged(s.run.device, &log).checkpoint(&ckpt, args.resume);
        sr.push(train_super_resolution(&sr_config, &s.full, &s.sched, max_level, &s.objective, &cfg, train)?);
        log.finish();
    }
    // ANCHOR_END: super_resolution
    // lesson 06's direct model, DIRECT_TIMED_STEPS steps of its recipe timed here: its training time on this CPU
    let timed = recipe(s, if s.run.quick { 2 } else { DIRECT_TIMED_STEPS }, args.batch);
    let direct_seconds = cascades::direct_train_seconds(&s.direct, text_data, &s.full, &s.objective, &timed)?;
    let seconds = [base_out.seconds, sr[0].2.seconds, sr[1].2.seconds, direct_seconds];
    println!(
        "training: base {:.0} s, super-resolution {:.0} s / {:.0} s, lesson 06 {:.0} s",
        seconds[0], seconds[1], seconds[2], seconds[3]
    );

    let (draw, grading) =
        (Draw::new(DEFAULT_GUIDANCE, s.sample_steps, s.run.seed + 1), (&s.clf, &s.asked, &s.data.test_images));
    let (levels, models) =
        (args.levels.iter().map(|&l| l as usize).collect::<Vec<_>>(), (&base, [&sr[0].1, &sr[1].1], &s.direct));
    let report = cascades::evaluate(models, &s.sched, (&s.prompts, &levels, draw), grading, seconds)?;
    report.plot(&s.run.out)?;
    Ok((report.sections(), report.metrics(&base_config, &sr_config, (base_steps, sr_steps, MAX_LEVEL))))
}

fn unclip(s: &Shared, args: &Args) -> Result<(Vec<(&'static str, String)>, Value)> {
    let steps = |flag: Option<u64>, full| flag.unwrap_or(if s.run.quick { 10 } else { full });
    let (clip_steps, prior_steps) = (steps(args.clip_steps, 800), steps(args.prior_steps, 3000));
    let decoder_steps = steps(args.decoder_steps, 1500);
    let device = s.run.device;
    // ANCHOR: clip
    // the image tower of a CLIP against lesson 06's frozen text encoder (lesson 10's, at t = 0 here)
    let (ids, lens) = (s.captioned.captions.ids.select(1, 0), s.captioned.captions.lens.select(1, 0)); // (M, L), (M,)
    let pooled = pooled_text_states(&s.direct.prompts, &ids, &lens); // (M, D)
    let tower = if s.run.quick { EncoderUNetConfig::tiny(64) } else { EncoderUNetConfig::mnist(64) };
    let log = StepLog::new(clip_steps, "CLIP image tower", 10);
    let (cfg, ckpt) = (recipe(s, clip_steps, 128), s.run.path("clip_checkpoint.safetensors"));
    let train = TrainRun::logged(s.run.device, &log).checkpoint(&ckpt, args.resume);
    let (mut clip_vs, clip, clip_out) =
        train_noisy_clip(&tower, &s.sched, (&s.full, &pooled, &ids.to_device(device)), &cfg, train)?;
    clip_vs.freeze();
    log.finish();
    // (M, d) each: the image embeddings (unit rows) and the text embeddings the prior starts from
    let image_emb = unclips::image_embeddings(&clip, &((&s.full + 1.0) / 2.0), device);
    let text_emb = tch::no_grad(|| clip.encode_text(&pooled));
    // ANCHOR_END: clip

    // ANCHOR: prior_and_decoder
    let prior_config = PriorConfig::mnist(64);
    let log = StepLog::new(prior_steps, "prior", 10);
    let (cfg, ckpt) = (recipe(s, prior_steps, 256), s.run.path("prior_checkpoint.safetensors"));
    let train = TrainRun::logged(s.run.device, &log).checkpoint(&ckpt, args.resume);
    let cfg = TrainerConfig { lr: 1e-3, ema_decay: None, ..cfg };
    let (_, prior, prior_out) = train_prior(&prior_config, (&text_emb, &image_emb), &s.sched, &cfg, train)?;
    log.finish();
    // lesson 05's UNet, cross-attending to the embedding's tokens
    let decoder_config = if s.run.quick { ClassCondConfig::tiny().unet } else { ClassCondConfig::mnist().unet };
    let log = StepLog::new(decoder_steps, "decoder", 10);
    let (cfg, ckpt) = (recipe(s, decoder_steps, args.batch), s.run.path("decoder_checkpoint.safetensors"));
    let train = TrainRun::logged(s.run.device, &log).checkpoint(&ckpt, args.resume);
    let (_, decoder, decoder_out) =
        train_decoder(&decoder_config, DECODER_TOKENS, (&s.full, &image_emb), P_DROP, &s.objective, &cfg, train)?;
    log.finish();
    // ANCHOR_END: prior_and_decoder
    let seconds = [clip_out.seconds, prior_out.seconds, decoder_out.seconds];
    println!("CLIP image tower {:.0} s, prior {:.0} s, decoder {:.0} s", seconds[0], seconds[1], seconds[2]);
    let how = unclips::Sampling { guidance: DEFAULT_GUIDANCE, steps: s.sample_steps };
    let models = (&clip, &prior, &decoder, &s.direct, &s.clf);
    let report = unclips::evaluate(models, &s.sched, &s.data, (&s.prompts, &s.asked), (how, s.run.seed + 3))?;
    report.plot(&s.run.out)?;
    Ok((
        report.sections(),
        report.metrics((&tower, &prior_config, &decoder_config), (clip_steps, prior_steps, decoder_steps), seconds),
    ))
}
