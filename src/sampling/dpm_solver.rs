//! DPM-Solver-1/2/3 (singlestep) and DPM-Solver++(2M): exponential integrators of the probability-flow ODE.
//!
//! [DPM-Solver] Lu, Zhou, Bao, Chen, Li, Zhu 2022, arXiv:2206.00927: eq. 3.4 (the exact solution with the linear
//! part integrated analytically), eq. 3.7 (DPM-Solver-1), Algorithm 1 (DPM-Solver-2, here r₁ = ½) and
//! Algorithm 2 (DPM-Solver-3, r₁ = ⅓, r₂ = ⅔).
//! [DPM-Solver++] Lu, Zhou, Bao, Chen, Li, Zhu 2022, arXiv:2211.01095: eq. 9 (the data-prediction form) and
//! Algorithm 2 (DPM-Solver++(2M), multistep).
//! Notation (code -> paper): the paper's x_t = α_t x₀ + σ_t ε with λ_t = log(α_t/σ_t); in σ-space α_t = 1 and
//! σ_t = σ, so λ = −log σ and h = λ_{t_i} − λ_{t_{i−1}} = log(σ/σ'). eps -> ε_θ, denoised -> x_θ (= D(x; σ)),
//! sigma_s -> σ_{s_i}, u -> u_i, d1/d2 -> D_{2i−1}/D_{2i}, r -> r_i.
//!
//! Why it works: the ODE dx/dσ = ε_θ(x, σ) has no linear part in σ-space, and in λ it reads
//! x_t = x_s − ∫_{λ_s}^{λ_t} e^{−λ} ε_θ dλ ([DPM-Solver] eq. 3.4 with α = 1); the solvers Taylor-expand ε_θ (or x_θ)
//! in λ and integrate the exponential weight exactly. DPM-Solver-1 is DDIM (σ_t(e^h − 1) = σ − σ').
//!
//! A step onto σ' = 0 (λ = ∞) is taken as the final denoising x' = D(x; σ) (first order, one evaluation), as in
//! [k-diffusion]'s DPM-Solver samplers; the papers stop at a small σ_min instead.
use crate::model::{denoise_at, Denoiser};
use crate::sampling::{to_d, SamplerStep};
use tch::Tensor;

/// ε_θ(x, σ) = (x − D(x; σ))/σ.
fn eps(d: &dyn Denoiser, x: &Tensor, sigma: f64) -> Tensor {
    to_d(x, &denoise_at(d, x, sigma), sigma)
}

/// Runs `step(x, denoised, σ, σ')` over the grid with the callback and the σ' = 0 rule shared by the solvers.
fn run(
    d: &dyn Denoiser,
    x: Tensor,
    sigmas: &[f64],
    cb: &mut dyn FnMut(SamplerStep),
    mut step: impl FnMut(&Tensor, &Tensor, f64, f64) -> Tensor,
) -> Tensor {
    let mut x = x;
    for (i, w) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (w[0], w[1]);
        let denoised = denoise_at(d, &x, sigma);
        cb(SamplerStep { i, sigma, sigma_next, x: &x, denoised: &denoised });
        x = if sigma_next == 0.0 { denoised } else { step(&x, &denoised, sigma, sigma_next) };
    }
    x
}

/// DPM-Solver-1, [DPM-Solver] eq. 3.7: x_t = (α_t/α_s) x_s − σ_t(e^h − 1) ε_θ(x_s, s). One evaluation per step.
// ANCHOR: dpm_solver_1
pub fn sample_dpm_solver_1(d: &dyn Denoiser, x: Tensor, sigmas: &[f64], cb: &mut dyn FnMut(SamplerStep)) -> Tensor {
    run(d, x, sigmas, cb, |x, denoised, sigma, sigma_next| {
        let h = (sigma / sigma_next).ln();
        // eq. 3.7 with α = 1
        x - to_d(x, denoised, sigma) * (sigma_next * h.exp_m1())
    })
}
// ANCHOR_END: dpm_solver_1

