//! Euler and Heun on the probability-flow ODE, Euler-ancestral, and EDM's stochastic sampler ("churn").
//!
//! [EDM] Karras, Aittala, Aila, Laine 2022, arXiv:2206.00364: eq. 4 (the PF-ODE with σ(t) = t, s(t) = 1:
//! dx/dσ = (x − D(x; σ))/σ), Algorithm 1 (deterministic, Heun's 2nd-order method), Algorithm 2 (stochastic).
//! [DDIM] Song, Meng, Ermon 2021, arXiv:2010.02502, eq. 16 (the ancestral noise level, see `ddim.rs`).
//! [k-diffusion] Crowson, `k_diffusion/sampling.py` (`sample_euler_ancestral`, `get_ancestral_step`): the names
//! "Euler" and "Euler a" of Stable Diffusion UIs.
//! Notation (code -> paper): sigma -> t_i, sigma_next -> t_{i+1}, d -> d_i, d_next -> d'_i, gamma -> γ_i,
//! sigma_hat -> t̂_i, s_churn/s_tmin/s_tmax/s_noise -> S_churn/S_tmin/S_tmax/S_noise.
use crate::model::{denoise_at, Denoiser};
use crate::sampling::{to_d, SamplerStep};
use tch::Tensor;

/// Euler's method on the PF-ODE: x' = x + (σ' − σ) d, d = (x − D(x; σ))/σ ([EDM] Alg. 1 without the correction;
/// = DDIM with η = 0). First order; one network evaluation per step.
// ANCHOR: euler
pub fn sample_euler(d: &dyn Denoiser, x: Tensor, sigmas: &[f64], cb: &mut dyn FnMut(SamplerStep)) -> Tensor {
    let mut x = x;
    for (i, w) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (w[0], w[1]);
        let denoised = denoise_at(d, &x, sigma);
        cb(SamplerStep { i, sigma, sigma_next, x: &x, denoised: &denoised });
        // [EDM] Alg. 1, lines 4–5: d_i = (x_i − D(x_i; t_i))/t_i,  x_{i+1} = x_i + (t_{i+1} − t_i) d_i
        x = &x + to_d(&x, &denoised, sigma) * (sigma_next - sigma);
    }
    x
}
// ANCHOR_END: euler

/// [EDM] Algorithm 1: Heun's second-order method, with a plain Euler step onto σ = 0 (where d is undefined).
/// Two network evaluations per step (one on the last).
// ANCHOR: heun
pub fn sample_heun(d: &dyn Denoiser, x: Tensor, sigmas: &[f64], cb: &mut dyn FnMut(SamplerStep)) -> Tensor {
    let mut x = x;
    for (i, w) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (w[0], w[1]);
        let denoised = denoise_at(d, &x, sigma);
        cb(SamplerStep { i, sigma, sigma_next, x: &x, denoised: &denoised });
        x = heun_step(d, &x, &denoised, sigma, sigma_next);
    }
    x
}
// ANCHOR_END: heun

/// One step of [EDM] Alg. 1 lines 4–8 (also Alg. 2 lines 7–10) from x at σ, given D(x; σ).
fn heun_step(d: &dyn Denoiser, x: &Tensor, denoised: &Tensor, sigma: f64, sigma_next: f64) -> Tensor {
    let d_cur = to_d(x, denoised, sigma);
    // line 5: Euler step
    let x_next = x + &d_cur * (sigma_next - sigma);
    if sigma_next == 0.0 {
        return x_next;
    }
    // lines 7–8: d'_i = (x_{i+1} − D(x_{i+1}; t_{i+1}))/t_{i+1},  x_{i+1} = x_i + (t_{i+1} − t_i)(½ d_i + ½ d'_i)
    let d_next = to_d(&x_next, &denoise_at(d, &x_next, sigma_next), sigma_next);
    x + (d_cur + d_next) * (0.5 * (sigma_next - sigma))
}

