//! Classifier-free guidance as an ε-model that wraps a conditional one, and the two numbers that show what it trades:
//! how often the samples are the class asked for, and how varied they are within a class.
//!
//! [CFG] Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598, eq. 6:
//! ε̃_θ(z, c) = (1 + w') ε_θ(z, c) − w' ε_θ(z). We use Stable Diffusion's convention (the CompVis/diffusers
//! `guidance_scale`), w = 1 + w':  ε̃ = ε_∅ + w · (ε_c − ε_∅), so w = 1 is the conditional model, w = 0 the
//! unconditional one, and w > 1 guides.
//! [Guidance] Dhariwal & Nichol 2021, arXiv:2105.05233, sec. 4: with ε = −σ_t ∇log p_t, the guided ε is the ε of
//! p_t(x) p_t(c | x)^w: ∇log p_t(x | c) = ∇log p_t(x) + ∇log p_t(c | x) (Bayes), and guidance scales the second term.
//! Notation (code -> paper): eps_cond -> ε_θ(z, c); eps_uncond -> ε_θ(z) = ε_θ(z, ∅); scale -> w (= 1 + w' of [CFG]).
use crate::eval::classifier::MnistClassifier;
use crate::eval::frechet::{evaluate_samples, SampleReport};
use crate::plot::{self, LinePanel};
use crate::train::conditional::{CondEpsModel, LabelConditioned};
use crate::train::ddpm::EpsModel;
use anyhow::Result;
use std::path::Path;
use tch::{Kind, Tensor};

/// ε̃ = ε_∅ + w (ε_c − ε_∅) from a conditional model and two contexts, (1 or B, L, D) each: one for the condition,
/// one for ∅. A context with batch 1 serves every image.
pub struct ClassifierFreeGuidance<'a, M: CondEpsModel + ?Sized> {
    pub model: &'a M,
    pub cond: Tensor,
    pub uncond: Tensor,
    pub scale: f64,
}

impl<'a, M: CondEpsModel + ?Sized> ClassifierFreeGuidance<'a, M> {
    pub fn new(model: &'a M, cond: Tensor, uncond: Tensor, scale: f64) -> Self {
        assert_eq!(cond.size()[1..], uncond.size()[1..], "both contexts need the same (L, D)");
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

/// A context (1 or B, L, D) for a batch of `b`.
fn for_batch(context: &Tensor, b: i64) -> Tensor {
    let size = context.size();
    assert!(size[0] == b || size[0] == 1, "context batch {} does not match the images' {b}", size[0]);
    context.expand([b, size[1], size[2]], false) // (B, L, D)
}

// ANCHOR: cfg_eps
impl<M: CondEpsModel + ?Sized> EpsModel for ClassifierFreeGuidance<'_, M> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
        let b = x_t.size()[0];
        let (cond, uncond) = (for_batch(&self.cond, b), for_batch(&self.uncond, b));
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
        let context = Tensor::cat(&[&uncond, &cond], 0); // (2B, L, D)
        let eps = self.model.eps_cond(&x2, &t2, &context, train).chunk(2, 0);
        // (B, C, H, W) each
        let (eps_uncond, eps_cond) = (&eps[0], &eps[1]);
        // [CFG] eq. 6 with w = 1 + w': ε̃ = ε_∅ + w (ε_c − ε_∅)
        eps_uncond + (eps_cond - eps_uncond) * self.scale
    }
}
// ANCHOR_END: cfg_eps

/// How the samples of one guidance scale grade: [`grade_guided`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuidanceReport {
    pub scale: f64,
    /// Fraction of samples the classifier reads as the digit that was asked for.
    pub accuracy: f64,
    /// Mean over samples of the classifier's probability for the digit that was asked for.
    pub mean_p_requested: f64,
    /// Within-class diversity: per requested digit, the mean distance between the classifier features of two
    /// different samples, averaged over digits.
    pub diversity: f64,
    /// The same measure on as many real test images per digit: what "as varied as real digits" scores.
    pub diversity_real: f64,
    /// diversity / diversity_real: about 1 for real-like variety, below 1 when guidance collapses each class.
    pub diversity_over_real: f64,
    /// The class-blind report of lessons 03–04 on all samples of this scale (FD against the test set, its floor,
    /// class histogram, confidence).
    pub samples: SampleReport,
}

/// Mean Euclidean distance ‖f_i − f_j‖ over all pairs i ≠ j of the rows of f (N, F), N ≥ 2.
pub fn mean_pairwise_distance(f: &Tensor) -> f64 {
    let n = f.size()[0];
    assert!(n >= 2, "a pairwise distance needs two rows, got {n}");
    let f = f.to_kind(Kind::Double);
    // compute mode 2: direct differences, not the matmul expansion (exact zeros on the diagonal)
    let d = Tensor::cdist(&f, &f, 2.0, 2); // (N, N)
    d.sum(Kind::Double).double_value(&[]) / (n * (n - 1)) as f64
}

/// Mean over the digits present in `labels` (N,) (with two samples or more) of the mean pairwise feature distance
/// within the digit.
fn within_class_diversity(features: &Tensor, labels: &Tensor) -> f64 {
    let labels = labels.to_device(features.device());
    let per_class: Vec<f64> = (0..10)
        .filter_map(|k| {
            let idx = labels.eq(k).nonzero().squeeze_dim(1); // (n_k,)
            (idx.size()[0] >= 2).then(|| mean_pairwise_distance(&features.index_select(0, &idx)))
        })
        .collect();
    per_class.iter().sum::<f64>() / per_class.len().max(1) as f64
}

