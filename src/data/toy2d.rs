//! 2-D Gaussian mixtures: data whose density, score and noised versions are known exactly.
//!
//! [NCSN] Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data Distribution", arXiv:1907.05600.
//! Notation (code -> math): weights -> π_k, means -> μ_k, stds -> s_k (isotropic), sigma -> σ (added noise).
//!
//! p(x) = Σ_k π_k N(x; μ_k, s_k² I). Because the sum of independent Gaussians is Gaussian, the data convolved with
//! noise N(0, σ² I) is again a mixture, p_σ(x) = Σ_k π_k N(x; μ_k, (s_k² + σ²) I), so every noised score is exact too.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// A mixture of isotropic 2-D Gaussians.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GaussianMixture {
    pub weights: Vec<f64>,
    pub means: Vec<[f64; 2]>,
    pub stds: Vec<f64>,
}

/// The layouts a lesson can ask for by name (`--layout`).
pub const LAYOUTS: [&str; 3] = ["two-modes", "ring", "grid"];

impl GaussianMixture {
    /// Builds a mixture, normalising the weights to sum to one.
    pub fn new(weights: Vec<f64>, means: Vec<[f64; 2]>, stds: Vec<f64>) -> Self {
        assert!(weights.len() == means.len() && means.len() == stds.len() && !weights.is_empty());
        let total: f64 = weights.iter().sum();
        Self { weights: weights.iter().map(|w| w / total).collect(), means, stds }
    }

    /// Two far-apart modes of unequal weight: p = ⅕ N((−5,−5), I) + ⅘ N((5,5), I), the mixture of [NCSN] sec. 3.2.2
    /// on which plain Langevin dynamics gets the mode weights wrong.
    pub fn two_modes() -> Self {
        Self::new(vec![0.2, 0.8], vec![[-5.0, -5.0], [5.0, 5.0]], vec![1.0, 1.0])
    }

    /// `k` equal modes on a circle of radius `radius`.
    pub fn ring(k: usize, radius: f64, std: f64) -> Self {
        let means = (0..k)
            .map(|i| {
                let a = 2.0 * std::f64::consts::PI * i as f64 / k as f64;
                [radius * a.cos(), radius * a.sin()]
            })
            .collect();
        Self::new(vec![1.0; k], means, vec![std; k])
    }

    /// A `n`×`n` grid of equal modes, `spacing` apart, centred on the origin.
    pub fn grid(n: usize, spacing: f64, std: f64) -> Self {
        let c = (n as f64 - 1.0) / 2.0;
        let means = (0..n * n).map(|i| [((i % n) as f64 - c) * spacing, ((i / n) as f64 - c) * spacing]).collect();
        Self::new(vec![1.0; n * n], means, vec![std; n * n])
    }

    /// A named layout: `two-modes`, `ring` (8 modes, radius 4) or `grid` (3×3, spacing 3).
    pub fn by_name(name: &str) -> Result<Self> {
        Ok(match name {
            "two-modes" => Self::two_modes(),
            "ring" => Self::ring(8, 4.0, 0.5),
            "grid" => Self::grid(3, 3.0, 0.4),
            other => bail!("unknown layout '{other}': use one of {}", LAYOUTS.join(", ")),
        })
    }

    // ANCHOR: noised
    /// The mixture convolved with N(0, σ² I): same weights and means, variances s_k² + σ².
    pub fn noised(&self, sigma: f64) -> Self {
        let stds = self.stds.iter().map(|s| (s * s + sigma * sigma).sqrt()).collect();
        Self { weights: self.weights.clone(), means: self.means.clone(), stds }
    }
    // ANCHOR_END: noised

    /// A square box [lo, hi]² that holds the mixture with a margin (for plots and grids).
    pub fn bounds(&self) -> (f64, f64) {
        let reach =
            self.means.iter().zip(&self.stds).map(|(m, s)| m[0].abs().max(m[1].abs()) + 3.0 * s).fold(0.0, f64::max);
        (-reach, reach)
    }

    fn params(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (kind, dev) = (x.kind(), x.device());
        let flat: Vec<f64> = self.means.iter().flat_map(|m| [m[0], m[1]]).collect();
        let means = Tensor::from_slice(&flat).view([-1, 2]).to_kind(kind).to_device(dev); // (K, 2)
        let var = Tensor::from_slice(&self.stds).to_kind(kind).to_device(dev).square(); // (K,)
        let log_w = Tensor::from_slice(&self.weights).to_kind(kind).to_device(dev).log(); // (K,)
        (means, var, log_w)
    }

