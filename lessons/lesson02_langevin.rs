//! Lesson 02 — Langevin dynamics and annealed Langevin (NCSN).
//!
//! Sampling with nothing but a score. Plain Langevin dynamics gets the weights of two far-apart modes wrong and
//! never moves between them; annealed Langevin, walking down a ladder of noise levels, fixes both. Then the same
//! idea on MNIST: a noise-conditional score network trained with denoising score matching and sampled with
//! annealed Langevin. Chapter 02 of the book walks through this file.
use anyhow::{Context, Result};
use clap::Parser;
use scratch_diffusion::checkpoint;
use scratch_diffusion::cli::{lesson_main, markdown_table, mean_of_last, positive, progress, CommonArgs, Run, StepLog};
use scratch_diffusion::data::mnist;
use scratch_diffusion::data::toy2d::GaussianMixture;
use scratch_diffusion::diffusion::ladder;
use scratch_diffusion::eval::sample_quality::{energy_distance, mode_weight_error, mode_weights};
use scratch_diffusion::nn::ncsn::{Ncsn, NcsnConfig};
use scratch_diffusion::nn::score_mlp::ScoreMlpConfig;
use scratch_diffusion::plot;
use scratch_diffusion::sampling::langevin::{annealed_langevin, langevin};
use scratch_diffusion::studies::langevin::{dsm_loss_per_level, plot_mnist, plot_toy, record, ToyFigures};
use scratch_diffusion::train::toy_score::{ToyScoreConfig, ToyScoreModel};
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use scratch_diffusion::train::{train_dsm, DsmData};
use serde_json::json;
use tch::{Kind, Tensor};

/// Lesson 02: Langevin dynamics, its failures, and annealed Langevin on 2-D data and on MNIST.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, allow_negative_numbers = true)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Langevin steps per noise level (annealed) [default: 100, or 20 with --quick]; plain Langevin gets L× as many.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps_per_level: Option<u64>,
    /// Step-size constant ε of annealed Langevin on the 2-D data (αᵢ = ε σᵢ²/σ_L²).
    #[arg(long, default_value_t = 2e-3, value_parser = positive)]
    eps: f64,
    /// Step size ε of plain Langevin on the 2-D data (large enough to converge within each mode).
    #[arg(long, default_value_t = 0.05, value_parser = positive)]
    plain_step: f64,
    /// Score model of lesson 01 to reuse; trained here if missing or trained with other settings.
    #[arg(long, default_value = "out/lesson01/score_mlp.safetensors")]
    toy_checkpoint: std::path::PathBuf,
    /// MNIST training steps [default: 1800, or 40 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    mnist_steps: Option<u64>,
    /// Step-size constant ε of annealed Langevin on MNIST (NCSN used 2e-5 for a network trained 100× longer;
    /// our minutes-trained score is smoother and takes larger steps).
    #[arg(long, default_value_t = 5e-5, value_parser = positive)]
    mnist_eps: f64,
    /// Number of MNIST samples to draw.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(i64).range(1..=1024))]
    num_samples: i64,
    /// Skip the MNIST part.
    #[arg(long)]
    skip_mnist: bool,
}

