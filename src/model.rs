//! The traits every network and every sampler share, so that neither depends on the other: what a network
//! predicts ([`EpsModel`], [`CondEpsModel`]) and the one interface samplers call, the denoiser D(x, σ) → x̂₀ in
//! σ-space, with the adapters that turn an ε-, x₀- or v-model (or a score) into one.
//!
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239, eq. 14 (the ε-prediction network ε_θ(x_t, t)).
//! [EDM] Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
//! arXiv:2206.00364 (eq. 1: x = x₀ + σ ε; Table 1: the preconditioning c_skip, c_out, c_in of VP models).
//! [Tweedie] Efron 2011, "Tweedie's Formula and Selection Bias", JASA 106(496): E[x₀ | x] = x + σ² ∇ log p_σ(x).
//! [v-pred] Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", arXiv:2202.00512,
//! sec. 4 and appendix D: v = √ᾱ ε − √(1 − ᾱ) x₀.
//! Notation (code -> paper): x -> x (noised, σ-space), sigma -> σ, denoised -> D(x; σ), eps -> ε̂, c_in -> c_in(σ).
//!
//! Every sampler works in σ-space ("variance exploding"): x = x₀ + σ ε, σ running from σ_max down to 0.
//! A DDPM-style model sees x_vp = √ᾱ_t x₀ + √(1 − ᾱ_t) ε instead; dividing by √ᾱ_t gives x₀ + σ_t ε with
//! σ_t = √((1 − ᾱ_t)/ᾱ_t), so x_vp = x/√(1 + σ²) ([EDM] Table 1, VP: c_in = 1/√(σ² + 1)). Conditioning (a label
//! context, classifier-free guidance) lives inside the model the adapter wraps: [`WithContext`] and
//! [`ClassifierFreeGuidance`] are ordinary [`EpsModel`]s.
//!
//! [`ClassifierFreeGuidance`]: crate::sampling::guidance::ClassifierFreeGuidance
use crate::diffusion::append_dims;
use crate::diffusion::forward::eps_from_v;
use crate::diffusion::schedule::NoiseSchedule;
use std::cell::Cell;
use tch::{Kind, Tensor};

/// A network that predicts the noise ε in x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε from x_t and the timestep t (B,).
pub trait EpsModel {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor;
}

// ANCHOR: cond
/// What a conditional network reads beside x_t and t, τ_θ(y) of [LDM] sec. 3.3: a context sequence (B, L, D) that
/// it cross-attends to (the token states of a prompt, or the embedding of a class label) and, for prompts padded
/// to a fixed length, the key-padding mask (B, L) bool, true for a real token (None: every position is real).
/// A conditioning with batch 1 serves a batch of any size ([`Cond::for_batch`]).
///
/// [LDM] Rombach et al. 2022, arXiv:2112.10752.
#[derive(Debug)]
pub struct Cond {
    pub context: Tensor,
    pub mask: Option<Tensor>,
}

impl Cond {
    /// A context without padding.
    pub fn new(context: Tensor) -> Self {
        Self { context, mask: None }
    }

    /// Token states (B, L, D) with their key-padding mask (B, L).
    pub fn masked(context: Tensor, mask: Tensor) -> Self {
        Self { context, mask: Some(mask) }
    }

    /// Rows of the batch.
    pub fn batch(&self) -> i64 {
        self.context.size()[0]
    }

    /// This conditioning (batch 1 or `b`) for a batch of `b`, expanded without copying.
    pub fn for_batch(&self, b: i64) -> Cond {
        let size = self.context.size();
        assert!(size[0] == b || size[0] == 1, "context batch {} does not match the images' {b}", size[0]);
        let mask = self.mask.as_ref().map(|m| m.expand([b, size[1]], false)); // (B, L)
        Cond { context: self.context.expand([b, size[1], size[2]], false), mask }
        // (B, L, D)
    }

