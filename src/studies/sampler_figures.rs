//! The figures of lesson 07: the convergence orders of the ODE solvers on an analytic Gaussian (from
//! [`crate::sampling::oracle::order_study`]), 2-D trajectories of ODE and SDE samplers from the same starting points
//! on a Gaussian mixture whose ideal denoiser is exact ([`MixtureOracle`]), and quality against NFE from the rows of
//! an NFE study ([`crate::studies::nfe`]).
//!
//! [SDE] Song et al. 2021, arXiv:2011.13456, sec. 4.3: the probability-flow ODE and the reverse SDE have the same
//! marginals p_t, but the ODE maps each starting point to one sample, the SDE to a distribution of them.
use crate::data::toy2d::GaussianMixture;
use crate::diffusion::schedule::NoiseSchedule;
use crate::eval::frechet::SampleReport;
use crate::plot::{self, Layer, LinePanel, Panel};
use crate::sampling::oracle::{MixtureOracle, OrderResult};
use crate::sampling::registry::Sampler;
use crate::studies::nfe::{overall_accuracy, NfeRow};
use anyhow::Result;
use plotters::style::{Color, RGBAColor, BLACK, WHITE};
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Log–log endpoint error against steps, one line per solver, the fitted slope in the legend.
pub fn plot_orders(path: &Path, results: &[OrderResult]) -> Result<()> {
    let series = results
        .iter()
        .map(|r| {
            let label = format!("{}: slope −{:.2} (theory {})", r.name, r.order, r.expected);
            (label, r.errors.iter().map(|&(n, e)| (n as f64, e)).collect())
        })
        .collect();
    let panel = LinePanel {
        title: "relative endpoint error on a 16-D Gaussian (exact PF-ODE solution known)".into(),
        x_desc: "steps N".into(),
        y_desc: "relative RMS error".into(),
        log_y: true,
        series,
    };
    plot::line_panels_log_x(path, "Orders of convergence of the ODE solvers (log–log)", 900, 560, &[panel])
}

/// One panel of the trajectory figure: a sampler, its steps and NFE, and where its chains ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrajectoryPanel {
    pub sampler: &'static str,
    pub steps: usize,
    pub nfe: usize,
    /// Mean log p₀ of the end points under the data density (the data's own samples: [`TrajectoryFigure`]).
    pub mean_log_p: f64,
    /// Fraction of chains that end in the same mixture component as the first (ODE) panel's chain from the same
    /// start: 1 for any accurate ODE solver, about the chance of agreeing for an SDE sampler started far from data.
    pub same_mode_as_first: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrajectoryFigure {
    pub chains: i64,
    pub drawn: i64,
    /// Mean log p₀ of samples of the data itself, the value a perfect sampler scores.
    pub data_mean_log_p: f64,
    pub panels: Vec<TrajectoryPanel>,
}