fn main() {
    lesson_main(|| run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let run = args.common.init("lesson02")?;
    let t_steps = args.steps_per_level.unwrap_or(if run.quick { 20 } else { 100 }) as usize;
    let mut metrics = toy_part(&run, &args, t_steps)?;
    if !args.skip_mnist {
        metrics["mnist"] = mnist_part(&run, &args)?;
    }
    run.write_metrics(metrics)?;
    println!("outputs in {} ({:.1} s)", run.out.display(), run.elapsed_s());
    Ok(())
}

/// The same configuration lesson 01 uses by default, so its checkpoint can be reused.
fn toy_config(run: &Run) -> ToyScoreConfig {
    let steps = if run.quick { 600 } else { 6000 };
    ToyScoreConfig {
        layout: "two-modes".into(),
        mixture: GaussianMixture::two_modes(),
        sigmas: ladder::geometric(10.0, 0.1, 10),
        net: ScoreMlpConfig::toy2d(),
        train: TrainerConfig { seed: run.seed, ..TrainerConfig::dsm(steps, 512, 2e-3) },
    }
}

fn toy_part(run: &Run, args: &Args, t_steps: usize) -> Result<serde_json::Value> {
    let config = toy_config(run);
    let p = config.mixture.clone();
    let sigmas = config.sigmas.clone();
    let model = match ToyScoreModel::load_if_matching(&args.toy_checkpoint, &config, run.device)? {
        Some(m) => {
            println!("using lesson 01's score model from {}", args.toy_checkpoint.display());
            m
        }
        None => {
            println!(
                "training the 2-D score model ({} steps; run lesson01 first to reuse its model)",
                config.train.steps
            );
            let log = StepLog::new(config.train.steps as u64, "DSM", 0);
            let (m, _) = ToyScoreModel::train(config, TrainRun::logged(run.device, &log))?;
            log.finish();
            m
        }
    };
    let (lo, hi) = p.bounds();
    let n = if run.quick { 1000 } else { 2000 };
    let sigma_min = *sigmas.last().unwrap();
    // ANCHOR: plain_vs_annealed
    // Plain Langevin uses the score of the clean data (analytic) or the smallest learned noise level, L·T steps of
    // size --plain-step; annealed Langevin walks the ladder σ₁ > … > σ_L with T steps of size αᵢ = ε σᵢ²/σ_L² at each level.
    let total = sigmas.len() * t_steps;
    let start = || Tensor::rand([n, 2], (Kind::Float, run.device)) * (hi - lo) + lo; // uniform over the box
    let analytic = |x: &Tensor, sigma: f64| p.noised(sigma).score(x);
    let learned = |x: &Tensor, sigma: f64| model.score(x, sigma);
    let mut paths_plain = Vec::new();
    let mut paths_annealed = Vec::new();
    let plain_analytic =
        langevin(|x| analytic(x, 0.0), start(), args.plain_step, total, &mut |s| record(&mut paths_plain, s.x));
    let annealed_analytic = annealed_langevin(analytic, start(), &sigmas, args.eps, t_steps, false, &mut |s| {
        record(&mut paths_annealed, s.x)
    });
    let plain_learned = langevin(|x| learned(x, sigma_min), start(), args.plain_step, total, &mut |_| {});
    let annealed_learned = annealed_langevin(learned, start(), &sigmas, args.eps, t_steps, false, &mut |_| {});
    // ANCHOR_END: plain_vs_annealed

    // ANCHOR: slow_mixing
    // Slow mixing: start every chain in the small mode and run plain Langevin 10× longer.
    let in_small = Tensor::randn([n, 2], (Kind::Float, run.device)) + Tensor::from_slice(&[-5.0f32, -5.0]);
    let stuck = langevin(|x| analytic(x, 0.0), in_small, args.plain_step, 10 * total, &mut |_| {});
    let reached_big = mode_weights(&p, &stuck)[1];
    // ANCHOR_END: slow_mixing

    let truth = p.sample(n, run.device);
    let methods = [
        ("plain Langevin, exact score", &plain_analytic),
        ("annealed Langevin, exact scores", &annealed_analytic),
        ("plain Langevin, learned score", &plain_learned),
        ("annealed Langevin, learned scores", &annealed_learned),
    ];
    let (mut per_method, mut rows) = (serde_json::Map::new(), Vec::new());
    for (name, x) in &methods {
        let w = mode_weights(&p, x);
        let (err, ed) = (mode_weight_error(&p, x), energy_distance(x, &truth));
        println!(
            "{name:<36} small-mode weight {:.3} (true 0.200)  mode-weight error {err:.3}  energy distance {ed:.4}",
            w[0]
        );
        rows.push(vec![name.to_string(), format!("{:.3}", w[0]), format!("{err:.3}"), format!("{ed:.4}")]);
        per_method.insert(
            name.to_string(),
            json!({"small_mode_weight": w[0], "mode_weight_error": err, "energy_distance": ed}),
        );
    }
    println!("slow mixing: after {} plain Langevin steps from the small mode, {:.1} % of chains reached the big mode (80 % should be there)", 10 * total, 100.0 * reached_big);

    let paths = [paths_plain, paths_annealed];
    let figures = ToyFigures { mixture: &p, truth: &truth, methods: &methods, stuck: &stuck, reached_big, paths };
    plot_toy(&run.out, figures)?;
    let header = [
        "sampler",
        "weight of the small mode (true 0.200)",
        "mode-weight error (TV)",
        "energy distance to exact samples",
    ];
    run.write_results(&[("samplers", markdown_table(&header, &rows))])?;

    let get = |k: &str, f: &str| per_method[k][f].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "samples_per_method": n,
        "steps_per_level": t_steps,
        "levels": sigmas.len(),
        "toy": per_method,
        "mode_weight_error_plain": get("plain Langevin, exact score", "mode_weight_error"),
        "mode_weight_error_annealed": get("annealed Langevin, exact scores", "mode_weight_error"),
        "energy_distance_plain": get("plain Langevin, exact score", "energy_distance"),
        "energy_distance_annealed": get("annealed Langevin, exact scores", "energy_distance"),
        "slow_mixing_fraction_escaped": reached_big,
        "slow_mixing_steps": 10 * total,
    }))
}

