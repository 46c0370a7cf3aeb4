//! Lesson 05 — attention and cross-attention.
//!
//! Part 1 checks scaled dot-product attention, written out in src/nn/attention.rs, against libtorch's fused kernel,
//! with and without masks, and draws the weights of a toy sequence. Part 2 trains lesson 04's UNet with its 7×7
//! attention blocks turned into Stable Diffusion's spatial transformers, which cross-attend to a learned sequence
//! per digit label, with condition dropout; it samples every digit with classifier-free guidance at several scales
//! and measures what guidance trades: the right digit more often, less variety within a digit.
//! Chapter 05 walks through this file.
use anyhow::{Context, Result};
use clap::Parser;
use scratch_diffusion::checkpoint;
use scratch_diffusion::cli::{
    finite, lesson_main, log_line, markdown_table, mean_of_last, positive, progress, unit_interval, CommonArgs, StepLog,
};
use scratch_diffusion::data::mnist;
use scratch_diffusion::data::to_unit;
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::nn::class_cond::ClassCondConfig;
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::pipelines::ddpm::{ship_class_cond, SavedClassCond};
use scratch_diffusion::sampling::ddpm::{sample, AncestralSampling, PosteriorVariance};
use scratch_diffusion::sampling::wrappers::Threshold;
use scratch_diffusion::studies::attention;
use scratch_diffusion::studies::guidance::{grade_guided, plot_samples_by_class, plot_tradeoff, GuidanceReport};
use scratch_diffusion::train::conditional::{train_cond_eps_model, DEFAULT_P_UNCOND};
use scratch_diffusion::train::ddpm::EpsObjective;
use scratch_diffusion::train::ddpm::LossWeight;
use scratch_diffusion::train::recipe;
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use serde_json::json;
use tch::{Device, Kind, Tensor};

/// Lesson 05: attention, cross-attention and classifier-free guidance on MNIST.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, allow_negative_numbers = true)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Training steps [default: 2000, or 30 with --quick] (lesson 04's budget).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Images per training batch.
    #[arg(long, default_value_t = recipe::BATCH, value_parser = clap::value_parser!(i64).range(1..=4096))]
    batch: i64,
    /// Peak learning rate (AdamW, warm-up then cosine decay).
    #[arg(long, default_value_t = recipe::LR, value_parser = positive)]
    lr: f64,
    /// Reverse steps when sampling [default: 100, or 20 with --quick] (evenly respaced over T = 1000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    sample_steps: Option<u64>,
    /// Reverse-step variance σ_t²: β_t or the posterior's β̃_t ([DDPM] sec. 3.2); lesson 04's default.
    #[arg(long, value_enum, default_value_t = PosteriorVariance::BetaTilde)]
    variance: PosteriorVariance,
    /// Noise schedule: linear (DDPM) or cosine (improved DDPM), T = 1000.
    #[arg(long, default_value = recipe::SCHEDULE)]
    schedule: String,
    /// Weighting of the loss over timesteps: uniform (L_simple) or min-snr (Hang et al. 2023, γ = 5).
    #[arg(long, value_enum, default_value_t = recipe::LOSS_WEIGHT)]
    loss_weight: LossWeight,
    /// Samples per guidance scale, split evenly over the ten digits [default: 200, or 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(20..=10000))]
    num_samples: Option<i64>,
    /// Dropout inside the residual blocks, in [0, 1] [default: the preset's].
    #[arg(long, value_parser = unit_interval)]
    dropout: Option<f64>,
    /// Also add the pooled label sequence to the time embedding (SDXL's pooled-embedding path), besides the
    /// cross-attention; `--pooled-context false` leaves cross-attention as the only way in, as in SD 1.5.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pooled_context: bool,
    /// Probability of training on the null label ∅ instead of the digit (condition dropout, [CFG] Algorithm 1).
    #[arg(long, default_value_t = DEFAULT_P_UNCOND, value_parser = unit_interval)]
    p_uncond: f64,
    /// Guidance scales w, comma-separated: ε̃ = ε_∅ + w (ε_c − ε_∅); 0 is unconditional, 1 conditional.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 1.0, 2.0, 3.0, 5.0], value_parser = finite)]
    guidance: Vec<f64>,
    /// Train in bf16 (f32 master weights).
    #[arg(long)]
    bf16: bool,
    /// Continue an interrupted training run from OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
    /// Also save the trained UNet into data/lesson05/ (what lesson 10 guides), with a README on how it was made.
    #[arg(long)]
    ship: bool,
}

