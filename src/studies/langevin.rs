//! Lesson 02's figures and its held-out measurement: samples of the four samplers over the true density, the paths
//! of eight chains, the weight each sampler gives the two modes, the MNIST samples after each noise level, and the
//! denoising-score-matching loss per level on test digits.
use crate::data::toy2d::GaussianMixture;
use crate::diffusion::score_matching::dsm_loss;
use crate::eval::sample_quality::mode_weights;
use crate::plot::{self, Layer, Panel};
use anyhow::Result;
use plotters::style::{Color, BLUE, RED, WHITE};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The samplers' names in the mode-weight bar chart, in the order of [`ToyFigures::methods`].
const SHORT_NAMES: [&str; 4] = ["plain, exact", "annealed, exact", "plain, learned", "annealed, learned"];

/// What the 2-D figures show.
pub struct ToyFigures<'a> {
    pub mixture: &'a GaussianMixture,
    /// Exact samples (n, 2).
    pub truth: &'a Tensor,
    /// (name, samples (n, 2)) of plain and annealed Langevin with the exact score, then with the learned one.
    pub methods: &'a [(&'a str, &'a Tensor); 4],
    /// Plain Langevin started in the small mode (n, 2), and the fraction of its chains that reached the big one.
    pub stuck: &'a Tensor,
    pub reached_big: f64,
    /// The first eight chains' positions at every step: plain Langevin, annealed Langevin.
    pub paths: [Vec<Vec<[f64; 2]>>; 2],
}

/// Draws samples_2d.png, trajectories.png and mode_weights.png into `out`.
pub fn plot_toy(out: &Path, figures: ToyFigures) -> Result<()> {
    let ToyFigures { mixture: p, truth, methods, stuck, reached_big, paths: [plain, annealed] } = figures;
    let (lo, hi) = p.bounds();
    let dens: Vec<f64> = Vec::<f64>::try_from(p.log_prob(&plot::grid_points(lo, hi, 100).to_kind(Kind::Double)).exp())?;
    let top = dens.iter().cloned().fold(0.0, f64::max);
    let heat = Layer::Heatmap { values: dens, n: 100, range: (0.0, top) };
    let mut panels = vec![Panel {
        title: "exact samples".into(),
        bounds: (lo, hi),
        layers: vec![heat.clone(), Layer::Scatter { points: plot::to_points(truth), color: WHITE.mix(0.7), size: 1 }],
    }];
    for (name, x) in methods {
        let w = mode_weights(p, x)[0];
        panels.push(Panel {
            title: format!("{name} (small mode {:.0} %)", 100.0 * w),
            bounds: (lo, hi),
            layers: vec![heat.clone(), Layer::Scatter { points: plot::to_points(x), color: WHITE.mix(0.7), size: 1 }],
        });
    }
    panels.push(Panel {
        title: format!("plain, started in the small mode: {:.0} % escape", 100.0 * reached_big),
        bounds: (lo, hi),
        layers: vec![heat.clone(), Layer::Scatter { points: plot::to_points(stuck), color: WHITE.mix(0.7), size: 1 }],
    });
    plot::panels(
        &out.join("samples_2d.png"),
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
        &out.join("trajectories.png"),
        "Lesson 02: eight chains from the same kind of start",
        2,
        440,
        &[traj(plain, "plain Langevin", RED.mix(0.9)), traj(annealed, "annealed Langevin", BLUE.mix(0.9))],
    )?;
    let cats = vec!["small mode (−5, −5)".to_string(), "big mode (5, 5)".to_string()];
    let mut series = vec![("true", vec![p.weights[0], p.weights[1]])];
    for (short, (_, x)) in SHORT_NAMES.iter().zip(methods) {
        let w = mode_weights(p, x)[0];
        series.push((short, vec![w, 1.0 - w]));
    }
    plot::bars(&out.join("mode_weights.png"), "Lesson 02: fraction of samples in each mode", "weight", &cats, &series)?;
    Ok(())
}

/// Keeps every position of the first eight chains, for trajectory plots.
pub fn record(paths: &mut Vec<Vec<[f64; 2]>>, x: &Tensor) {
    if paths.is_empty() {
        paths.resize(8, Vec::new());
    }
    for (path, pt) in paths.iter_mut().zip(plot::to_points(&x.narrow(0, 0, 8))) {
        path.push(pt);
    }
}

/// MNIST samples (N, 1, 28, 28) in a grid of √N columns (mnist_samples.png), and `snapshots` (one (8, 1, 28, 28)
/// per noise level: eight chains after each level of `sigmas`) as a row per chain (mnist_annealing.png), into `out`.
pub fn plot_mnist(out: &Path, samples: &Tensor, snapshots: &[Tensor], sigmas: &[f64]) -> Result<()> {
    let ncol = (samples.size()[0] as f64).sqrt().ceil() as usize;
    let title = "NCSN + annealed Langevin samples";
    plot::image_grid(
        &out.join("mnist_samples.png"),
        title,
        &samples.clamp(0.0, 1.0).to_device(Device::Cpu),
        ncol,
        3,
        &[],
    )?;
    let strip = Tensor::stack(snapshots, 1).flatten(0, 1).clamp(0.0, 1.0).to_device(Device::Cpu); // (8·L, 1, 28, 28)
    let labels: Vec<String> =
        (0..strip.size()[0] as usize).map(|i| format!("σ={:.2}", sigmas[i % sigmas.len()])).collect();
    let title = "Annealed Langevin: each row one chain, after each noise level";
    plot::image_grid(&out.join("mnist_annealing.png"), title, &strip, sigmas.len(), 3, &labels)
}

/// The denoising-score-matching loss ([NCSN] eq. 6 at one σ, see [`dsm_loss`]) of `score(x, σ)` on held-out `x`
/// at each level of `sigmas`.
pub fn dsm_loss_per_level(score: impl Fn(&Tensor, &Tensor) -> Tensor, x: &Tensor, sigmas: &[f64]) -> Vec<f64> {
    sigmas
        .iter()
        .map(|&s| {
            let sig = Tensor::full([x.size()[0]], s, (Kind::Float, x.device())); // (N,)
            tch::no_grad(|| dsm_loss(&score, x, &sig).double_value(&[]))
        })
        .collect()
}
