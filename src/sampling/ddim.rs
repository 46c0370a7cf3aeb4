//! DDPM ancestral sampling and DDIM on a σ grid, with Analytic-DPM's optimal reverse variance as an option.
//!
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239, eq. 7 (the posterior q(x_{t−1} | x_t, x₀)), Algorithm 2.
//! [DDIM] Song, Meng, Ermon 2021, arXiv:2010.02502, eq. 12 (the generalised step) and eq. 16 (σ_t(η)).
//! [Analytic-DPM] Bao, Li, Zhu, Zhang 2022, arXiv:2201.06503, Theorem 1 (the optimal variance σ*_n²).
//! Notation (code -> paper): sigma, sigma_next -> σ, σ' (σ-space noise levels of t and t−1); denoised -> x̂₀;
//! eps -> ε̂ = (x − x̂₀)/σ; lambda_sq -> λ² (= σ_t(η)² of [DDIM], λ_n² of [Analytic-DPM]) divided by ᾱ_{t−1};
//! gamma -> Γ(σ) = E‖ε̂‖²/d.
//!
//! In σ-space x = x_vp/√ᾱ_t = x₀ + σ_t ε. Dividing the VP formulas by √ᾱ_{t−1} and using ᾱ = 1/(1 + σ²):
//!     [DDPM] eq. 7:   q(x' | x, x₀) = N(x₀ + (σ'²/σ²)(x − x₀), β̃ I),   β̃ = σ'²(σ² − σ'²)/σ²
//!     [DDIM] eq. 16:  λ² = η² σ'²(σ² − σ'²)/σ²                (so η = 1 is DDPM with β̃)
//!     [DDIM] eq. 12:  x' = x̂₀ + √(σ'² − λ²) ε̂ + λ z
//! With η = 0 the last line is x' = x̂₀ + σ'(x − x̂₀)/σ = x + (σ' − σ)(x − x̂₀)/σ: one Euler step of the
//! probability-flow ODE ([EDM] eq. 4). That is why DDIM is an ODE solver.
use crate::model::{denoise_at, Denoiser};
use crate::sampling::{to_d, SamplerStep};
use tch::{Kind, Tensor};

/// The variance of each ancestral step.
#[derive(Clone, Copy)]
pub enum AncestralVariance<'a> {
    /// β̃: exact when the data is a single point ([DDPM] sec. 3.2).
    BetaTilde,
    /// β_t/ᾱ_{t−1} = (σ² − σ'²)(1 + σ'²)/(1 + σ²): exact for data N(0, I) in the VP model's units ([DDPM]
    /// sec. 3.2), so only meaningful for VP models (it uses ᾱ = 1/(1 + σ²)).
    Beta,
    /// [Analytic-DPM]'s optimal variance from Γ(σ) = E‖ε̂(x, σ)‖²/d, estimated once per noise level (e.g. with
    /// [`estimate_eps_sq_mean`]). Unlike the other two it also adds noise at the last step (the posterior spread
    /// of x₀, σ²(1 − Γ)).
    Analytic(&'a dyn Fn(f64) -> f64),
}

/// [Analytic-DPM] Theorem 1 divided by ᾱ_{t−1} (σ-space): the variance of the Gaussian reverse step with mean
/// x̂₀ + √(σ'² − λ²) ε̂ that is optimal in KL:
///     σ*² = λ² + (σ − √(σ'² − λ²))² · (1 − Γ(σ))
/// ((1 − Γ)σ² is the mean posterior variance of x₀ per dimension; Γ is clamped to [0, 1]).
pub fn analytic_variance(sigma: f64, sigma_next: f64, lambda_sq: f64, gamma: f64) -> f64 {
    let coef = sigma - (sigma_next * sigma_next - lambda_sq).max(0.0).sqrt();
    lambda_sq + coef * coef * (1.0 - gamma.clamp(0.0, 1.0))
}

/// Monte-Carlo Γ(σ) = E‖ε̂‖²/d over data `x0` (B, ...) noised once at σ ([Analytic-DPM] eq. 8's Γ_n, which the
/// paper estimates the same way from training data).
pub fn estimate_eps_sq_mean(d: &dyn Denoiser, x0: &Tensor, sigma: f64) -> f64 {
    let x = x0 + x0.randn_like() * sigma;
    let eps = to_d(&x, &denoise_at(d, &x, sigma), sigma);
    eps.square().mean(Kind::Double).double_value(&[])
}

