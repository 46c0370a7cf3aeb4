//! Classifier-free guidance as an ε-model that wraps a conditional one (lesson 05's study of what it trades is
//! [`crate::studies::guidance`]).
//!
//! [CFG] Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598, eq. 6:
//! ε̃_θ(z, c) = (1 + w') ε_θ(z, c) − w' ε_θ(z). We use Stable Diffusion's convention (the CompVis/diffusers
//! `guidance_scale`), w = 1 + w':  ε̃ = ε_∅ + w · (ε_c − ε_∅), so w = 1 is the conditional model, w = 0 the
//! unconditional one, and w > 1 guides.
//! [Guidance] Dhariwal & Nichol 2021, arXiv:2105.05233, sec. 4: with ε = −σ_t ∇log p_t, the guided ε is the ε of
//! p_t(x) p_t(c | x)^w: ∇log p_t(x | c) = ∇log p_t(x) + ∇log p_t(c | x) (Bayes), and guidance scales the second term.
//! Notation (code -> paper): eps_cond -> ε_θ(z, c); eps_uncond -> ε_θ(z) = ε_θ(z, ∅); scale -> w (= 1 + w' of [CFG]).
use crate::model::{Cond, CondEpsModel, EpsModel};
use crate::nn::class_cond::LabelConditioned;
use tch::Tensor;

/// Largest |w| the pipelines accept: the web UIs stop at 30; at 10¹⁵ the images came out grey, at 10²⁰ black.
pub const MAX_SCALE: f64 = 100.0;

/// ε̃ = ε_∅ + w (ε_c − ε_∅) from a conditional model and two conditionings, batch 1 or B each: one for the
/// condition, one for ∅. A conditioning with batch 1 serves every image.
pub struct ClassifierFreeGuidance<'a, M: CondEpsModel + ?Sized> {
    pub model: &'a M,
    pub cond: Cond,
    pub uncond: Cond,
    pub scale: f64,
}

impl<'a, M: CondEpsModel + ?Sized> ClassifierFreeGuidance<'a, M> {
    /// `cond` and `uncond`: [`Cond`]s, or bare contexts (B or 1, L, D).
    pub fn new(model: &'a M, cond: impl Into<Cond>, uncond: impl Into<Cond>, scale: f64) -> Self {
        let (cond, uncond) = (cond.into(), uncond.into());
        assert_eq!(cond.context.size()[1..], uncond.context.size()[1..], "both contexts need the same (L, D)");
        Self { model, cond, uncond, scale }
    }
}

impl<M: CondEpsModel> LabelConditioned<M> {
    /// The guided model for one class `label` at scale `w`: contexts τ_θ(label) and τ_θ(∅), batch 1 each.
    pub fn guided(&self, label: i64, scale: f64) -> ClassifierFreeGuidance<'_, M> {
        let cond = self.labels.forward(&Tensor::from_slice(&[label])); // (1, tokens, dim)
        ClassifierFreeGuidance::new(&self.net, cond, self.labels.null_context(1), scale)
    }
}

// ANCHOR: cfg_eps
impl<M: CondEpsModel + ?Sized> EpsModel for ClassifierFreeGuidance<'_, M> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
        let b = x_t.size()[0];
        let (cond, uncond) = (self.cond.for_batch(b), self.uncond.for_batch(b));
        // w = 1 and w = 0 need one network evaluation, and give ε_c and ε_∅ exactly
        if self.scale == 1.0 {
            return self.model.eps_cond(x_t, t, &cond, train);
        }
        if self.scale == 0.0 {
            return self.model.eps_cond(x_t, t, &uncond, train);
        }
        // both branches in one batch of 2B: rows 0..B unconditional, B..2B conditional
        let x2 = Tensor::cat(&[x_t, x_t], 0); // (2B, C, H, W)
        let t2 = Tensor::cat(&[t, t], 0); // (2B,)
        let both = Cond::cat(&[&uncond, &cond]); // (2B, L, D), and the masks (2B, L) when there are any
        let eps = self.model.eps_cond(&x2, &t2, &both, train).chunk(2, 0);
        // (B, C, H, W) each
        cfg_combine(&eps[0], &eps[1], self.scale)
    }
}

