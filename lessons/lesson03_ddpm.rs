//! Lesson 03 — DDPM.
//!
//! A fixed forward process that destroys data with Gaussian noise in T small steps, q(x_t | x₀) in closed form, and
//! a network trained to predict the noise, which runs the process backwards (Ho et al. 2020). First on 2-D data with
//! an MLP (samples vs the true density), then on MNIST with an MLP over the flattened pixels — good enough to see
//! strokes, not good enough for digits, which is why lesson 04 builds a UNet. Chapter 03 walks through this file.
use anyhow::{Context, Result};
use clap::Parser;
use scratch_diffusion::cli::{lesson_main, markdown_table, mean_of_last, positive, progress, CommonArgs, Run, StepLog};
use scratch_diffusion::data::mnist;
use scratch_diffusion::data::to_unit;
use scratch_diffusion::data::toy2d::GaussianMixture;
use scratch_diffusion::diffusion::schedule::NoiseSchedule;
use scratch_diffusion::eval::frechet::{evaluate_samples, QUALITY_HEADER};
use scratch_diffusion::eval::sample_quality;
use scratch_diffusion::nn::classifier::MnistClassifier;
use scratch_diffusion::nn::eps_mlp::{EpsMlp, EpsMlpConfig};
use scratch_diffusion::plot;
use scratch_diffusion::sampling::ddpm::{sample, AncestralSampling, PosteriorVariance};
use scratch_diffusion::sampling::wrappers::Threshold;
use scratch_diffusion::studies::ddpm_figures as figures;
use scratch_diffusion::studies::trajectory::Trajectory;
use scratch_diffusion::train::ddpm::{train_eps_model, EpsObjective, LossWeight};
use scratch_diffusion::train::recipe::describe;
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use serde_json::json;
use tch::Device;

/// Lesson 03: DDPM on 2-D data and on MNIST with an MLP.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, allow_negative_numbers = true)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Noise schedule: linear (DDPM), cosine (improved DDPM) or scaled-linear (Stable Diffusion).
    #[arg(long, default_value = "linear")]
    schedule: String,
    /// Diffusion steps T.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..=4000))]
    timesteps: u64,
    /// MNIST training steps [default: 1000 (lesson 04's budget), or 40 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Images per training batch.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(i64).range(1..=4096))]
    batch: i64,
    /// Peak learning rate (AdamW, warm-up then cosine decay).
    #[arg(long, default_value_t = 2e-3, value_parser = positive)]
    lr: f64,
    /// Reverse steps when sampling MNIST (T = Algorithm 2 exactly; fewer = evenly respaced timesteps).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    sample_steps: u64,
    /// Reverse-process variance σ_t²: beta-tilde (posterior β̃_t) or beta (β_t).
    #[arg(long, default_value = "beta-tilde", value_parser = parse_variance)]
    variance: PosteriorVariance,
    /// Weighting of the MNIST loss over timesteps: uniform (L_simple) or min-snr (Hang et al. 2023, γ = 5).
    #[arg(long, value_enum, default_value_t = LossWeight::Uniform)]
    loss_weight: LossWeight,
    /// MNIST samples to draw and grade [default: 500, or 32 with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(2..=10000))]
    num_samples: Option<i64>,
    /// Train in bf16 (f32 master weights).
    #[arg(long)]
    bf16: bool,
    /// Continue an interrupted MNIST training run from OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
}

fn parse_variance(s: &str) -> Result<PosteriorVariance, String> {
    match s {
        "beta" => Ok(PosteriorVariance::Beta),
        "beta-tilde" => Ok(PosteriorVariance::BetaTilde),
        other => Err(format!("unknown variance '{other}': use beta or beta-tilde")),
    }
}

