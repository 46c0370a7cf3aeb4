//! Langevin dynamics and annealed Langevin dynamics.
//!
//! [SGLD] Welling & Teh 2011, "Bayesian Learning via Stochastic Gradient Langevin Dynamics", ICML.
//! [NCSN] Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data Distribution", arXiv:1907.05600.
//! [Tweedie] Efron 2011, "Tweedie's Formula and Selection Bias", JASA 106(496).
//! Notation (code -> paper): step -> ε (plain) or αᵢ (annealed), eps -> ε, sigmas -> {σᵢ}, t_steps -> T, z -> z_t.
use tch::Tensor;

/// What a sampler reports after each update (for progress bars and trajectory plots).
pub struct LangevinStep<'a> {
    /// Index of the noise level (0 for plain Langevin).
    pub level: usize,
    /// Step within the level, 0-based.
    pub t: usize,
    /// Noise level of the score used (0 for plain Langevin).
    pub sigma: f64,
    /// The samples after this update.
    pub x: &'a Tensor,
}

/// Plain (unadjusted) Langevin dynamics with a fixed step ε, `n_steps` updates from `x`:
/// [NCSN] eq. 4 (the update of [SGLD] eq. 4 with the full-data gradient)
///     x_t = x_{t−1} + (ε/2) ∇ₓ log p(x_{t−1}) + √ε z_t,   z_t ~ N(0, I).
/// As ε → 0 and T → ∞ the samples are distributed as p.
// ANCHOR: langevin
pub fn langevin(
    score: impl Fn(&Tensor) -> Tensor,
    x: Tensor,
    step: f64,
    n_steps: usize,
    cb: &mut dyn FnMut(LangevinStep),
) -> Tensor {
    let mut x = x;
    for t in 0..n_steps {
        let z = x.randn_like();
        // [NCSN] eq. 4
        x = &x + score(&x) * (step / 2.0) + z * step.sqrt();
        cb(LangevinStep { level: 0, t, sigma: 0.0, x: &x });
    }
    x
}
// ANCHOR_END: langevin

/// Annealed Langevin dynamics, [NCSN] Algorithm 1: for each noise level σᵢ (largest first) run T Langevin steps on
/// the noised density p_σᵢ with the step size
///     αᵢ = ε · σᵢ² / σ_L²
/// so that the signal-to-noise ratio of each update is the same at every level. `score(x, σ)` is the score of the
/// data noised at σ. With `denoise_last`, finish with one step of Tweedie's formula at the smallest level,
/// x ← x + σ_L² ∇ log p_σ_L(x) ([Tweedie] eq. 2.8; the "final denoising" of Jolicoeur-Martineau et al. 2021), which
/// removes the σ_L-sized noise the last Langevin step leaves behind.
// ANCHOR: annealed_langevin
pub fn annealed_langevin(
    score: impl Fn(&Tensor, f64) -> Tensor,
    x: Tensor,
    sigmas: &[f64],
    eps: f64,
    t_steps: usize,
    denoise_last: bool,
    cb: &mut dyn FnMut(LangevinStep),
) -> Tensor {
    let sigma_last = *sigmas.last().expect("at least one noise level");
    let mut x = x;
    for (level, &sigma) in sigmas.iter().enumerate() {
        // [NCSN] Algorithm 1, line 3: αᵢ ← ε · σᵢ² / σ_L²
        let alpha = eps * sigma * sigma / (sigma_last * sigma_last);
        for t in 0..t_steps {
            let z = x.randn_like();
            // [NCSN] Algorithm 1, line 6: x̃_t ← x̃_{t−1} + (αᵢ/2) s_θ(x̃_{t−1}, σᵢ) + √αᵢ z_t
            x = &x + score(&x, sigma) * (alpha / 2.0) + z * alpha.sqrt();
            cb(LangevinStep { level, t, sigma, x: &x });
        }
    }
    if denoise_last {
        // [Tweedie] E[x₀ | x̃] = x̃ + σ² ∇ log p_σ(x̃)
        x = &x + score(&x, sigma_last) * (sigma_last * sigma_last);
    }
    x
}
// ANCHOR_END: annealed_langevin

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn moments(x: &Tensor) -> (f64, f64) {
        (x.mean(Kind::Double).double_value(&[]), x.var(true).double_value(&[]))
    }

    /// Unadjusted Langevin on N(μ, s²) is an AR(1) chain whose stationary variance is s² / (1 − ε/(4s²)):
    /// with ε = 0.01 and s = 1.5 that is within 0.2 % of s², so the samples must match μ and s².
    #[test]
    fn langevin_with_an_analytic_gaussian_score_reproduces_mean_and_variance() {
        tch::manual_seed(3);
        let (mu, s) = (2.0, 1.5);
        let score = |x: &Tensor| -(x - mu) / (s * s);
        let x0 = Tensor::randn([20_000, 2], (Kind::Double, Device::Cpu)) * 0.1 - 3.0; // start far away, narrow
        let x = langevin(score, x0, 0.01, 3000, &mut |_| {});
        let (m, v) = moments(&x);
        assert!((m - mu).abs() < 0.03, "mean {m}");
        assert!((v / (s * s) - 1.0).abs() < 0.03, "variance {v} vs {}", s * s);
    }

    /// Annealed Langevin with exact noised scores of a Gaussian, then Tweedie's denoising step, recovers it.
    #[test]
    fn annealed_langevin_recovers_a_gaussian_and_reports_every_step() {
        tch::manual_seed(4);
        let (mu, s) = (-1.0, 0.5);
        let score = |x: &Tensor, sigma: f64| -(x - mu) / (s * s + sigma * sigma);
        let sigmas = crate::diffusion::ladder::geometric(5.0, 0.05, 6);
        let mut calls = 0;
        let x0 = Tensor::rand([20_000, 2], (Kind::Double, Device::Cpu)) * 16.0 - 8.0;
        let x = annealed_langevin(score, x0, &sigmas, 2e-3, 200, false, &mut |_| calls += 1);
        assert_eq!(calls, 6 * 200);
        let (m, v) = moments(&x);
        // without the final denoising step the samples come from p_σ_L: variance s² + σ_L²
        assert!((m - mu).abs() < 0.02 && (v / (s * s + 0.05f64.powi(2)) - 1.0).abs() < 0.05, "{m} {v}");
    }

    #[test]
    fn tweedie_denoising_step_is_the_posterior_mean() {
        // For x₀ ~ N(0, s²) and x̃ = x₀ + σz, E[x₀ | x̃] = x̃ · s²/(s² + σ²); one Tweedie step from any x̃ gives it.
        let (s, sigma) = (1.0f64, 0.5f64);
        let score = |x: &Tensor, sg: f64| -x / (s * s + sg * sg);
        let x = Tensor::from_slice(&[1.0f64, -2.0, 0.5]);
        let out = annealed_langevin(score, x.shallow_clone(), &[sigma], 0.0, 0, true, &mut |_| {});
        let want = &x * (s * s / (s * s + sigma * sigma));
        assert!((out - want).abs().max().double_value(&[]) < 1e-12);
    }
}
