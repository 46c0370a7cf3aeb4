//! The SDE view: variance-exploding and variance-preserving SDEs, their reverse-time Euler–Maruyama sampler and
//! the predictor–corrector sampler with a Langevin corrector.
//!
//! [SDE] Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021, "Score-Based Generative Modeling through
//! Stochastic Differential Equations", arXiv:2011.13456: eq. 5 (dx = f(x, t) dt + g(t) dw), eq. 6 (the reverse
//! SDE dx = [f − g² ∇ₓ log p_t(x)] dt + g dw̄), eq. 9 (VE), eq. 11 (VP), eqs. 29 and 33 (their marginals),
//! Algorithms 2–3 (predictor–corrector for VE and VP).
//! Notation (code -> paper): t -> t ∈ [ε, 1], alpha -> the mean coefficient of x(t) | x(0) (e^{−½∫β} for VP, 1 for
//! VE), std -> its noise std, sigma -> std/alpha (the σ-space level of every other sampler), beta -> β(t),
//! snr -> r, step -> ε of the corrector.
//!
//! Both SDEs are σ-space diffusions in disguise: x/α(t) = x₀ + σ(t) ε, so the score every sampler needs comes from
//! the same denoiser, ∇ₓ log p_t(x) = (α D(x/α; σ) − x)/std². The Langevin corrector is lesson 02's annealed
//! Langevin, one level per time step, with the step size set by a target signal-to-noise ratio.
use crate::model::{denoise_at, Denoiser};
use crate::sampling::SamplerStep;
use tch::{Kind, Tensor};

/// A forward SDE on t ∈ [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Sde {
    /// [SDE] eq. 9 with σ(t) = σ_min (σ_max/σ_min)^t:  dx = √(d[σ²(t)]/dt) dw  (NCSN's noise ladder, continuous).
    Ve { sigma_min: f64, sigma_max: f64 },
    /// [SDE] eq. 11 with β(t) = β_min + t(β_max − β_min):  dx = −½β(t) x dt + √β(t) dw  (DDPM, continuous).
    Vp { beta_min: f64, beta_max: f64 },
}

impl Sde {
    /// [SDE] appendix C: σ_min = 0.01, σ_max = 50 (CIFAR-10).
    pub fn ve_cifar10() -> Self {
        Sde::Ve { sigma_min: 0.01, sigma_max: 50.0 }
    }

    /// [SDE] sec. 3.4 / appendix C: β_min = 0.1, β_max = 20 (DDPM's β₁ = 10⁻⁴, β_T = 0.02 times T = 1000).
    pub fn vp_ddpm() -> Self {
        Sde::Vp { beta_min: 0.1, beta_max: 20.0 }
    }

    /// (α(t), std(t)) with x(t) | x(0) ~ N(α x(0), std² I). VP ([SDE] eq. 33): α = exp(−¼t²(β_max − β_min) − ½tβ_min),
    /// std = √(1 − α²). VE: α = 1, std = σ(t) (as in the authors' code: x(0) is taken to carry σ_min of noise, so
    /// eq. 29's σ²(t) − σ²(0) becomes σ²(t)).
    pub fn marginal(&self, t: f64) -> (f64, f64) {
        match *self {
            Sde::Ve { sigma_min, sigma_max } => (1.0, sigma_min * (sigma_max / sigma_min).powf(t)),
            Sde::Vp { beta_min, beta_max } => {
                let alpha = (-0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min).exp();
                (alpha, (1.0 - alpha * alpha).sqrt())
            }
        }
    }

    /// The σ-space noise level of time t: std/α.
    pub fn sigma(&self, t: f64) -> f64 {
        let (alpha, std) = self.marginal(t);
        std / alpha
    }

    /// (f, g): the drift is f · x and the diffusion g(t). VE: f = 0, g² = d[σ²]/dt = 2σ² log(σ_max/σ_min).
    /// VP: f = −½β(t), g = √β(t).
    pub fn drift_diffusion(&self, t: f64) -> (f64, f64) {
        match *self {
            Sde::Ve { sigma_min, sigma_max } => (0.0, self.sigma(t) * (2.0 * (sigma_max / sigma_min).ln()).sqrt()),
            Sde::Vp { beta_min, beta_max } => {
                let beta = beta_min + t * (beta_max - beta_min);
                (-0.5 * beta, beta.sqrt())
            }
        }
    }

