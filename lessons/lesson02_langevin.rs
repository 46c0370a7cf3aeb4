//! Lesson 02 — Langevin dynamics and annealed Langevin (NCSN).
//!
//! Sampling with nothing but a score. Plain Langevin dynamics gets the weights of two far-apart modes wrong and
//! never moves between them; annealed Langevin, walking down a ladder of noise levels, fixes both. Then the same
//! idea on MNIST: a noise-conditional score network trained with denoising score matching and sampled with
//! annealed Langevin. Chapter 02 of the book walks through this file.
use anyhow::{Context, Result};
use clap::Parser;
use plotters::style::{Color, BLUE, RED, WHITE};
use scratch_diffusion::checkpoint;
use scratch_diffusion::cli::{lesson_main, log_line, positive, progress, CommonArgs, Run};
use scratch_diffusion::data::mnist;
use scratch_diffusion::data::toy2d::GaussianMixture;
use scratch_diffusion::diffusion::ladder;
use scratch_diffusion::eval::sample_quality::{energy_distance, mode_weight_error, mode_weights};
use scratch_diffusion::nn::ncsn::{Ncsn, NcsnConfig};
use scratch_diffusion::nn::score_mlp::ScoreMlpConfig;
use scratch_diffusion::plot::{self, Layer, Panel};
use scratch_diffusion::sampling::langevin::{annealed_langevin, langevin};
use scratch_diffusion::train::ema::Ema;
use scratch_diffusion::train::toy_score::{ToyScoreConfig, ToyScoreModel};
use scratch_diffusion::train::{train_dsm, TrainOpts};
use serde_json::json;
use tch::{nn::VarStore, Device, Kind, Tensor};

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
        train: TrainOpts { steps, batch_size: 512, lr: 2e-3, warmup: steps / 20 },
        seed: run.seed,
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
            let mut m = ToyScoreModel::new(config, run.device);
            let bar = progress(m.config.train.steps as u64, "train");
            m.train(&mut |_, _| bar.inc(1))?;
            bar.finish_and_clear();
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
    let mut per_method = serde_json::Map::new();
    let mut small_weights = vec![p.weights[0]];
    for (name, x) in &methods {
        let w = mode_weights(&p, x);
        let (err, ed) = (mode_weight_error(&p, x), energy_distance(x, &truth));
        println!(
            "{name:<36} small-mode weight {:.3} (true 0.200)  mode-weight error {err:.3}  energy distance {ed:.4}",
            w[0]
        );
        per_method.insert(
            name.to_string(),
            json!({"small_mode_weight": w[0], "mode_weight_error": err, "energy_distance": ed}),
        );
        small_weights.push(w[0]);
    }
    println!("slow mixing: after {} plain Langevin steps from the small mode, {:.1} % of chains reached the big mode (80 % should be there)", 10 * total, 100.0 * reached_big);

    // figures
    let dens: Vec<f64> = Vec::<f64>::try_from(p.log_prob(&plot::grid_points(lo, hi, 100).to_kind(Kind::Double)).exp())?;
    let top = dens.iter().cloned().fold(0.0, f64::max);
    let heat = Layer::Heatmap { values: dens, n: 100, range: (0.0, top) };
    let mut panels = vec![Panel {
        title: "exact samples".into(),
        bounds: (lo, hi),
        layers: vec![heat.clone(), Layer::Scatter { points: plot::to_points(&truth), color: WHITE.mix(0.7), size: 1 }],
    }];
    for (name, x) in &methods {
        let w = mode_weights(&p, x)[0];
        panels.push(Panel {
            title: format!("{name} (small mode {:.0} %)", 100.0 * w),
            bounds: (lo, hi),
            layers: vec![heat.clone(), Layer::Scatter { points: plot::to_points(x), color: WHITE.mix(0.7), size: 1 }],
        });
    }
    panels.push(Panel {
        title: format!("plain, started in the small mode: {:.0} % escape", 100.0 * reached_big),
        bounds: (lo, hi),
        layers: vec![heat.clone(), Layer::Scatter { points: plot::to_points(&stuck), color: WHITE.mix(0.7), size: 1 }],
    });
    plot::panels(
        &run.path("samples_2d.png"),
        "Lesson 02: samples vs the true density (small mode has weight 20 %)",
        3,
        380,
        &panels,
    )?;
    let traj = |paths: Vec<Vec<[f64; 2]>>, title: &str, color| Panel {
        title: title.into(),
        bounds: (lo, hi),
        layers: vec![heat.clone(), Layer::Paths { paths, color }],
    };
    plot::panels(
        &run.path("trajectories.png"),
        "Lesson 02: eight chains from the same kind of start",
        2,
        440,
        &[traj(paths_plain, "plain Langevin", RED.mix(0.9)), traj(paths_annealed, "annealed Langevin", BLUE.mix(0.9))],
    )?;
    let cats = vec!["small mode (−5, −5)".to_string(), "big mode (5, 5)".to_string()];
    let mut series = vec![("true", vec![p.weights[0], p.weights[1]])];
    let short = ["plain, exact", "annealed, exact", "plain, learned", "annealed, learned"];
    for (k, w) in small_weights.iter().skip(1).enumerate() {
        series.push((short[k], vec![*w, 1.0 - w]));
    }
    plot::bars(&run.path("mode_weights.png"), "Lesson 02: fraction of samples in each mode", "weight", &cats, &series)?;

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