fn main() {
    lesson_main(|| run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let run = args.common.init("lesson05")?;
    // part 1: our attention against libtorch's fused kernel, with no mask, a causal and a key-padding mask
    let check = attention::attention_check(&run.path("attention_toy.png"))?;
    println!(
        "our attention vs libtorch's: max |difference| {:.1e} (no mask), {:.1e} (causal), {:.1e} (padding)",
        check.max_abs_diff_no_mask, check.max_abs_diff_causal, check.max_abs_diff_padding
    );
    let data = mnist::load(&run.data_dir).context("lesson 05 trains on MNIST")?;
    let steps = args.steps.unwrap_or(if run.quick { 30 } else { recipe::STEPS }) as usize;
    let per_class = args.num_samples.unwrap_or(if run.quick { 20 } else { 200 }).div_euclid(10);
    let sample_steps = args.sample_steps.unwrap_or(if run.quick { 20 } else { 100 }) as usize;
    let sched = NoiseSchedule::by_name(&args.schedule, 1000)?;
    // ANCHOR: config
    let mut config = if run.quick { ClassCondConfig::tiny() } else { ClassCondConfig::mnist() };
    if let Some(d) = args.dropout {
        config.unet.dropout = d;
    }
    config.unet.pooled_context_embedding = args.pooled_context;
    // lesson 04's recipe
    let cfg =
        TrainerConfig { bf16: args.bf16, seed: run.seed, ..TrainerConfig::mnist_unet(steps, args.batch, args.lr) };
    // ANCHOR_END: config

    // ANCHOR: train
    let images = (&data.train_images * 2.0 - 1.0).to_device(run.device); // (60000, 1, 28, 28) in [−1, 1]
    let labels = data.train_labels.to_device(run.device); // (60000,) digits 0–9
    let log = StepLog::new(steps as u64, "train", 10);
    let (vs, model, outcome) = train_cond_eps_model(
        |p| config.build(p),
        &images,
        &labels,
        &EpsObjective::new(&sched, args.loss_weight, run.device),
        args.p_uncond,
        &cfg,
        TrainRun::logged(run.device, &log)
            .checkpoint(&run.path("checkpoint.safetensors"), args.resume)
            .spec("model", &config), // what a resume must repeat, with the objective's settings
    )?;
    log.finish();
    // ANCHOR_END: train
    let parameters = checkpoint::num_parameters(&vs);
    println!(
        "class-conditional UNet {:?}: {parameters} parameters, trained in {:.0} s",
        config.unet.block_out_channels, outcome.seconds
    );
    let title = format!(
        "Lesson 05: L_simple of the class-conditional UNet ({} % of labels dropped to ∅)",
        args.p_uncond * 100.0
    );
    run.write_loss(&title, ("l_simple", "L_simple"), &outcome.losses)?;

    // ANCHOR: sample
    let clf = MnistClassifier::load_shipped(Device::Cpu)?;
    let bar = progress((args.guidance.len() as i64 * 10 * per_class) as u64 * sample_steps as u64, "sample");
    let (mut reports, mut tiles, started) = (Vec::new(), Vec::new(), std::time::Instant::now());
    for &w in &args.guidance {
        let mut per_digit = Vec::new();
        for digit in 0..10i64 {
            tch::manual_seed(1000 * (run.seed as i64 + 1) + digit); // the same starting noise for a digit at every w
            let x = sample(
                &model.guided(digit, w),
                &sched,
                &[per_class, 1, 28, 28],
                &AncestralSampling {
                    steps: sample_steps,
                    variance: args.variance,
                    threshold: Threshold::Static,
                    batch: 250,
                },
                run.device,
                &mut |_, st| bar.inc(st.x_t.size()[0] as u64),
            );
            per_digit.push(to_unit(&x).to_device(Device::Cpu)); // (per_class, 1, 28, 28)
        }
        let requested = Tensor::arange(10, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(per_class, 0, None);
        let report =
            grade_guided(&clf, &Tensor::cat(&per_digit, 0), &requested, &data.test_images, &data.test_labels, w);
        log_line(
            &bar,
            format!(
                "w = {w}: accuracy {:.3}, p(asked digit) {:.3}, diversity {:.2} of real, FD/floor {:.2}",
                report.accuracy, report.mean_p_requested, report.diversity_over_real, report.samples.fd_over_floor
            ),
        );
        tiles.push(per_digit);
        reports.push(report);
    }
    bar.finish_and_clear();
    // ANCHOR_END: sample
    let sample_seconds = started.elapsed().as_secs_f64(); // grading included

    // a row per digit, then for each scale its first 4 samples (the same noises)
    plot_samples_by_class(&run.path("samples_by_class.png"), &tiles, &args.guidance, per_class.min(4))?;
    plot_tradeoff(&run.path("guidance_tradeoff.png"), &reports)?;
    let (path, seed) = (run.path("cross_attention.png"), run.seed);
    attention::plot_cross_attention(&path, &model, &sched, sample_steps, (seed, run.device))?;

    let row = |r: &GuidanceReport| {
        let (q, f) = (&r.samples, |v: f64| format!("{v:.3}"));
        let fd = format!("{:.2} / {:.2} = {:.2}", q.frechet_distance, q.frechet_floor, q.fd_over_floor);
        let diversity = format!("{:.2}", r.diversity_over_real);
        vec![
            r.scale.to_string(),
            f(r.accuracy),
            f(r.mean_p_requested),
            diversity,
            fd,
            f(q.entropy_over_max),
            f(q.mean_confidence),
        ]
    };
    let header = [
        "w",
        "accuracy",
        "p(asked digit)",
        "diversity / real",
        "Fréchet distance / floor",
        "class entropy / ln 10",
        "mean confidence",
    ];
    run.write_results(&[("guidance", markdown_table(&header, &reports.iter().map(row).collect::<Vec<_>>()))])?;
    run.write_metrics(json!({
        "attention_check": check, "network": config, "parameters": parameters,
        "train_steps": steps, "batch_size": args.batch, "train_seconds": outcome.seconds, "resumed_from": outcome.resumed_from,
        "bf16": args.bf16, "p_uncond": args.p_uncond,
        "final_loss_mean_last_100": mean_of_last(&outcome.losses, 100),
        "sample_steps": sample_steps, "samples_per_scale": 10 * per_class, "sample_seconds": sample_seconds,
        "guidance": reports,
    }))?;
    if args.ship {
        let saved =
            SavedClassCond { model: config.clone(), schedule: args.schedule.clone(), timesteps: sched.num_steps() };
        let scores: Vec<String> =
            reports.iter().map(|r| format!("w = {}: accuracy {:.3}", r.scale, r.accuracy)).collect();
        let how = format!(
            "Made by `{}` (seed {}, {steps} steps of {} images, {:.0} s of training on {} threads; {} samples per \
             scale at {sample_steps} steps: {}).",
            run.stamp().command,
            run.seed,
            args.batch,
            outcome.seconds,
            tch::get_num_threads(),
            10 * per_class,
            scores.join(", ")
        );
        println!("shipped the UNet to {}", ship_class_cond(&vs, &saved, &how)?.display());
    }
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}