/// [DDPM] Algorithm 2 on a σ grid: each step draws x' from the posterior q(x' | x, x̂₀) of eq. 7 with the chosen
/// variance. `x` starts at `sigmas[0]` (e.g. σ_max · z, or x_T √(1 + σ_T²) for a VP model's x_T ~ N(0, I)).
/// As in Algorithm 2 no noise is added on the step to σ = 0 (except with [`AncestralVariance::Analytic`]).
/// On a model's own timesteps this is lesson 03's sampler ([`crate::sampling::ddpm::ddpm_sample`]) step for step.
// ANCHOR: ddpm_sigma
pub fn sample_ddpm(
    d: &dyn Denoiser,
    x: Tensor,
    sigmas: &[f64],
    variance: AncestralVariance,
    noise: &mut dyn FnMut(&Tensor) -> Tensor,
    cb: &mut dyn FnMut(SamplerStep),
) -> Tensor {
    let mut x = x;
    for (i, w) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (w[0], w[1]);
        let denoised = denoise_at(d, &x, sigma);
        cb(SamplerStep { i, sigma, sigma_next, x: &x, denoised: &denoised });
        let ratio = (sigma_next / sigma).powi(2);
        // [DDPM] eq. 7 in σ-space: μ̃ = x̂₀ + (σ'²/σ²)(x − x̂₀), β̃ = σ'²(σ² − σ'²)/σ²
        let mean = &denoised + (&x - &denoised) * ratio;
        let beta_tilde = sigma_next * sigma_next * (1.0 - ratio);
        let var = match variance {
            AncestralVariance::BetaTilde => beta_tilde,
            // β_t/ᾱ_{t−1} with ᾱ = 1/(1 + σ²)
            AncestralVariance::Beta => {
                (sigma * sigma - sigma_next * sigma_next) * (1.0 + sigma_next * sigma_next) / (1.0 + sigma * sigma)
            }
            AncestralVariance::Analytic(gamma) => analytic_variance(sigma, sigma_next, beta_tilde, gamma(sigma)),
        };
        // Algorithm 2, line 3: z = 0 on the last step
        let last = sigma_next == 0.0 && !matches!(variance, AncestralVariance::Analytic(_));
        x = if var > 0.0 && !last { mean + noise(&x) * var.sqrt() } else { mean };
    }
    x
}
// ANCHOR_END: ddpm_sigma

