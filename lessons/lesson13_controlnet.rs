//! Lesson 13 — ControlNet: spatial control for a frozen text-to-image model.
//!
//! It makes Canny edge maps of MNIST digits (the detector is written out in src/data/canny.rs, as OpenCV's), trains
//! a ControlNet — a copy of the way down of lesson 06's frozen UNet that reads the edge map, joined to the UNet by
//! zero convolutions — on (digit, caption, edges) triples, and measures how closely samples follow held-out hints
//! (the F1 of their edges against the hint's) while still following the prompt, how that grows during training,
//! what the control weight and guess mode do, and who wins when the hint and the prompt disagree.
//! `lesson13 sample --prompt "a bold 7" --hint-from DIGIT.png` draws with the shipped ControlNet. Chapter 13 walks
//! through this file.
use anyhow::{ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use scratch_diffusion::checkpoint;
use scratch_diffusion::cli::{crate_root, lesson_main, non_negative, positive, unit_interval, CommonArgs, StepLog};
use scratch_diffusion::data::captions::CaptionStyle;
use scratch_diffusion::data::hints::HintKind;
use scratch_diffusion::data::mnist;
use scratch_diffusion::data::png::read_png_gray;
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::nn::controlnet::{ControlNet, ControlNetConfig, ControlScale, SavedControlNet};
use scratch_diffusion::pipelines::text_to_image::{shipped_dir, TextToImage, DEFAULT_GUIDANCE, DEFAULT_SAMPLE_STEPS};
use scratch_diffusion::pipelines::{bundle, PromptArgs};
use scratch_diffusion::studies::controlnet::{self as study, draw_controlled, grade, ControlDraw, EvalSet};
use scratch_diffusion::studies::guidance_methods::plot_rows;
use scratch_diffusion::text::captions::caption_images_with;
use scratch_diffusion::train::controlnet::{train_controlnet, P_EMPTY_PROMPT};
use scratch_diffusion::train::ddpm::{EpsObjective, LossWeight};
use scratch_diffusion::train::text_cond::TextData;
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use serde_json::json;
use tch::{Device, Kind};

/// Where `--ship` writes the ControlNet and `sample` reads it by default.
const SHIPPED: &str = "data/lesson13/controlnet.safetensors";

/// Lesson 13: ControlNet on lesson 06's pipeline.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train and measure the ControlNet (the default without a subcommand).
    Train(TrainArgs),
    /// Draw digits for a prompt that follow an edge map.
    Sample(SampleArgs),
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Training steps [default: 800, or 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(i64).range(2..=4096))]
    batch: i64,
    /// Peak learning rate (AdamW, warm-up then cosine decay).
    #[arg(long, default_value_t = 2e-3, value_parser = positive)]
    lr: f64,
    /// Training digits (with their edges and captions) [default: 20000, or 256 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(2..=60000))]
    train_images: Option<i64>,
    /// Held-out test digits each measurement draws, one sample each [default: 200, or 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(10..=250))]
    num_samples: Option<i64>,
    /// Control weights of the sweep (0: the frozen pipeline, the baseline).
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.25, 0.5, 1.0, 1.5], value_parser = non_negative)]
    scales: Vec<f64>,
    /// Measure the hint-following every 10 steps up to step 100, then every this many [default: 100].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_every: Option<u64>,
    /// The hint the ControlNet learns to follow: the digit's Canny edges, or a coarse mask of where its ink is.
    #[arg(long, value_enum, default_value_t = HintKind::Canny)]
    hint: HintKind,
    /// Also save the ControlNet into data/lesson13/ (what `sample` draws with).
    #[arg(long)]
    ship: bool,
    /// Continue an interrupted training run from OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
}

#[derive(Args, Debug)]
struct SampleArgs {
    #[command(flatten)]
    prompt: PromptArgs,
    /// The hint to follow: a PNG, white (> 0.5) on black, the pipeline's size (28×28): edges for a Canny ControlNet,
    /// a mask for a mask one.
    #[arg(long, conflicts_with = "hint_from", required_unless_present = "hint_from")]
    hint: Option<std::path::PathBuf>,
    /// A digit image (PNG, white on black, 28×28) to make the hint from as the ControlNet was trained (Canny 100/200,
    /// as the annotator, or the grown mask).
    #[arg(long)]
    hint_from: Option<std::path::PathBuf>,
    /// A ControlNet saved by a lesson 13 run [default: the shipped one, data/lesson13/controlnet.safetensors].
    #[arg(long)]
    controlnet: Option<std::path::PathBuf>,
    /// Control weight (the UIs' "control weight"): 0 is the frozen pipeline.
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    control_scale: f64,
    /// Guess mode: the ControlNet on the conditional branch only, its skips weighted 0.1 → 1 with depth.
    #[arg(long)]
    guess_mode: bool,
    /// Where the control starts and ends, as fractions of the sampling steps.
    #[arg(long, default_value_t = 0.0, value_parser = unit_interval)]
    control_start: f64,
    #[arg(long, default_value_t = 1.0, value_parser = unit_interval)]
    control_end: f64,
}