    /// The std of the prior x(1) ≈ N(0, std² I) to start from: σ_max (VE) or 1 (VP).
    pub fn prior_std(&self) -> f64 {
        match *self {
            Sde::Ve { sigma_max, .. } => sigma_max,
            Sde::Vp { .. } => 1.0,
        }
    }

    /// ∇ₓ log p_t(x) = (α D(x/α; σ(t)) − x)/std², and D itself.
    fn score(&self, d: &dyn Denoiser, x: &Tensor, t: f64) -> (Tensor, Tensor) {
        let (alpha, std) = self.marginal(t);
        let denoised = denoise_at(d, &(x / alpha), self.sigma(t));
        ((&denoised * alpha - x) / (std * std), denoised)
    }
}

/// `steps` + 1 times from 1 down to `t_eps`, evenly spaced (the authors' `linspace(T, eps, N)`, with the end
/// included so that there are `steps` steps).
pub fn sde_times(steps: usize, t_eps: f64) -> Vec<f64> {
    (0..=steps).map(|i| 1.0 - (1.0 - t_eps) * i as f64 / steps as f64).collect()
}

/// The Langevin corrector of [SDE] Algorithms 2–3.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LangevinCorrector {
    /// The target signal-to-noise ratio r (the authors' CIFAR-10 configs use 0.16). The corrector's own
    /// stationary law is over-dispersed by about r²: on Gaussian data r = 0.16 leaves the output variance about
    /// 2.5 % high, r = 0.05 about 0.2 %.
    pub snr: f64,
    /// Langevin steps per time step (M of the algorithms; 1 in the paper's experiments).
    pub steps: usize,
}

/// [SDE] Algorithms 2 (VE) and 3 (VP) with an Euler–Maruyama predictor: for each step t → t' of `ts`
/// (descending, from [`sde_times`]):
///     predictor (eq. 6 discretised): x ← x − [f(x, t) − g(t)² ∇ log p_t(x)] Δt + g(t) √Δt z,   Δt = t − t'
///     corrector (M times at t'):     ε = 2α (r ‖z‖/‖∇ log p_t'‖)²,  x ← x + ε ∇ log p_t'(x) + √(2ε) z
/// with α = 1 (VE) or α = 1 − β(t')Δt (VP, Alg. 3's α_i), and the norms averaged over the batch as in the authors'
/// code (per-sample norms blow the step up wherever the score is near zero, which in 2-D is often).
/// `x` starts in the SDE's own units at t = ts[0] (e.g. N(0, prior_std² I)); the result is the data estimate
/// D(x/α; σ(t_end)) after the last step (Tweedie's denoising, the authors' `denoise = True`). Without a corrector
/// this is plain reverse-time Euler–Maruyama.
// ANCHOR: pc_sampler
pub fn sample_pc(
    d: &dyn Denoiser,
    sde: &Sde,
    x: Tensor,
    ts: &[f64],
    corrector: Option<LangevinCorrector>,
    noise: &mut dyn FnMut(&Tensor) -> Tensor,
    cb: &mut dyn FnMut(SamplerStep),
) -> Tensor {
    let mut x = x;
    for (i, w) in ts.windows(2).enumerate() {
        let (t, t_next) = (w[0], w[1]);
        let dt = t - t_next;
        // predictor: reverse-time Euler–Maruyama on eq. 6
        let (f, g) = sde.drift_diffusion(t);
        let (score, denoised) = sde.score(d, &x, t);
        cb(SamplerStep { i, sigma: sde.sigma(t), sigma_next: sde.sigma(t_next), x: &x, denoised: &denoised });
        x = &x - (&x * f - score * (g * g)) * dt + noise(&x) * (g * dt.sqrt());
        // corrector: Langevin MCMC at t'
        if let Some(c) = corrector {
            let alpha = match *sde {
                Sde::Ve { .. } => 1.0,
                // Alg. 3's α_i = 1 − β_i as the exact ᾱ(t)/ᾱ(t') = e^{−∫β} over the step: ≈ 1 − β(t')Δt for small
                // steps, but positive for any step (1 − β(t')Δt < 0 below ~20 steps made ε < 0 and x NaN)
                Sde::Vp { .. } => (sde.marginal(t).0 / sde.marginal(t_next).0).powi(2),
            };
            for _ in 0..c.steps {
                let (grad, _) = sde.score(d, &x, t_next);
                let z = noise(&x);
                // [SDE] Alg. 2 line 7 / Alg. 3 line 7: ε = 2α (r ‖z‖₂ / ‖g‖₂)²
                let step = 2.0 * alpha * (c.snr * mean_norm(&z) / mean_norm(&grad)).powi(2);
                x = &x + grad * step + z * (2.0 * step).sqrt();
            }
        }
    }
    let t_end = *ts.last().expect("at least one time");
    denoise_at(d, &(&x / sde.marginal(t_end).0), sde.sigma(t_end))
}
// ANCHOR_END: pc_sampler