/// Keeps every position of the first eight chains, for trajectory plots.
fn record(paths: &mut Vec<Vec<[f64; 2]>>, x: &Tensor) {
    if paths.is_empty() {
        paths.resize(8, Vec::new());
    }
    for (path, pt) in paths.iter_mut().zip(plot::to_points(&x.narrow(0, 0, 8))) {
        path.push(pt);
    }
}

fn mnist_part(run: &Run, args: &Args) -> Result<serde_json::Value> {
    let data = mnist::load(&run.data_dir).context("lesson 02 trains on MNIST (use --skip-mnist to skip that part)")?;
    // ANCHOR: ncsn_train
    // [NCSN] sec. 5: for MNIST, L = 10 levels from σ₁ = 1 to σ_L = 0.01, pixels in [0, 1].
    let sigmas = ladder::geometric(1.0, 0.01, 10);
    let config = if run.quick { NcsnConfig::tiny() } else { NcsnConfig::mnist() };
    let steps = args.mnist_steps.unwrap_or(if run.quick { 40 } else { 1800 }) as usize;
    let opts = TrainOpts { steps, batch_size: 64, lr: 2e-3, warmup: steps / 20 };
    let mut vs = VarStore::new(run.device);
    let net = Ncsn::new(vs.root(), config.clone());
    let mut ema = Ema::new(&vs, 0.999); // sample from the average of the weights, not the last iterate
    let train_x = data.train_images.to_device(run.device);
    let n_train = train_x.size()[0];
    let bar = progress(steps as u64, "ncsn");
    let losses = train_dsm(
        &vs,
        |x, s| net.score(x, s, true),
        |_| train_x.index_select(0, &Tensor::randint(n_train, [opts.batch_size], (Kind::Int64, run.device))),
        &sigmas,
        &opts,
        &mut |step, loss| {
            ema.update(&vs);
            bar.inc(1);
            bar.set_message(format!("loss {loss:.3}"));
            if (step + 1) % (steps / 5).max(1) == 0 {
                log_line(&bar, format!("NCSN step {:>5}/{steps}  DSM loss {loss:.3}", step + 1));
            }
        },
    )?;
    bar.finish_and_clear();
    ema.copy_to(&mut vs);
    checkpoint::save(
        &vs,
        &run.path("ncsn_mnist.safetensors"),
        &json!({"ncsn": config, "sigmas": sigmas, "train": opts, "ema_decay": ema.decay}),
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
    let ncol = (args.num_samples as f64).sqrt().ceil() as usize;
    plot::image_grid(
        &run.path("mnist_samples.png"),
        "NCSN + annealed Langevin samples",
        &samples.clamp(0.0, 1.0).to_device(Device::Cpu),
        ncol,
        3,
        &[],
    )?;
    let strip = Tensor::stack(&snapshots, 1).flatten(0, 1).clamp(0.0, 1.0).to_device(Device::Cpu); // (8·L, 1, 28, 28)
    let labels: Vec<String> =
        (0..strip.size()[0] as usize).map(|i| format!("σ={:.2}", sigmas[i % sigmas.len()])).collect();
    plot::image_grid(
        &run.path("mnist_annealing.png"),
        "Annealed Langevin: each row one chain, after each noise level",
        &strip,
        sigmas.len(),
        3,
        &labels,
    )?;

    // held-out DSM loss per noise level (the test set never seen in training)
    let test_x = data.test_images.narrow(0, 0, 1000).to_device(run.device);
    let per_level: Vec<f64> = sigmas
        .iter()
        .map(|&s| {
            let sig = Tensor::full([test_x.size()[0]], s, (Kind::Float, run.device));
            tch::no_grad(|| {
                scratch_diffusion::diffusion::score_matching::dsm_loss(|x, sg| net.score(x, sg, false), &test_x, &sig)
                    .double_value(&[])
            })
        })
        .collect();
    let pixel_mean = samples.clamp(0.0, 1.0).mean(Kind::Double).double_value(&[]);
    let data_mean = data.test_images.mean(Kind::Double).double_value(&[]);
    println!(
        "MNIST: {steps} steps, final loss {:.3}; sample mean intensity {pixel_mean:.3} (test set {data_mean:.3})",
        losses.last().unwrap()
    );
    Ok(json!({
        "config": config,
        "steps": steps,
        "batch_size": opts.batch_size,
        "final_loss_mean_last_100": losses.iter().rev().take(100).sum::<f64>() / losses.len().min(100) as f64,
        "test_dsm_loss_per_sigma": sigmas.iter().zip(&per_level).map(|(s, l)| json!({"sigma": s, "loss": l})).collect::<Vec<_>>(),
        "sample_mean_intensity": pixel_mean,
        "test_mean_intensity": data_mean,
        "langevin_steps_per_level": t_steps,
        "eps": args.mnist_eps,
    }))
}
