//! Training and sampling an ε-prediction model with DDPM, shared by lessons 03 (an MLP) and 04 (a UNet), so the two
//! differ only in the network.
//!
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239. Notation (code -> paper): alpha_bar -> ᾱ_t, eps -> ε,
//! eps_hat -> ε_θ(x_t, t), x0 -> x₀.
use crate::diffusion::forward::{q_sample, v_from_eps};
use crate::diffusion::schedule::{NoiseSchedule, ScheduleKind};
use crate::model::EpsModel;
use crate::train::trainer::TrainRun;
use crate::train::trainer::{train_model, TrainOutcome, TrainerConfig};
use anyhow::Result;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

/// How the squared noise errors of different timesteps are weighted in the loss.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum LossWeight {
    /// Every timestep weighs the same: L_simple, [DDPM] eq. 14.
    Uniform,
    /// [MinSNR] w_t = min(SNR_t, γ)/SNR_t with γ = MIN_SNR_GAMMA: the nearly clean timesteps (SNR_t > γ), whose
    /// large but unimportant errors dominate L_simple's gradient, are scaled down; the rest keep weight 1.
    MinSnr,
}

/// [MinSNR] Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", arXiv:2303.09556:
/// the paper's γ = 5.
pub const MIN_SNR_GAMMA: f64 = 5.0;

// ANCHOR: weighted_loss
impl LossWeight {
    /// The weight of each timestep, (T,), from ᾱ (T,): SNR_t = ᾱ_t / (1 − ᾱ_t).
    pub fn weights(self, alpha_bar: &Tensor) -> Tensor {
        match self {
            LossWeight::Uniform => alpha_bar.ones_like(),
            LossWeight::MinSnr => {
                let snr: Tensor = alpha_bar / (1.0 - alpha_bar); // (T,)
                snr.clamp_max(MIN_SNR_GAMMA) / &snr // [MinSNR] min(SNR_t, γ) / SNR_t
            }
        }
    }
}

/// The weighted objective: E_t[w_t ‖ε − ε_θ(x_t, t)‖²] with `weights` (T,) from [`LossWeight::weights`]
/// (all ones: L_simple itself).
pub fn weighted_eps_loss(model: &dyn EpsModel, alpha_bar: &Tensor, weights: &Tensor, x0: &Tensor) -> Tensor {
    let t = Tensor::randint(alpha_bar.size()[0], [x0.size()[0]], (Kind::Int64, x0.device())); // (B,)
    let eps = x0.randn_like();
    let x_t = q_sample(&alpha_bar.to_kind(x0.kind()), x0, &t, &eps); // [DDPM] eq. 4
    let squared = (eps - model.eps(&x_t, &t, true)).square().to_kind(Kind::Float); // (B, C, H, W)
    let per_image = squared.flatten(1, -1).mean_dim(1, false, Kind::Float); // (B,)
    (per_image * weights.index_select(0, &t)).mean(Kind::Float)
}
// ANCHOR_END: weighted_loss

// ANCHOR: l_simple
/// [DDPM] eq. 14, L_simple(θ) = E_{t, x₀, ε} ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖², with t uniform on {0, …, T−1}
/// ([DDPM] Algorithm 1): the mean over pixels and batch of the squared error of the predicted noise.
pub fn l_simple(model: &dyn EpsModel, alpha_bar: &Tensor, x0: &Tensor) -> Tensor {
    let t = Tensor::randint(alpha_bar.size()[0], [x0.size()[0]], (Kind::Int64, x0.device())); // (B,)
    let eps = x0.randn_like();
    let x_t = q_sample(&alpha_bar.to_kind(x0.kind()), x0, &t, &eps); // [DDPM] eq. 4
    (eps - model.eps(&x_t, &t, true)).square().to_kind(Kind::Float).mean(Kind::Float)
}
// ANCHOR_END: l_simple