/// [DDIM] eq. 12 with σ_t(η) of eq. 16, on a σ grid: η = 0 is deterministic (= Euler on the probability-flow ODE),
/// η = 1 is DDPM with β̃. `analytic = Some(Γ)` replaces the noise variance λ² by [Analytic-DPM]'s σ*² (the mean
/// keeps λ; with η = 0 that is "Analytic-DDIM").
// ANCHOR: ddim
pub fn sample_ddim(
    d: &dyn Denoiser,
    x: Tensor,
    sigmas: &[f64],
    eta: f64,
    analytic: Option<&dyn Fn(f64) -> f64>,
    noise: &mut dyn FnMut(&Tensor) -> Tensor,
    cb: &mut dyn FnMut(SamplerStep),
) -> Tensor {
    let mut x = x;
    for (i, w) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (w[0], w[1]);
        let denoised = denoise_at(d, &x, sigma);
        cb(SamplerStep { i, sigma, sigma_next, x: &x, denoised: &denoised });
        let eps = to_d(&x, &denoised, sigma);
        // [DDIM] eq. 16 ÷ ᾱ_{t−1}: λ² = η² σ'²(σ² − σ'²)/σ²
        let lambda_sq = eta * eta * sigma_next * sigma_next * (1.0 - (sigma_next / sigma).powi(2));
        // [DDIM] eq. 12 ÷ √ᾱ_{t−1}: x' = x̂₀ + √(σ'² − λ²) ε̂ + λ z
        let x_next = &denoised + eps * (sigma_next * sigma_next - lambda_sq).max(0.0).sqrt();
        let var = analytic.map_or(lambda_sq, |gamma| analytic_variance(sigma, sigma_next, lambda_sq, gamma(sigma)));
        x = if var > 0.0 { x_next + noise(&x) * var.sqrt() } else { x_next };
    }
    x
}
// ANCHOR_END: ddim

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::forward::posterior_mean;
    use crate::diffusion::schedule::NoiseSchedule;
    use crate::model::EpsDenoiser;
    use crate::model::EpsModel;
    use crate::sampling::ddpm::{ddpm_sample, PosteriorVariance};
    use crate::sampling::grids::{karras_sigmas, EDM_SIGMA_MAX};
    use crate::sampling::karras::sample_euler;
    use crate::sampling::oracle::{EpsOfDenoiser, GaussianOracle};
    use crate::sampling::randn_like;
    use tch::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Replays `zs` in order, as a sampler's noise source.
    fn replay(zs: &[Tensor]) -> impl FnMut(&Tensor) -> Tensor + '_ {
        let mut k = 0;
        move |_| {
            k += 1;
            zs[k - 1].shallow_clone()
        }
    }

    /// DDIM(η = 0) and Euler are the same update written two ways (module docs): equal to f64 rounding.
    #[test]
    fn ddim_eta_0_equals_euler() {
        tch::manual_seed(5);
        let oracle = GaussianOracle::diagonal(&[0.5, -1.0, 2.0, 0.0], &[0.1, 0.5, 1.0, 2.0]);
        let x = Tensor::randn([64, 4], (Kind::Double, Device::Cpu)) * EDM_SIGMA_MAX;
        let sigmas = karras_sigmas(20, 0.002, EDM_SIGMA_MAX, 7.0);
        let ddim = sample_ddim(&oracle, x.copy(), &sigmas, 0.0, None, &mut randn_like, &mut |_| {});
        let euler = sample_euler(&oracle, x, &sigmas, &mut |_| {});
        assert!(max_diff(&ddim, &euler) < 1e-12, "{}", max_diff(&ddim, &euler));
    }

    /// σ-space DDPM through [`EpsDenoiser`] is lesson 03's `ddpm_sample` given the same noise: run the latter on
    /// a respaced schedule, recover each z it drew from consecutive states (z = (x_{t−1} − μ̃_t)/σ_t with its own
    /// eq. 7), feed those to `sample_ddpm` from the same x_T, and compare the outputs, for both variances.
    #[test]
    fn ddpm_matches_lesson_03_sampler_given_the_same_noise() {
        tch::manual_seed(6);
        let full = NoiseSchedule::ddpm(1000);
        let (timesteps, sched) = full.respaced(50);
        let oracle = GaussianOracle::isotropic(&[0.7, -1.2], 0.3);
        let eps_model = EpsOfDenoiser::new(&oracle, &full);
        let x_t = Tensor::randn([256, 2], (Kind::Double, Device::Cpu));
        for (variance, ours) in [
            (PosteriorVariance::BetaTilde, AncestralVariance::BetaTilde),
            (PosteriorVariance::Beta, AncestralVariance::Beta),
        ] {
            let (mut states, mut x0s) = (Vec::new(), Vec::new());
            let model = |x: &Tensor, t: &Tensor| eps_model.eps(x, t, false);
            let reference = ddpm_sample(
                model,
                &sched,
                &timesteps,
                x_t.copy(),
                variance,
                crate::sampling::wrappers::Threshold::None,
                &mut |st| {
                    states.push(st.x_t.copy());
                    x0s.push(st.x0_hat.copy());
                },
            );
            let n = sched.num_steps();
            let zs: Vec<Tensor> = (0..n - 1)
                .map(|k| {
                    let i = n - 1 - k;
                    let mean = posterior_mean(&sched, i, &states[k], &x0s[k]);
                    (&states[k + 1] - mean) / variance.sigma_squared(&sched, i).sqrt()
                })
                .collect();
            let mut sigmas: Vec<f64> = timesteps.iter().rev().map(|&t| full.sigma(t)).collect();
            sigmas.push(0.0);
            let d = EpsDenoiser::new(&eps_model, &full);
            let x_sigma = &x_t * (1.0 + sigmas[0] * sigmas[0]).sqrt(); // x = x_vp/√ᾱ
            let out = sample_ddpm(&d, x_sigma, &sigmas, ours, &mut replay(&zs), &mut |_| {});
            assert!(max_diff(&out, &reference) < 1e-9, "{variance:?}: {}", max_diff(&out, &reference));
        }
    }

    /// DDIM with η = 1 is DDPM with β̃ (eq. 16), step for step with the same noise.
    #[test]
    fn ddim_eta_1_is_ddpm_with_beta_tilde() {
        tch::manual_seed(7);
        let oracle = GaussianOracle::isotropic(&[1.0, -0.5, 0.0], 0.5);
        let sigmas = karras_sigmas(15, 0.01, 20.0, 7.0);
        let zs: Vec<Tensor> = (0..15).map(|_| Tensor::randn([32, 3], (Kind::Double, Device::Cpu))).collect();
        let x = Tensor::randn([32, 3], (Kind::Double, Device::Cpu)) * 20.0;
        let a = sample_ddpm(&oracle, x.copy(), &sigmas, AncestralVariance::BetaTilde, &mut replay(&zs), &mut |_| {});
        let b = sample_ddim(&oracle, x, &sigmas, 1.0, None, &mut replay(&zs), &mut |_| {});
        assert!(max_diff(&a, &b) < 1e-12);
    }

    /// The variance formulas against the true reverse variance for data N(μ, s² I), which a Gaussian step can
    /// match exactly: Var(x' | x) = β̃ + (1 − σ'²/σ²)² Var(x₀ | x), Var(x₀ | x) = s²σ²/(s² + σ²), and
    /// Γ(σ) = σ²/(s² + σ²). Analytic-DPM equals it for every s; β equals it for s = 1 and β̃ for s = 0
    /// ([DDPM] sec. 3.2's two extremes).
    #[test]
    fn analytic_variance_is_the_true_reverse_variance_for_gaussian_data() {
        for (sigma, sigma_next) in [(80.0, 40.0), (2.0, 1.5), (0.5, 0.1), (0.1, 0.0)] {
            let beta_tilde = sigma_next * sigma_next * (1.0 - (sigma_next / sigma) * (sigma_next / sigma));
            for s in [0.0f64, 0.3, 1.0, 2.0] {
                let post_var = s * s * sigma * sigma / (s * s + sigma * sigma);
                let truth = beta_tilde + (1.0 - (sigma_next / sigma).powi(2)).powi(2) * post_var;
                let gamma = sigma * sigma / (s * s + sigma * sigma);
                let ours = analytic_variance(sigma, sigma_next, beta_tilde, gamma);
                assert!((ours - truth).abs() < 1e-12 * (1.0 + truth), "σ={sigma} σ'={sigma_next} s={s}");
            }
            let beta =
                (sigma * sigma - sigma_next * sigma_next) * (1.0 + sigma_next * sigma_next) / (1.0 + sigma * sigma);
            assert!(
                (analytic_variance(sigma, sigma_next, beta_tilde, sigma * sigma / (1.0 + sigma * sigma)) - beta).abs()
                    < 1e-9
            );
            assert_eq!(analytic_variance(sigma, sigma_next, beta_tilde, 1.0), beta_tilde);
        }
        // the Monte-Carlo Γ against the closed form (5 standard errors of a mean of ε̂², Var(ε̂²) = 2Γ²)
        tch::manual_seed(8);
        let oracle = GaussianOracle::isotropic(&[0.4, 0.4], 0.5);
        let x0 = oracle.sample(50_000);
        for sigma in [0.1, 0.5, 3.0] {
            let (est, exact) = (estimate_eps_sq_mean(&oracle, &x0, sigma), oracle.eps_sq_mean(sigma));
            assert!((est - exact).abs() < 5.0 * exact * (2.0 / 100_000.0f64).sqrt(), "σ={sigma}: {est} vs {exact}");
        }
    }

    /// With the exact Γ each Analytic-DPM step samples the exact marginal, so even a 10-step chain from the exact
    /// p_σmax reproduces N(μ, s²) (within 5 standard errors), while β̃ on the same grid under-disperses it (the
    /// exact ratio of its output variance to s² is 0.36, from the linear-Gaussian recursion).
    #[test]
    fn analytic_dpm_recovers_gaussian_data_in_ten_steps() {
        tch::manual_seed(9);
        let (mu, s, n) = ([1.0, -0.5], 0.5, 20_000i64);
        let oracle = GaussianOracle::isotropic(&mu, s);
        let sigmas = karras_sigmas(10, 0.002, EDM_SIGMA_MAX, 7.0);
        let x = oracle.sample_noised(n, EDM_SIGMA_MAX);
        let gamma = |sigma: f64| oracle.eps_sq_mean(sigma);
        let analytic = AncestralVariance::Analytic(&gamma);
        let out = sample_ddpm(&oracle, x.copy(), &sigmas, analytic, &mut randn_like, &mut |_| {});
        let (m, v) = (out.mean_dim(0, false, Kind::Double), out.var_dim(0, true, false));
        let n = n as f64;
        for k in 0..2 {
            let (m, v) = (m.double_value(&[k]), v.double_value(&[k]));
            assert!((m - mu[k as usize]).abs() < 5.0 * s / n.sqrt(), "mean {m}");
            assert!((v / (s * s) - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "variance ratio {}", v / (s * s));
        }
        let out = sample_ddpm(&oracle, x, &sigmas, AncestralVariance::BetaTilde, &mut randn_like, &mut |_| {});
        let ratio = out.var_dim(0, true, false).mean(Kind::Double).double_value(&[]) / (s * s);
        assert!((ratio - 0.36).abs() < 0.03, "β̃ with 10 steps: variance ratio {ratio}");
    }
}
