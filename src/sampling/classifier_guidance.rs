//! Guidance by the gradient of a separate network: classifier guidance and CLIP guidance, as an ε-model that wraps
//! an unconditional one, so every sampler takes it (lesson 10).
//!
//! [Guidance] Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", arXiv:2105.05233:
//! sec. 4.1 and Algorithm 1 (DDPM: x_{t−1} ~ N(μ + s Σ ∇ log p_φ(y | x_t), Σ)); sec. 4.2 and Algorithm 2 (DDIM:
//! ε̂ = ε_θ(x_t) − √(1 − ᾱ_t) ∇ log p_φ(y | x_t), with the scale s in front of the gradient as in their sec. 4.3).
//! Bayes: ∇ log p(x_t | y) = ∇ log p(x_t) + ∇ log p(y | x_t), and ε = −√(1 − ᾱ_t) ∇ log p(x_t) ([Guidance] eq. 11).
//! [GLIDE] Nichol et al. 2022, arXiv:2112.10741, sec. 2.3: CLIP guidance replaces the classifier by the dot product
//! of a noised CLIP's image and text embeddings: μ̂ = μ + s Σ ∇ (f(x_t, t) · g(c)).
//! Notation (code -> paper): guide.log_prob -> log p_φ(y | x_t) or f(x_t, t)·g(c), scale -> s, model -> ε_θ.
use crate::diffusion::append_dims;
use crate::diffusion::schedule::NoiseSchedule;
use crate::model::{sigma_of_timestep, sigmas_of_schedule, EpsModel};
use crate::nn::encoder_unet::{EncoderUNet, NoisyClip};
use tch::{Kind, Tensor};

/// What guides: a differentiable log-density of the condition given the noised image, per row.
pub trait Guide {
    /// x_t (B, ...) on the model's VP scale, t (B,) its timesteps -> (B,).
    fn log_prob(&self, x_t: &Tensor, t: &Tensor) -> Tensor;
}

// ANCHOR: gradient
/// ∇ₓ log p(y | x_t) of a guide at x_t (B, ...), by autograd, whatever the caller's grad mode (the samplers run
/// the model without gradients): (B, ...), detached.
pub fn guide_gradient(guide: &dyn Guide, x_t: &Tensor, t: &Tensor) -> Tensor {
    tch::with_grad(|| {
        let x = x_t.detach().set_requires_grad(true);
        // the rows are independent, so the gradient of the sum is each row's own gradient
        let log_p = guide.log_prob(&x, t);
        Tensor::run_backward(&[log_p.sum(log_p.kind())], &[&x], false, false).remove(0)
    })
}
// ANCHOR_END: gradient

/// Which of [Guidance]'s two algorithms the guided ε reproduces.
#[derive(Debug, Clone)]
pub enum GuidanceForm {
    /// Algorithm 2 (the form for DDIM and every σ-space sampler): ε̂ = ε_θ − s √(1 − ᾱ_t) ∇ log p.
    Eps,
    /// Algorithm 1 on DDPM's ancestral sampler over `respaced` (the schedule of the steps taken, from
    /// [`NoiseSchedule::respaced`], with their original `timesteps`) with reverse variance σ_t² = `variance`: the
    /// mean shift s σ_t² ∇ log p, written as the ε shift that moves the posterior mean by exactly that
    /// (module docs of [`crate::sampling::ddpm`]: μ = (x_t − β_t/√(1 − ᾱ_t) ε̂)/√α_t), so
    /// ε̂ = ε_θ − s σ_t² √α_t √(1 − ᾱ_t)/β_t ∇ log p. Exact while x̂₀ is not thresholded.
    Ddpm { respaced: NoiseSchedule, timesteps: Vec<usize>, variance: crate::diffusion::schedule::PosteriorVariance },
}

// ANCHOR: classifier_guidance
/// An unconditional ε-model guided by the gradient of `guide` at scale s ([Guidance] Alg. 1 or 2): an [`EpsModel`],
/// so lesson 04's DDPM sampler and every sampler of lesson 07 (through [`crate::model::EpsDenoiser`]) take it.
pub struct GradientGuidance<'a> {
    pub model: &'a dyn EpsModel,
    pub guide: &'a dyn Guide,
    pub scale: f64,
    pub form: GuidanceForm,
    /// σ_t of the model's training timesteps, ascending: √(1 − ᾱ_t) = σ_t/√(1 + σ_t²) at any (fractional) t.
    sigmas: Vec<f64>,
}

impl<'a> GradientGuidance<'a> {
    /// Algorithm 2's guidance of `model`, trained on `sched`, at scale `scale`.
    pub fn new(model: &'a dyn EpsModel, guide: &'a dyn Guide, sched: &NoiseSchedule, scale: f64) -> Self {
        Self { model, guide, scale, form: GuidanceForm::Eps, sigmas: sigmas_of_schedule(sched) }
    }