    /// The rows of `parts` in order, as one batch; a part without a mask gets an all-true one when another has one.
    pub fn cat(parts: &[&Cond]) -> Cond {
        let context = Tensor::cat(&parts.iter().map(|c| &c.context).collect::<Vec<_>>(), 0); // (ΣB, L, D)
        let all_real = |c: &Cond| {
            let (b, l) = (c.context.size()[0], c.context.size()[1]);
            Tensor::ones([b, l], (Kind::Bool, c.context.device())) // (B, L)
        };
        let mask = parts.iter().any(|c| c.mask.is_some()).then(|| {
            let masks: Vec<Tensor> =
                parts.iter().map(|c| c.mask.as_ref().map_or_else(|| all_real(c), Tensor::shallow_clone)).collect();
            Tensor::cat(&masks, 0) // (ΣB, L)
        });
        Cond { context, mask }
    }
    // ANCHOR_END: cond

    /// The context in `kind` (bf16 training casts it with the weights); the mask stays as it is.
    pub fn to_kind(&self, kind: Kind) -> Cond {
        Cond { context: self.context.to_kind(kind), mask: self.mask.as_ref().map(Tensor::shallow_clone) }
    }

    /// Another handle on the same tensors.
    pub fn shallow_clone(&self) -> Cond {
        Cond { context: self.context.shallow_clone(), mask: self.mask.as_ref().map(Tensor::shallow_clone) }
    }
}

impl From<Tensor> for Cond {
    fn from(context: Tensor) -> Self {
        Cond::new(context)
    }
}

/// A network that predicts ε from x_t, the timestep t (B,) and a conditioning (B rows) that it reads with
/// cross-attention.
pub trait CondEpsModel {
    fn eps_cond(&self, x_t: &Tensor, t: &Tensor, cond: &Cond, train: bool) -> Tensor;
}

/// A conditional model with its conditioning fixed: an ordinary [`EpsModel`], so the DDPM losses and sampler take it.
pub struct WithContext<'a, M: CondEpsModel + ?Sized> {
    pub model: &'a M,
    /// One conditioning per image of the batches it will see.
    pub cond: &'a Cond,
}

impl<M: CondEpsModel + ?Sized> EpsModel for WithContext<'_, M> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
        self.model.eps_cond(x_t, t, self.cond, train)
    }
}

// ANCHOR: denoiser_trait
/// D(x, σ) → x̂₀: the model's estimate of the clean data from x = x₀ + σ ε, with σ (B,) one level per sample.
pub trait Denoiser {
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor;
}
// ANCHOR_END: denoiser_trait

/// Any closure `(x, sigma) -> x̂₀` is a denoiser.
impl<F: Fn(&Tensor, &Tensor) -> Tensor> Denoiser for F {
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        self(x, sigma)
    }
}

/// σ as a (B,) tensor of x's kind and device, for a batch x (B, ...).
pub fn sigma_like(x: &Tensor, sigma: f64) -> Tensor {
    Tensor::full([x.size()[0]], sigma, (x.kind(), x.device()))
}

/// D(x, σ) at one noise level for the whole batch.
pub fn denoise_at(d: &dyn Denoiser, x: &Tensor, sigma: f64) -> Tensor {
    d.denoise(x, &sigma_like(x, sigma))
}

/// σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0..T−1 (ascending): the σ-space noise level of each training timestep.
pub fn sigmas_of_schedule(sched: &NoiseSchedule) -> Vec<f64> {
    (0..sched.num_steps()).map(|t| sched.sigma(t)).collect()
}

/// What a discrete-time network's output means ([v-pred] sec. 4; diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum Prediction {
    /// ε̂ ([DDPM] eq. 14): x̂₀ = x − σ ε̂ (c_skip = 1, c_out = −σ, [EDM] Table 1).
    Epsilon,
    /// x̂₀ itself.
    Sample,
    /// v̂ = √ᾱ ε − √(1 − ᾱ) x₀: x̂₀ = √ᾱ x_vp − √(1 − ᾱ) v̂ = x/(1 + σ²) − σ/√(1 + σ²) · v̂.
    V,
}

