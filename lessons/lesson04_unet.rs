//! Lesson 04 — a small UNet.
//!
//! The same DDPM as lesson 03, with the MLP replaced by a UNet built piece by piece in src/nn: the sinusoidal time
//! embedding, residual blocks with time injection, down- and upsampling with skip connections, and self-attention
//! at the low resolutions. Same data, same objective: at lesson 03's budget of 64 000 images (`--steps 2000`) the
//! samples already look like digits (the Fréchet distance over its floor drops 26×); the default trains 30 % longer,
//! which lifts the classifier's mean confidence in the samples to 0.9 (chapter 04).
//! Chapter 04 walks through this file.
use anyhow::{Context, Result};
use clap::Parser;
use scratch_diffusion::cli::{
    lesson_main, markdown_table, mean_of_last, positive, progress, unit_interval, CommonArgs, StepLog,
};
use scratch_diffusion::data::mnist;
use scratch_diffusion::data::to_unit;
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::eval::frechet::{evaluate_samples, QUALITY_HEADER};
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::nn::unet::{UNet, UNetConfig};
use scratch_diffusion::pipelines::ddpm::{save_unet, ship_unet, SavedUNet, ShipNote};
use scratch_diffusion::plot;
use scratch_diffusion::sampling::ddpm::{sample, AncestralSampling, PosteriorVariance};
use scratch_diffusion::sampling::wrappers::Threshold;
use scratch_diffusion::studies::trajectory::Trajectory;
use scratch_diffusion::studies::unet_figures;
use scratch_diffusion::train::ddpm::EpsObjective;
use scratch_diffusion::train::ddpm::{train_eps_model, LossWeight};
use scratch_diffusion::train::recipe::{self, describe};
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use serde_json::json;
use tch::{Device, Tensor};

/// Training steps of the full run: the shared recipe's 2000 (lesson 03's 64 000 images) reach a Fréchet distance
/// within 3× the floor but a mean confidence of 0.88; 2600 reach 0.90 and still train in under ten minutes on 2 cores.
const STEPS: u64 = 2600;
/// Peak learning rate: a little below the recipe's 1.2·10⁻², at which a 2600-step run on two threads blew up right
/// after warm-up (chapter 04, "Training longer"); at 10⁻² the same run trained cleanly.
const LR: f64 = 1e-2;

/// Lesson 04: DDPM on MNIST with a UNet.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, allow_negative_numbers = true)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Training steps [default: 2600, or 30 with --quick]: 83 200 images (2000 is lesson 03's budget).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Images per training batch.
    #[arg(long, default_value_t = recipe::BATCH, value_parser = clap::value_parser!(i64).range(1..=4096))]
    batch: i64,
    /// Peak learning rate (AdamW, warm-up then cosine decay).
    #[arg(long, default_value_t = LR, value_parser = positive)]
    lr: f64,
    /// Reverse steps when sampling (evenly respaced over T = 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
    sample_steps: u64,
    /// Reverse-step variance σ_t²: β_t or the posterior's β̃_t ([DDPM] sec. 3.2); β̃ scored the better Fréchet
    /// distance on this model (chapter 04).
    #[arg(long, value_enum, default_value_t = PosteriorVariance::BetaTilde)]
    variance: PosteriorVariance,
    /// Noise schedule: linear (DDPM) or cosine (improved DDPM), T = 1000.
    #[arg(long, default_value = recipe::SCHEDULE)]
    schedule: String,
    /// Weighting of the loss over timesteps: uniform (L_simple) or min-snr (Hang et al. 2023, γ = 5).
    #[arg(long, value_enum, default_value_t = recipe::LOSS_WEIGHT)]
    loss_weight: LossWeight,
    /// Samples to draw and grade [default: 500, or 16 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(2..=10000))]
    num_samples: Option<i64>,
    /// Channels of each UNet level, comma-separated [default: the mnist preset's 16,32,64].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(i64).range(1..=1024))]
    channels: Option<Vec<i64>>,
    /// Dropout inside the residual blocks, in [0, 1] [default: the preset's].
    #[arg(long, value_parser = unit_interval)]
    dropout: Option<f64>,
    /// Train in bf16 (f32 master weights).
    #[arg(long)]
    bf16: bool,
    /// Continue an interrupted training run from OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
    /// Also copy the trained UNet into data/lesson04/ (what lesson 07 samples from on a fresh clone).
    #[arg(long)]
    ship: bool,
}