fn mnist_part(run: &Run, args: &Args) -> Result<serde_json::Value> {
    let data = mnist::load(&run.data_dir).context("lesson 02 trains on MNIST (use --skip-mnist to skip that part)")?;
    // ANCHOR: ncsn_train
    // [NCSN] sec. 5: for MNIST, L = 10 levels from σ₁ = 1 to σ_L = 0.01, pixels in [0, 1].
    let sigmas = ladder::geometric(1.0, 0.01, 10);
    let config = if run.quick { NcsnConfig::tiny() } else { NcsnConfig::mnist() };
    let steps = args.mnist_steps.unwrap_or(if run.quick { 40 } else { 1800 }) as usize;
    // sample from an average of the weights (EMA), not the last iterate
    let cfg = TrainerConfig { ema_decay: Some(0.999), seed: run.seed, ..TrainerConfig::dsm(steps, 64, 2e-3) };
    let train_x = data.train_images.to_device(run.device); // (60000, 1, 28, 28) in [0, 1]
    let log = StepLog::new(steps as u64, "NCSN", 5);
    let (vs, net, outcome) = train_dsm(
        |path| Ncsn::new(path, config.clone()),
        |net: &Ncsn, x, s| net.score(x, s, true),
        DsmData::Rows(&train_x),
        &sigmas,
        &cfg,
        TrainRun::logged(run.device, &log),
    )?;
    log.finish();
    let losses = outcome.losses; // vs now holds the EMA weights
    checkpoint::save(
        &vs,
        &run.path("ncsn_mnist.safetensors"),
        &json!({"ncsn": config, "sigmas": sigmas, "train": cfg}),
    )?;
    // ANCHOR_END: ncsn_train
    let rows: Vec<(usize, Vec<f64>)> = losses.iter().enumerate().map(|(i, l)| (i, vec![*l])).collect();
    run.write_loss_csv("loss.csv", &["ncsn_dsm_loss"], &rows)?;
    plot::loss_curve(&run.path("loss.png"), "Lesson 02: NCSN on MNIST, DSM loss", &[("DSM loss", &losses)])?;

    // ANCHOR: ncsn_sample
    let t_steps = args.steps_per_level.unwrap_or(if run.quick { 5 } else { 100 }) as usize;
    let score = |x: &Tensor, sigma: f64| {
        let s = Tensor::full([x.size()[0]], sigma, (Kind::Float, x.device()));
        tch::no_grad(|| net.score(x, &s, false))
    };
    let x0 = Tensor::rand([args.num_samples, 1, 28, 28], (Kind::Float, run.device)); // [NCSN]: uniform noise start
    let mut snapshots = Vec::new();
    let bar = progress((sigmas.len() * t_steps) as u64, "sample");
    let samples = annealed_langevin(score, x0, &sigmas, args.mnist_eps, t_steps, true, &mut |s| {
        bar.inc(1);
        if s.t + 1 == t_steps {
            snapshots.push(s.x.narrow(0, 0, 8.min(args.num_samples)).shallow_clone());
            // (8, 1, 28, 28)
        }
    });
    bar.finish_and_clear();
    // ANCHOR_END: ncsn_sample
    plot_mnist(&run.out, &samples, &snapshots, &sigmas)?;
    // held-out DSM loss per noise level (the test set never seen in training)
    let test_x = data.test_images.narrow(0, 0, 1000).to_device(run.device);
    let per_level = dsm_loss_per_level(|x, s| net.score(x, s, false), &test_x, &sigmas);
    let pixel_mean = samples.clamp(0.0, 1.0).mean(Kind::Double).double_value(&[]);
    let data_mean = data.test_images.mean(Kind::Double).double_value(&[]);
    println!(
        "MNIST: {steps} steps, final loss {:.3}; sample mean intensity {pixel_mean:.3} (test set {data_mean:.3})",
        losses.last().unwrap()
    );
    Ok(json!({
        "config": config,
        "steps": steps,
        "batch_size": cfg.batch_size,
        "final_loss_mean_last_100": mean_of_last(&losses, 100),
        "test_dsm_loss_per_sigma": sigmas.iter().zip(&per_level).map(|(s, l)| json!({"sigma": s, "loss": l})).collect::<Vec<_>>(),
        "sample_mean_intensity": pixel_mean,
        "test_mean_intensity": data_mean,
        "langevin_steps_per_level": t_steps,
        "eps": args.mnist_eps,
    }))
}