// ANCHOR: trajectories
/// Runs each (sampler, steps) of `runs` on the exact denoiser of `mixture` from the same `chains` starting points
/// z ~ N(0, I) (the VP x_T; the schedule is DDPM's linear one, whose continuous limit is the VP SDE of the
/// predictor–corrector), and draws the paths of the first `drawn` chains over the data density. States are drawn in
/// VP units x/√(1 + σ²), where the prior is N(0, I) and the data are unscaled.
pub fn ode_vs_sde_trajectories(
    path: &Path,
    mixture: &GaussianMixture,
    runs: &[(Sampler, usize)],
    chains: i64,
    drawn: i64,
) -> Result<TrajectoryFigure> {
    let oracle = MixtureOracle::from_toy2d(mixture);
    let sched = NoiseSchedule::ddpm(1000);
    let z = Tensor::randn([chains, 2], (Kind::Double, Device::Cpu)); // the same starts for every sampler
    let log_p = |x: &Tensor| oracle.log_density(x, 0.0).mean(Kind::Double).double_value(&[]);
    let (lo, hi) = mixture.bounds();
    let n = 80;
    let density = oracle.log_density(&plot::grid_points(lo, hi, n).to_kind(Kind::Double), 0.0);
    let values: Vec<f64> = Vec::try_from(density.clamp_min(-12.0)).expect("(n²,) f64");
    let (mut panels, mut figure, mut first_modes) = (Vec::new(), Vec::new(), None);
    for &(sampler, steps) in runs {
        let mut states: Vec<Tensor> = vec![z.narrow(0, 0, drawn)];
        let counting = crate::model::CountingDenoiser::new(&oracle);
        let x0 = sampler.sample(&counting, &sched, &z, steps, &mut |st| {
            // the predictor–corrector's state is already in VP units
            let scale = if sampler == Sampler::PredictorCorrector { 1.0 } else { (1.0 + st.sigma * st.sigma).sqrt() };
            if st.i > 0 {
                states.push(st.x.narrow(0, 0, drawn) / scale);
            }
        });
        states.push(x0.narrow(0, 0, drawn));
        let modes = mixture.assign(&x0);
        let first = first_modes.get_or_insert_with(|| modes.shallow_clone());
        let same = modes.eq_tensor(first).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        let paths: Vec<Vec<[f64; 2]>> =
            (0..drawn).map(|c| states.iter().map(|s| plot::to_points(&s.get(c).unsqueeze(0))[0]).collect()).collect();
        let nfe = counting.calls.get();
        let kind = if sampler.stochastic() { "SDE" } else { "ODE" };
        figure.push(Panel {
            title: format!("{kind}: {}, {steps} steps ({nfe} NFE)", sampler.name()),
            bounds: (lo, hi),
            layers: vec![
                Layer::Heatmap {
                    values: values.clone(),
                    n,
                    range: (-12.0, values.iter().copied().fold(-12.0, f64::max)),
                },
                Layer::Scatter { points: plot::to_points(&x0), color: WHITE.mix(0.5), size: 1 },
                Layer::Paths { paths, color: RGBAColor(255, 120, 0, 0.9) },
                Layer::Scatter { points: plot::to_points(&z.narrow(0, 0, drawn)), color: BLACK.mix(1.0), size: 3 },
            ],
        });
        let (sampler, mean_log_p) = (sampler.name(), log_p(&x0));
        panels.push(TrajectoryPanel { sampler, steps, nfe, mean_log_p, same_mode_as_first: same });
    }
    let data_mean_log_p = log_p(&oracle.sample_noised(chains, 0.0));
    let title = "The same starting points (black) through ODE and SDE samplers; orange: paths, white: all end points";
    plot::panels(path, title, runs.len().min(4), 380, &figure)?;
    Ok(TrajectoryFigure { chains, drawn, data_mean_log_p, panels })
}
// ANCHOR_END: trajectories

/// The rows as (name, [(NFE, value)]) series, one per sampler, in the order of `samplers`.
fn series<G>(rows: &[NfeRow<G>], samplers: &[Sampler], value: &dyn Fn(&G) -> f64) -> Vec<(String, Vec<(f64, f64)>)> {
    samplers
        .iter()
        .map(|s| {
            let pts = rows.iter().filter(|r| r.sampler == s.key()).map(|r| (r.nfe as f64, value(&r.grade))).collect();
            (s.name().to_string(), pts)
        })
        .filter(|(_, pts): &(String, Vec<(f64, f64)>)| !pts.is_empty())
        .collect()
}

/// Quality against NFE (log x): deterministic solvers in one panel, stochastic samplers (with DPM-Solver++(2M) for
/// comparison) in the other, each with the horizontal `lines` (e.g. the reference and the real-vs-real floor).
pub fn plot_vs_nfe<G>(
    path: &Path,
    title: &str,
    y_desc: &str,
    rows: &[NfeRow<G>],
    value: &dyn Fn(&G) -> f64,
    log_y: bool,
    lines: &[(String, f64)],
) -> Result<()> {
    let (lo, hi) = rows.iter().fold((f64::MAX, 1.0f64), |(a, b), r| (a.min(r.nfe as f64), b.max(r.nfe as f64)));
    let panel = |name: &str, samplers: Vec<Sampler>| {
        let mut s = series(rows, &samplers, value);
        s.extend(lines.iter().map(|(label, v)| (label.clone(), vec![(lo, *v), (hi, *v)])));
        LinePanel { title: name.into(), x_desc: "NFE".into(), y_desc: y_desc.into(), log_y, series: s }
    };
    // many samplers: deterministic and stochastic apart (DPM-Solver++(2M) in both); a few: one panel
    let present: Vec<Sampler> =
        Sampler::ALL.into_iter().filter(|s| rows.iter().any(|r| r.sampler == s.key())).collect();
    let panels = if present.len() <= 4 {
        vec![panel("", present)]
    } else {
        let ode = present.iter().copied().filter(|s| !s.stochastic()).collect();
        let sde = present.iter().copied().filter(|s| s.stochastic() || *s == Sampler::DpmSolverPp2m).collect();
        vec![panel("deterministic (ODE solvers)", ode), panel("stochastic (SDE samplers)", sde)]
    };
    let width = if panels.len() == 1 { 900 } else { 560 };
    plot::line_panels_log_x(path, title, width, 420, &panels)
}

