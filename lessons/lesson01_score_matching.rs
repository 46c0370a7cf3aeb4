//! Lesson 01 — score matching.
//!
//! The score ∇ₓ log p(x) of a 2-D Gaussian mixture, and a network that learns it from samples alone with denoising
//! score matching at several noise levels. The figures show the true and learned vector fields side by side and
//! where the learned one is wrong: in the low-density regions, at small noise. Chapter 01 of the book walks through
//! this file.
use anyhow::Result;
use clap::Parser;
use plotters::style::{Color, RED, WHITE};
use scratch_diffusion::cli::{lesson_main, markdown_table, mean_of_last, positive, CommonArgs, StepLog};
use scratch_diffusion::data::toy2d::GaussianMixture;
use scratch_diffusion::diffusion::ladder;
use scratch_diffusion::eval::score_error::{score_errors, ScoreErrors};
use scratch_diffusion::nn::score_mlp::ScoreMlpConfig;
use scratch_diffusion::plot::{self, Layer, Panel};
use scratch_diffusion::train::toy_score::{ToyScoreConfig, ToyScoreModel};
use scratch_diffusion::train::trainer::{TrainRun, TrainerConfig};
use serde_json::json;
use tch::{Device, Kind};

/// Lesson 01: learn the score of a 2-D Gaussian mixture with denoising score matching.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, allow_negative_numbers = true)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Mixture to learn: two-modes (Song & Ermon's ⅕/⅘ pair), ring (8 modes) or grid (3×3).
    #[arg(long, default_value = "two-modes")]
    layout: String,
    /// Training steps [default: 6000, or 600 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Peak learning rate of Adam.
    #[arg(long, default_value_t = 2e-3, value_parser = positive)]
    lr: f64,
    /// Samples per training batch.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(i64).range(1..))]
    batch: i64,
    /// Number of noise levels L in the geometric ladder.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100))]
    levels: u64,
    /// Largest noise level σ₁.
    #[arg(long, default_value_t = 10.0, value_parser = positive)]
    sigma_max: f64,
    /// Smallest noise level σ_L.
    #[arg(long, default_value_t = 0.1, value_parser = positive)]
    sigma_min: f64,
}