/// The per-sample L2 norm over all but the batch dimension, averaged over the batch.
fn mean_norm(v: &Tensor) -> f64 {
    let per_sample = v.flatten(1, -1).square().sum_dim_intlist(1, false, Kind::Double).sqrt(); // (B,)
    per_sample.mean(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::oracle::GaussianOracle;
    use crate::sampling::randn_like;

    /// The marginals solve the SDE's moment equations: for x(0) = 0, Var(x(t)) = std² obeys
    /// dVar/dt = 2f Var + g² (central differences), VP preserves α² + std² = 1, and σ = std/α.
    #[test]
    fn marginals_solve_the_moment_equation() {
        for sde in [Sde::ve_cifar10(), Sde::vp_ddpm()] {
            for t in [0.05, 0.3, 0.7, 0.95] {
                let h = 1e-6;
                // x(0) = 0: Var(x(t)) = std² for both SDEs
                let var = |t: f64| sde.marginal(t).1.powi(2);
                let (f, g) = sde.drift_diffusion(t);
                let lhs = (var(t + h) - var(t - h)) / (2.0 * h);
                let rhs = 2.0 * f * var(t) + g * g;
                assert!((lhs / rhs - 1.0).abs() < 1e-6, "{sde:?} t={t}: {lhs} vs {rhs}");
                let (alpha, std) = sde.marginal(t);
                assert!((sde.sigma(t) - std / alpha).abs() < 1e-12);
                if let Sde::Vp { .. } = sde {
                    assert!((alpha * alpha + std * std - 1.0).abs() < 1e-12);
                }
            }
        }
        // the ends of the VP SDE: nearly clean at t = 10⁻³, nearly pure noise (σ ≈ 152) at t = 1
        let vp = Sde::vp_ddpm();
        assert!(vp.sigma(1e-3) < 0.011 && (vp.sigma(1.0) - 152.0).abs() < 1.0, "{}", vp.sigma(1.0));
        let ts = sde_times(4, 0.2);
        assert!(ts.len() == 5 && ts.iter().zip([1.0, 0.8, 0.6, 0.4, 0.2]).all(|(a, b)| (a - b).abs() < 1e-12));
    }

    /// From the exact p_1, Euler–Maruyama and PC (r = 0.05) on both SDEs reproduce N(μ, s²) within 5 standard
    /// errors (10k samples, 500 steps). Their exact discretisation biases on Gaussian data (linear-Gaussian
    /// recursion): VE −0.03 %, VP +0.25 % (mean +0.001), PC VE +0.12 %, PC VP +0.07 %, all below 1 SE (1 %).
    #[test]
    fn euler_maruyama_and_pc_reproduce_the_gaussian() {
        let (mu, s, n) = ([1.0, -0.5], 0.5, 10_000i64);
        let oracle = GaussianOracle::isotropic(&mu, s);
        let ts = sde_times(500, 1e-3);
        tch::manual_seed(16);
        for sde in [Sde::ve_cifar10(), Sde::vp_ddpm()] {
            for corrector in [None, Some(LangevinCorrector { snr: 0.05, steps: 1 })] {
                let (alpha, _) = sde.marginal(1.0);
                let x = oracle.sample_noised(n, sde.sigma(1.0)) * alpha; // the exact p_1
                let out = sample_pc(&oracle, &sde, x, &ts, corrector, &mut randn_like, &mut |_| {});
                let (m, v) = (out.mean_dim(0, false, Kind::Double), out.var_dim(0, true, false));
                for (k, &mu_k) in mu.iter().enumerate() {
                    let (m, v) = (m.double_value(&[k as i64]), v.double_value(&[k as i64]));
                    let what = format!("{sde:?}, {corrector:?}");
                    assert!((m - mu_k).abs() < 5.0 * s / (n as f64).sqrt(), "{what}: mean {m}");
                    assert!((v / (s * s) - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(), "{what}: var {v}");
                }
            }
        }
    }
}