/// The two figures of the study on lesson 04's UNet, into `out`: fd_vs_nfe.png (Fréchet distance against NFE, with
/// the `reference` run of DDPM over `reference_steps` steps and the real-vs-real floor at `n` samples) and
/// samples_by_sampler.png (the first 8 samples of every sampler at the smallest budget ≥ 10 of `budgets`, else the
/// largest, and of the reference).
pub fn plot_fd_study(
    out: &Path,
    (rows, reference): (&[NfeRow<SampleReport>], &NfeRow<SampleReport>),
    (n, reference_steps): (i64, usize),
    budgets: &[usize],
) -> Result<()> {
    let fd = |g: &SampleReport| g.frechet_distance;
    let (ref_fd, floor) = (reference.grade.frechet_distance, reference.grade.frechet_floor);
    let lines = [(format!("DDPM, {reference_steps} steps"), ref_fd), (format!("real vs real (n = {n})"), floor)];
    let title = format!("Lesson 04's UNet: Fréchet distance against network evaluations ({n} samples, same noise)");
    plot_vs_nfe(&out.join("fd_vs_nfe.png"), &title, "Fréchet distance", rows, &fd, true, &lines)?;
    let shown = budgets.iter().copied().filter(|&b| b >= 10).min().unwrap_or(*budgets.iter().max().unwrap());
    let mut preview: Vec<_> = rows.iter().filter(|r| r.budget == shown).collect();
    preview.push(reference);
    let title = format!("The same 8 starting noises through every sampler at NFE ≤ {shown}, and the reference");
    plot_previews(&out.join("samples_by_sampler.png"), &title, &preview, 8)
}

/// The figure of the study on lesson 06's pipeline at guidance `w`, one image for each of the 50 evaluation prompts,
/// into `out`: prompt_accuracy_vs_nfe.png.
pub fn plot_prompt_study(out: &Path, rows: &[NfeRow<Value>], w: f64) -> Result<()> {
    let title = format!("Lesson 06's pipeline: prompt accuracy against NFE (w = {w}, 50 prompts)");
    plot_vs_nfe(&out.join("prompt_accuracy_vs_nfe.png"), &title, "prompt accuracy", rows, &overall_accuracy, false, &[])
}