// ANCHOR: l_simple_v
/// [v-pred] sec. 4 (arXiv:2202.00512): the same expectation with the network's output read as v̂ and the target
/// v = √ᾱ_t ε − √(1 − ᾱ_t) x₀, E_{t, x₀, ε} ‖v − v̂_θ(x_t, t)‖², t uniform on {0, …, T−1}. In x₀ terms this is
/// (1 + SNR_t)·‖x₀ − x̂₀‖² (what [v-pred] sec. 4 calls "SNR+1" weighting), so unlike L_simple (SNR_t·‖x₀ − x̂₀‖²)
/// it keeps a weight on x̂₀ at the largest t. [`crate::model::VAsEps`] samples such a model with the ε samplers.
pub fn l_simple_v(model: &dyn EpsModel, alpha_bar: &Tensor, x0: &Tensor) -> Tensor {
    let t = Tensor::randint(alpha_bar.size()[0], [x0.size()[0]], (Kind::Int64, x0.device())); // (B,)
    let eps = x0.randn_like();
    let alpha_bar = alpha_bar.to_kind(x0.kind());
    let x_t = q_sample(&alpha_bar, x0, &t, &eps); // [DDPM] eq. 4
    let a = alpha_bar.index_select(0, &t.to_device(alpha_bar.device())).to_device(x0.device()); // (B,)
    let v = v_from_eps(&a, x0, &eps); // (B, C, H, W)
    (v - model.eps(&x_t, &t, true)).square().to_kind(Kind::Float).mean(Kind::Float)
}
// ANCHOR_END: l_simple_v

/// The ε-prediction objective of a schedule and a weighting, ready to evaluate on batches: ᾱ (T,) and w_t (T,) on
/// the device, computed once.
pub struct EpsObjective {
    pub alpha_bar: Tensor,
    weights: Tensor,
    weight: LossWeight,
    schedule: &'static str,
}

impl EpsObjective {
    pub fn new(sched: &NoiseSchedule, weight: LossWeight, device: Device) -> Self {
        let alpha_bar = sched.to_tensor_alpha_bar(device); // (T,)
        let weights = weight.weights(&alpha_bar.to_kind(Kind::Double)).to_kind(Kind::Float); // (T,)
        let schedule = match sched.kind {
            ScheduleKind::Linear => "linear", // the names of `NoiseSchedule::by_name` and --schedule
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::ScaledLinear => "scaled-linear",
        };
        Self { alpha_bar, weights, weight, schedule }
    }

    /// Records what decides this objective in the run's [`crate::train::trainer::RunSpec`]: the schedule, T and the
    /// loss weighting, so a resume with another `--schedule`, `--timesteps` or `--loss-weight` is refused.
    pub fn record<'a>(&self, run: TrainRun<'a>) -> TrainRun<'a> {
        run.spec("schedule", self.schedule).spec("timesteps", self.alpha_bar.size()[0]).spec("loss_weight", self.weight)
    }

    /// Whether every timestep weighs the same (L_simple).
    pub fn is_uniform(&self) -> bool {
        self.weight == LossWeight::Uniform
    }

    /// L_simple for uniform weights, the weighted loss otherwise, on clean images `x0`.
    pub fn loss(&self, model: &dyn EpsModel, x0: &Tensor) -> Tensor {
        match self.weight {
            LossWeight::Uniform => l_simple(model, &self.alpha_bar, x0),
            _ => weighted_eps_loss(model, &self.alpha_bar, &self.weights, x0),
        }
    }
}

/// What [`train_eps_model`] calls at its snapshot steps: (step, the model with its current weights).
pub type Snapshot<'a> = dyn FnMut(usize, &dyn EpsModel) + 'a;