fn main() {
    lesson_main(|| run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let run = args.common.init("lesson01")?;
    anyhow::ensure!(args.sigma_min <= args.sigma_max, "--sigma-min must not exceed --sigma-max");
    // ANCHOR: setup
    let p = GaussianMixture::by_name(&args.layout)?;
    let sigmas = ladder::geometric(args.sigma_max, args.sigma_min, args.levels as usize); // σ₁ > … > σ_L
    let steps = args.steps.unwrap_or(if run.quick { 600 } else { 6000 }) as usize;
    let config = ToyScoreConfig {
        layout: args.layout.clone(),
        mixture: p.clone(),
        sigmas: sigmas.clone(),
        net: ScoreMlpConfig::toy2d(),
        train: TrainerConfig { seed: run.seed, ..TrainerConfig::dsm(steps, args.batch, args.lr) },
    };
    // ANCHOR_END: setup
    println!(
        "lesson01: learning the score of the '{}' mixture at {} noise levels, {steps} steps",
        args.layout,
        sigmas.len()
    );

    // ANCHOR: train
    let log = StepLog::new(steps as u64, "DSM", 5);
    let (model, outcome) = ToyScoreModel::train(config, TrainRun::logged(run.device, &log))?;
    log.finish();
    let losses = outcome.losses;
    model.save(&run.path("score_mlp.safetensors"))?;
    // ANCHOR_END: train
    let rows: Vec<(usize, Vec<f64>)> = losses.iter().enumerate().map(|(i, l)| (i, vec![*l])).collect();
    run.write_loss_csv("loss.csv", &["dsm_loss"], &rows)?;
    plot::loss_curve(&run.path("loss.png"), "Lesson 01: denoising score matching loss", &[("DSM loss", &losses)])?;

    // ANCHOR: evaluate
    let errors: Vec<ScoreErrors> = sigmas
        .iter()
        .map(|&sigma| score_errors(&p, sigma, |x| model.score(x, sigma).to_kind(Kind::Double), 20_000, 80))
        .collect();
    // ANCHOR_END: evaluate
    for e in &errors {
        println!(
            "σ = {:>7.3}   relative error: where the data is {:.4}   low-density region {:.4}",
            e.sigma, e.weighted_rel_error, e.low_density_rel_error
        );
    }
    draw_fields(&run.path("score_fields.png"), &p, &model, &sigmas)?;
    draw_density(&run.path("density.png"), &p)?;
    let names: Vec<String> = errors.iter().map(|e| format!("{:.2}", e.sigma)).collect();
    plot::bars(
        &run.path("score_error.png"),
        "Relative score error per noise level σ",
        "relative squared error",
        &names,
        &[
            ("weighted by p_σ (where the data is)", errors.iter().map(|e| e.weighted_rel_error.min(2.0)).collect()),
            ("low-density region (uniform)", errors.iter().map(|e| e.low_density_rel_error.min(2.0)).collect()),
        ],
    )?;

    let (small, large) = (errors.last().unwrap(), errors.first().unwrap());
    let metrics = json!({
        "layout": args.layout,
        "steps": steps,
        "final_loss_mean_last_100": mean_of_last(&losses, 100),
        "score_error": errors,
        "low_density_error_smallest_sigma": small.low_density_rel_error,
        "low_density_error_largest_sigma": large.low_density_rel_error,
        "low_density_worse_at_small_noise": small.low_density_rel_error > large.low_density_rel_error,
    });
    let cell = |e: &ScoreErrors| {
        vec![
            format!("{:.3}", e.sigma),
            format!("{:.4}", e.weighted_rel_error),
            format!("{:.4}", e.low_density_rel_error),
        ]
    };
    let header = ["σ", "relative error where the data is", "relative error in the low-density region"];
    run.write_results(&[("score_error", markdown_table(&header, &errors.iter().map(cell).collect::<Vec<_>>()))])?;
    run.write_metrics(metrics)?;
    println!(
        "summary: at σ = {:.2} the low-density score error is {:.3} (vs {:.3} where the data is); at σ = {:.1} it is {:.3}. \
         Outputs in {} ({:.1} s)",
        small.sigma, small.low_density_rel_error, small.weighted_rel_error, large.sigma, large.low_density_rel_error,
        run.out.display(), run.elapsed_s()
    );
    Ok(())
}

/// The clean density with samples drawn from it.
fn draw_density(path: &std::path::Path, p: &GaussianMixture) -> Result<()> {
    let (lo, hi) = p.bounds();
    let n = 120;
    let log_p = p.log_prob(&plot::grid_points(lo, hi, n).to_kind(Kind::Double));
    let values: Vec<f64> = Vec::<f64>::try_from(log_p.exp())?;
    let top = values.iter().cloned().fold(0.0, f64::max);
    let samples = plot::to_points(&p.sample(1000, Device::Cpu));
    let panel = Panel {
        title: "density p(x) and 1000 samples".into(),
        bounds: (lo, hi),
        layers: vec![
            Layer::Heatmap { values, n, range: (0.0, top) },
            Layer::Scatter { points: samples, color: WHITE.mix(0.6), size: 1 },
        ],
    };
    plot::panels(path, "Lesson 01: the data", 1, 520, &[panel])
}

/// One row per shown noise level: the true score over the noised density, the learned score, and the error map.
fn draw_fields(path: &std::path::Path, p: &GaussianMixture, model: &ToyScoreModel, sigmas: &[f64]) -> Result<()> {
    let (lo, hi) = p.bounds();
    let (n_heat, n_arrows) = (80, 21);
    let heat_pts = plot::grid_points(lo, hi, n_heat);
    let arrow_pts = plot::grid_points(lo, hi, n_arrows);
    let spacing = (hi - lo) / n_arrows as f64 * 0.9;
    let shown: Vec<f64> = {
        let l = sigmas.len();
        let mut idx: Vec<usize> = vec![l - 1, (2 * (l - 1)) / 3, (l - 1) / 3, 0];
        idx.dedup();
        idx.into_iter().map(|i| sigmas[i]).collect()
    };
    let mut panels = Vec::new();
    for &sigma in &shown {
        let ps = p.noised(sigma);
        let dens: Vec<f64> = Vec::<f64>::try_from(ps.log_prob(&heat_pts.to_kind(Kind::Double)).exp())?;
        let top = dens.iter().cloned().fold(0.0, f64::max);
        let truth = ps.score(&arrow_pts.to_kind(Kind::Double));
        let learned = model.score(&arrow_pts, sigma);
        let pts = plot::to_points(&arrow_pts);
        let heat = Layer::Heatmap { values: dens, n: n_heat, range: (0.0, top) };
        panels.push(Panel {
            title: format!("true ∇log p_σ, σ = {sigma:.2}"),
            bounds: (lo, hi),
            layers: vec![
                heat.clone(),
                Layer::Quiver { points: pts.clone(), vectors: plot::to_points(&truth), spacing, color: WHITE },
            ],
        });
        panels.push(Panel {
            title: format!("learned s_θ(x, σ), σ = {sigma:.2}"),
            bounds: (lo, hi),
            layers: vec![
                heat,
                Layer::Quiver { points: pts, vectors: plot::to_points(&learned), spacing, color: WHITE },
            ],
        });
        // error map: ‖s_θ − ∇log p_σ‖ / ‖∇log p_σ‖, capped at 1
        let t = ps.score(&heat_pts.to_kind(Kind::Double));
        let l = model.score(&heat_pts, sigma).to_kind(Kind::Double);
        let rel = (&l - &t).norm_scalaropt_dim(2.0, [1], false) / (t.norm_scalaropt_dim(2.0, [1], false) + 1e-8);
        let rel: Vec<f64> = Vec::<f64>::try_from(rel.clamp_max(1.0))?;
        let modes: Vec<[f64; 2]> = p.means.clone();
        panels.push(Panel {
            title: format!("relative error (0 → 1+), σ = {sigma:.2}"),
            bounds: (lo, hi),
            layers: vec![
                Layer::Heatmap { values: rel, n: n_heat, range: (0.0, 1.0) },
                Layer::Scatter { points: modes, color: RED.mix(1.0), size: 4 },
            ],
        });
    }
    plot::panels(path, "Lesson 01: true vs learned score, and where they differ", 3, 360, &panels)
}