/// A grid with a row per run of `rows` (its first `k` preview samples), labelled with the sampler and NFE.
pub fn plot_previews<G>(path: &Path, title: &str, rows: &[&NfeRow<G>], k: i64) -> Result<()> {
    let (mut tiles, mut labels) = (Vec::new(), Vec::new());
    for r in rows {
        let x = r.preview.narrow(0, 0, k.min(r.preview.size()[0]));
        labels.extend(
            (0..x.size()[0]).map(|j| if j == 0 { format!("{}, {} NFE", r.name, r.nfe) } else { String::new() }),
        );
        tiles.push(x);
    }
    plot::image_grid(path, title, &Tensor::cat(&tiles, 0), k as usize, 3, &labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::oracle::{ode_solvers, order_study, OrderSetup};

    /// Both figures render; accurate ODE solvers agree chain by chain, SDE samplers do not, and all land on the data.
    #[test]
    fn figures_render_and_ode_chains_are_deterministic() {
        tch::manual_seed(4);
        let dir = tempfile::tempdir().unwrap();
        let setup = OrderSetup { points: 16, steps: vec![10, 20], ..OrderSetup::default() };
        plot_orders(&dir.path().join("order.png"), &order_study(&setup, &ode_solvers()[..3])).unwrap();
        let runs = [(Sampler::Heun, 40), (Sampler::DpmSolverPp2m, 60), (Sampler::EulerAncestral, 80)];
        let fig =
            ode_vs_sde_trajectories(&dir.path().join("traj.png"), &GaussianMixture::ring(8, 4.0, 0.5), &runs, 400, 4)
                .unwrap();
        println!("{fig:#?}");
        assert!(dir.path().join("traj.png").exists() && dir.path().join("order.png").exists());
        assert_eq!(fig.panels[0].nfe, 79);
        assert!(fig.panels[1].same_mode_as_first > 0.97, "{:?}", fig.panels[1]);
        assert!(fig.panels[2].same_mode_as_first < 0.6, "{:?}", fig.panels[2]);
        for p in &fig.panels {
            assert!((p.mean_log_p - fig.data_mean_log_p).abs() < 0.3, "{p:?} vs {}", fig.data_mean_log_p);
        }
    }

    /// The NFE figures render for a full set of samplers (two panels), a few (one panel) and a single budget.
    #[test]
    fn nfe_figures_render() {
        let dir = tempfile::tempdir().unwrap();
        let sched = NoiseSchedule::ddpm(1000);
        let oracle = crate::sampling::oracle::GaussianOracle::isotropic(&[0.0; 4], 0.5);
        let z = Tensor::randn([8, 1, 2, 2], (Kind::Float, Device::Cpu));
        let d = |x: &Tensor, s: &Tensor| crate::model::Denoiser::denoise(&oracle, &x.flatten(1, -1), s).view_as(x);
        let mean = &mut |x: &Tensor| Ok(x.mean(Kind::Double).double_value(&[]));
        for (samplers, budgets) in [(&Sampler::ALL[..], &[5, 10, 20][..]), (&Sampler::ALL[..3], &[5][..])] {
            let plan = crate::studies::nfe::plan(samplers, budgets, &sched);
            let rows = crate::studies::nfe::run_study(&d, &sched, &z, &plan, 0, mean, &|_| {}).unwrap();
            let png = dir.path().join(format!("nfe{}.png", samplers.len()));
            plot_vs_nfe(&png, "t", "mean", &rows, &|g| *g, false, &[("ref".into(), 0.5)]).unwrap();
            plot_previews(&dir.path().join("previews.png"), "t", &rows.iter().collect::<Vec<_>>(), 4).unwrap();
            assert!(png.exists());
        }
        // the two study figures of lesson 07, from rows with made-up grades
        let plan = crate::studies::nfe::plan(&Sampler::ALL[..3], &[5, 10], &sched);
        let report = |fd| SampleReport {
            n: 8,
            frechet_distance: fd,
            frechet_floor: 1.0,
            fd_over_floor: fd,
            class_histogram: vec![0.1; 10],
            class_entropy: 10f64.ln(),
            entropy_over_max: 1.0,
            mean_confidence: 0.9,
        };
        let fd = &mut |x: &Tensor| Ok(report(x.abs().mean(Kind::Double).double_value(&[])));
        let mut rows = crate::studies::nfe::run_study(&d, &sched, &z, &plan, 0, fd, &|_| {}).unwrap();
        let reference = rows.remove(0);
        plot_fd_study(dir.path(), (&rows, &reference), (8, 1000), &[5, 10]).unwrap();
        let accuracy = &mut |x: &Tensor| Ok(serde_json::json!({ "overall": x.mean(Kind::Double).double_value(&[]) }));
        let rows = crate::studies::nfe::run_study(&d, &sched, &z, &plan, 0, accuracy, &|_| {}).unwrap();
        plot_prompt_study(dir.path(), &rows, 2.0).unwrap();
        for name in ["fd_vs_nfe.png", "samples_by_sampler.png", "prompt_accuracy_vs_nfe.png"] {
            assert!(dir.path().join(name).exists(), "{name}");
        }
    }
}
