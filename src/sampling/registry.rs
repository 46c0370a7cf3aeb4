//! Sample quality against the number of network evaluations (NFE): every sampler of `src/sampling` on one trained
//! model, from the same starting noise, at a list of NFE budgets, graded by any function of the samples.
//!
//! [DDPM] Ho et al. 2020, arXiv:2006.11239, Algorithm 2. [DDIM] Song, Meng, Ermon 2021, arXiv:2010.02502, eq. 12.
//! [EDM] Karras et al. 2022, arXiv:2206.00364, eq. 5 (the noise grid), Algorithm 1 (Heun).
//! [DPM-Solver] Lu et al. 2022, arXiv:2206.00927; [DPM-Solver++] Lu et al. 2022, arXiv:2211.01095.
//! [SDE] Song et al. 2021, arXiv:2011.13456, Algorithm 3 (VP predictor–corrector).
//! [k-diffusion] Crowson, `k_diffusion/sampling.py`: the sampler names of Stable Diffusion UIs.
//!
//! Counting NFE honestly: a step of a k-stage solver costs k evaluations, except the last step onto σ = 0, which
//! every solver here takes as a single evaluation (x = D(x; σ)). So N steps cost N (DDPM, DDIM, Euler, Euler a,
//! DPM-Solver++(2M)), 2N − 1 (Heun, DPM-Solver-2), 3N − 2 (DPM-Solver-3) or 2N + 1 (predictor–corrector with one
//! corrector step: N predictor and N corrector evaluations and a final denoising). A budget B gets the most steps
//! whose cost is ≤ B; the evaluations actually made are counted with [`CountingDenoiser`] and reported.
use crate::diffusion::schedule::NoiseSchedule;
use crate::model::Denoiser;
use crate::sampling::ddim::{sample_ddim, sample_ddpm, AncestralVariance};
use crate::sampling::dpm_solver::{sample_dpm_solver_2, sample_dpm_solver_3, sample_dpm_solver_pp_2m};
use crate::sampling::grids::{karras_sigmas, timestep_sigmas, TimestepSpacing, EDM_SIGMA_MAX, KARRAS_RHO};
use crate::sampling::karras::{sample_euler, sample_euler_ancestral, sample_heun};
use crate::sampling::sde::{sample_pc, sde_times, LangevinCorrector, Sde};
use crate::sampling::{randn_like, SamplerStep};
use tch::Tensor;

/// The corrector of the predictor–corrector sampler: [SDE]'s CIFAR-10 signal-to-noise ratio r = 0.16, one Langevin
/// step per time step (M = 1, as in the paper's experiments).
pub const PC_CORRECTOR: LangevinCorrector = LangevinCorrector { snr: 0.16, steps: 1 };
/// [SDE] appendix C: the reverse SDE stops at t = ε = 10⁻³ (σ ≈ 0.01 for the VP SDE), then denoises.
pub const PC_T_EPS: f64 = 1e-3;

/// The samplers the study compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Sampler {
    Ddpm,
    Ddim,
    Euler,
    Heun,
    EulerAncestral,
    DpmSolver2,
    DpmSolver3,
    DpmSolverPp2m,
    PredictorCorrector,
}

impl Sampler {
    pub const ALL: [Sampler; 9] = [
        Sampler::Ddpm,
        Sampler::Ddim,
        Sampler::Euler,
        Sampler::Heun,
        Sampler::EulerAncestral,
        Sampler::DpmSolver2,
        Sampler::DpmSolver3,
        Sampler::DpmSolverPp2m,
        Sampler::PredictorCorrector,
    ];