// ANCHOR: v_as_eps
/// A network trained to predict v ([v-pred] sec. 4: v = √ᾱ_t ε − √(1 − ᾱ_t) x₀), read as an ε-prediction model for
/// the samplers that take one: since x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε, ε = √ᾱ_t v + √(1 − ᾱ_t) x_t exactly, and so
/// ε̂ = √ᾱ_t v̂ + √(1 − ᾱ_t) x_t. At large t the ε-sampler's x̂₀ = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t becomes
/// √ᾱ_t x_t − √(1 − ᾱ_t) v̂: no division by √ᾱ_t → 0 amplifies the network's error.
pub struct VAsEps<'a> {
    /// The network, its output v̂ (B, ...).
    pub v_model: &'a dyn EpsModel,
    /// ᾱ_t of its schedule, (T,).
    pub alpha_bar: &'a Tensor,
}

impl EpsModel for VAsEps<'_> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
        let a = self.alpha_bar.index_select(0, &t.to_device(self.alpha_bar.device())); // (B,)
        eps_from_v(&a.to_device(x_t.device()).to_kind(x_t.kind()), x_t, &self.v_model.eps(x_t, t, train))
    }
}
// ANCHOR_END: v_as_eps

/// A discrete-time VP model (an [`EpsModel`], whatever its [`Prediction`]) as a σ-space denoiser.
///
/// The network only knows its T training timesteps, so by default a σ between two of them is mapped to the NEAREST
/// timestep in log σ and the model is called with an integer t. [`Self::with_interpolated_timesteps`] instead passes
/// the fractional t that interpolates log σ linearly (k-diffusion's `DiscreteSchedule.sigma_to_t`, what Stable
/// Diffusion UIs feed SD's UNet, whose sinusoidal time embedding takes any real t). The input is
/// scaled with the requested σ, c_in = 1/√(σ² + 1), and x̂₀ is formed with it too; on the model's own grid (see
/// [`crate::sampling::grids::timestep_sigmas`]) σ is exactly σ_t and the adapter is exact. Grids that fall between
/// timesteps (Karras, log-SNR) see a σ_t up to half a timestep off, which is small for T = 1000.
pub struct EpsDenoiser<'a> {
    pub model: &'a dyn EpsModel,
    pub prediction: Prediction,
    /// σ_t for t = 0..T−1, ascending.
    pub sigmas: Vec<f64>,
    /// log σ_t (T,) f64, for the nearest-timestep lookup.
    log_sigmas: Tensor,
    /// Fractional timesteps (k-diffusion) instead of the nearest integer one.
    interpolate: bool,
}

impl<'a> EpsDenoiser<'a> {
    /// An ε-prediction model trained on `sched`.
    pub fn new(model: &'a dyn EpsModel, sched: &NoiseSchedule) -> Self {
        let sigmas = sigmas_of_schedule(sched);
        let log_sigmas = Tensor::from_slice(&sigmas).log(); // (T,)
        Self { model, prediction: Prediction::Epsilon, sigmas, log_sigmas, interpolate: false }
    }

    /// The same model called with fractional timesteps ([`timestep_of_sigma`]).
    pub fn with_interpolated_timesteps(self) -> Self {
        Self { interpolate: true, ..self }
    }

    /// The same model read as x₀- or v-prediction.
    pub fn with_prediction(self, prediction: Prediction) -> Self {
        Self { prediction, ..self }
    }

    /// σ_min = σ_0 and σ_max = σ_{T−1}: the range a noise grid for this model should span.
    pub fn sigma_range(&self) -> (f64, f64) {
        (self.sigmas[0], *self.sigmas.last().expect("a schedule has at least one step"))
    }

    /// The training timestep nearest to each σ in log σ: (B,) -> (B,) i64; or, interpolating, (B,) f64.
    pub fn timestep(&self, sigma: &Tensor) -> Tensor {
        if self.interpolate {
            let s = Vec::<f64>::try_from(sigma.to_kind(Kind::Double).to_device(tch::Device::Cpu)).expect("σ (B,)");
            let t: Vec<f64> = s.iter().map(|&s| timestep_of_sigma(&self.sigmas, s)).collect();
            return Tensor::from_slice(&t).to_device(sigma.device());
        }
        let log_sigma = sigma.to_kind(Kind::Double).log().unsqueeze(1); // (B, 1)
        let table = self.log_sigmas.to_device(sigma.device()).unsqueeze(0); // (1, T)
        (log_sigma - table).abs().argmin(1, false) // (B,)
    }
}