/// [CFG] eq. 6 with w = 1 + w': ε̃ = ε_∅ + w (ε_c − ε_∅), from the two branches' predictions.
pub fn cfg_combine(eps_uncond: &Tensor, eps_cond: &Tensor, w: f64) -> Tensor {
    eps_uncond + (eps_cond - eps_uncond) * w
}
// ANCHOR_END: cfg_eps

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The exact ε of 1-D data x₀ | c ~ N(μ_c, s²) for two equally likely classes at one noise level ᾱ: the context
    /// (B, 1, 1) holds the class, or −1 for ∅ (then the ε of the two-class mixture).
    struct TwoGaussians {
        mu: [f64; 2],
        s2: f64,
        alpha_bar: f64,
    }

    impl TwoGaussians {
        /// Mean m_c = √ᾱ μ_c and variance v = ᾱ s² + 1 − ᾱ of x_t | c.
        fn moments(&self, c: usize) -> (f64, f64) {
            (self.alpha_bar.sqrt() * self.mu[c], self.alpha_bar * self.s2 + 1.0 - self.alpha_bar)
        }
        /// log p(x_t | c) up to a constant shared by both classes: (B, 1).
        fn log_lik(&self, x: &Tensor, c: usize) -> Tensor {
            let (m, v) = self.moments(c);
            -(x - m).square() / (2.0 * v)
        }
        /// ∇log p(x_t | c) (B, 1).
        fn score(&self, x: &Tensor, c: usize) -> Tensor {
            let (m, v) = self.moments(c);
            -(x - m) / v
        }
    }

    impl CondEpsModel for TwoGaussians {
        fn eps_cond(&self, x: &Tensor, _t: &Tensor, cond: &Cond, _: bool) -> Tensor {
            let sigma = (1.0 - self.alpha_bar).sqrt();
            // (B, 1)
            let c = cond.context.view([-1, 1]);
            // p(c | x_t) for the mixture: softmax of the log-likelihoods (equal priors)
            let r = Tensor::cat(&[self.log_lik(x, 0), self.log_lik(x, 1)], 1).softmax(1, Kind::Double); // (B, 2)
            let mixture = r.narrow(1, 0, 1) * self.score(x, 0) + r.narrow(1, 1, 1) * self.score(x, 1);
            let score = mixture.where_self(&c.lt(0.0), &self.score(x, 1).where_self(&c.eq(1.0), &self.score(x, 0)));
            -score * sigma // ε = −σ_t ∇log p_t
        }
    }

    fn ctx(v: f64) -> Tensor {
        Tensor::from_slice(&[v]).view([1, 1, 1])
    }

    #[test]
    fn scale_one_is_the_conditional_model_and_zero_the_unconditional_exactly() {
        tch::manual_seed(0);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let net = crate::nn::unet::UNet::new(vs.root(), crate::nn::unet::UNetConfig::tiny_cond(6));
        let opts = (Kind::Float, Device::Cpu);
        let (x, t) = (Tensor::randn([3, 1, 16, 16], opts), Tensor::from_slice(&[5i64, 400, 900]));
        let (c, u) = (Tensor::randn([1, 4, 6], opts), Tensor::randn([1, 4, 6], opts));
        let guided = |w: f64| ClassifierFreeGuidance::new(&net, c.copy(), u.copy(), w).eps(&x, &t, false);
        let (eps_c, eps_u) = (
            net.eps_cond(&x, &t, &Cond::new(c.expand([3, 4, 6], false)), false),
            net.eps_cond(&x, &t, &Cond::new(u.expand([3, 4, 6], false)), false),
        );
        assert!(guided(1.0).equal(&eps_c));
        assert!(guided(0.0).equal(&eps_u));
        // the batched 2B evaluation is linear in w: ε̃(w) = ε_∅ + w (ε_c − ε_∅), to f32 round-off of ε's size
        let size = eps_c.abs().max().double_value(&[]).max(eps_u.abs().max().double_value(&[]));
        for w in [-1.0, 0.5, 2.0, 7.5] {
            let want = &eps_u + (&eps_c - &eps_u) * w;
            let diff = (guided(w) - want).abs().max().double_value(&[]);
            assert!(diff < 1e-5 * size * (1.0 + w.abs()), "w = {w}: {diff} (|ε| up to {size})");
        }
        // a context per image works as well as one shared by all
        let per_image = ClassifierFreeGuidance::new(&net, c.expand([3, 4, 6], false).copy(), u.copy(), 1.0);
        assert!(per_image.eps(&x, &t, false).equal(&eps_c));
    }

    /// Bayes: ∇log p(x | c) = ∇log p(x) + ∇log p(c | x). The guided ε at scale w is the ε of p(x) p(c | x)^w,
    /// −σ (∇log p(x) + w ∇log p(c | x)), with ∇log p(c | x) computed by autograd from the class posterior.
    #[test]
    fn guided_eps_is_the_eps_of_the_prior_times_the_classifier_to_the_power_w() {
        let oracle = TwoGaussians { mu: [-1.0, 1.5], s2: 0.2, alpha_bar: 0.4 };
        let sigma = (1.0 - oracle.alpha_bar).sqrt();
        let x = Tensor::linspace(-3.0, 3.0, 13, (Kind::Double, Device::Cpu)).view([13, 1]).set_requires_grad(true);
        let t = Tensor::zeros([13], (Kind::Int64, Device::Cpu));
        // log p(c = 1 | x) and its gradient
        let log_post = Tensor::cat(&[oracle.log_lik(&x, 0), oracle.log_lik(&x, 1)], 1)
            .log_softmax(1, Kind::Double)
            .narrow(1, 1, 1);
        let grad_log_post = Tensor::run_backward(&[log_post.sum(Kind::Double)], &[&x], false, false)[0].detach();
        let x = x.detach();
        let eps_uncond = oracle.eps_cond(&x, &t, &Cond::new(ctx(-1.0).expand([13, 1, 1], false)), false);
        for w in [0.0, 1.0, 3.0] {
            let guided = ClassifierFreeGuidance::new(&oracle, ctx(1.0), ctx(-1.0), w).eps(&x, &t, false);
            let want = &eps_uncond - &grad_log_post * (w * sigma); // −σ(∇log p(x) + w ∇log p(c | x))
            assert!((guided - want).abs().max().double_value(&[]) < 1e-9, "w = {w}");
        }
    }
}