    /// The same guidance in Algorithm 1's form ([`GuidanceForm::Ddpm`]).
    pub fn with_form(self, form: GuidanceForm) -> Self {
        Self { form, ..self }
    }

    /// The factor in front of ∇ log p at each row's timestep t (B,): √(1 − ᾱ_t), times σ_t² √α_t/β_t for Alg. 1.
    fn coefficient(&self, t: &Tensor) -> Tensor {
        let ts = Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(tch::Device::Cpu)).expect("t (B,)");
        let c: Vec<f64> = ts
            .iter()
            .map(|&t| {
                let sigma = sigma_of_timestep(&self.sigmas, t);
                let sqrt_one_minus_alpha_bar = sigma / (1.0 + sigma * sigma).sqrt();
                match &self.form {
                    GuidanceForm::Eps => sqrt_one_minus_alpha_bar,
                    GuidanceForm::Ddpm { respaced, timesteps, variance } => {
                        let i = timesteps.iter().position(|&s| s as f64 == t).expect("a timestep of the respacing");
                        let beta = 1.0 - respaced.alpha_bar(i) / respaced.alpha_bar_prev(i);
                        // σ_t² √α_t √(1 − ᾱ_t)/β_t
                        variance.sigma_squared(respaced, i) * (1.0 - beta).sqrt() * sqrt_one_minus_alpha_bar / beta
                    }
                }
            })
            .collect();
        Tensor::from_slice(&c).to_device(t.device())
    }
}

impl EpsModel for GradientGuidance<'_> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
        let eps = self.model.eps(x_t, t, train);
        if self.scale == 0.0 {
            return eps; // the unconditional model, one evaluation
        }
        // ∇ log p(y | x_t): (B, ...)
        let grad = guide_gradient(self.guide, x_t, t).to_kind(eps.kind());
        // (B, 1, ...): √(1 − ᾱ_t), or Alg. 1's coefficient (GuidanceForm::Ddpm)
        let c = append_dims(&self.coefficient(t).to_kind(eps.kind()), &eps);
        // [Guidance] Alg. 2: ε̂ = ε_θ(x_t) − s √(1 − ᾱ_t) ∇ log p_φ(y | x_t)
        eps - c * grad * self.scale
    }
}
// ANCHOR_END: classifier_guidance

// ANCHOR: guides
/// A noise-aware classifier's log p_φ(y | x_t, t) for the labels y (B,) or (1,): [Guidance] sec. 4.
pub struct ClassifierGuide<'a> {
    pub classifier: &'a EncoderUNet,
    pub labels: Tensor,
}

impl Guide for ClassifierGuide<'_> {
    fn log_prob(&self, x_t: &Tensor, t: &Tensor) -> Tensor {
        let b = x_t.size()[0];
        let log_p = self.classifier.forward(x_t, t, false).log_softmax(-1, Kind::Float); // (B, classes)
        let y = self.labels.to_device(x_t.device()).expand([b], false).unsqueeze(1); // (B, 1)
        log_p.gather(1, &y, false).squeeze_dim(1) // (B,)
    }
}

/// [GLIDE] sec. 2.3: the noised CLIP's image embedding f(x_t, t) against the text embeddings g(c) (B or 1, d_e),
/// normalised: exp(t_clip) · f(x_t, t) · g(c), the logit its contrastive loss trained (the temperature only sets the
/// scale's units).
pub struct ClipGuide<'a> {
    pub clip: &'a NoisyClip,
    pub text: Tensor,
}