// ANCHOR: sigma_to_t
/// The fractional timestep of σ on an ascending table σ_t, linear in log σ between its neighbours and clamped to
/// [0, T − 1] (k-diffusion `DiscreteSchedule.sigma_to_t`); [`sigma_of_timestep`] is its inverse.
pub fn timestep_of_sigma(sigmas: &[f64], sigma: f64) -> f64 {
    let log_sigma = sigma.ln();
    // the last t with log σ_t ≤ log σ, kept below T − 1 so that t + 1 exists
    let low = sigmas.iter().rposition(|s| s.ln() <= log_sigma).unwrap_or(0).min(sigmas.len() - 2);
    let (lo, hi) = (sigmas[low].ln(), sigmas[low + 1].ln());
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    low as f64 + w
}

/// σ at a fractional timestep t ∈ [0, T − 1]: log σ interpolated linearly (k-diffusion `t_to_sigma`).
pub fn sigma_of_timestep(sigmas: &[f64], t: f64) -> f64 {
    let low = (t.floor() as usize).min(sigmas.len() - 1);
    let high = (low + 1).min(sigmas.len() - 1);
    let w = t - low as f64;
    ((1.0 - w) * sigmas[low].ln() + w * sigmas[high].ln()).exp()
}
// ANCHOR_END: sigma_to_t

// ANCHOR: eps_denoiser
impl Denoiser for EpsDenoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        // t: (B,), s: (B, 1, ...)
        let (t, s) = (self.timestep(sigma), append_dims(sigma, x));
        // [EDM] Table 1, VP: c_in(σ) = 1/√(σ² + 1), i.e. x_vp = √ᾱ x
        let c_in = (s.square() + 1.0).rsqrt();
        let out = self.model.eps(&(x * &c_in), &t, false);
        match self.prediction {
            // [EDM] Table 1, VP: c_skip = 1, c_out = −σ:  x̂₀ = x − σ ε̂
            Prediction::Epsilon => x - s * out,
            Prediction::Sample => out,
            // [v-pred] x̂₀ = √ᾱ x_vp − √(1 − ᾱ) v̂ with √ᾱ = c_in, √(1 − ᾱ) = σ c_in, x_vp = c_in x
            Prediction::V => x * c_in.square() - s * c_in * out,
        }
    }
}
// ANCHOR_END: eps_denoiser

/// A σ-conditioned score model s_θ(x, σ) ≈ ∇ log p_σ(x) (lesson 02's NCSN or score MLP) as a denoiser, by
/// Tweedie's formula ([Tweedie] eq. 2.8):  x̂₀ = x + σ² s_θ(x, σ).
/// E.g. `ScoreDenoiser(|x: &Tensor, s: &Tensor| ncsn.score(x, s, false))`.
pub struct ScoreDenoiser<F: Fn(&Tensor, &Tensor) -> Tensor>(pub F);

impl<F: Fn(&Tensor, &Tensor) -> Tensor> Denoiser for ScoreDenoiser<F> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        let s = append_dims(sigma, x); // (B, 1, ...)
        x + s.square() * (self.0)(x, sigma)
    }
}

/// Counts the network evaluations (NFE) a sampler makes, one per call whatever the batch size.
pub struct CountingDenoiser<'a> {
    pub inner: &'a dyn Denoiser,
    pub calls: Cell<usize>,
}

impl<'a> CountingDenoiser<'a> {
    pub fn new(inner: &'a dyn Denoiser) -> Self {
        Self { inner, calls: Cell::new(0) }
    }
}