/// DPM-Solver-2, [DPM-Solver] Algorithm 1 with r₁ = ½ (the midpoint in λ). Two evaluations per step.
// ANCHOR: dpm_solver_2
pub fn sample_dpm_solver_2(d: &dyn Denoiser, x: Tensor, sigmas: &[f64], cb: &mut dyn FnMut(SamplerStep)) -> Tensor {
    const R1: f64 = 0.5;
    run(d, x, sigmas, cb, |x, denoised, sigma, sigma_next| {
        let h = (sigma / sigma_next).ln();
        let eps_0 = to_d(x, denoised, sigma);
        // s_i = t_λ(λ_{t_{i−1}} + r₁ h_i), i.e. σ_s = σ e^{−r₁ h}
        let sigma_s = sigma * (-R1 * h).exp();
        // u_i = (α_{s_i}/α_{t_{i−1}}) x̃_{i−1} − σ_{s_i}(e^{r₁h_i} − 1) ε_θ(x̃_{i−1}, t_{i−1})
        let u = x - &eps_0 * (sigma_s * (R1 * h).exp_m1());
        let eps_s = eps(d, &u, sigma_s);
        // x̃_i = (α_{t_i}/α_{t_{i−1}}) x̃_{i−1} − σ_{t_i}(e^{h_i} − 1) ε_θ(x̃_{i−1}, t_{i−1})
        //        − σ_{t_i}/(2r₁) (e^{h_i} − 1)(ε_θ(u_i, s_i) − ε_θ(x̃_{i−1}, t_{i−1}))
        let phi = sigma_next * h.exp_m1();
        x - &eps_0 * phi - (eps_s - &eps_0) * (phi / (2.0 * R1))
    })
}
// ANCHOR_END: dpm_solver_2

/// DPM-Solver-3, [DPM-Solver] Algorithm 2 with r₁ = ⅓, r₂ = ⅔. Three evaluations per step.
// ANCHOR: dpm_solver_3
pub fn sample_dpm_solver_3(d: &dyn Denoiser, x: Tensor, sigmas: &[f64], cb: &mut dyn FnMut(SamplerStep)) -> Tensor {
    const R1: f64 = 1.0 / 3.0;
    const R2: f64 = 2.0 / 3.0;
    run(d, x, sigmas, cb, |x, denoised, sigma, sigma_next| {
        let h = (sigma / sigma_next).ln();
        let eps_0 = to_d(x, denoised, sigma);
        let (sigma_s1, sigma_s2) = (sigma * (-R1 * h).exp(), sigma * (-R2 * h).exp());
        // u_{2i−1} = (α_{s_{2i−1}}/α_{t_{i−1}}) x̃_{i−1} − σ_{s_{2i−1}}(e^{r₁h_i} − 1) ε_θ(x̃_{i−1}, t_{i−1})
        let u1 = x - &eps_0 * (sigma_s1 * (R1 * h).exp_m1());
        // D_{2i−1} = ε_θ(u_{2i−1}, s_{2i−1}) − ε_θ(x̃_{i−1}, t_{i−1})
        let d1 = eps(d, &u1, sigma_s1) - &eps_0;
        // u_{2i} = (α_{s_{2i}}/α_{t_{i−1}}) x̃_{i−1} − σ_{s_{2i}}(e^{r₂h_i} − 1) ε_θ(x̃_{i−1}, t_{i−1})
        //          − (σ_{s_{2i}} r₂/r₁)((e^{r₂h_i} − 1)/(r₂h_i) − 1) D_{2i−1}
        let u2 = x
            - &eps_0 * (sigma_s2 * (R2 * h).exp_m1())
            - d1 * (sigma_s2 * R2 / R1 * ((R2 * h).exp_m1() / (R2 * h) - 1.0));
        // D_{2i} = ε_θ(u_{2i}, s_{2i}) − ε_θ(x̃_{i−1}, t_{i−1})
        let d2 = eps(d, &u2, sigma_s2) - &eps_0;
        // x̃_i = (α_{t_i}/α_{t_{i−1}}) x̃_{i−1} − σ_{t_i}(e^{h_i} − 1) ε_θ(x̃_{i−1}, t_{i−1})
        //        − (σ_{t_i}/r₂)((e^{h_i} − 1)/h_i − 1) D_{2i}
        x - &eps_0 * (sigma_next * h.exp_m1()) - d2 * (sigma_next / R2 * (h.exp_m1() / h - 1.0))
    })
}
// ANCHOR_END: dpm_solver_3