    /// The paper's name.
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Ddpm => "DDPM ancestral",
            Sampler::Ddim => "DDIM (η = 0)",
            Sampler::Euler => "Euler",
            Sampler::Heun => "Heun",
            Sampler::EulerAncestral => "Euler ancestral",
            Sampler::DpmSolver2 => "DPM-Solver-2",
            Sampler::DpmSolver3 => "DPM-Solver-3",
            Sampler::DpmSolverPp2m => "DPM-Solver++(2M)",
            Sampler::PredictorCorrector => "VP predictor–corrector",
        }
    }

    /// What AUTOMATIC1111's web UI and ComfyUI call it (on the grid this study uses; "" where they have no such
    /// sampler). "DPM2" is k-diffusion's `sample_dpm_2`, DPM-Solver-2 with its midpoint taken in log σ.
    pub fn ui_name(self) -> &'static str {
        match self {
            Sampler::Ddpm => "DDPM",
            Sampler::Ddim => "DDIM",
            Sampler::Euler => "Euler Karras",
            Sampler::Heun => "Heun Karras",
            Sampler::EulerAncestral => "Euler a Karras",
            Sampler::DpmSolver2 => "DPM2 Karras",
            Sampler::DpmSolver3 => "",
            Sampler::DpmSolverPp2m => "DPM++ 2M Karras",
            Sampler::PredictorCorrector => "",
        }
    }

    /// A short key for files and metrics.json.
    pub fn key(self) -> &'static str {
        match self {
            Sampler::Ddpm => "ddpm",
            Sampler::Ddim => "ddim",
            Sampler::Euler => "euler",
            Sampler::Heun => "heun",
            Sampler::EulerAncestral => "euler_a",
            Sampler::DpmSolver2 => "dpm_solver_2",
            Sampler::DpmSolver3 => "dpm_solver_3",
            Sampler::DpmSolverPp2m => "dpm_solver_pp_2m",
            Sampler::PredictorCorrector => "pc",
        }
    }

    /// The sampler a user names by its key ("dpm_solver_pp_2m"), its UI name ("DPM++ 2M Karras", any case) or its
    /// paper name; an error lists the names.
    pub fn from_name(name: &str) -> anyhow::Result<Sampler> {
        let want = name.trim().to_lowercase();
        Sampler::ALL
            .into_iter()
            .find(|s| [s.key(), s.ui_name(), s.name()].iter().any(|n| !n.is_empty() && n.to_lowercase() == want))
            .ok_or_else(|| {
                let names: Vec<String> = Sampler::ALL.iter().map(|s| format!("{} ({})", s.key(), s.name())).collect();
                anyhow::anyhow!("unknown sampler \"{name}\": use one of {}", names.join(", "))
            })
    }

    /// Whether it draws fresh noise while it runs (an SDE sampler) or is a deterministic ODE solver.
    pub fn stochastic(self) -> bool {
        matches!(self, Sampler::Ddpm | Sampler::EulerAncestral | Sampler::PredictorCorrector)
    }

    /// Network evaluations of `steps` steps (module docs): a·N + b.
    fn cost(self) -> (i64, i64) {
        match self {
            Sampler::Heun | Sampler::DpmSolver2 => (2, -1),
            Sampler::DpmSolver3 => (3, -2),
            Sampler::PredictorCorrector => (2, 1),
            _ => (1, 0),
        }
    }

    pub fn nfe(self, steps: usize) -> usize {
        let (a, b) = self.cost();
        (a * steps as i64 + b) as usize
    }

    /// The most steps (at most `max_steps`) whose NFE fits in `budget`; None if not even one step does.
    pub fn steps_for(self, budget: usize, max_steps: usize) -> Option<usize> {
        let (a, b) = self.cost();
        let steps = ((budget as i64 - b) / a).min(max_steps as i64);
        (steps >= 1).then_some(steps as usize)
    }

    /// The σ grid of `steps` steps for a model trained on `sched`: DDPM and DDIM visit the model's own timesteps
    /// (evenly spaced, both ends kept: lesson 04's respacing), the others a Karras grid ([EDM] eq. 5, ρ = 7) from
    /// the model's σ_min to [`karras_sigma_max`], as "Karras" samplers of the UIs do. (The predictor–corrector runs
    /// on SDE time instead.)
    pub fn grid(self, sched: &NoiseSchedule, steps: usize) -> Vec<f64> {
        match self {
            Sampler::Ddpm | Sampler::Ddim => timestep_sigmas(sched, steps, TimestepSpacing::Linspace),
            _ => karras_sigmas(steps, sched.sigma(0), karras_sigma_max(sched), KARRAS_RHO),
        }
    }

    // ANCHOR: sample
    /// Runs `steps` steps from z ~ N(0, I) (B, ...), the VP model's x_T, and returns x̂₀. Every σ-space sampler
    /// starts from x = z √(1 + σ₀²) (x_vp/√ᾱ at its first level σ₀); the predictor–corrector starts its VP SDE
    /// ([SDE] eq. 11 with β from 0.1 to 20, DDPM's linear schedule) at x(1) = z. Fresh noise comes from libtorch's
    /// generator: seed it first for a reproducible run.
    pub fn sample(
        self,
        d: &dyn Denoiser,
        sched: &NoiseSchedule,
        z: &Tensor,
        steps: usize,
        cb: &mut dyn FnMut(SamplerStep),
    ) -> Tensor {
        let noise = &mut randn_like;
        if self == Sampler::PredictorCorrector {
            let sde = Sde::vp_ddpm();
            return sample_pc(d, &sde, z * sde.prior_std(), &sde_times(steps, PC_T_EPS), Some(PC_CORRECTOR), noise, cb);
        }
        let sigmas = self.grid(sched, steps);
        self.run(d, z * (1.0 + sigmas[0] * sigmas[0]).sqrt(), &sigmas, cb)
    }

    /// Runs the σ-space sampler from x, already at the first level of `sigmas` (a whole grid, or its tail for
    /// img2img), down the grid. Every sampler but the predictor–corrector (which runs in SDE time: it panics).
    pub fn run(self, d: &dyn Denoiser, x: Tensor, sigmas: &[f64], cb: &mut dyn FnMut(SamplerStep)) -> Tensor {
        let noise = &mut randn_like;
        match self {
            // σ² = β as lesson 04 samples (chapter 03: β̃ under-disperses at few steps)
            Sampler::Ddpm => sample_ddpm(d, x, sigmas, AncestralVariance::Beta, noise, cb),
            Sampler::Ddim => sample_ddim(d, x, sigmas, 0.0, None, noise, cb),
            Sampler::Euler => sample_euler(d, x, sigmas, cb),
            Sampler::Heun => sample_heun(d, x, sigmas, cb),
            Sampler::EulerAncestral => sample_euler_ancestral(d, x, sigmas, 1.0, noise, cb),
            Sampler::DpmSolver2 => sample_dpm_solver_2(d, x, sigmas, cb),
            Sampler::DpmSolver3 => sample_dpm_solver_3(d, x, sigmas, cb),
            Sampler::DpmSolverPp2m => sample_dpm_solver_pp_2m(d, x, sigmas, cb),
            Sampler::PredictorCorrector => panic!("the predictor-corrector sampler runs in SDE time, not on a σ grid"),
        }
    }
    // ANCHOR_END: sample
}