    /// log π_k + log N(x; μ_k, s_k² I) for each point and component: (N, K); also μ_k − x: (N, K, 2) and s_k²: (K,).
    fn component_logits(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (means, var, log_w) = self.params(x);
        // (N, K, 2)
        let diff = means.unsqueeze(0) - x.unsqueeze(1);
        // (N, K)
        let sq = diff.square().sum_dim_intlist(-1, false, x.kind());
        // log N(x; μ, s² I) in d = 2 dimensions: −‖x − μ‖²/(2s²) − log(2π s²)
        let log_n = -&sq / (2.0 * &var) - (2.0 * std::f64::consts::PI * &var).log();
        (log_n + log_w, diff, var)
    }

    /// log p(x) for points x: (N, 2) -> (N,).
    pub fn log_prob(&self, x: &Tensor) -> Tensor {
        let (logits, _, _) = self.component_logits(x);
        logits.logsumexp(-1, false)
    }

    // ANCHOR: score
    /// The score ∇ₓ log p(x) = Σ_k r_k(x) (μ_k − x)/s_k², with responsibilities r_k(x) = π_k N_k(x) / p(x):
    /// (N, 2) -> (N, 2).
    pub fn score(&self, x: &Tensor) -> Tensor {
        let (logits, diff, var) = self.component_logits(x);
        let r = logits.softmax(-1, x.kind()); // (N, K)
        (r.unsqueeze(-1) * diff / var.view([1, -1, 1])).sum_dim_intlist(1, false, x.kind())
    }
    // ANCHOR_END: score

    /// Index of the most responsible component for each point: (N, 2) -> (N,) i64.
    pub fn assign(&self, x: &Tensor) -> Tensor {
        let (logits, _, _) = self.component_logits(x);
        logits.argmax(-1, false)
    }

    /// `n` samples drawn with libtorch's generator (seeded by `tch::manual_seed`): (n, 2) f32.
    pub fn sample(&self, n: i64, device: Device) -> Tensor {
        let w = Tensor::from_slice(&self.weights).to_kind(Kind::Float);
        let k = w.multinomial(n, true); // (n,)
        let (means, var, _) = self.params(&Tensor::zeros([1], (Kind::Float, Device::Cpu)));
        let mu = means.index_select(0, &k); // (n, 2)
        let std = var.sqrt().index_select(0, &k).unsqueeze(-1); // (n, 1)
        (mu + std * Tensor::randn([n, 2], (Kind::Float, Device::Cpu))).to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_equals_finite_difference_gradient_of_log_density() {
        for p in [
            GaussianMixture::two_modes(),
            GaussianMixture::ring(8, 4.0, 0.5),
            GaussianMixture::grid(3, 3.0, 0.4).noised(0.3),
        ] {
            let x = Tensor::from_slice(&[0.3f64, -0.7, 4.1, 4.9, -2.0, 1.5, 0.0, 3.9]).view([4, 2]);
            let s = p.score(&x);
            let h = 1e-5;
            for d in 0..2i64 {
                let e = Tensor::zeros([1, 2], (Kind::Double, Device::Cpu)).index_fill(1, &Tensor::from_slice(&[d]), h);
                let fd = (p.log_prob(&(&x + &e)) - p.log_prob(&(&x - &e))) / (2.0 * h);
                let err = (fd - s.select(1, d)).abs().max().double_value(&[]);
                assert!(err < 1e-6, "finite-difference mismatch {err}");
            }
        }
    }

    #[test]
    fn density_integrates_to_one_and_samples_match_weights() {
        tch::manual_seed(0);
        let p = GaussianMixture::two_modes();
        let (lo, hi) = (-12.0, 12.0);
        let n = 400i64;
        let g = Tensor::linspace(lo, hi, n, (Kind::Double, Device::Cpu));
        let xy = Tensor::stack(&[g.repeat([n]), g.repeat_interleave_self_int(n, None, None)], 1);
        let cell = ((hi - lo) / (n - 1) as f64).powi(2);
        let mass = p.log_prob(&xy).exp().sum(Kind::Double).double_value(&[]) * cell;
        assert!((mass - 1.0).abs() < 1e-3, "mass {mass}");
        let frac_big =
            p.assign(&p.sample(20_000, Device::Cpu)).eq(1).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        assert!((frac_big - 0.8).abs() < 0.015, "weight of the big mode {frac_big}");
    }

    #[test]
    fn unknown_layout_is_an_error() {
        assert!(GaussianMixture::by_name("moons").unwrap_err().to_string().contains("two-modes"));
    }
}