/// Euler-ancestral ("Euler a"): step down to σ_down with Euler, then add fresh noise of size σ_up, where
///     σ_up = min(σ', η √(σ'²(σ² − σ'²)/σ²)),  σ_down = √(σ'² − σ_up²)       ([k-diffusion] `get_ancestral_step`)
/// σ_up is [DDIM] eq. 16's λ in σ-space, so with η = 1 this is DDPM with β̃ (σ_down = σ'²/σ, and the Euler step to
/// σ_down lands on the posterior mean x̂₀ + (σ'²/σ²)(x − x̂₀)); a test checks it step for step.
// ANCHOR: euler_ancestral
pub fn sample_euler_ancestral(
    d: &dyn Denoiser,
    x: Tensor,
    sigmas: &[f64],
    eta: f64,
    noise: &mut dyn FnMut(&Tensor) -> Tensor,
    cb: &mut dyn FnMut(SamplerStep),
) -> Tensor {
    let mut x = x;
    for (i, w) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (w[0], w[1]);
        let denoised = denoise_at(d, &x, sigma);
        cb(SamplerStep { i, sigma, sigma_next, x: &x, denoised: &denoised });
        let sigma_up =
            sigma_next.min(eta * (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)).sqrt() / sigma);
        let sigma_down = (sigma_next * sigma_next - sigma_up * sigma_up).sqrt();
        x = &x + to_d(&x, &denoised, sigma) * (sigma_down - sigma);
        if sigma_up > 0.0 {
            x = &x + noise(&x) * sigma_up;
        }
    }
    x
}
// ANCHOR_END: euler_ancestral

/// The stochasticity of [EDM] Algorithm 2. `Churn::default()` has none (Algorithm 2 is then Algorithm 1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Churn {
    /// Total noise added over the whole run, S_churn; each step gets γ_i = min(S_churn/N, √2 − 1).
    pub s_churn: f64,
    /// Noise is only added for σ in [S_tmin, S_tmax].
    pub s_tmin: f64,
    pub s_tmax: f64,
    /// S_noise slightly above 1 counters the denoiser's tendency to remove a bit too much noise.
    pub s_noise: f64,
}

impl Default for Churn {
    fn default() -> Self {
        Self { s_churn: 0.0, s_tmin: 0.0, s_tmax: f64::INFINITY, s_noise: 1.0 }
    }
}