fn main() {
    lesson_main(|| run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let run = args.common.init("lesson04")?;
    let data = mnist::load(&run.data_dir).context("lesson 04 trains on MNIST")?;
    let steps = args.steps.unwrap_or(if run.quick { 30 } else { STEPS }) as usize;
    let n = args.num_samples.unwrap_or(if run.quick { 16 } else { 500 });
    let sched = NoiseSchedule::by_name(&args.schedule, 1000)?;
    // ANCHOR: config
    let mut config = if run.quick { UNetConfig::tiny() } else { UNetConfig::mnist() };
    if let Some(c) = &args.channels {
        // one level per entry, self-attention at the last (lowest-resolution) one only
        config.attention = (0..c.len()).map(|i| i + 1 == c.len()).collect();
        config.block_out_channels = c.clone();
    }
    if let Some(d) = args.dropout {
        config.dropout = d;
    }
    // the shared recipe (src/train/recipe.rs): AdamW with warm-up and cosine decay, EMA 0.999, clipping at 1 (this
    // lesson's own STEPS and LR above)
    let cfg =
        TrainerConfig { bf16: args.bf16, seed: run.seed, ..TrainerConfig::mnist_unet(steps, args.batch, args.lr) };
    // ANCHOR_END: config
    let blocks = unet_figures::plot_architecture(&run.path("architecture.png"), &config)?; // (name, parameters)
    println!("UNet {:?}: {} parameters", config.block_out_channels, blocks.iter().map(|r| r.1).sum::<i64>());
    for (name, count) in &blocks {
        println!("  {name:<16} {count:>9}");
    }

    // ANCHOR: train
    let images = (&data.train_images * 2.0 - 1.0).to_device(run.device); // (60000, 1, 28, 28) in [−1, 1]
    let snapshot_at: Vec<usize> = [1, 2, 3].iter().map(|k| k * steps / 4).collect(); // and the EMA model at the end
    let mut snapshots: Vec<(usize, Tensor)> = Vec::new();
    let snapshot = |net: &dyn scratch_diffusion::model::EpsModel| {
        tch::manual_seed(1234); // the same starting noise at every snapshot
        let x = sample(
            net,
            &sched,
            &[16, 1, 28, 28],
            &AncestralSampling {
                steps: 50,
                variance: PosteriorVariance::Beta,
                threshold: Threshold::Static,
                batch: 16,
            },
            run.device,
            &mut |_, _| {},
        );
        to_unit(&x).to_device(Device::Cpu)
    };
    let log = StepLog::new(steps as u64, "train", 10);
    let (vs, model, outcome) = train_eps_model(
        |p| UNet::new(p, config.clone()),
        &images,
        &EpsObjective::new(&sched, args.loss_weight, run.device),
        &cfg,
        TrainRun::logged(run.device, &log)
            .checkpoint(&run.path("checkpoint.safetensors"), args.resume)
            .spec("model", &config), // what a resume must repeat, with the objective's settings
        (&snapshot_at, &mut |step, net| {
            snapshots.push((step, snapshot(net)));
        }),
    )?;
    log.finish();
    snapshots.push((steps, snapshot(&model)));
    // ANCHOR_END: train
    // the EMA weights with their config and schedule: what lesson 07 samples from
    let saved = SavedUNet { unet: config.clone(), schedule: args.schedule.clone(), timesteps: sched.num_steps() };
    save_unet(&vs, &run.path("unet.safetensors"), &saved)?;
    run.write_loss("Lesson 04: L_simple of the UNet", ("l_simple", "L_simple"), &outcome.losses)?;
    unet_figures::plot_snapshots(&run.path("samples_over_training.png"), &snapshots)?;

    // ANCHOR: sample
    let sample_steps = args.sample_steps as usize;
    let mut traj = Trajectory::new(4, sample_steps, 8);
    let bar = progress(n as u64 * sample_steps as u64, "sample");
    let started = std::time::Instant::now();
    // σ_t² = β̃_t by default: it adds less noise per step than β_t, and on this model scored the better Fréchet
    // distance although it under-disperses Gaussian data at 100 steps (chapters 03 and 04)
    let x = sample(
        &model,
        &sched,
        &[n, 1, 28, 28],
        &AncestralSampling { steps: sample_steps, variance: args.variance, threshold: Threshold::Static, batch: 250 },
        run.device,
        &mut |start, st| {
            traj.record(start, &st);
            bar.inc(st.x_t.size()[0] as u64);
        },
    );
    let sample_seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let samples = to_unit(&x).to_device(Device::Cpu);
    // ANCHOR_END: sample
    plot::sample_grid(&run.path("samples.png"), "Lesson 04: DDPM samples from the UNet", &samples)?;
    traj.draw(&run.path("trajectory.png"), "Reverse process: x_t and the predicted x̂₀ (rows) as t falls (columns)")?;

    let clf = MnistClassifier::load_shipped(Device::Cpu)?;
    let report = evaluate_samples(&clf, &samples, &data.test_images);
    println!(
        "UNet: {steps} steps in {:.0} s; {n} samples ({sample_steps} steps, {:.1} images/s): Fréchet distance {:.2} (floor {:.2}, ratio {:.2}), class entropy {:.3} of ln 10, confidence {:.3}",
        outcome.seconds, n as f64 / sample_seconds, report.frechet_distance, report.frechet_floor, report.fd_over_floor, report.entropy_over_max, report.mean_confidence
    );
    // the table of results, under lesson 03's row when its run's results are there (./run.sh lesson 03)
    let l03 = std::fs::read_to_string("out/lesson03/results.md").ok();
    let l03_row = l03.as_deref().and_then(|md| md.lines().find(|l| l.starts_with("| MLP (lesson 03)")));
    let parameters = vs.variables().values().map(|t| t.numel()).sum::<usize>();
    let (network, how) = (
        format!("UNet {:?}, {parameters} parameters", config.block_out_channels),
        describe(&args.schedule, args.loss_weight, args.lr, args.variance),
    );
    let table =
        markdown_table(&QUALITY_HEADER, &[report.row(&network, &how, (steps as u64, args.batch), outcome.seconds)]);
    run.write_results(&[(
        "quality",
        match l03_row {
            Some(row) => table.replacen("|---|\n", &format!("|---|\n{row}\n"), 1),
            None => table,
        },
    )])?;
    run.write_metrics(json!({
        "network": config, "schedule": args.schedule, "loss_weight": args.loss_weight, "lr": args.lr, "parameters": parameters,
        "train_steps": steps, "batch_size": args.batch, "train_seconds": outcome.seconds, "resumed_from": outcome.resumed_from,
        "bf16": args.bf16,
        "final_loss_mean_last_100": mean_of_last(&outcome.losses, 100),
        "sample_steps": sample_steps, "sample_images_per_second": n as f64 / sample_seconds, "samples": report,
    }))?;
    if args.ship {
        let (samples, frechet_distance, frechet_floor) = (report.n, report.frechet_distance, report.frechet_floor);
        let (batch, lr, seed, train_seconds) = (args.batch, args.lr, run.seed, outcome.seconds);
        let note = ShipNote { steps, batch, lr, seed, train_seconds, samples, frechet_distance, frechet_floor };
        println!("shipped the UNet to {}", ship_unet(&vs, &saved, &note)?.display());
    }
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}