/// Builds the model with `build` on a fresh VarStore (and a bf16 copy when `cfg.bf16`), trains it with L_simple on
/// `images` (N, C, H, W, scaled to [−1, 1]) through the shared trainer, and returns the f32 VarStore holding the
/// EMA weights (or the last weights without EMA), the model on it, and the training outcome.
/// At each step in `snapshot_at`, `on_snapshot(step, model)` sees the current (f32, not averaged) weights, after
/// that step's loss is computed: the trainer re-seeds the noise at every step, so what it draws changes nothing.
/// The objective's settings go into the checkpoint's run spec; the caller adds the model's config
/// (`run.spec("model", &config)`), which `build` hides from this function.
pub fn train_eps_model<M: EpsModel>(
    build: impl Fn(nn::Path) -> M,
    images: &Tensor,
    objective: &EpsObjective,
    cfg: &TrainerConfig,
    run: TrainRun,
    (snapshot_at, on_snapshot): (&[usize], &mut Snapshot),
) -> Result<(VarStore, M, TrainOutcome)> {
    let kind = if cfg.bf16 { Kind::BFloat16 } else { Kind::Float };
    let mut loss_fn = |net: &M, model: &M, batch: &[Tensor], step: usize| {
        let loss = objective.loss(net, &batch[0].to_kind(kind));
        if snapshot_at.contains(&step) {
            tch::no_grad(|| on_snapshot(step, model));
        }
        loss
    };
    train_model(build, &[images], cfg, objective.record(run), &mut loss_fn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::ddpm::sample;
    use crate::sampling::ddpm::AncestralSampling;
    use crate::sampling::ddpm::PosteriorVariance;
    use crate::sampling::wrappers::Threshold;
    use tch::Device;

    /// An exact ε-predictor for x₀ ~ N(μ, s²): E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ).
    struct GaussianOracle {
        mu: f64,
        s2: f64,
        alpha_bar: Tensor,
    }
    impl EpsModel for GaussianOracle {
        fn eps(&self, x_t: &Tensor, t: &Tensor, _: bool) -> Tensor {
            let ab = crate::diffusion::append_dims(&self.alpha_bar.index_select(0, t), x_t).to_kind(x_t.kind());
            let one_minus: Tensor = 1.0 - &ab;
            one_minus.sqrt() * (x_t - ab.sqrt() * self.mu) / (&ab * self.s2 + &one_minus)
        }
    }

    /// [v-pred] sec. 4's target: for x₀ = c everywhere and a network that outputs 0, the v-loss is E‖v‖² =
    /// mean over t of ᾱ_t + (1 − ᾱ_t) c², since v = √ᾱ_t ε − √(1 − ᾱ_t) c with E ε² = 1.
    #[test]
    fn the_v_loss_regresses_sqrt_alpha_bar_eps_minus_sqrt_one_minus_alpha_bar_x0() {
        tch::manual_seed(0);
        let sched = NoiseSchedule::ddpm(1000);
        let alpha_bar = sched.to_tensor_alpha_bar(Device::Cpu);
        struct Zero;
        impl EpsModel for Zero {
            fn eps(&self, x_t: &Tensor, _: &Tensor, _: bool) -> Tensor {
                x_t.zeros_like()
            }
        }
        let c = 0.8;
        let x0 = Tensor::full([50_000, 1, 2, 2], c, tch::kind::FLOAT_CPU);
        let loss = l_simple_v(&Zero, &alpha_bar, &x0).double_value(&[]);
        let expected = (0..1000).map(|t| sched.alpha_bar(t) * (1.0 - c * c) + c * c).sum::<f64>() / 1000.0;
        assert!((loss - expected).abs() < 0.01, "v-loss {loss}, expected {expected}");
    }

    /// With the exact predictor L_simple is the unexplained variance of ε, averaged over t:
    /// Var(ε | x_t) = ᾱ s²/(ᾱ s² + 1 − ᾱ) per pixel.
    #[test]
    fn l_simple_of_the_exact_predictor_is_the_irreducible_noise() {
        tch::manual_seed(0);
        let sched = NoiseSchedule::ddpm(1000);
        let ab = sched.to_tensor_alpha_bar(Device::Cpu);
        let (mu, s2) = (0.3, 0.25);
        let oracle = GaussianOracle { mu, s2, alpha_bar: ab.shallow_clone() };
        let x0 = Tensor::randn([200_000, 1], (Kind::Float, Device::Cpu)) * s2.sqrt() + mu;
        let loss = l_simple(&oracle, &ab, &x0).double_value(&[]);
        let want: f64 = (0..1000)
            .map(|t| {
                let a = sched.alpha_bar(t);
                a * s2 / (a * s2 + 1.0 - a)
            })
            .sum::<f64>()
            / 1000.0;
        assert!((loss - want).abs() < 0.01, "{loss} vs {want}");
    }

    #[test]
    fn min_snr_weights_follow_their_formula_and_uniform_is_one() {
        let sched = NoiseSchedule::ddpm(1000);
        let ab = Tensor::from_slice(&(0..1000).map(|t| sched.alpha_bar(t)).collect::<Vec<f64>>()); // (T,) f64
        let w = LossWeight::MinSnr.weights(&ab);
        for t in [0usize, 50, 200, 600, 999] {
            let snr = sched.alpha_bar(t) / (1.0 - sched.alpha_bar(t));
            let want = snr.min(MIN_SNR_GAMMA) / snr;
            assert!((w.double_value(&[t as i64]) - want).abs() < 1e-9 * want.max(1.0), "t={t}");
        }
        // noisy timesteps (SNR ≤ γ) keep weight 1, clean ones are scaled down
        assert_eq!(w.double_value(&[999]), 1.0);
        assert!(w.double_value(&[0]) < 0.01);
        assert_eq!(LossWeight::Uniform.weights(&ab).sum(Kind::Double).double_value(&[]), 1000.0);
    }

    #[test]
    fn the_uniformly_weighted_loss_is_l_simple() {
        let sched = NoiseSchedule::ddpm(1000);
        let ab = sched.to_tensor_alpha_bar(Device::Cpu);
        let oracle = GaussianOracle { mu: 0.3, s2: 0.25, alpha_bar: ab.shallow_clone() };
        let x0 = Tensor::randn([64, 3], (Kind::Float, Device::Cpu));
        tch::manual_seed(5);
        let a = l_simple(&oracle, &ab, &x0).double_value(&[]);
        tch::manual_seed(5);
        let b = weighted_eps_loss(&oracle, &ab, &LossWeight::Uniform.weights(&ab), &x0).double_value(&[]);
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    #[test]
    fn sampling_with_the_oracle_recovers_the_gaussian_in_batches() {
        tch::manual_seed(1);
        let sched = NoiseSchedule::ddpm(1000);
        let oracle = GaussianOracle { mu: -0.5, s2: 0.09, alpha_bar: sched.to_tensor_alpha_bar(Device::Cpu) };
        let mut calls = 0;
        // σ_t² = β_t: at 100 respaced steps it over-disperses this data by a few per cent, while β̃_t would
        // under-disperse it by over 10 % (see the oracle tests in src/sampling/ddpm.rs)
        let x = sample(
            &oracle,
            &sched,
            &[6000, 1],
            &AncestralSampling {
                steps: 100,
                variance: PosteriorVariance::Beta,
                threshold: Threshold::None,
                batch: 2500,
            },
            Device::Cpu,
            &mut |_, _| calls += 1,
        );
        assert_eq!(calls, 3 * 100, "three batches of 100 steps");
        let (m, v) = (x.mean(Kind::Double).double_value(&[]), x.var(true).double_value(&[]));
        // mean exact to Monte-Carlo error; variance over-dispersed by β_t, less than 10 % here
        assert!((m + 0.5).abs() < 0.02 && (0.97..1.10).contains(&(v / 0.09)), "{m} {v}");
    }
}