/// [EDM] Algorithm 2: at each step raise the noise from t_i to t̂_i = t_i(1 + γ_i) by adding fresh noise, then take
/// a Heun step from t̂_i to t_{i+1}. The callback sees the state at t̂_i. N = `sigmas.len() − 1` steps.
// ANCHOR: edm_stochastic
pub fn sample_edm(
    d: &dyn Denoiser,
    x: Tensor,
    sigmas: &[f64],
    churn: &Churn,
    noise: &mut dyn FnMut(&Tensor) -> Tensor,
    cb: &mut dyn FnMut(SamplerStep),
) -> Tensor {
    let n = (sigmas.len() - 1) as f64;
    let mut x = x;
    for (i, w) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (w[0], w[1]);
        // line 4: γ_i = min(S_churn/N, √2 − 1) if t_i ∈ [S_tmin, S_tmax], else 0
        let gamma = if (churn.s_tmin..=churn.s_tmax).contains(&sigma) {
            (churn.s_churn / n).min(std::f64::consts::SQRT_2 - 1.0)
        } else {
            0.0
        };
        // lines 5–6: t̂_i = t_i + γ_i t_i,  x̂_i = x_i + √(t̂_i² − t_i²) ε_i,  ε_i ~ N(0, S_noise² I)
        let sigma_hat = sigma * (1.0 + gamma);
        if gamma > 0.0 {
            x = &x + noise(&x) * (churn.s_noise * (sigma_hat * sigma_hat - sigma * sigma).sqrt());
        }
        let denoised = denoise_at(d, &x, sigma_hat);
        cb(SamplerStep { i, sigma: sigma_hat, sigma_next, x: &x, denoised: &denoised });
        // lines 7–10: Heun from t̂_i to t_{i+1}
        x = heun_step(d, &x, &denoised, sigma_hat, sigma_next);
    }
    x
}
// ANCHOR_END: edm_stochastic

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CountingDenoiser;
    use crate::sampling::ddim::{sample_ddpm, AncestralVariance};
    use crate::sampling::grids::{karras_sigmas, EDM_SIGMA_MAX, EDM_SIGMA_MIN};
    use crate::sampling::oracle::GaussianOracle;
    use crate::sampling::randn_like;
    use tch::{Device, Kind};

    /// Asserts each coordinate's mean and variance of `out` (n, D) match N(μ_k, s²) within 5 standard errors.
    fn assert_gaussian(what: &str, out: &Tensor, mu: &[f64], s: f64) {
        let n = out.size()[0] as f64;
        let (m, v) = (out.mean_dim(0, false, Kind::Double), out.var_dim(0, true, false));
        for (k, &mu_k) in mu.iter().enumerate() {
            let (m, v) = (m.double_value(&[k as i64]), v.double_value(&[k as i64]));
            assert!((m - mu_k).abs() < 5.0 * s / n.sqrt(), "{what}: mean {m} vs {mu_k}");
            assert!((v / (s * s) - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "{what}: variance ratio {}", v / (s * s));
        }
    }

    /// Euler-ancestral with η = 1 is DDPM with β̃ given the same noise (the doc comment's identity).
    #[test]
    fn euler_ancestral_is_ddpm_with_beta_tilde() {
        tch::manual_seed(10);
        let oracle = GaussianOracle::isotropic(&[1.0, -0.5], 0.5);
        let sigmas = karras_sigmas(12, 0.01, 20.0, 7.0);
        let zs: Vec<Tensor> = (0..11).map(|_| Tensor::randn([64, 2], (Kind::Double, Device::Cpu))).collect();
        let x = Tensor::randn([64, 2], (Kind::Double, Device::Cpu)) * 20.0;
        let (mut k1, mut k2) = (0, 0);
        let mut replay1 = |_: &Tensor| {
            k1 += 1;
            zs[k1 - 1].shallow_clone()
        };
        let a = sample_euler_ancestral(&oracle, x.copy(), &sigmas, 1.0, &mut replay1, &mut |_| {});
        let mut replay2 = |_: &Tensor| {
            k2 += 1;
            zs[k2 - 1].shallow_clone()
        };
        let b = sample_ddpm(&oracle, x, &sigmas, AncestralVariance::BetaTilde, &mut replay2, &mut |_| {});
        assert_eq!((k1, k2), (11, 11));
        assert!((a - b).abs().max().double_value(&[]) < 1e-12);
    }

    /// Starting from the exact p_σmax, the stochastic samplers reproduce N(μ, s²) (20k samples, 5 standard errors).
    /// Their discretisation bias on the variance, from the exact linear-Gaussian recursion: Euler-a with 2000
    /// Karras steps −0.6 % (with 100 steps −11 %: it converges at first order), EDM churn (S_churn = 40) with 400
    /// steps +0.16 %; both below one standard error (0.7 %).
    #[test]
    fn stochastic_samplers_reproduce_the_gaussian() {
        let (mu, s, n) = ([1.0, -0.5], 0.5, 20_000);
        let oracle = GaussianOracle::isotropic(&mu, s);
        tch::manual_seed(11);
        let sigmas = karras_sigmas(2000, EDM_SIGMA_MIN, EDM_SIGMA_MAX, 7.0);
        let x = oracle.sample_noised(n, EDM_SIGMA_MAX);
        let out = sample_euler_ancestral(&oracle, x, &sigmas, 1.0, &mut randn_like, &mut |_| {});
        assert_gaussian("Euler a, 2000 steps", &out, &mu, s);
        let sigmas = karras_sigmas(400, EDM_SIGMA_MIN, EDM_SIGMA_MAX, 7.0);
        let churn = Churn { s_churn: 40.0, s_tmin: 0.05, s_tmax: 50.0, s_noise: 1.0 };
        let x = oracle.sample_noised(n, EDM_SIGMA_MAX);
        let out = sample_edm(&oracle, x, &sigmas, &churn, &mut randn_like, &mut |_| {});
        assert_gaussian("EDM churn, 400 steps", &out, &mu, s);
    }

    /// Without churn Algorithm 2 is Algorithm 1; Heun costs 2N − 1 evaluations, Euler N; the callback sees each
    /// step once with σ̂ ≥ σ.
    #[test]
    fn edm_without_churn_is_heun_and_nfe_counts() {
        tch::manual_seed(12);
        let oracle = GaussianOracle::isotropic(&[0.0, 2.0], 1.0);
        let sigmas = karras_sigmas(8, 0.02, 10.0, 7.0);
        let x = Tensor::randn([16, 2], (Kind::Double, Device::Cpu)) * 10.0;
        let counting = CountingDenoiser::new(&oracle);
        let heun = sample_heun(&counting, x.copy(), &sigmas, &mut |_| {});
        assert_eq!(counting.calls.get(), 2 * 8 - 1);
        let mut no_noise = |_: &Tensor| -> Tensor { panic!("no churn, no noise") };
        let edm = sample_edm(&oracle, x.copy(), &sigmas, &Churn::default(), &mut no_noise, &mut |_| {});
        assert!((heun - edm).abs().max().double_value(&[]) < 1e-15);
        let counting = CountingDenoiser::new(&oracle);
        let mut seen = Vec::new();
        let churn = Churn { s_churn: 2.0, ..Churn::default() };
        let _ = sample_edm(&counting, x, &sigmas, &churn, &mut randn_like, &mut |st| seen.push((st.i, st.sigma)));
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
        assert!(seen.iter().all(|&(i, s)| (s / sigmas[i] - 1.25).abs() < 1e-12), "γ = S_churn/N = 0.25");
        assert_eq!(counting.calls.get(), 2 * 8 - 1);
    }
}