fn main() {
    lesson_main(|| run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let run = args.common.init("lesson03")?;
    let t_max = args.timesteps as usize;
    // ANCHOR: schedule
    let sched = NoiseSchedule::by_name(&args.schedule, t_max)?;
    // ANCHOR_END: schedule
    figures::plot_schedules(&run.path("schedules.png"), t_max)?;
    let data = mnist::load(&run.data_dir).context("lesson 03 trains on MNIST")?;
    // eight test digits noised with q(x_t | x₀) ([DDPM] eq. 4) at increasing t
    figures::plot_forward_noising(&run.path("forward_noising.png"), &sched, &data.test_images)?;
    let toy = toy_part(&run, &sched)?;
    let mnist = mnist_part(&run, &args, &sched, &data)?;
    run.write_metrics(json!({ "schedule": args.schedule, "timesteps": t_max, "toy": toy, "mnist": mnist }))?;
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}

/// DDPM on the two-mode mixture of lessons 01–02, scaled by 1/5 so the data is of unit size like the N(0, I) the
/// forward process ends in.
fn toy_part(run: &Run, sched: &NoiseSchedule) -> Result<serde_json::Value> {
    const SCALE: f64 = 0.2;
    let p = GaussianMixture::two_modes();
    let data = p.sample(100_000, run.device) * SCALE;
    let steps = if run.quick { 400 } else { 4000 };
    let cfg = TrainerConfig { seed: run.seed, ..TrainerConfig::ddpm_mlp(steps, 256, 2e-3) };
    let log = StepLog::new(steps as u64, "toy", 0);
    let (_vs, model, _) = train_eps_model(
        |p| EpsMlp::new(p, EpsMlpConfig::toy2d()),
        &data,
        &EpsObjective::new(sched, LossWeight::Uniform, run.device),
        &cfg,
        TrainRun::logged(run.device, &log),
        (&[], &mut |_, _| {}),
    )?;
    log.finish();
    let n = 2000;
    let x = sample(
        &model,
        sched,
        &[n, 2],
        &AncestralSampling {
            steps: sched.num_steps(),
            variance: PosteriorVariance::BetaTilde,
            threshold: Threshold::None,
            batch: n,
        },
        run.device,
        &mut |_, _| {},
    ) / SCALE;
    let truth = p.sample(n, run.device);
    let (err, ed) = (sample_quality::mode_weight_error(&p, &x), sample_quality::energy_distance(&x, &truth));
    let small = sample_quality::mode_weights(&p, &x)[0];
    println!(
        "toy: DDPM small-mode weight {small:.3} (true 0.200), mode-weight error {err:.3}, energy distance {ed:.4}"
    );
    let ddpm = format!("DDPM, {} steps (small mode {:.0} %)", sched.num_steps(), 100.0 * small);
    let clouds = [("exact samples".to_string(), &truth), (ddpm, &x)];
    figures::plot_over_density(&run.path("toy_samples.png"), "DDPM on the two-mode mixture", &p, &clouds)?;
    Ok(json!({"train_steps": steps, "small_mode_weight": small, "mode_weight_error": err, "energy_distance": ed}))
}

fn mnist_part(run: &Run, args: &Args, sched: &NoiseSchedule, data: &mnist::Mnist) -> Result<serde_json::Value> {
    let steps = args.steps.unwrap_or(if run.quick { 40 } else { 1000 }) as usize;
    let n = args.num_samples.unwrap_or(if run.quick { 32 } else { 500 });
    let config = if run.quick { EpsMlpConfig::tiny(784) } else { EpsMlpConfig::mnist() };
    // ANCHOR: train
    let images = (&data.train_images * 2.0 - 1.0).to_device(run.device); // (60000, 1, 28, 28) in [−1, 1]
    let cfg = TrainerConfig { bf16: args.bf16, seed: run.seed, ..TrainerConfig::ddpm_mlp(steps, args.batch, args.lr) };
    let log = StepLog::new(steps as u64, "train", 5);
    let (_vs, model, outcome) = train_eps_model(
        |p| EpsMlp::new(p, config.clone()),
        &images,
        &EpsObjective::new(sched, args.loss_weight, run.device),
        &cfg,
        TrainRun::logged(run.device, &log)
            .checkpoint(&run.path("checkpoint.safetensors"), args.resume)
            .spec("model", &config), // what a resume must repeat, with the objective's settings
        (&[], &mut |_, _| {}),
    )?;
    log.finish();
    // ANCHOR_END: train
    run.write_loss("Lesson 03: L_simple of the MNIST MLP", ("l_simple", "L_simple"), &outcome.losses)?;

    // ANCHOR: sample
    let sample_steps = args.sample_steps as usize;
    let mut traj = Trajectory::new(4, sample_steps.min(sched.num_steps()), 8);
    let bar = progress(n as u64 * sample_steps.min(sched.num_steps()) as u64, "sample");
    let x = sample(
        &model,
        sched,
        &[n, 1, 28, 28],
        &AncestralSampling { steps: sample_steps, variance: args.variance, threshold: Threshold::Static, batch: 250 },
        run.device,
        &mut |start, st| {
            traj.record(start, &st);
            bar.inc(st.x_t.size()[0] as u64);
        },
    );
    bar.finish_and_clear();
    // (n, 1, 28, 28) in [0, 1]
    let samples = to_unit(&x).to_device(Device::Cpu);
    // ANCHOR_END: sample
    plot::sample_grid(&run.path("samples.png"), "Lesson 03: DDPM samples from the MLP", &samples)?;
    traj.draw(&run.path("trajectory.png"), "Reverse process: x_t and the predicted x̂₀ (rows) as t falls (columns)")?;

    // ANCHOR: evaluate
    let clf = MnistClassifier::load_shipped(Device::Cpu)?;
    let report = evaluate_samples(&clf, &samples, &data.test_images);
    // ANCHOR_END: evaluate
    println!(
        "MNIST MLP: {steps} steps in {:.0} s; {n} samples: Fréchet distance {:.2} (real-vs-real floor {:.2}, ratio {:.1}), class entropy {:.3} of ln 10, confidence {:.3}",
        outcome.seconds, report.frechet_distance, report.frechet_floor, report.fd_over_floor, report.entropy_over_max, report.mean_confidence
    );
    let recipe = describe(&args.schedule, args.loss_weight, args.lr, args.variance);
    let row = report.row("MLP (lesson 03)", &recipe, (steps as u64, args.batch), outcome.seconds);
    run.write_results(&[("quality", markdown_table(&QUALITY_HEADER, &[row]))])?;
    Ok(json!({
        "network": config, "train_steps": steps, "batch_size": args.batch, "train_seconds": outcome.seconds,
        "resumed_from": outcome.resumed_from, "bf16": args.bf16,
        "final_loss_mean_last_100": mean_of_last(&outcome.losses, 100),
        "sample_steps": sample_steps, "variance": args.variance, "samples": report,
    }))
}
