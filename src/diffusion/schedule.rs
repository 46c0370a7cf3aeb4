//! Discrete noise schedules: how much noise each step of the forward process adds.
//!
//! [DDPM] Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
//! [iDDPM] Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672.
//! [LDM] Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752.
//! [improved-diffusion] github.com/openai/improved-diffusion, `gaussian_diffusion.py` (`get_named_beta_schedule`,
//!   `betas_for_alpha_bar`) and `respace.py` (`space_timesteps`): the reference code for the cosine schedule,
//!   the T-scaled linear schedule and respacing.
//!
//! Notation (code -> paper). Timesteps are array indices t = 0..T−1; index t is the paper's step t+1, so t = 0 is
//! the first noising step and ᾱ_{−1} = 1 stands for the clean data.
//!   betas[t]          -> β_t               variance added by step t
//!   1 − betas[t]      -> α_t
//!   alphas_cumprod[t] -> ᾱ_t = ∏_{s≤t} α_s  q(x_t | x₀) = N(√ᾱ_t x₀, (1 − ᾱ_t) I), [DDPM] eq. 4
//!   sigma(t)          -> σ_t = √((1 − ᾱ_t)/ᾱ_t): x_t/√ᾱ_t = x₀ + σ_t ε, the variance-exploding noise level of
//!                        lessons 01–02
//!   snr(t)            -> ᾱ_t/(1 − ᾱ_t) = 1/σ_t²
//!   posterior_variance(t) -> β̃_t, the variance of q(x_{t−1} | x_t, x₀), [DDPM] eq. 7
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// [DDPM] sec. 4: β₁ = 10⁻⁴ ... β_T = 0.02 with T = 1000.
pub const DDPM_BETA_START: f64 = 1e-4;
pub const DDPM_BETA_END: f64 = 0.02;
pub const DDPM_T: usize = 1000;
/// [iDDPM] sec. 3.2: the offset s = 0.008 keeps β near t = 0 from being too small.
pub const COSINE_S: f64 = 0.008;
/// [iDDPM] sec. 3.2: β clipped to ≤ 0.999 to avoid the singularity at t = T (where ᾱ → 0).
pub const MAX_BETA: f64 = 0.999;
/// Stable Diffusion v1 (CompVis/stable-diffusion `configs/stable-diffusion/v1-inference.yaml`: linear_start,
/// linear_end; [LDM] code `make_beta_schedule("linear")` squares a linspace of square roots).
pub const SD_BETA_START: f64 = 0.00085;
pub const SD_BETA_END: f64 = 0.012;

/// The names `by_name` accepts (also the CLI's `--schedule` values).
pub const SCHEDULE_NAMES: [&str; 3] = ["linear", "cosine", "scaled-linear"];

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ScheduleKind {
    Linear,
    Cosine,
    ScaledLinear,
}

/// β_t and ᾱ_t for t = 0..T−1 (f64; ᾱ underflows f32 precision in 1 − ᾱ near t = 0).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NoiseSchedule {
    pub kind: ScheduleKind,
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
}

/// σ_t² of the reverse process, [DDPM] sec. 3.2: β_t or β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t. The first is the
/// right per-step variance for data x₀ ~ N(0, I), the second for data that is a single point; real data lies in
/// between, and the two give similar samples at T = 1000 but not with few (respaced) steps.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum PosteriorVariance {
    Beta,
    BetaTilde,
}

impl PosteriorVariance {
    /// σ_t² at index `t` of `sched`.
    pub fn sigma_squared(self, sched: &NoiseSchedule, t: usize) -> f64 {
        match self {
            PosteriorVariance::Beta => sched.betas[t],
            PosteriorVariance::BetaTilde => sched.posterior_variance(t),
        }
    }
}

/// n points from a to b inclusive, like `numpy.linspace` (n = 1 gives [a]).
fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect()
}

/// ᾱ_t = ∏_{s≤t} (1 − β_s), [DDPM] sec. 2 (the notation below eq. 4).
fn cumprod_one_minus(betas: &[f64]) -> Vec<f64> {
    betas
        .iter()
        .scan(1.0, |acc, &b| {
            *acc *= 1.0 - b;
            Some(*acc)
        })
        .collect()
}