/// Grades samples (N, 1, 28, 28) in [0, 1] drawn for the digits `labels` (N,) at guidance `scale`: accuracy and
/// probability of the requested digit under the shipped classifier, within-class diversity of its penultimate
/// features against real test digits (the first n_k test images of each digit, n_k as many as samples of it), and
/// the class-blind [`evaluate_samples`] report.
pub fn grade_guided(
    clf: &MnistClassifier,
    samples: &Tensor,
    labels: &Tensor,
    test_images: &Tensor,
    test_labels: &Tensor,
    scale: f64,
) -> GuidanceReport {
    let labels = labels.to_device(tch::Device::Cpu);
    let probs = clf.probabilities(samples).to_device(tch::Device::Cpu); // (N, 10)
    let correct = probs.argmax(-1, false).eq_tensor(&labels).to_kind(Kind::Double);
    let p_requested = probs.gather(1, &labels.unsqueeze(1), false).to_kind(Kind::Double); // (N, 1)
    let diversity = within_class_diversity(&clf.features(samples), &labels);
    let mut real = Vec::new();
    let mut real_labels = Vec::new();
    for k in 0..10 {
        let n_k = labels.eq(k).sum(Kind::Int64).int64_value(&[]);
        let idx = test_labels.eq(k).nonzero().squeeze_dim(1).narrow(0, 0, n_k); // (n_k,)
        real.push(test_images.index_select(0, &idx.to_device(test_images.device())));
        real_labels.push(Tensor::full([n_k], k, (Kind::Int64, tch::Device::Cpu)));
    }
    let diversity_real = within_class_diversity(&clf.features(&Tensor::cat(&real, 0)), &Tensor::cat(&real_labels, 0));
    GuidanceReport {
        scale,
        accuracy: correct.mean(Kind::Double).double_value(&[]),
        mean_p_requested: p_requested.mean(Kind::Double).double_value(&[]),
        diversity,
        diversity_real,
        diversity_over_real: diversity / diversity_real,
        samples: evaluate_samples(clf, samples, test_images),
    }
}

/// guidance_tradeoff.png: fidelity (accuracy, probability of the asked-for digit), within-digit diversity and the
/// Fréchet ratio, each against the guidance scale.
pub fn plot_tradeoff(path: &Path, reports: &[GuidanceReport]) -> Result<()> {
    let line = |f: &dyn Fn(&GuidanceReport) -> f64| reports.iter().map(|r| (r.scale, f(r))).collect::<Vec<_>>();
    let panel = |title: &str, y: &str, series: Vec<(&str, Vec<(f64, f64)>)>| LinePanel {
        title: title.into(),
        x_desc: "guidance scale w".into(),
        y_desc: y.into(),
        log_y: false,
        series: series.into_iter().map(|(name, points)| (name.to_string(), points)).collect(),
    };
    let fidelity = vec![("accuracy", line(&|r| r.accuracy)), ("p(asked digit)", line(&|r| r.mean_p_requested))];
    let panels = [
        panel("fidelity", "fraction of samples / mean probability", fidelity),
        panel(
            "within-digit diversity",
            "feature distance, samples / real",
            vec![("diversity", line(&|r| r.diversity_over_real))],
        ),
        panel("Fréchet distance", "FD / real-vs-real floor", vec![("FD / floor", line(&|r| r.samples.fd_over_floor))]),
    ];
    plot::line_panels(path, "Classifier-free guidance: the asked-for digit more often, less variety", 420, 340, &panels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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
        fn eps_cond(&self, x: &Tensor, _t: &Tensor, context: &Tensor, _: bool) -> Tensor {
            let sigma = (1.0 - self.alpha_bar).sqrt();
            // (B, 1)
            let c = context.view([-1, 1]);
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
            net.eps_cond(&x, &t, &c.expand([3, 4, 6], false), false),
            net.eps_cond(&x, &t, &u.expand([3, 4, 6], false), false),
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
        let eps_uncond = oracle.eps_cond(&x, &t, &ctx(-1.0).expand([13, 1, 1], false), false);
        for w in [0.0, 1.0, 3.0] {
            let guided = ClassifierFreeGuidance::new(&oracle, ctx(1.0), ctx(-1.0), w).eps(&x, &t, false);
            let want = &eps_uncond - &grad_log_post * (w * sigma); // −σ(∇log p(x) + w ∇log p(c | x))
            assert!((guided - want).abs().max().double_value(&[]) < 1e-9, "w = {w}");
        }
    }

    #[test]
    fn mean_pairwise_distance_of_known_points() {
        // three corners of a 3-4-5 right triangle: pair distances 3, 4, 5
        let f = Tensor::from_slice(&[0.0, 0.0, 3.0, 0.0, 0.0, 4.0]).view([3, 2]);
        assert!((mean_pairwise_distance(&f) - 4.0).abs() < 1e-12);
        // per class: class 0 has the triangle (mean 4), class 1 two points 10 apart, class 2 one point (left out)
        let g = Tensor::cat(&[f, Tensor::from_slice(&[0.0, 0.0, 6.0, 8.0, 9.0, 9.0]).view([3, 2])], 0);
        let labels = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 2]);
        assert!((within_class_diversity(&g, &labels) - 7.0).abs() < 1e-12);
    }
}