impl Guide for ClipGuide<'_> {
    fn log_prob(&self, x_t: &Tensor, t: &Tensor) -> Tensor {
        let image = self.clip.encode_image(x_t, t); // (B, d_e), unit rows
        let text = self.text.to_device(x_t.device()).to_kind(image.kind()); // (B or 1, d_e)
        (image * text).sum_dim_intlist(-1, false, Kind::Float) * self.clip.logit_scale().exp()
        // (B,)
    }
}
// ANCHOR_END: guides

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::PosteriorVariance;
    use crate::nn::encoder_unet::EncoderUNetConfig;
    use tch::{Device, Kind};

    /// x₀ | c ~ N(μ_c, s² I) in 2-D with priors π_c: x_t | c ~ N(√ᾱ μ_c, v I), v = ᾱ s² + 1 − ᾱ, so every score and
    /// the exact posterior p(c | x_t) are closed forms.
    struct Mixture {
        mu: [[f64; 2]; 3],
        prior: [f64; 3],
        s2: f64,
        sched: NoiseSchedule,
    }

    impl Mixture {
        /// ᾱ_t (B, 1) in f64.
        fn alpha_bar(&self, t: &Tensor) -> Tensor {
            let ts = Vec::<i64>::try_from(t).unwrap();
            let ab: Vec<f64> = ts.iter().map(|&t| self.sched.alpha_bar(t as usize)).collect();
            Tensor::from_slice(&ab).view([-1, 1])
        }
        fn moments(&self, t: &Tensor, c: usize) -> (Tensor, Tensor) {
            let ab = self.alpha_bar(t); // (B, 1)
            let m = ab.sqrt() * Tensor::from_slice(&self.mu[c]).view([1, 2]); // (B, 2)
            (m, &ab * self.s2 + 1.0 - &ab)
        }
        /// log π_c + log N(x; m_c, v I) for each class: (B, 3).
        fn joint(&self, x: &Tensor, t: &Tensor) -> Tensor {
            let cols: Vec<Tensor> = (0..3)
                .map(|c| {
                    let (m, v) = self.moments(t, c);
                    let sq = (x - m).square().sum_dim_intlist(-1, true, Kind::Double);
                    -sq / (&v * 2.0) - v.log() + self.prior[c].ln()
                })
                .collect();
            Tensor::cat(&cols, 1)
        }
        /// ∇ log p(x_t | c) (B, 2).
        fn class_score(&self, x: &Tensor, t: &Tensor, c: usize) -> Tensor {
            let (m, v) = self.moments(t, c);
            -(x - m) / v
        }
        /// ∇ log p(x_t) = Σ_c p(c | x_t) ∇ log p(x_t | c) (B, 2).
        fn score(&self, x: &Tensor, t: &Tensor) -> Tensor {
            let r = self.joint(x, t).softmax(1, Kind::Double); // (B, 3)
            (0..3).map(|c| r.narrow(1, c, 1) * self.class_score(x, t, c as usize)).fold(x.zeros_like(), |a, b| a + b)
        }
        fn sqrt_one_minus_alpha_bar(&self, t: &Tensor) -> Tensor {
            (-self.alpha_bar(t) + 1.0).sqrt()
        }
    }

    impl EpsModel for Mixture {
        fn eps(&self, x: &Tensor, t: &Tensor, _: bool) -> Tensor {
            -self.sqrt_one_minus_alpha_bar(t) * self.score(x, t) // ε = −√(1 − ᾱ_t) ∇ log p_t
        }
    }

    /// The exact log p(c | x_t) of the mixture.
    struct ExactPosterior<'a>(&'a Mixture, i64);

    impl Guide for ExactPosterior<'_> {
        fn log_prob(&self, x: &Tensor, t: &Tensor) -> Tensor {
            self.0.joint(x, t).log_softmax(1, Kind::Double).select(1, self.1)
        }
    }

    /// Bayes: with the exact p(y | x_t), s = 1 gives the class-conditional ε, −√(1 − ᾱ) ∇ log p(x_t | y); any s
    /// gives the ε of p(x_t) p(y | x_t)^s, −√(1 − ᾱ) ((1 − s) ∇ log p(x_t) + s ∇ log p(x_t | y)).
    #[test]
    fn exact_classifier_guidance_is_the_class_conditional_score_and_tilts_it_at_other_scales() {
        let sched = NoiseSchedule::cosine(1000);
        let oracle = Mixture { mu: [[-1.0, 0.5], [1.5, 1.0], [0.0, -1.5]], prior: [0.5, 0.3, 0.2], s2: 0.1, sched };
        tch::manual_seed(0);
        let x = Tensor::randn([64, 2], (Kind::Double, Device::Cpu)) * 1.5;
        let t = Tensor::randint(1000, [64], (Kind::Int64, Device::Cpu));
        for y in 0..3 {
            let guide = ExactPosterior(&oracle, y);
            let c = oracle.sqrt_one_minus_alpha_bar(&t);
            for s in [1.0, 0.0, 3.0, -0.5] {
                let guided = GradientGuidance::new(&oracle, &guide, &oracle.sched, s).eps(&x, &t, false);
                let tilted = oracle.score(&x, &t) * (1.0 - s) + oracle.class_score(&x, &t, y as usize) * s;
                let err = (guided - -(&c) * tilted).abs().max().double_value(&[]);
                assert!(err < 1e-9, "y = {y}, s = {s}: {err}");
            }
        }
    }

    /// Algorithm 1's form moves DDPM's posterior mean by exactly s σ_t² ∇ log p.
    #[test]
    fn the_ddpm_form_shifts_the_posterior_mean_by_s_sigma_squared_times_the_gradient() {
        let sched = NoiseSchedule::cosine(1000);
        let oracle = Mixture { mu: [[-1.0, 0.5], [1.5, 1.0], [0.0, -1.5]], prior: [0.5, 0.3, 0.2], s2: 0.1, sched };
        let (timesteps, respaced) = oracle.sched.respaced(20);
        let guide = ExactPosterior(&oracle, 1);
        let x = Tensor::randn([8, 2], (Kind::Double, Device::Cpu));
        for variance in [PosteriorVariance::Beta, PosteriorVariance::BetaTilde] {
            let form = GuidanceForm::Ddpm { respaced: respaced.clone(), timesteps: timesteps.clone(), variance };
            let guided = GradientGuidance::new(&oracle, &guide, &oracle.sched, 2.0).with_form(form);
            for i in [1usize, 7, 19] {
                let t = Tensor::full([8], timesteps[i] as i64, (Kind::Int64, Device::Cpu));
                let ab = Tensor::from(respaced.alpha_bar(i));
                let mean = |eps: &Tensor| {
                    let x0 = crate::diffusion::forward::predict_x0_from_eps(&ab, &x, eps);
                    crate::diffusion::forward::posterior_mean(&respaced, i, &x, &x0)
                };
                let shift = guide_gradient(&guide, &x, &t) * (2.0 * variance.sigma_squared(&respaced, i));
                let want = mean(&oracle.eps(&x, &t, false)) + shift;
                let err = (mean(&guided.eps(&x, &t, false)) - want).abs().max().double_value(&[]);
                assert!(err < 1e-9, "{variance:?}, step {i}: {err}");
            }
        }
    }

    /// The CLIP guide is exp(τ) times the cosine of the image and text embeddings, and its gradient matches central
    /// finite differences.
    #[test]
    fn the_clip_guide_is_the_scaled_cosine_and_its_gradient_is_right() {
        tch::manual_seed(6);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let clip = NoisyClip::new(vs.root(), EncoderUNetConfig::tiny(8), 5);
        let text = clip.encode_text(&Tensor::randn([1, 5], (Kind::Float, Device::Cpu))); // (1, 8)
        let guide = ClipGuide { clip: &clip, text: text.shallow_clone() };
        let x = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[50i64, 500]);
        let f = |x: &Tensor| tch::no_grad(|| guide.log_prob(x, &t)).to_kind(Kind::Double);
        let image = tch::no_grad(|| clip.vision_model.forward(&x, &t, false)); // (2, 8), not normalised
        let cosine = (&image * &text).sum_dim_intlist(-1, false, Kind::Double)
            / image.norm_scalaropt_dim(2.0, [-1i64].as_slice(), false).to_kind(Kind::Double);
        let want = cosine * crate::nn::clip::LOGIT_SCALE_INIT.exp();
        assert!((f(&x) - want).abs().max().double_value(&[]) < 1e-4);
        let g = guide_gradient(&guide, &x, &t);
        let (h, v) = (1e-2, Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu)));
        let fd = (f(&(&x + &v * h)) - f(&(&x - &v * h))) / (2.0 * h); // (2,)
        let analytic = (&g * &v).sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Double);
        let rel = ((&fd - &analytic).abs() / analytic.abs().clamp_min(1e-6)).max().double_value(&[]);
        assert!(rel < 2e-2, "finite differences {fd:?} vs the gradient {analytic:?}");
    }

    /// The gradient a trained-or-not noise-aware classifier gives raises log p(y | x_t): a step along it increases
    /// it, and it matches central finite differences along a random direction.
    #[test]
    fn the_classifier_gradient_raises_log_p_of_the_label() {
        tch::manual_seed(5);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let clf = EncoderUNet::new(vs.root(), EncoderUNetConfig::tiny(10));
        let guide = ClassifierGuide { classifier: &clf, labels: Tensor::from_slice(&[3i64]) };
        let x = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[100i64, 600]);
        let g = guide_gradient(&guide, &x, &t);
        let f = |x: &Tensor| tch::no_grad(|| guide.log_prob(x, &t)).to_kind(Kind::Double);
        let h = 1e-2;
        let v = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
        let fd = (f(&(&x + &v * h)) - f(&(&x - &v * h))) / (2.0 * h); // (2,)
        let analytic = (&g * &v).sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Double);
        let rel = ((&fd - &analytic).abs() / analytic.abs().clamp_min(1e-6)).max().double_value(&[]);
        assert!(rel < 2e-2, "finite differences {fd:?} vs the gradient {analytic:?}");
        let step = &g / g.square().sum(Kind::Float).sqrt() * 0.05;
        let gain = (f(&(&x + step)) - f(&x)).min().double_value(&[]);
        assert!(gain > 0.0, "a step along the gradient lowered log p: {gain}");
    }
}
