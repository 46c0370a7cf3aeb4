//! Latent consistency sampling: a consistency model f(x_t, t) maps any point of a trajectory straight to its clean
//! end, so a handful of steps — denoise fully, re-noise to a lower level, denoise again — draws an image.
//!
//! [CM] Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models", arXiv:2303.01469: eq. 5 (f_θ(x, t) =
//! c_skip(t) x + c_out(t) F_θ(x, t), with c_skip(ε) = 1, c_out(ε) = 0 so that f is the identity at the boundary) and
//! Algorithm 1 (multistep sampling: x̂ = f(x, τ_n); x ← x̂ + √(τ_{n+1}² − ε²) z). [LCM] Luo, Tan, Huang, Li, Zhao 2023,
//! "Latent Consistency Models", arXiv:2310.04378: sec. 4.2 (the skipping-step schedule over a DDIM grid of
//! `original_inference_steps` = 50 steps, k = 20), Algorithm 3 (multistep LCM sampling, re-noised with the forward
//! process q(z_{τ_{n+1}} | ẑ₀)); [LCM-LoRA] Luo et al. 2023, arXiv:2311.05556 (the same as a LoRA of SD 1.5).
//! The boundary scalings, the timestep grid and the re-noising are diffusers' `LCMScheduler`
//! (`get_scalings_for_boundary_condition_discrete` with σ_data = 0.5 and `timestep_scaling` = 10).
//!
//! Here F_θ is an ε-model seen through lesson 07's denoiser, D(x; σ) = x̂₀, in σ-space x = z_t/√ᾱ_t; the VP latents
//! are z_t = x/√(1 + σ²).
use crate::model::{denoise_at, Denoiser};
use crate::sampling::SamplerStep;
use tch::{Device, Kind, Tensor};

/// LCM's training-time DDIM grid: 50 steps (k = T/50 = 20), diffusers' `original_inference_steps`.
pub const ORIGINAL_INFERENCE_STEPS: usize = 50;
/// [LCM] the consistency parameterisation's σ_data and the scale diffusers applies to t in c_skip/c_out.
pub const SIGMA_DATA: f64 = 0.5;
pub const TIMESTEP_SCALING: f64 = 10.0;

// ANCHOR: lcm_timesteps
/// The `steps` timesteps LCM visits, descending: the DDIM grid t_j = (j + 1)·T/50 − 1 (j = 0..49), read backwards
/// at ⌊linspace(0, 50, steps)⌋ (diffusers `LCMScheduler.set_timesteps`, strength 1): 4 steps are 999, 759, 499, 259.
pub fn lcm_timesteps(num_train_timesteps: usize, steps: usize) -> Vec<usize> {
    let k = num_train_timesteps / ORIGINAL_INFERENCE_STEPS;
    let origin: Vec<usize> = (1..=ORIGINAL_INFERENCE_STEPS).map(|j| j * k - 1).rev().collect(); // 999, 979, …, 19
    (0..steps).map(|i| origin[i * ORIGINAL_INFERENCE_STEPS / steps]).collect()
}
// ANCHOR_END: lcm_timesteps

/// [CM] eq. 5's boundary scalings at timestep t (diffusers' discrete form): with τ = 10 t,
/// c_skip = σ_d²/(τ² + σ_d²), c_out = τ/√(τ² + σ_d²); at t = 0, c_skip = 1 and c_out = 0.
pub fn boundary_scalings(t: f64) -> (f64, f64) {
    let tau = t * TIMESTEP_SCALING;
    let d2 = SIGMA_DATA * SIGMA_DATA;
    (d2 / (tau * tau + d2), tau / (tau * tau + d2).sqrt())
}

// ANCHOR: lcm_sample
/// Multistep LCM ([LCM] Algorithm 3) from `x` at `sigmas[0]` (σ-space): at each of the N levels σ_k (timestep
/// `timesteps[k]`), ẑ₀ = c_skip z + c_out D(x; σ_k) ([CM] eq. 5 with F's x̂₀), then — but after the last — re-noise
/// to the next level, x = ẑ₀ + σ_{k+1} ε, ε ~ N(0, I) from the global generator (in NCHW order, as diffusers' generator
/// fills them). Returns the last ẑ₀ (VP = clean latents). `sigmas` has N + 1 entries (its last, 0, is where it ends).
pub fn lcm_sample(
    denoiser: &dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f64],
    timesteps: &[f64],
    cb: &mut dyn FnMut(SamplerStep),
) -> Tensor {
    let n = sigmas.len() - 1;
    assert_eq!(timesteps.len(), n, "one timestep per step");
    let mut clean = x.shallow_clone();
    for k in 0..n {
        let sigma = sigmas[k];
        let z = &x / (1.0 + sigma * sigma).sqrt(); // the VP latents z_t
        let x0 = denoise_at(denoiser, &x, sigma); // F's x̂₀
        let (c_skip, c_out) = boundary_scalings(timesteps[k]);
        clean = &z * c_skip + &x0 * c_out; // [CM] eq. 5: f(z, t) = c_skip z + c_out x̂₀
        cb(SamplerStep { i: k, sigma, sigma_next: sigmas[k + 1], x: &x, denoised: &clean });
        if k + 1 < n {
            let noise = Tensor::randn(x.size(), (Kind::Float, Device::Cpu)).to_device(x.device());
            x = &clean + noise * sigmas[k + 1]; // q(z_{t'} | ẑ₀) in σ-space: ẑ₀ + σ' ε
        }
    }
    clean
}
// ANCHOR_END: lcm_sample

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_and_scalings_are_diffusers_lcm_schedulers() {
        assert_eq!(lcm_timesteps(1000, 4), [999, 759, 499, 259]);
        assert_eq!(lcm_timesteps(1000, 1), [999]);
        assert_eq!(lcm_timesteps(1000, 8), [999, 879, 759, 639, 499, 379, 259, 139]);
        assert_eq!(lcm_timesteps(1000, 50).len(), 50);
        let (s0, o0) = boundary_scalings(0.0);
        assert_eq!((s0, o0), (1.0, 0.0), "the identity at the boundary");
        let (s, o) = boundary_scalings(999.0);
        assert!(s < 1e-7 && (o - 1.0).abs() < 1e-7, "a full denoiser far from it: {s} {o}");
    }

    /// With an exact denoiser of a point mass at x₀ = c, every step returns c (c_skip z + c_out c → c as c_skip → 0
    /// at large t), and the re-noised state is c + σ' ε.
    #[test]
    fn an_exact_denoiser_of_a_point_mass_lands_on_it() {
        let c = Tensor::full([1, 2, 3, 3], 0.7, (Kind::Float, Device::Cpu));
        let target = c.shallow_clone();
        let d = move |x: &Tensor, _s: &Tensor| target.expand_as(x);
        let (sigmas, ts) = (vec![14.6, 4.0, 1.0, 0.0], vec![999.0, 759.0, 499.0]);
        tch::manual_seed(0);
        let x = Tensor::randn([1, 2, 3, 3], (Kind::Float, Device::Cpu)) * (1.0 + 14.6f64 * 14.6).sqrt();
        let mut seen = Vec::new();
        let out = lcm_sample(&d, x, &sigmas, &ts, &mut |s| seen.push((s.i, s.sigma)));
        assert_eq!(seen, [(0, 14.6), (1, 4.0), (2, 1.0)]);
        // c_skip(499) ≈ 5e-8: the result is c to within c_skip · |z|
        assert!((out - &c).abs().max().double_value(&[]) < 1e-5);
    }
}
