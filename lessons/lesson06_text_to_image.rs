//! Lesson 06 — text-to-image: everything Stable Diffusion does, at MNIST scale, trained from scratch.
//!
//! `lesson06 train` (the default) captions every training digit (the digit as a numeral or a word, and the
//! thickness, slant and size measured from its pixels), trains a byte-level BPE tokenizer on the captions,
//! pre-trains a mini-CLIP contrastively and freezes its text encoder, trains a UNet whose spatial transformers
//! cross-attend to the caption's token states (dropping captions to the empty prompt), then measures whether samples
//! follow their prompts, draws the figures and saves the pipeline (with `--ship` also into data/lesson06/).
//! `lesson06 sample --prompt "a bold 7"` draws digits with the shipped (or any saved) pipeline.
//! Chapter 06 walks through this file.
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use scratch_diffusion::checkpoint;
use scratch_diffusion::cli::{
    crate_root, finite, lesson_main, mean_of_last, merge, positive, progress, unit_interval, CommonArgs, StepLog,
};
use scratch_diffusion::data::{captions::CaptionStyle, mnist};
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::nn::class_cond::ClassCondConfig;
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::nn::clip::{digit_prompts, tokenize, zero_shot_accuracy, ClipTargets, MiniClipConfig};
use scratch_diffusion::nn::text_unet::lens_to_mask;
use scratch_diffusion::pipelines::text_to_image::{self as t2i, PipelineConfig, TextToImage};
use scratch_diffusion::pipelines::{bundle, PromptArgs, ThresholdArgs, TokensArgs};
use scratch_diffusion::plot;
use scratch_diffusion::sampling::ddpm::PosteriorVariance;
use scratch_diffusion::studies::prompts::{self as figures, grade_text_to_image, EvalArgs, GradeArgs};
use scratch_diffusion::text::captions::{caption_images, CONTEXT_LEN};
use scratch_diffusion::train::clip::train_mini_clip;
use scratch_diffusion::train::conditional::DEFAULT_P_UNCOND;
use scratch_diffusion::train::ddpm::{EpsObjective, LossWeight};
use scratch_diffusion::train::recipe::{BATCH, LOSS_WEIGHT, SCHEDULE, STEPS};
use scratch_diffusion::train::text_cond::{train_text_cond_unet, TextData};
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use serde_json::json;
use tch::Device;

/// Captions drawn per training image; each step reads one of them at random.
const CAPTIONS_PER_IMAGE: usize = 4;
/// Mini-CLIP pre-training: steps (a flag), batch and peak learning rate.
const CLIP_STEPS: u64 = 600;
const CLIP_BATCH: i64 = 128;
const CLIP_LR: f64 = 1e-3;
/// Peak learning rate of the UNet: lesson 04's 10⁻², below the recipe's 1.2·10⁻², at which a run did worse (chapter 06).
const LR: f64 = 1e-2;

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
    /// Train the whole pipeline (the default without a subcommand).
    Train(TrainArgs),
    /// Draw digits for a prompt with a trained pipeline (by default the shipped one).
    Sample(SampleArgs),
    /// Show how the tokenizer reads a prompt: tokens, ids, and those no training caption had.
    Tokens(TokensArgs),
    /// Grade a saved pipeline (by default the shipped one) as training does, held-out phrasings included.
    Eval(GradeArgs),
}