/// DPM-Solver++(2M), [DPM-Solver++] Algorithm 2: the data-prediction form (eq. 9) with the previous step's x_θ as
/// a second point, so one evaluation per step and second order. The first step (and the step onto σ = 0) is first
/// order. Stable Diffusion UIs call it "DPM++ 2M" ("DPM++ 2M Karras" on [`crate::sampling::grids::karras_sigmas`]).
// ANCHOR: dpm_solver_pp_2m
pub fn sample_dpm_solver_pp_2m(d: &dyn Denoiser, x: Tensor, sigmas: &[f64], cb: &mut dyn FnMut(SamplerStep)) -> Tensor {
    let mut x = x;
    // x_θ(x̃_{i−2}, t_{i−2}) and h_{i−1}
    let mut previous: Option<(Tensor, f64)> = None;
    for (i, w) in sigmas.windows(2).enumerate() {
        let (sigma, sigma_next) = (w[0], w[1]);
        let denoised = denoise_at(d, &x, sigma);
        cb(SamplerStep { i, sigma, sigma_next, x: &x, denoised: &denoised });
        if sigma_next == 0.0 {
            x = denoised;
            break;
        }
        let h = (sigma / sigma_next).ln();
        let d_combined = match &previous {
            None => denoised.shallow_clone(),
            // r_i = h_{i−1}/h_i,  D_i = (1 + 1/(2r_i)) x_θ(x̃_{i−1}, t_{i−1}) − 1/(2r_i) x_θ(x̃_{i−2}, t_{i−2})
            Some((old, h_last)) => {
                let r = h_last / h;
                &denoised * (1.0 + 1.0 / (2.0 * r)) - old * (1.0 / (2.0 * r))
            }
        };
        // x̃_i = (σ_{t_i}/σ_{t_{i−1}}) x̃_{i−1} − α_{t_i}(e^{−h_i} − 1) D_i
        x = &x * (sigma_next / sigma) - d_combined * (-h).exp_m1();
        previous = Some((denoised, h));
    }
    x
}
// ANCHOR_END: dpm_solver_pp_2m

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CountingDenoiser;
    use crate::sampling::grids::karras_sigmas;
    use crate::sampling::karras::sample_euler;
    use crate::sampling::oracle::GaussianOracle;
    use tch::{Device, Kind};

    /// DPM-Solver-1 is DDIM / Euler in σ-space (σ'(e^h − 1) = σ − σ'); each solver makes the stated number of
    /// evaluations and finishes a grid ending in 0 with the denoised sample.
    #[test]
    fn dpm_solver_1_is_euler_and_evaluation_counts() {
        tch::manual_seed(13);
        let oracle = GaussianOracle::diagonal(&[0.5, -1.0, 0.0], &[0.1, 0.5, 2.0]);
        let x = Tensor::randn([32, 3], (Kind::Double, Device::Cpu)) * 20.0;
        let sigmas = karras_sigmas(10, 0.01, 20.0, 7.0);
        let a = sample_dpm_solver_1(&oracle, x.copy(), &sigmas, &mut |_| {});
        let b = sample_euler(&oracle, x.copy(), &sigmas, &mut |_| {});
        assert!((a - b).abs().max().double_value(&[]) < 1e-12);
        type Solver = fn(&dyn Denoiser, Tensor, &[f64], &mut dyn FnMut(SamplerStep)) -> Tensor;
        let solvers: [(Solver, usize); 4] = [
            (sample_dpm_solver_1, 1),
            (sample_dpm_solver_2, 2),
            (sample_dpm_solver_3, 3),
            (sample_dpm_solver_pp_2m, 1),
        ];
        for (k, (solver, per_step)) in solvers.into_iter().enumerate() {
            let counting = CountingDenoiser::new(&oracle);
            let mut last_denoised = None;
            let out = solver(&counting, x.copy(), &sigmas, &mut |st| last_denoised = Some(st.denoised.copy()));
            assert_eq!(counting.calls.get(), 9 * per_step + 1, "solver {k}");
            assert!((out - last_denoised.unwrap()).abs().max().double_value(&[]) < 1e-15, "solver {k}");
        }
    }
}