impl NoiseSchedule {
    fn from_betas(kind: ScheduleKind, betas: Vec<f64>) -> Self {
        assert!(!betas.is_empty(), "a schedule needs at least one step");
        assert!(betas.iter().all(|&b| b > 0.0 && b < 1.0), "every β_t must lie in (0, 1)");
        let alphas_cumprod = cumprod_one_minus(&betas);
        Self { kind, betas, alphas_cumprod }
    }

    /// β_t linear from `beta_start` to `beta_end` over T steps, [DDPM] sec. 4 (10⁻⁴ → 0.02, T = 1000).
    pub fn linear(t: usize, beta_start: f64, beta_end: f64) -> Self {
        Self::from_betas(ScheduleKind::Linear, linspace(beta_start, beta_end, t))
    }

    /// The [DDPM] linear schedule with its endpoints scaled to T steps as (1000/T)·(10⁻⁴, 0.02), so that ᾱ_{T−1}
    /// stays about the same for any T ([improved-diffusion] `get_named_beta_schedule("linear")`). Needs T > 20
    /// (otherwise β_{T−1} ≥ 1).
    // ANCHOR: ddpm_linear
    pub fn ddpm(t: usize) -> Self {
        let scale = DDPM_T as f64 / t as f64;
        Self::linear(t, scale * DDPM_BETA_START, scale * DDPM_BETA_END)
    }
    // ANCHOR_END: ddpm_linear

    /// [iDDPM] eq. 17 with s = 0.008:  ᾱ(τ) = f(τ)/f(0),  f(τ) = cos²((τ + s)/(1 + s) · π/2),  τ ∈ [0, 1].
    /// Convention (that of [improved-diffusion] `betas_for_alpha_bar`): step index t covers τ ∈ [t/T, (t+1)/T],
    ///     β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999)     ([iDDPM] sec. 3.2, the clipped eq. 17 ratio)
    /// and ᾱ_t = ∏_{s≤t}(1 − β_s), which telescopes to ᾱ_t = f((t+1)/T)/f(0) wherever no clipping happened at or
    /// before t. With f(1) = 0 the last step is always clipped (β_{T−1} = 0.999), which keeps ᾱ_{T−1} > 0.
    // ANCHOR: cosine
    pub fn cosine(t: usize) -> Self {
        let f = |tau: f64| ((tau + COSINE_S) / (1.0 + COSINE_S) * std::f64::consts::FRAC_PI_2).cos().powi(2);
        let n = t as f64;
        // all arithmetic in f64: (i as f64) / n, never the integer i / t (diffusers-rs and candle compute this
        // ratio in integers and get a schedule that is constant in t)
        let betas = (0..t).map(|i| (1.0 - f((i + 1) as f64 / n) / f(i as f64 / n)).min(MAX_BETA)).collect();
        Self::from_betas(ScheduleKind::Cosine, betas)
    }
    // ANCHOR_END: cosine

    /// Stable Diffusion's "scaled linear" schedule: √β_t linear from √0.00085 to √0.012, β_t = (√β_t)².
    pub fn scaled_linear(t: usize) -> Self {
        let betas = linspace(SD_BETA_START.sqrt(), SD_BETA_END.sqrt(), t).into_iter().map(|r| r * r).collect();
        Self::from_betas(ScheduleKind::ScaledLinear, betas)
    }

    /// "linear" (= [`NoiseSchedule::ddpm`]), "cosine" or "scaled-linear" with T steps.
    pub fn by_name(name: &str, t: usize) -> Result<Self> {
        if t == 0 {
            bail!("a noise schedule needs at least one step, got T = 0");
        }
        match name {
            "linear" if t <= 20 => {
                bail!(
                    "the linear schedule scales β_T = 0.02·1000/T, which reaches 1 for T ≤ 20 (got T = {t}): \
                     use more steps, or --schedule cosine"
                )
            }
            "linear" => Ok(Self::ddpm(t)),
            "cosine" => Ok(Self::cosine(t)),
            "scaled-linear" => Ok(Self::scaled_linear(t)),
            _ => bail!("unknown noise schedule {name:?}: choose one of {}", SCHEDULE_NAMES.join(", ")),
        }
    }