fn main() {
    lesson_main(|| match Cli::parse() {
        Cli { command: Some(Command::Sample(args)), .. } => sample_cmd(args),
        Cli { command: Some(Command::Train(args)), .. } | Cli { train: args, .. } => train_cmd(args),
    })
}

fn sample_cmd(args: SampleArgs) -> Result<()> {
    let (device, dir) = (args.prompt.init()?, args.prompt.weights_dir(shipped_dir));
    ensure!(args.control_start <= args.control_end, "--control-start must not come after --control-end");
    let pipe = TextToImage::load(&dir, device).with_context(|| bundle::no_bundle(&dir, "06", "text-to-image"))?;
    let path = args.controlnet.clone().unwrap_or_else(|| crate_root().join(SHIPPED));
    let (_vs, control, kind) = ControlNet::load(&path, device)?;
    ensure!(args.prompt.negative.is_none(), "lesson13 sample takes no --negative: it guides away from \"\"");
    // ANCHOR: sample_cmd
    let hint = match (&args.hint, &args.hint_from) {
        (Some(p), _) => read_png_gray(p)?.gt(0.5).to_kind(Kind::Float), // (1, 1, H, W): the edges as given
        (None, Some(p)) => kind.make(&read_png_gray(p)?)?,              // Canny first, as the annotator (or the mask)
        (None, None) => unreachable!("clap requires one of --hint, --hint-from"),
    };
    let a = &args.prompt;
    let scale = ControlScale { conditioning_scale: args.control_scale, guess_mode: args.guess_mode };
    let draw = ControlDraw {
        guidance: a.guidance,
        steps: a.steps as usize,
        seed: a.seed,
        scale,
        window: (args.control_start, args.control_end),
    };
    let prompts = vec![a.prompt.clone(); a.num as usize];
    let images = draw_controlled(&pipe, &control, &prompts, &hint, &draw)?;
    // ANCHOR_END: sample_cmd
    bundle::write_samples(
        &a.out_dir("lesson13"),
        &images,
        &a.title(&format!("{} steps, control {}", a.steps, args.control_scale)),
    )
}

