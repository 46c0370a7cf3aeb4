//! Noise grids: the σ levels a sampler visits, descending from σ_max and ending in 0.
//!
//! [EDM] Karras, Aittala, Aila, Laine 2022, arXiv:2206.00364, eq. 5 (and sec. 3: ρ = 3 nearly equalises the
//! local truncation error of every step, ρ = 7 gives the best images).
//! [DPM-Solver] Lu et al. 2022, arXiv:2206.00927, sec. 3.3: steps uniform in λ = log(α/σ) (half the log-SNR).
//! [Flawed] Lin, Liu, Li, Yang 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
//! arXiv:2305.08891, Table 2: the three ways samplers pick S of T training timesteps (diffusers' `timestep_spacing`).
//! [SDEdit] Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations",
//! arXiv:2108.01073, sec. 3 (perturb the input to t₀, then solve the reverse process from there).
//! Notation (code -> paper): sigma_max -> σ_max, sigma_min -> σ_min, rho -> ρ, steps -> N (or S).
//!
//! A grid of N steps is N + 1 numbers: N noise levels, then 0 (k-diffusion's `get_sigmas_*` convention). Timesteps
//! here are 0-based (t = 0 is the first noising step; [Flawed] counts from 1).
use crate::diffusion::schedule::NoiseSchedule;
use crate::model::sigmas_of_schedule;

/// [EDM] Table 1 (and sec. 5): σ_min = 0.002, σ_max = 80, ρ = 7.
pub const EDM_SIGMA_MIN: f64 = 0.002;
pub const EDM_SIGMA_MAX: f64 = 80.0;
pub const KARRAS_RHO: f64 = 7.0;

/// How S of T training timesteps are spread ([Flawed] Table 2; diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum TimestepSpacing {
    /// round(linspace(0, T − 1, S)): both ends kept (as improved-diffusion's respacing keeps them).
    Linspace,
    /// k · ⌊T/S⌋ for k = 0..S−1: Stable Diffusion's default; never reaches t = T − 1.
    Leading,
    /// round(T − k · T/S) − 1: starts at t = T − 1 but never reaches t = 0 ([Flawed]'s recommendation).
    Trailing,
}

/// The S timesteps of `spacing` among T, in the order a sampler visits them (descending). For T = 1000, S = 10:
/// linspace 999, 888, …, 111, 0; leading 900, 800, …, 0; trailing 999, 899, …, 99 ([Flawed] Table 2, shifted by
/// one to 0-based timesteps).
pub fn spaced_timesteps(num_train: usize, steps: usize, spacing: TimestepSpacing) -> Vec<usize> {
    assert!(steps >= 1 && steps <= num_train, "can pick 1..={num_train} timesteps, not {steps}");
    let (t, s) = (num_train as f64, steps as f64);
    let mut ts: Vec<usize> = match spacing {
        // numpy: np.linspace(0, T − 1, S).round() (round half to even)
        TimestepSpacing::Linspace if steps == 1 => vec![num_train - 1],
        TimestepSpacing::Linspace => {
            (0..steps).map(|k| (k as f64 * (t - 1.0) / (s - 1.0)).round_ties_even() as usize).collect()
        }
        // diffusers: (np.arange(0, S) * (T // S)).round()
        TimestepSpacing::Leading => (0..steps).map(|k| k * (num_train / steps)).collect(),
        // diffusers: np.round(np.arange(T, 0, −T/S)) − 1
        TimestepSpacing::Trailing => {
            (0..steps).map(|k| (t - k as f64 * t / s).round_ties_even() as usize - 1).collect()
        }
    };
    ts.sort_unstable_by(|a, b| b.cmp(a));
    ts
}

/// The σ-space grid of a discrete-time model: σ_t at the [`spaced_timesteps`], then 0.
pub fn timestep_sigmas(sched: &NoiseSchedule, steps: usize, spacing: TimestepSpacing) -> Vec<f64> {
    let table = sigmas_of_schedule(sched);
    let mut sigmas: Vec<f64> =
        spaced_timesteps(sched.num_steps(), steps, spacing).into_iter().map(|t| table[t]).collect();
    sigmas.push(0.0);
    sigmas
}

// ANCHOR: karras_sigmas
/// [EDM] eq. 5:  σ_i = (σ_max^{1/ρ} + i/(N − 1) · (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ  for i < N,  σ_N = 0.
/// Larger ρ spends more steps near σ_min.
pub fn karras_sigmas(steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    assert!(steps >= 1 && 0.0 < sigma_min && sigma_min <= sigma_max, "need N ≥ 1 and 0 < σ_min ≤ σ_max");
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    let mut sigmas: Vec<f64> = (0..steps).map(|i| (hi + fraction(i, steps) * (lo - hi)).powf(rho)).collect();
    sigmas.push(0.0);
    sigmas
}
// ANCHOR_END: karras_sigmas

/// Steps uniform in λ = −log σ ([DPM-Solver] sec. 3.3, "uniform logSNR"; in σ-space log-SNR = −2 log σ):
/// σ_i = σ_max (σ_min/σ_max)^{i/(N − 1)} for i < N, σ_N = 0.
pub fn log_snr_sigmas(steps: usize, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    assert!(steps >= 1 && 0.0 < sigma_min && sigma_min <= sigma_max, "need N ≥ 1 and 0 < σ_min ≤ σ_max");
    let mut sigmas: Vec<f64> =
        (0..steps).map(|i| sigma_max * (sigma_min / sigma_max).powf(fraction(i, steps))).collect();
    sigmas.push(0.0);
    sigmas
}