#[derive(Args, Debug)]
struct SampleArgs {
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    threshold: ThresholdArgs,
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// UNet training steps [default: 2000, or 30 with --quick] (lesson 05's budget).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    #[arg(long, default_value_t = BATCH, value_parser = clap::value_parser!(i64).range(1..=4096))]
    batch: i64,
    /// Peak learning rate of the UNet (AdamW, warm-up then cosine decay).
    #[arg(long, default_value_t = LR, value_parser = positive)]
    lr: f64,
    /// Noise schedule: linear (DDPM) or cosine (improved DDPM), T = 1000.
    #[arg(long, default_value = SCHEDULE)]
    schedule: String,
    /// Weighting of the loss over timesteps: uniform (L_simple) or min-snr.
    #[arg(long, value_enum, default_value_t = LOSS_WEIGHT)]
    loss_weight: LossWeight,
    /// Dropout inside the residual blocks [default: the preset's].
    #[arg(long, value_parser = unit_interval)]
    dropout: Option<f64>,
    /// Also add the pooled text embedding (the end-of-text token's state) to the time embedding, as SDXL does;
    /// `--pooled-context false` leaves cross-attention as the only way in, as in SD 1.5.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pooled_context: bool,
    /// Probability of training on the empty prompt instead of the caption (condition dropout).
    #[arg(long, default_value_t = DEFAULT_P_UNCOND, value_parser = unit_interval)]
    p_uncond: f64,
    /// Captions to train on: varied (as people write prompts) or fixed (the first nine-template grammar).
    #[arg(long, value_enum, default_value_t = CaptionStyle::Varied)]
    captions: CaptionStyle,
    /// Contrastive pre-training steps of the mini-CLIP [default: 600, or 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    clip_steps: Option<u64>,
    #[command(flatten)]
    eval: EvalArgs,
    /// Guidance scales of the sweep figure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 1.0, 2.0, 3.0, 5.0, 8.0], value_parser = finite)]
    sweep: Vec<f64>,
    /// Reverse-step variance σ_t² of the DDPM sampler (respaced over T = 1000): β̃_t suits few respaced steps.
    #[arg(long, value_enum, default_value_t = PosteriorVariance::BetaTilde)]
    variance: PosteriorVariance,
    /// Train in bf16 (f32 master weights).
    #[arg(long)]
    bf16: bool,
    /// Continue interrupted training from OUT/clip_checkpoint.safetensors and OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
    /// Also save the pipeline into data/lesson06/, the weights `lesson06 sample` uses by default.
    #[arg(long)]
    ship: bool,
}

fn main() {
    lesson_main(|| match Cli::parse() {
        Cli { command: Some(Command::Sample(args)), .. } => sample_cmd(args),
        Cli { command: Some(Command::Tokens(args)), .. } => args.run("06", t2i::shipped_dir),
        Cli { command: Some(Command::Eval(args)), .. } => figures::grade_saved(&args),
        Cli { command: Some(Command::Train(args)), .. } | Cli { train: args, .. } => train_cmd(args),
    })
}

fn sample_cmd(SampleArgs { prompt: args, threshold }: SampleArgs) -> Result<()> {
    let (device, dir) = (args.init()?, args.weights_dir(t2i::shipped_dir));
    // ANCHOR: sample_cmd
    let pipe = TextToImage::load(&dir, device).with_context(|| bundle::no_bundle(&dir, "06", "text-to-image"))?;
    for note in pipe.prompts.notes(&args.prompt)? {
        println!("{note}"); // words the captions never had, no digit or several
    }
    let draw =
        t2i::Draw { threshold: threshold.threshold(), ..t2i::Draw::new(args.guidance, args.steps as usize, args.seed) };
    let images = pipe.generate_with(&args.prompt, args.negative.as_deref(), args.num, &draw, &mut |_, _| {})?;
    // ANCHOR_END: sample_cmd
    bundle::write_samples(&args.out_dir("lesson06"), &images, &args.title(&format!("{} steps", args.steps)))
}