// ANCHOR: karras_sigma_max
/// Where a Karras grid starts on a model trained on `sched`: the model's largest σ, but at most [EDM]'s σ_max = 80.
/// [EDM] Table 1 starts its samplers there for every model, the improved-DDPM cosine model included (its reference
/// `generate.py` keeps only that model's timesteps with σ ≤ σ_max). The cosine schedule's own last σ is about
/// 2·10⁴ (ᾱ_{T−1} ≈ 2·10⁻⁹), and a ρ = 7 grid of 10 levels from there puts six of them above σ = 180, where D(x; σ)
/// is close to the mean image whatever x is. Chapter 07 measures the difference.
pub fn karras_sigma_max(sched: &NoiseSchedule) -> f64 {
    sched.sigma(sched.num_steps() - 1).min(EDM_SIGMA_MAX)
}
// ANCHOR_END: karras_sigma_max

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::oracle::GaussianOracle;
    use tch::{Device, Kind};

    /// The cosine schedule's top level (ᾱ_{T−1} ≈ 2·10⁻⁹) is capped at [EDM]'s 80; Stable Diffusion's scaled-linear
    /// schedule (σ_max ≈ 14.6) and DDPM's linear one (≈ 157) are below or near it and keep their own.
    #[test]
    fn karras_grids_start_at_the_model_top_level_or_80() {
        let cosine = NoiseSchedule::cosine(1000);
        assert!(cosine.sigma(999) > 2e4 && karras_sigma_max(&cosine) == EDM_SIGMA_MAX);
        let sd = NoiseSchedule::scaled_linear(1000);
        assert!((karras_sigma_max(&sd) - sd.sigma(999)).abs() < 1e-12 && (sd.sigma(999) - 14.6).abs() < 0.1);
        assert_eq!(karras_sigma_max(&NoiseSchedule::ddpm(1000)), EDM_SIGMA_MAX);
        let grid = Sampler::DpmSolverPp2m.grid(&cosine, 10);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b;
        assert!(close(grid[0], EDM_SIGMA_MAX) && close(grid[9], cosine.sigma(0)) && grid[10] == 0.0, "{grid:?}");
        assert_eq!(Sampler::Ddim.grid(&cosine, 10)[0], cosine.sigma(999), "DDIM keeps the model's own timesteps");
    }
    /// Every sampler, from the same noise, recovers N(μ, s²) of an oracle with a generous budget (moments within
    /// 10 %: the ODE solvers map the noise deterministically, the SDE samplers add their own).
    #[test]
    fn every_sampler_recovers_a_gaussian_from_the_same_noise() {
        tch::manual_seed(3);
        let sched = NoiseSchedule::ddpm(1000);
        let oracle = GaussianOracle::isotropic(&[0.5, -0.5], 0.3);
        let z = Tensor::randn([4000, 2], (Kind::Double, Device::Cpu));
        for s in Sampler::ALL {
            let steps = s.steps_for(200, 1000).unwrap();
            let x = s.sample(&oracle, &sched, &z, steps, &mut |_| {});
            let (m, v) = (x.mean_dim(0, false, Kind::Double), x.var_dim(0, true, false));
            for k in 0..2 {
                let (m, v) = (m.double_value(&[k]), v.double_value(&[k]));
                let mu = if k == 0 { 0.5 } else { -0.5 };
                assert!((m - mu).abs() < 0.03, "{}: mean {m}", s.name());
                assert!((v / 0.09 - 1.0).abs() < 0.1, "{}: variance {v}", s.name());
            }
        }
    }
}