impl Denoiser for CountingDenoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        self.calls.set(self.calls.get() + 1);
        self.inner.denoise(x, sigma)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::forward::v_from_eps;

    /// The network that outputs the true v = √ᾱ_t ε − √(1 − ᾱ_t) x₀ of a known draw.
    struct TrueV {
        x0: Tensor,
        eps: Tensor,
        alpha_bar: Tensor,
    }
    impl EpsModel for TrueV {
        fn eps(&self, _: &Tensor, t: &Tensor, _: bool) -> Tensor {
            v_from_eps(&self.alpha_bar.index_select(0, t), &self.x0, &self.eps)
        }
    }

    /// [v-pred] sec. 4: read through [`VAsEps`], the true v gives back the true ε at every t, the largest included
    /// (where ᾱ_t ≈ 4·10⁻⁵).
    #[test]
    fn v_read_as_eps_is_the_noise() {
        let sched = NoiseSchedule::ddpm(1000);
        let alpha_bar = sched.to_tensor_alpha_bar(tch::Device::Cpu);
        let (x0, eps) = (
            Tensor::rand([4, 1, 3, 3], tch::kind::FLOAT_CPU) * 2.0 - 1.0,
            Tensor::randn([4, 1, 3, 3], tch::kind::FLOAT_CPU),
        );
        let t = Tensor::from_slice(&[0i64, 10, 500, 999]);
        let x_t = crate::diffusion::forward::q_sample(&alpha_bar, &x0, &t, &eps);
        let v_model = TrueV { x0: x0.shallow_clone(), eps: eps.shallow_clone(), alpha_bar: alpha_bar.shallow_clone() };
        let eps_hat = VAsEps { v_model: &v_model, alpha_bar: &alpha_bar }.eps(&x_t, &t, false);
        assert!(
            eps_hat.allclose(&eps, 1e-5, 1e-5, false),
            "max error {}",
            (&eps_hat - &eps).abs().max().double_value(&[])
        );
    }

    #[test]
    fn conditionings_expand_and_concatenate_with_their_masks() {
        let opts = (Kind::Float, tch::Device::Cpu);
        let text = Cond::masked(Tensor::randn([1, 3, 2], opts), Tensor::from_slice(&[true, true, false]).view([1, 3]));
        let label = Cond::new(Tensor::randn([2, 3, 2], opts));
        let wide = text.for_batch(2);
        assert_eq!((wide.context.size(), wide.mask.as_ref().unwrap().size()), (vec![2, 3, 2], vec![2, 3]));
        let both = Cond::cat(&[&wide, &label]);
        assert_eq!(both.batch(), 4);
        let mask = Vec::<bool>::try_from(both.mask.unwrap().flatten(0, -1)).unwrap();
        assert_eq!(mask, [true, true, false, true, true, false, true, true, true, true, true, true]);
        assert!(Cond::cat(&[&label, &label]).mask.is_none(), "no masks in, none out");
        assert_eq!(text.to_kind(Kind::BFloat16).context.kind(), Kind::BFloat16);
    }

    #[test]
    fn fractional_timesteps_invert_the_log_sigma_interpolation() {
        let sigmas = sigmas_of_schedule(&NoiseSchedule::scaled_linear(1000));
        for t in [0.0, 0.25, 1.0, 250.5, 998.75, 999.0] {
            let s = sigma_of_timestep(&sigmas, t);
            assert!((timestep_of_sigma(&sigmas, s) - t).abs() < 1e-9, "t = {t}");
        }
        // on the table: the integer timestep itself; outside it: clamped to the ends
        assert_eq!(timestep_of_sigma(&sigmas, sigmas[751]), 751.0);
        assert_eq!(timestep_of_sigma(&sigmas, 1e-4), 0.0);
        assert_eq!(timestep_of_sigma(&sigmas, 1e3), 999.0);
    }

    /// Tweedie: for x₀ ~ N(μ, s²) the exact score −(x − μ)/(s² + σ²) gives the exact posterior mean.
    #[test]
    fn score_adapter_is_tweedie() {
        let (mu, s2) = (0.7, 0.25);
        let d = ScoreDenoiser(|x: &Tensor, sigma: &Tensor| -(x - mu) / (sigma.view([-1, 1]).square() + s2));
        let x = Tensor::from_slice(&[1.0f64, -2.0, 3.0, 0.5]).view([2, 2]); // (B, D)
        let sigma = Tensor::from_slice(&[0.5f64, 2.0]);
        let want = (&x - mu) * (s2 / Tensor::from_slice(&[s2 + 0.25, s2 + 4.0]).view([2, 1])) + mu;
        assert!((d.denoise(&x, &sigma) - want).abs().max().double_value(&[]) < 1e-12);
    }
}