    /// T, the number of steps.
    pub fn num_steps(&self) -> usize {
        self.betas.len()
    }

    /// ᾱ_t.
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alphas_cumprod[t]
    }

    /// ᾱ_{t−1}, with ᾱ_{−1} = 1 (the clean data) for t = 0.
    pub fn alpha_bar_prev(&self, t: usize) -> f64 {
        if t == 0 {
            1.0
        } else {
            self.alphas_cumprod[t - 1]
        }
    }

    /// σ_t = √((1 − ᾱ_t)/ᾱ_t): dividing x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε by √ᾱ_t gives x₀ + σ_t ε.
    pub fn sigma(&self, t: usize) -> f64 {
        let a = self.alpha_bar(t);
        ((1.0 - a) / a).sqrt()
    }

    /// Signal-to-noise ratio ᾱ_t/(1 − ᾱ_t) = 1/σ_t².
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alpha_bar(t);
        a / (1.0 - a)
    }

    /// [DDPM] eq. 7: β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t, with ᾱ_{−1} = 1 so β̃_0 = 0.
    // ANCHOR: posterior_variance
    pub fn posterior_variance(&self, t: usize) -> f64 {
        (1.0 - self.alpha_bar_prev(t)) / (1.0 - self.alpha_bar(t)) * self.betas[t]
    }
    // ANCHOR_END: posterior_variance

    /// ᾱ as a (T,) f32 tensor, for gathering per-sample values with `index_select`.
    pub fn to_tensor_alpha_bar(&self, device: Device) -> Tensor {
        Tensor::from_slice(&self.alphas_cumprod).to_kind(Kind::Float).to_device(device)
    }

    /// [iDDPM] sec. 4 ("Improving Sampling Speed"): keep `steps` of the T timesteps, evenly spaced as
    /// [improved-diffusion] `space_timesteps(T, [steps])` does — k_j = round(j·(T−1)/(steps−1)), accumulated and
    /// rounded half-to-even as in its Python, so both 0 and T−1 are kept — and recompute
    ///     β_j = 1 − ᾱ_{k_j}/ᾱ_{k_{j−1}}   (ᾱ_{k_{−1}} = 1)
    /// so that ᾱ at every kept step is unchanged (copied, so exactly). For steps = 1 we keep only T−1 (the Python
    /// keeps 0, which would skip the whole schedule). Returns the kept original timesteps (ascending) and the
    /// new `steps`-step schedule; samplers pass the originals to the model.
    pub fn respaced(&self, steps: usize) -> (Vec<usize>, Self) {
        let t = self.num_steps();
        assert!(steps >= 1 && steps <= t, "can keep 1..={t} steps, not {steps}");
        let kept: Vec<usize> = if steps == 1 {
            vec![t - 1]
        } else {
            let frac_stride = (t - 1) as f64 / (steps - 1) as f64;
            let mut cur = 0.0f64;
            let mut kept = Vec::with_capacity(steps);
            for _ in 0..steps {
                kept.push(cur.round_ties_even() as usize);
                cur += frac_stride;
            }
            kept.dedup(); // a no-op: frac_stride ≥ 1 keeps the rounded steps distinct
            kept
        };
        let alphas_cumprod: Vec<f64> = kept.iter().map(|&k| self.alphas_cumprod[k]).collect();
        let betas = (0..kept.len())
            .map(|j| 1.0 - alphas_cumprod[j] / if j == 0 { 1.0 } else { alphas_cumprod[j - 1] })
            .collect();
        (kept, Self { kind: self.kind.clone(), betas, alphas_cumprod })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds(t: usize) -> [NoiseSchedule; 3] {
        [NoiseSchedule::ddpm(t), NoiseSchedule::cosine(t), NoiseSchedule::scaled_linear(t)]
    }

    #[test]
    fn alpha_bar_is_strictly_decreasing_in_0_1() {
        for t in [1000, 100, 25] {
            for s in all_kinds(t) {
                assert_eq!(s.num_steps(), t);
                assert!(s.alphas_cumprod.iter().all(|&a| a > 0.0 && a <= 1.0), "{:?} T={t}", s.kind);
                assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]), "{:?} T={t}", s.kind);
            }
        }
    }

    #[test]
    fn linear_endpoints_and_t_scaling() {
        let s = NoiseSchedule::linear(1000, 1e-4, 0.02);
        assert_eq!((s.betas[0], s.betas[999]), (1e-4, 0.02));
        assert!(s.betas.windows(2).all(|w| (w[1] - w[0] - (0.02 - 1e-4) / 999.0).abs() < 1e-15));
        // ddpm(1000) is exactly the paper's schedule; ddpm(T) scales the endpoints by 1000/T
        assert_eq!(NoiseSchedule::ddpm(1000).betas, s.betas);
        let s = NoiseSchedule::ddpm(250);
        assert!((s.betas[0] - 4e-4).abs() < 1e-15 && (s.betas[249] - 0.08).abs() < 1e-15);
        // [DDPM] sec. 4 picks the endpoints so that ᾱ_T ≈ 0: at T = 1000 ᾱ_{999} ≈ 4.0e-5
        assert!((NoiseSchedule::ddpm(1000).alpha_bar(999) - 4.04e-5).abs() < 0.01e-5);
    }

    #[test]
    fn scaled_linear_has_linear_square_roots() {
        let s = NoiseSchedule::scaled_linear(1000);
        assert!((s.betas[0] - 0.00085).abs() < 1e-15 && (s.betas[999] - 0.012).abs() < 1e-15);
        let step = (0.012f64.sqrt() - 0.00085f64.sqrt()) / 999.0;
        assert!(s.betas.windows(2).all(|w| (w[1].sqrt() - w[0].sqrt() - step).abs() < 1e-13));
    }

    /// The cosine schedule against [iDDPM] eq. 17 written out independently: ᾱ at index t is
    /// ᾱ(τ) = f(τ)/f(0) at τ = (t+1)/T, f(τ) = cos²((τ + s)/(1 + s) · π/2), wherever clipping is not active.
    #[test]
    fn cosine_matches_the_closed_form() {
        let closed_form = |t: usize, n: usize| {
            let f = |tau: f64| ((tau + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
            f((t + 1) as f64 / n as f64) / f(0.0)
        };
        for n in [1000usize, 50] {
            let s = NoiseSchedule::cosine(n);
            assert_eq!(s.kind, ScheduleKind::Cosine);
            // only the last step is clipped (f(1) = 0 would give β = 1)
            assert_eq!(s.betas.iter().filter(|&&b| b == MAX_BETA).count(), 1);
            assert_eq!(s.betas[n - 1], MAX_BETA);
            for t in [0, 1, n / 10, n / 4, n / 2, 3 * n / 4, n - 2] {
                let (got, want) = (s.alpha_bar(t), closed_form(t, n));
                assert!((got - want).abs() < 1e-9, "T={n} t={t}: {got} vs {want}");
            }
            // after the clipped step: ᾱ_{T−1} = ᾱ_{T−2} · (1 − 0.999)
            assert!((s.alpha_bar(n - 1) - closed_form(n - 2, n) * (1.0 - MAX_BETA)).abs() < 1e-12);
        }
        // landmarks at T = 1000: ᾱ(½) = cos²(0.504·π/2)/cos²(0.008·π/2) is just under ½, and β_0 is tiny
        let s = NoiseSchedule::cosine(1000);
        assert!((s.alpha_bar(499) - 0.4938).abs() < 1e-3, "{}", s.alpha_bar(499));
        assert!(s.betas[0] < 5e-5 && s.betas[0] > 3e-5, "{}", s.betas[0]);
    }

    #[test]
    fn posterior_variance_is_between_0_and_beta() {
        for s in all_kinds(1000) {
            assert_eq!(s.posterior_variance(0), 0.0);
            for t in 1..1000 {
                let v = s.posterior_variance(t);
                assert!(v > 0.0 && v <= s.betas[t], "{:?} t={t}: β̃ = {v}, β = {}", s.kind, s.betas[t]);
            }
        }
    }

    #[test]
    fn sigma_and_snr_are_the_ve_noise_level() {
        let s = NoiseSchedule::ddpm(1000);
        for t in [0, 10, 500, 999] {
            let a = s.alpha_bar(t);
            assert!((s.sigma(t).powi(2) * s.snr(t) - 1.0).abs() < 1e-12);
            // x_t/√ᾱ = x₀ + (√(1−ᾱ)/√ᾱ) ε
            assert!((s.sigma(t) - (1.0 - a).sqrt() / a.sqrt()).abs() < 1e-12 * s.sigma(t));
        }
        let ab = s.to_tensor_alpha_bar(Device::Cpu);
        assert_eq!((ab.size(), ab.kind()), (vec![1000], Kind::Float));
        assert!((ab.double_value(&[500]) - s.alpha_bar(500)).abs() < 1e-7);
    }

    #[test]
    fn respacing_keeps_alpha_bar_at_the_kept_steps() {
        for s in all_kinds(1000) {
            for steps in [1000, 250, 100, 50, 10, 2, 1] {
                let (kept, r) = s.respaced(steps);
                assert_eq!((kept.len(), r.num_steps()), (steps, steps));
                assert_eq!(*kept.last().unwrap(), 999);
                if steps > 1 {
                    assert_eq!(kept[0], 0);
                }
                assert!(kept.windows(2).all(|w| w[0] < w[1]));
                for (j, &k) in kept.iter().enumerate() {
                    assert_eq!(r.alpha_bar(j), s.alpha_bar(k));
                }
                // the new β reproduce ᾱ through the product ∏(1 − β_j) (to rounding: 1 − β loses digits when β ≈ 1)
                let again = cumprod_one_minus(&r.betas);
                assert!(again.iter().zip(&r.alphas_cumprod).all(|(a, b)| (a - b).abs() < 1e-14));
            }
            // keeping every step gives back the original β (up to the rounding of ᾱ_t/ᾱ_{t−1})
            let (_, same) = s.respaced(1000);
            assert!(same.betas.iter().zip(&s.betas).all(|(a, b)| (a / b - 1.0).abs() < 1e-9));
        }
    }

    /// The timestep lists of [improved-diffusion] `space_timesteps(1000, [n])` (computed with its Python).
    #[test]
    fn respacing_picks_the_same_timesteps_as_improved_diffusion() {
        let s = NoiseSchedule::ddpm(1000);
        assert_eq!(s.respaced(10).0, vec![0, 111, 222, 333, 444, 555, 666, 777, 888, 999]);
        let k = s.respaced(100).0;
        assert_eq!(k[..12], [0, 10, 20, 30, 40, 50, 61, 71, 81, 91, 101, 111]);
        assert_eq!(k[95..], [959, 969, 979, 989, 999]);
        assert_eq!(s.respaced(50).0[..8], [0, 20, 41, 61, 82, 102, 122, 143]);
        assert_eq!(NoiseSchedule::ddpm(100).respaced(7).0, vec![0, 16, 33, 50, 66, 82, 99]);
    }

    #[test]
    fn by_name_knows_three_schedules_and_lists_them_otherwise() {
        assert_eq!(NoiseSchedule::by_name("linear", 1000).unwrap().betas, NoiseSchedule::ddpm(1000).betas);
        assert_eq!(NoiseSchedule::by_name("cosine", 100).unwrap().kind, ScheduleKind::Cosine);
        assert_eq!(NoiseSchedule::by_name("scaled-linear", 100).unwrap().kind, ScheduleKind::ScaledLinear);
        let err = NoiseSchedule::by_name("quadratic", 100).unwrap_err().to_string();
        assert!(SCHEDULE_NAMES.iter().all(|n| err.contains(n)) && err.contains("quadratic"), "{err}");
        assert!(NoiseSchedule::by_name("linear", 20).is_err());
        assert!(NoiseSchedule::by_name("cosine", 0).is_err());
    }
}