fn train_cmd(args: TrainArgs) -> Result<()> {
    let run = args.common.init("lesson13")?;
    let q = |quick: u64, full: u64| if run.quick { quick } else { full };
    let (steps, m) = (args.steps.unwrap_or(q(20, 800)) as usize, args.train_images.unwrap_or(q(256, 20000) as i64));
    let (n, every) = (args.num_samples.unwrap_or(q(20, 200) as i64), args.snapshot_every.unwrap_or(100) as usize);
    ensure!(m >= args.batch, "--train-images ({m}) must be at least --batch ({}): lower --batch", args.batch);
    let data = mnist::load(&run.data_dir).context("lesson 13 trains on MNIST")?;
    let mut pipe = TextToImage::load(&shipped_dir(), run.device)
        .context("lesson 06's shipped pipeline (./run.sh lesson 06 --ship)")?;
    pipe.freeze_unet(); // only the ControlNet trains
    let sched = NoiseSchedule::by_name(&pipe.config.schedule, pipe.config.num_train_timesteps)?;
    let clf = MnistClassifier::load_shipped(Device::Cpu)?;

    // ANCHOR: data
    // (digit, caption, edges) triples: the edges by the annotator's Canny, the captions as lesson 06's
    let images = data.train_images.narrow(0, 0, m); // (M, 1, 28, 28) in [0, 1]
    let hints = args.hint.make(&images)?; // (M, 1, 28, 28) of 0/1
    let captioned = caption_images_with(
        &images,
        &data.train_labels.narrow(0, 0, m),
        (2, CaptionStyle::Varied),
        run.seed,
        pipe.prompts.tokenizer.clone(),
    )?;
    let empty = pipe.prompts.tokenizer.encode_padded("", pipe.config.context_len);
    // held-out test digits, each asked for by a held-out phrasing of its own label, with its own hint
    let set = EvalSet::new(&data.test_images, &data.test_labels, n, args.hint)?;
    // ANCHOR_END: data
    let draw = |scale: f64, guess_mode: bool| ControlDraw {
        guidance: DEFAULT_GUIDANCE,
        steps: if run.quick { 5 } else { DEFAULT_SAMPLE_STEPS },
        seed: run.seed + 1,
        scale: ControlScale { conditioning_scale: scale, guess_mode },
        window: (0.0, 1.0),
    };

    // ANCHOR: train
    let config = ControlNetConfig::pixel_space(pipe.unet.0.config.clone(), 1);
    let cfg = TrainerConfig { seed: run.seed, ..TrainerConfig::mnist_unet(steps, args.batch, args.lr) };
    let objective = EpsObjective::new(&sched, LossWeight::Uniform, run.device);
    let (log, ckpt) = (StepLog::new(steps as u64, "train", 10), run.path("checkpoint.safetensors"));
    // a quick look at fidelity on 50 of the digits: every 10 steps up to 100, where it learns fastest, then every `every`
    let snap = set.head(n.min(50));
    let early = (0..steps.min(100)).step_by(10);
    let snapshot_at: Vec<usize> = early.chain((100..steps).step_by(every)).chain([steps - 1]).collect();
    let mut by_step = vec![];
    let mut on_snapshot = |step: usize, control: &ControlNet| {
        let s = draw_controlled(&pipe, control, &snap.prompts, &snap.hints, &draw(1.0, false));
        by_step.push((step, s.and_then(|s| grade(&clf, &s, (&snap.asked, &snap.hints), args.hint))));
    };
    let text = TextData {
        encoder: &pipe.prompts.text_encoder,
        captions: &captioned.captions,
        empty: &empty,
        p_uncond: P_EMPTY_PROMPT,
    };
    let (vs, control, outcome) = train_controlnet(
        (&pipe.unet.0, pipe.unet_vs()),
        &config,
        text,
        (&(&images * 2.0 - 1.0).to_device(run.device), &hints.to_device(run.device)),
        &objective,
        &cfg,
        TrainRun::logged(run.device, &log).checkpoint(&ckpt, args.resume).spec("model", &config),
        (&snapshot_at, &mut on_snapshot),
    )?;
    log.finish();
    let by_step = by_step.into_iter().map(|(s, g)| g.map(|g| (s, g))).collect::<Result<Vec<_>>>()?;
    // ANCHOR_END: train
    println!("ControlNet: {} parameters, trained in {:.0} s", checkpoint::num_parameters(&vs), outcome.seconds);
    run.write_loss(
        "Lesson 13: L_simple of the controlled UNet (only the ControlNet trains)",
        ("l_simple", "L_simple"),
        &outcome.losses,
    )?;
    let saved = SavedControlNet { network: config.clone(), hint: args.hint };
    checkpoint::save(&vs, &run.path("controlnet.safetensors"), &saved)?;

    // ANCHOR: measure
    let parts = (&pipe, &control, &clf);
    let (sweep, tiles) = study::scale_sweep(parts, &set, (&args.scales, args.hint), &draw)?;
    let (clashes, clash_tiles) = study::disagreement(parts, &set, &[0.5, 1.0, 1.5], &draw)?;
    // ANCHOR_END: measure
    let baseline = sweep.iter().find(|r| r.scale == 0.0 && !r.guess_mode).map_or(f64::NAN, |r| r.grade.fidelity);
    study::plot_by_step(&run.path("control_by_step.png"), &by_step, baseline)?;
    study::plot_scale_sweep(&run.path("control_scale.png"), &sweep)?;
    plot_rows(
        &run.path("control_samples.png"),
        "Held-out digits, their hints, samples at growing control weight",
        &tiles,
    )?;
    plot_rows(&run.path("control_disagreement.png"), "The hint of digit d with a prompt for d + 5", &clash_tiles)?;
    run.write_results(&study::results_tables(&sweep, &by_step, &clashes, args.hint))?;
    run.write_metrics(json!({
        "network": config, "hint": args.hint, "parameters": checkpoint::num_parameters(&vs), "train_steps": steps,
        "batch_size": args.batch, "lr": args.lr, "train_images": m, "train_seconds": outcome.seconds,
        "resumed_from": outcome.resumed_from, "samples": n, "baseline_fidelity": baseline,
        "by_step": by_step.iter().map(|(s, g)| json!({"step": s, "grade": g})).collect::<Vec<_>>(),
        "sweep": sweep, "disagreement": clashes,
    }))?;
    if args.ship {
        let path = crate_root().join(SHIPPED);
        checkpoint::save(&vs, &path, &saved)?;
        println!("shipped the ControlNet to {}", path.display());
    }
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}
