//! The figures of lesson 03: the three noise schedules side by side, the forward process q(x_t | x₀) on MNIST digits,
//! and DDPM samples on a 2-D mixture over its true density.
//!
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239 (the linear schedule, eq. 4).
//! [iDDPM] Nichol & Dhariwal 2021, arXiv:2102.09672, eq. 17 (the cosine schedule).
//! Notation (code -> paper): alpha_bar(t) -> ᾱ_t, betas[t] -> β_t, snr(t) -> ᾱ_t/(1−ᾱ_t).
use crate::data::to_unit;
use crate::data::toy2d::GaussianMixture;
use crate::diffusion::forward::q_sample;
use crate::diffusion::schedule::NoiseSchedule;
use crate::plot::{self, Layer, LinePanel, Panel};
use anyhow::Result;
use plotters::style::{Color, WHITE};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// schedules.png: β_t, ᾱ_t and the signal-to-noise ratio of the linear, cosine and scaled-linear schedules with
/// T = `t_max`.
pub fn plot_schedules(path: &Path, t_max: usize) -> Result<()> {
    let all = [
        ("linear", NoiseSchedule::ddpm(t_max)),
        ("cosine", NoiseSchedule::cosine(t_max)),
        ("scaled-linear", NoiseSchedule::scaled_linear(t_max)),
    ];
    let series = |f: &dyn Fn(&NoiseSchedule, usize) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        all.iter().map(|(n, s)| (n.to_string(), (0..t_max).map(|t| (t as f64, f(s, t))).collect())).collect()
    };
    let panel = |title: &str, y: &str, log_y, f: &dyn Fn(&NoiseSchedule, usize) -> f64| LinePanel {
        title: title.into(),
        x_desc: "t".into(),
        y_desc: y.into(),
        log_y,
        series: series(f),
    };
    plot::line_panels(
        path,
        "Noise schedules",
        380,
        320,
        &[
            panel("β_t", "β_t", false, &|s, t| s.betas[t]),
            panel("ᾱ_t (signal kept)", "ᾱ_t", false, &|s, t| s.alpha_bar(t)),
            panel("SNR = ᾱ_t/(1−ᾱ_t)", "SNR (log)", true, &|s, t| s.snr(t)),
        ],
    )
}

/// forward_noising.png: the first eight of `images` (N, 1, 28, 28) in [0, 1], noised with q(x_t | x₀) at eight
/// increasing t (a row per digit, fresh noise for every tile).
pub fn plot_forward_noising(path: &Path, sched: &NoiseSchedule, images: &Tensor) -> Result<()> {
    let t_max = sched.num_steps();
    let ts: Vec<usize> =
        [0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0].iter().map(|f| ((t_max - 1) as f64 * f).round() as usize).collect();
    let x0 = images.narrow(0, 0, 8) * 2.0 - 1.0; // (8, 1, 28, 28) in [−1, 1]
    let ab = sched.to_tensor_alpha_bar(Device::Cpu);
    let mut tiles = Vec::new();
    let mut labels = Vec::new();
    for k in 0..8 {
        for &t in &ts {
            let tt = Tensor::from_slice(&[t as i64]);
            // ANCHOR: q_sample
            let eps = x0.get(k).unsqueeze(0).randn_like();
            // [DDPM] eq. 4
            let x_t = q_sample(&ab, &x0.get(k).unsqueeze(0), &tt, &eps);
            // ANCHOR_END: q_sample
            tiles.push(to_unit(&x_t).squeeze_dim(0));
            labels.push(format!("t={t}"));
        }
    }
    plot::image_grid(
        path,
        "q(x_t | x₀): MNIST digits noised at increasing t",
        &Tensor::stack(&tiles, 0),
        ts.len(),
        3,
        &labels,
    )
}

/// Point clouds (N, 2) over the density of `p`, one panel each, titled: for example exact samples beside a
/// sampler's.
pub fn plot_over_density(path: &Path, title: &str, p: &GaussianMixture, clouds: &[(String, &Tensor)]) -> Result<()> {
    let (lo, hi) = p.bounds();
    let dens: Vec<f64> = Vec::<f64>::try_from(p.log_prob(&plot::grid_points(lo, hi, 100).to_kind(Kind::Double)).exp())?;
    let top = dens.iter().cloned().fold(0.0, f64::max);
    let heat = Layer::Heatmap { values: dens, n: 100, range: (0.0, top) };
    let panel = |(title, pts): &(String, &Tensor)| Panel {
        title: title.clone(),
        bounds: (lo, hi),
        layers: vec![heat.clone(), Layer::Scatter { points: plot::to_points(pts), color: WHITE.mix(0.7), size: 1 }],
    };
    plot::panels(path, title, 2, 420, &clouds.iter().map(panel).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_figures_render() {
        tch::manual_seed(0);
        let dir = tempfile::tempdir().unwrap();
        plot_schedules(&dir.path().join("schedules.png"), 50).unwrap();
        let images = Tensor::rand([8, 1, 28, 28], (Kind::Float, Device::Cpu));
        plot_forward_noising(&dir.path().join("forward.png"), &NoiseSchedule::ddpm(50), &images).unwrap();
        let p = GaussianMixture::two_modes();
        let x = p.sample(100, Device::Cpu);
        plot_over_density(&dir.path().join("toy.png"), "toy", &p, &[("exact".into(), &x), ("again".into(), &x)])
            .unwrap();
        for name in ["schedules.png", "forward.png", "toy.png"] {
            assert_eq!(&std::fs::read(dir.path().join(name)).unwrap()[1..4], b"PNG", "{name} is a PNG");
        }
    }
}