fn train_cmd(args: TrainArgs) -> Result<()> {
    let run = args.common.init("lesson06")?;
    let data = mnist::load(&run.data_dir).context("lesson 06 trains on MNIST")?;
    let q = |quick: u64, full: u64| if run.quick { quick } else { full };
    let (steps, clip_steps) =
        (args.steps.unwrap_or(q(30, STEPS)) as usize, args.clip_steps.unwrap_or(q(20, CLIP_STEPS)) as usize);
    let (guidance, sample_steps, eval_n) = args.eval.resolve(run.quick);
    let (sched, started) = (NoiseSchedule::by_name(&args.schedule, 1000)?, std::time::Instant::now()); // T as saved
    let data_set =
        caption_images(&data.train_images, &data.train_labels, (CAPTIONS_PER_IMAGE, args.captions), run.seed)?;
    let (bpe, caps) = (&data_set.tokenizer, &data_set.captions); // caps: ids (N, K, L), lens (N, K)
    let (merges, vocab) = (bpe.num_merges(), bpe.vocab_size());
    println!("captions of image 0: {:?}; BPE: {merges} merges, {vocab} tokens", data_set.example);

    // ANCHOR: clip
    let mut clip_config =
        if run.quick { MiniClipConfig::tiny(vocab as i64) } else { MiniClipConfig::mnist(vocab as i64) };
    clip_config.text.max_position_embeddings = CONTEXT_LEN as i64;
    let clip_cfg = TrainerConfig { seed: run.seed, ..TrainerConfig::mini_clip(clip_steps, CLIP_BATCH, CLIP_LR) };
    let images = (&data.train_images * 2.0 - 1.0).to_device(run.device); // (60000, 1, 28, 28) in [−1, 1]
    let (ids, mask) = (caps.ids.select(1, 0), lens_to_mask(&caps.lens.select(1, 0), CONTEXT_LEN as i64)); // (N, L)
    let log = StepLog::new(clip_steps as u64, "mini-CLIP", 0);
    let (clip_vs, clip, clip_out) = train_mini_clip(
        &clip_config,
        &images,
        &ids,
        Some(&mask),
        ClipTargets::SameCaption,
        &clip_cfg,
        TrainRun::logged(run.device, &log).checkpoint(&run.path("clip_checkpoint.safetensors"), args.resume),
    )?;
    log.finish();
    // ANCHOR_END: clip
    let (prompt_ids, prompt_mask) = tokenize(bpe, &digit_prompts(), CONTEXT_LEN); // "a handwritten 0", …
    let test = data.test(q(1000, 10_000) as i64); // images in [0, 1], labels
    let zero_shot = zero_shot_accuracy(&clip, &(test.0 * 2.0 - 1.0), &prompt_ids, Some(&prompt_mask), &test.1);
    println!("mini-CLIP: {clip_steps} steps in {:.0} s, zero-shot accuracy {zero_shot:.3}", clip_out.seconds);

    // ANCHOR: unet
    let mut unet_config = if run.quick { ClassCondConfig::tiny().unet } else { ClassCondConfig::mnist().unet };
    unet_config.cross_attention_dim = Some(clip_config.text.hidden_size); // the width of the text's token states
    unet_config.dropout = args.dropout.unwrap_or(unet_config.dropout);
    unet_config.pooled_context_embedding = args.pooled_context;
    let cfg = // lesson 04's recipe (src/train/recipe.rs)
        TrainerConfig { bf16: args.bf16, seed: run.seed, ..TrainerConfig::mnist_unet(steps, args.batch, args.lr) };
    let empty = bpe.encode_padded("", CONTEXT_LEN); // the unconditional prompt ∅
    let log = StepLog::new(steps as u64, "UNet", 10);
    let (unet_vs, unet, outcome) = train_text_cond_unet(
        &unet_config,
        TextData { encoder: &clip.text_encoder, captions: caps, empty: &empty, p_uncond: args.p_uncond },
        &images,
        &EpsObjective::new(&sched, args.loss_weight, run.device),
        &cfg,
        TrainRun::logged(run.device, &log).checkpoint(&run.path("checkpoint.safetensors"), args.resume),
    )?;
    log.finish();
    // ANCHOR_END: unet
    let train_seconds = started.elapsed().as_secs_f64();
    let parameters = checkpoint::num_parameters(&unet_vs);
    println!("UNet: {parameters} parameters, {steps} steps in {:.0} s; all: {train_seconds:.0} s", outcome.seconds);
    // ANCHOR: pipeline
    let config = PipelineConfig::mnist(&args.schedule, args.variance, caps.seen_tokens());
    let (text_config, bins) = (clip_config.text.clone(), Some(data_set.bins.clone()));
    let pipe = TextToImage::new(config, bpe.clone(), text_config, &clip_vs, unet_vs, unet, bins)?;
    pipe.save(&run.path("weights"))?;
    // ANCHOR_END: pipeline
    let losses = [("mini-CLIP contrastive loss", clip_out.losses.as_slice()), ("UNet loss", &outcome.losses)];
    plot::loss_curve(&run.path("loss.png"), "Lesson 06: mini-CLIP pre-training, then the UNet", &losses)?;

    // ANCHOR: evaluate
    let clf = MnistClassifier::load_shipped(Device::Cpu)?;
    let held_out = q(3, 64) as usize; // held-out templates graded
    let bar = progress(figures::images_graded(eval_n, args.sweep.len(), held_out) * sample_steps as u64, "sample");
    let mut generate = |prompt: &str, n: i64, seed: u64, w: f64| {
        pipe.generate_with(prompt, None, n, &t2i::Draw::new(w, sample_steps, seed), &mut |_, st| {
            bar.inc(st.x_t.size()[0] as u64)
        })
    };
    let mut generate_each = |prompts: &[String], seed: u64, w: f64| {
        let (x, refused) = pipe.generate_each(prompts, &t2i::Draw::new(w, sample_steps, seed))?;
        bar.inc(prompts.len() as u64 * sample_steps as u64);
        Ok((x, refused)) // one image per held-out prompt, a digit's prompts in one batch
    };
    // prompt accuracy, attributes, Fréchet distance (lesson 04's harness), the guidance sweep, held-out phrasings
    let (eval, by) = ((guidance, eval_n, run.seed, held_out), (&mut generate as _, &mut generate_each as _));
    let grades = grade_text_to_image(by, &clf, eval, &args.sweep, &data.test_images, &run.out)?;
    // ANCHOR_END: evaluate
    bar.finish_and_clear();
    println!("{}", grades.summary());
    let prompt = "a bold 7 leaning right";
    figures::plot_token_attention(&run.path("cross_attention.png"), &pipe, prompt, guidance, sample_steps, 9000)?;
    if args.ship {
        let how = format!(
            "seed {}, {steps} UNet steps of {} at peak lr {}, {clip_steps} mini-CLIP steps of {CLIP_BATCH}, \
             {train_seconds:.0} s of training; worst digit's prompt accuracy {:.3}",
            run.seed, args.batch, args.lr, grades.prompt_accuracy.worst_digit
        );
        bundle::ship(&crate_root().join(t2i::SHIPPED_DIR), &t2i::readme(&how), |dir| pipe.save(dir))?;
    }
    let mut metrics = json!({
        "train_seconds_total": train_seconds,
        "clip": { "config": clip_config, "steps": clip_steps, "batch_size": CLIP_BATCH, "seconds": clip_out.seconds,
                  "zero_shot_accuracy": zero_shot },
        "tokenizer": { "merges": merges, "vocab_size": vocab, "context_len": CONTEXT_LEN },
        "network": unet_config, "parameters": parameters, "train_steps": steps, "batch_size": args.batch,
        "unet_seconds": outcome.seconds, "resumed_from": outcome.resumed_from, "p_uncond": args.p_uncond,
        "captions": args.captions, "bf16": args.bf16, "final_loss_mean_last_100": mean_of_last(&outcome.losses, 100),
        "guidance": guidance, "sample_steps": sample_steps, "variance": args.variance,
    });
    merge(&mut metrics, json!(grades));
    run.write_results(&[("results", figures::lesson06_results(&metrics, &grades))])?;
    run.write_metrics(metrics)?;
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}