/// i/(N − 1), with 0 for N = 1 (a single level: σ_max).
fn fraction(i: usize, n: usize) -> f64 {
    if n == 1 {
        0.0
    } else {
        i as f64 / (n - 1) as f64
    }
}

/// img2img ([SDEdit]) on a grid of N steps (N + 1 numbers): the tail that `strength` ∈ [0, 1] runs, the last
/// ⌊N · strength⌋ steps as diffusers counts them, from σ_start (where the input is noised to) down to 0. Strength 0
/// gives `[0.0]`, no step at all: the input comes back as it is.
pub fn img2img_tail(sigmas: &[f64], strength: f64) -> &[f64] {
    let steps = sigmas.len() - 1;
    let run = ((steps as f64 * strength) as usize).min(steps); // steps actually taken
    &sigmas[steps - run..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn img2img_runs_the_last_strength_fraction_of_the_steps() {
        let sigmas = [8.0, 4.0, 2.0, 1.0, 0.0]; // 4 steps
        assert_eq!(img2img_tail(&sigmas, 0.0), [0.0]);
        assert_eq!(img2img_tail(&sigmas, 0.3), [1.0, 0.0]); // ⌊1.2⌋ = 1 step
        assert_eq!(img2img_tail(&sigmas, 0.75), [4.0, 2.0, 1.0, 0.0]);
        assert_eq!(img2img_tail(&sigmas, 1.0), sigmas);
    }

    /// [Flawed] Table 2 (T = 1000, S = 10), in 0-based timesteps.
    #[test]
    fn spacings_match_the_table_of_lin_et_al() {
        let desc = |v: Vec<usize>| v.into_iter().rev().collect::<Vec<_>>();
        assert_eq!(
            spaced_timesteps(1000, 10, TimestepSpacing::Linspace),
            desc(vec![0, 111, 222, 333, 444, 555, 666, 777, 888, 999])
        );
        assert_eq!(spaced_timesteps(1000, 10, TimestepSpacing::Leading), desc((0..10).map(|k| 100 * k).collect()));
        assert_eq!(
            spaced_timesteps(1000, 10, TimestepSpacing::Trailing),
            desc((0..10).map(|k| 100 * k + 99).collect())
        );
        // uneven ratios: numpy gives these (np.round(np.arange(1000, 0, −1000/3)) − 1, linspace(0, 999, 4))
        assert_eq!(spaced_timesteps(1000, 3, TimestepSpacing::Trailing), vec![999, 666, 332]);
        assert_eq!(spaced_timesteps(1000, 4, TimestepSpacing::Linspace), vec![999, 666, 333, 0]);
        assert_eq!(spaced_timesteps(1000, 3, TimestepSpacing::Leading), vec![666, 333, 0]);
        for spacing in [TimestepSpacing::Linspace, TimestepSpacing::Leading, TimestepSpacing::Trailing] {
            assert_eq!(spaced_timesteps(1000, 1000, spacing), (0..1000).rev().collect::<Vec<_>>(), "{spacing:?}");
        }
        assert_eq!(spaced_timesteps(1000, 1, TimestepSpacing::Linspace), vec![999]);
    }

    #[test]
    fn timestep_sigmas_are_the_schedule_sigmas_then_zero() {
        let sched = NoiseSchedule::ddpm(1000);
        let s = timestep_sigmas(&sched, 10, TimestepSpacing::Trailing);
        assert_eq!(s.len(), 11);
        assert_eq!((s[0], s[9], s[10]), (sched.sigma(999), sched.sigma(99), 0.0));
        assert!(s.windows(2).all(|w| w[1] < w[0]));
    }

    /// [EDM] eq. 5 endpoints, the ρ-th-root spacing, and the log-uniform grid's constant ratio.
    #[test]
    fn karras_and_log_snr_grids() {
        let s = karras_sigmas(18, EDM_SIGMA_MIN, EDM_SIGMA_MAX, KARRAS_RHO);
        assert_eq!(s.len(), 19);
        assert!((s[0] - 80.0).abs() < 1e-12 && (s[17] - 0.002).abs() < 1e-15 && s[18] == 0.0);
        let roots: Vec<f64> = s[..18].iter().map(|x| x.powf(1.0 / 7.0)).collect();
        assert!(roots.windows(3).all(|w| ((w[2] - w[1]) - (w[1] - w[0])).abs() < 1e-12));
        // ρ = 1 is linear in σ
        let lin = karras_sigmas(5, 1.0, 5.0, 1.0);
        assert!(lin.iter().zip([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]).all(|(a, b)| (a - b).abs() < 1e-12));
        let g = log_snr_sigmas(5, 0.01, 100.0);
        assert!(g.iter().zip([100.0, 10.0, 1.0, 0.1, 0.01, 0.0]).all(|(a, b)| (a - b).abs() < 1e-12 * (1.0 + b)));
        let one = karras_sigmas(1, 0.1, 10.0, 7.0);
        assert!(one.len() == 2 && (one[0] - 10.0).abs() < 1e-12 && one[1] == 0.0);
    }
}
