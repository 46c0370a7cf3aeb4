//! Ancestral sampling of a DDPM: [DDPM] Algorithm 2, over the full schedule or a respaced one.
//!
//! [DDPM] Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
//! [iDDPM] Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672.
//! Notation (code -> paper): eps_model -> ε_θ(x_t, t), x0_hat -> x̂₀, sched.betas[i] -> β_t, alpha_bar -> ᾱ_t,
//! variance -> σ_t² of p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I), z -> z ~ N(0, I).
//! `i` indexes the (possibly respaced, [iDDPM] sec. 4) schedule; `timesteps[i]` is the original timestep the
//! network was trained at. Without respacing the two are the same.
//!
//! Each step predicts x̂₀ from ε̂, optionally clips it to the data range, and takes the mean of the forward
//! posterior q(x_{t−1} | x_t, x̂₀) ([DDPM] eq. 7). Without clipping that mean is exactly Algorithm 2, line 4:
//!     μ̃_t(x_t, x̂₀) = 1/√α_t · (x_t − β_t/√(1 − ᾱ_t) · ε̂)        ([DDPM] eq. 11)
//! (substitute x̂₀ = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t into eq. 7; a test checks it).
use crate::diffusion::forward::{posterior_mean, predict_x0_from_eps};
use crate::diffusion::schedule::NoiseSchedule;
use crate::model::EpsModel;
use crate::sampling::wrappers::Threshold;
use tch::Device;
use tch::{Kind, Tensor};

pub use crate::diffusion::schedule::PosteriorVariance;

/// What the sampler reports at every step (for progress bars and trajectory strips).
pub struct DdpmStep<'a> {
    /// Index into the (respaced) schedule, counting down from `timesteps.len() − 1` to 0.
    pub i: usize,
    /// The original timestep `timesteps[i]` the model was called with.
    pub t: usize,
    /// The sample the model saw at this step (x_{T−1} at the first step).
    pub x_t: &'a Tensor,
    /// The (clipped) prediction of x₀ from it. At the last step (i = 0) this is the returned sample.
    pub x0_hat: &'a Tensor,
}

/// [DDPM] Algorithm 2 from `x_t` (B, ...), usually N(0, I) noise, down to x₀.
/// `eps_model(x_t, t)` predicts ε from x_t and the ORIGINAL timestep indices t (B,) i64; `timesteps` are the
/// original timesteps kept (ascending: from [`NoiseSchedule::respaced`], or 0..T) and `sched` is the (respaced)
/// schedule over them. `threshold` acts on x̂₀ before the posterior mean ([`Threshold`]: none, clipped to the data
/// range [−1, 1], or Imagen's dynamic thresholding).
/// No noise is added at the last step, so the result is the last x̂₀.
// ANCHOR: ddpm_sample
pub fn ddpm_sample(
    eps_model: impl Fn(&Tensor, &Tensor) -> Tensor,
    sched: &NoiseSchedule,
    timesteps: &[usize],
    x_t: Tensor,
    variance: PosteriorVariance,
    threshold: Threshold,
    cb: &mut dyn FnMut(DdpmStep),
) -> Tensor {
    assert_eq!(timesteps.len(), sched.num_steps(), "one original timestep per step of the schedule");
    assert!(timesteps.windows(2).all(|w| w[0] < w[1]), "timesteps must be ascending");
    let (batch, device) = (x_t.size()[0], x_t.device());
    let mut x = x_t;
    for i in (0..sched.num_steps()).rev() {
        let t = timesteps[i];
        let eps = eps_model(&x, &Tensor::full([batch], t as i64, (Kind::Int64, device)));
        // a 0-dim f64 ᾱ_t: the coefficients are computed in f64 whatever x's kind and device (bf16 would round
        // ᾱ_0 = 0.9999 to 1)
        let alpha_bar = Tensor::from(sched.alpha_bar(i));
        // x̂₀ = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t, thresholded as asked
        let x0_hat = threshold.apply(&predict_x0_from_eps(&alpha_bar, &x, &eps));
        // [DDPM] eq. 7: μ̃_t(x_t, x̂₀), which is Algorithm 2, line 4 without the noise when x̂₀ is not clipped
        let mean = posterior_mean(sched, i, &x, &x0_hat);
        cb(DdpmStep { i, t, x_t: &x, x0_hat: &x0_hat });
        // Algorithm 2, lines 3–4: x_{t−1} = μ + σ_t z, z ~ N(0, I) except at the last step
        x = if i > 0 { mean + x.randn_like() * variance.sigma_squared(sched, i).sqrt() } else { mean };
    }
    x
}
// ANCHOR_END: ddpm_sample

/// How [`sample`] walks the schedule: `steps` evenly respaced timesteps, the posterior variance σ_t², what is done to
/// x̂₀ (images: clipped to the data range [−1, 1], [`Threshold::Static`]), at most `batch` images per network call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AncestralSampling {
    pub steps: usize,
    pub variance: PosteriorVariance,
    pub threshold: Threshold,
    pub batch: i64,
}

/// Draws `shape[0]` samples of an ε-model with DDPM ancestral sampling ([DDPM] Algorithm 2) over `how.steps`
/// evenly respaced timesteps (`steps` = T is Algorithm 2 itself), starting from x_T ~ N(0, I), `how.batch` at a
/// time; `cb(first_image_of_the_batch, step)` sees every step. This is the sampler of lessons 03–06, on the model's
/// own timesteps; [`crate::sampling::ddim::sample_ddpm`] is the same algorithm on the σ-space denoiser interface
/// that every other sampler shares (lesson 07 checks the two agree step for step), for any σ grid.
pub fn sample(
    model: &dyn EpsModel,
    sched: &NoiseSchedule,
    shape: &[i64],
    how: &AncestralSampling,
    device: Device,
    cb: &mut dyn FnMut(i64, DdpmStep),
) -> Tensor {
    let AncestralSampling { steps, variance, threshold, batch } = *how;
    let (timesteps, respaced) = sched.respaced(steps.min(sched.num_steps()));
    let n = shape[0];
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let b = batch.min(n - start);
        let mut s = shape.to_vec();
        s[0] = b;
        let x_t = Tensor::randn(s.as_slice(), (Kind::Float, device)); // x_T ~ N(0, I)
        let eps = |x: &Tensor, t: &Tensor| tch::no_grad(|| model.eps(x, t, false));
        chunks.push(ddpm_sample(eps, &respaced, &timesteps, x_t, variance, threshold, &mut |st| cb(start, st)));
        start += b;
    }
    Tensor::cat(&chunks, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::append_dims;
    use std::cell::RefCell;
    use tch::Device;

    /// The exact ε-prediction for data x₀ ~ N(μ, s² I): x_t = √ᾱ x₀ + √(1 − ᾱ) ε is jointly Gaussian with ε, so
    ///     E[ε | x_t] = Cov(ε, x_t)/Var(x_t) · (x_t − E x_t) = √(1 − ᾱ_t)(x_t − √ᾱ_t μ)/(ᾱ_t s² + 1 − ᾱ_t).
    /// `alpha_bar_table` is ᾱ over the ORIGINAL timesteps, `mu` broadcasts against x.
    fn gaussian_oracle(alpha_bar_table: Tensor, mu: Tensor, s: f64) -> impl Fn(&Tensor, &Tensor) -> Tensor {
        move |x: &Tensor, t: &Tensor| {
            let a = append_dims(&alpha_bar_table.index_select(0, t), x); // (B, 1)
            (1f64 - &a).sqrt() * (x - a.sqrt() * &mu) / (&a * (s * s) + 1.0 - &a)
        }
    }

    /// The sampler with the oracle is linear-Gaussian in each coordinate: x_{t−1} = A x_t + B + σ_t z. Pushing
    /// N(0, 1) through it gives the exact mean and variance of its output (the reference for the Monte Carlo).
    fn exact_output_moments(sched: &NoiseSchedule, mu: f64, s: f64, variance: PosteriorVariance) -> (f64, f64) {
        let (mut m, mut v) = (0.0, 1.0);
        for i in (0..sched.num_steps()).rev() {
            let (a, a_prev, beta) = (sched.alpha_bar(i), sched.alpha_bar_prev(i), sched.betas[i]);
            let k = (1.0 - a).sqrt() / (a * s * s + 1.0 - a); // ε̂ = k (x − √ᾱ μ)
            let (a0, b0) = ((1.0 - (1.0 - a).sqrt() * k) / a.sqrt(), (1.0 - a).sqrt() * k * mu); // x̂₀ = a0 x + b0
            let c0 = a_prev.sqrt() * beta / (1.0 - a);
            let ct = (1.0 - beta).sqrt() * (1.0 - a_prev) / (1.0 - a);
            let noise = if i > 0 { variance.sigma_squared(sched, i) } else { 0.0 };
            m = (c0 * a0 + ct) * m + c0 * b0;
            v = (c0 * a0 + ct).powi(2) * v + noise;
        }
        (m, v)
    }

    /// Sampling via x̂₀ and eq. 7 is Algorithm 2, line 4 (eq. 11). Along real trajectories (full and respaced
    /// schedule, both variances), at every step: the sampler's x̂₀ put into eq. 7 equals the line-4 mean
    /// 1/√α_t (x_t − β_t/√(1 − ᾱ_t) ε̂) to f64 rounding; the next state minus that mean, over σ_t, is N(0, 1) noise
    /// (mean and variance within 5 standard errors); and the last step adds no noise at all. (The noise itself
    /// cannot be replayed: tests share libtorch's global generator across threads.)
    #[test]
    fn posterior_mean_via_x0_hat_is_algorithm_2() {
        let full = NoiseSchedule::ddpm(1000);
        let (mu, s) = (Tensor::from_slice(&[0.7f64, -1.2]).view([1, 2]), 0.3); // (1, 2)
        let model = gaussian_oracle(Tensor::from_slice(&full.alphas_cumprod), mu, s);
        for (timesteps, sched) in [((0..1000).collect::<Vec<_>>(), full.clone()), full.respaced(50)] {
            for variance in [PosteriorVariance::Beta, PosteriorVariance::BetaTilde] {
                let what = format!("{} steps, {variance:?}", sched.num_steps());
                let (mut line4_means, mut states) = (Vec::new(), Vec::new());
                let x_start = Tensor::randn([256, 2], (Kind::Double, Device::Cpu));
                let out = ddpm_sample(&model, &sched, &timesteps, x_start, variance, Threshold::None, &mut |st| {
                    let (a, beta) = (sched.alpha_bar(st.i), sched.betas[st.i]);
                    let eps = model(st.x_t, &Tensor::full([256], st.t as i64, (Kind::Int64, Device::Cpu)));
                    // [DDPM] Algorithm 2, line 4 without the noise: 1/√α_t (x_t − β_t/√(1 − ᾱ_t) ε̂)
                    let line4 = (st.x_t - eps * (beta / (1.0 - a).sqrt())) / (1.0 - beta).sqrt();
                    let ours = posterior_mean(&sched, st.i, st.x_t, st.x0_hat);
                    let diff = (&ours - &line4).abs().max().double_value(&[]);
                    assert!(diff < 1e-9, "{what}, i={}: eq. 7 vs line 4 differ by {diff}", st.i);
                    line4_means.push(line4);
                    states.push(st.x_t.copy());
                });
                // the next state is line 4's mean plus σ_t z; the returned sample is the last mean exactly
                let mut z = Vec::new();
                for k in 0..states.len() - 1 {
                    let i = sched.num_steps() - 1 - k;
                    z.push((&states[k + 1] - &line4_means[k]) / variance.sigma_squared(&sched, i).sqrt());
                }
                let z = Tensor::cat(&z, 0); // ((steps − 1)·256, 2)
                let (n, z_mean, z_var) =
                    (z.numel() as f64, z.mean(Kind::Double).double_value(&[]), z.var(true).double_value(&[]));
                assert!(
                    z_mean.abs() < 5.0 / n.sqrt() && (z_var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(),
                    "{what}: z {z_mean} {z_var}"
                );
                assert!((out - line4_means.last().unwrap()).abs().max().double_value(&[]) < 1e-12, "{what}");
            }
        }
    }

    /// Oracle test: data x₀ ~ N(μ, s² I) in 2-D with μ = (1, −0.5), s = 0.5; 20k chains from N(0, I) with the exact
    /// ε-prediction. First, the Monte Carlo output matches the exact output moments of the sampler (5 standard
    /// errors) — that checks the implementation. Then, what those exact moments are:
    /// - the mean is right everywhere (|error| ≈ 1e-5, from starting at N(0, I) instead of q(x_{T−1}));
    /// - the variance is not, and that is the sampler, not the test: the true reverse step q(x_{t−1} | x_t) has
    ///   variance β̃_t + c₀² Var(x₀ | x_t) (c₀ = √ᾱ_{t−1} β_t/(1 − ᾱ_t), the x₀ coefficient of eq. 7), between
    ///   β̃_t (data a point, Var(x₀ | x_t) = 0) and β_t (data N(0, I)) — [DDPM] sec. 3.2's two extremes. So σ² = β̃
    ///   under-disperses and σ² = β over-disperses data with 0 < s < 1, and the per-step error adds up the fewer
    ///   steps there are. Exact output variance / s²: T = 1000: β̃ 0.9845 (β 1.0030, checked in the next test);
    ///   100 respaced steps: β̃ 0.8759, β 1.0346.
    #[test]
    fn gaussian_oracle_recovers_the_data_distribution() {
        let full = NoiseSchedule::ddpm(1000);
        let (mu, s, n) = ([1.0f64, -0.5], 0.5f64, 20_000i64);
        let mu_t = Tensor::from_slice(&mu).to_kind(Kind::Float).view([1, 2]); // (1, 2)
        let model = gaussian_oracle(full.to_tensor_alpha_bar(Device::Cpu), mu_t, s);
        let cases = [
            ((0..1000).collect::<Vec<_>>(), full.clone(), PosteriorVariance::BetaTilde, 0.9845),
            (full.respaced(100).0, full.respaced(100).1, PosteriorVariance::BetaTilde, 0.8759),
            (full.respaced(100).0, full.respaced(100).1, PosteriorVariance::Beta, 1.0346),
        ];
        tch::manual_seed(22);
        for (timesteps, sched, variance, want_ratio) in cases {
            let what = format!("{} steps, {variance:?}", sched.num_steps());
            let x = ddpm_sample(
                &model,
                &sched,
                &timesteps,
                Tensor::randn([n, 2], (Kind::Float, Device::Cpu)),
                variance,
                Threshold::None,
                &mut |_| {},
            );
            let x = x.to_kind(Kind::Double);
            let var_hat = x.var_dim(0, true, false).mean(Kind::Double).double_value(&[]); // both coordinates
            let (_, v_exact) = exact_output_moments(&sched, 0.0, s, variance); // the same for every μ
            for (d, &mu_d) in mu.iter().enumerate() {
                let (m_exact, _) = exact_output_moments(&sched, mu_d, s, variance);
                let m_hat = x.select(1, d as i64).mean(Kind::Double).double_value(&[]);
                assert!(
                    (m_hat - m_exact).abs() < 5.0 * (v_exact / n as f64).sqrt(),
                    "{what}: mean {m_hat} vs {m_exact}"
                );
                // the mean of the sampler's output is μ (the stated tolerance: 1e-4, far below Monte Carlo)
                assert!((m_exact - mu_d).abs() < 1e-4, "{what}: exact mean {m_exact} vs μ = {mu_d}");
            }
            // SE of the variance pooled over 2 coordinates: v √(2/n) / √2
            assert!(
                (var_hat - v_exact).abs() < 5.0 * v_exact / (n as f64).sqrt(),
                "{what}: var {var_hat} vs {v_exact}"
            );
            assert!(
                (v_exact / (s * s) - want_ratio).abs() < 1e-4,
                "{what}: exact variance ratio {}",
                v_exact / (s * s)
            );
        }
    }

    /// The per-step claim behind the comment above, in closed form: Var(x_{t−1} | x_t) for data N(μ, s²) is
    /// β̃_t + c₀² s²(1 − ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t); it equals β̃_t for s = 0, β_t for s = 1, and lies between.
    /// With it (or with β at s = 1) the sampler's output variance is right even with 100 steps.
    #[test]
    fn beta_and_beta_tilde_are_the_extremes_of_the_true_reverse_variance() {
        let (timesteps, sched) = NoiseSchedule::ddpm(1000).respaced(100);
        assert_eq!(timesteps.len(), 100);
        for i in 1..sched.num_steps() {
            let (a, beta, beta_tilde) = (sched.alpha_bar(i), sched.betas[i], sched.posterior_variance(i));
            let c0 = sched.alpha_bar_prev(i).sqrt() * beta / (1.0 - a);
            let true_var = |s: f64| beta_tilde + c0 * c0 * s * s * (1.0 - a) / (a * s * s + 1.0 - a);
            assert!((true_var(0.0) - beta_tilde).abs() < 1e-15);
            assert!((true_var(1.0) / beta - 1.0).abs() < 1e-9, "i={i}: {} vs β = {beta}", true_var(1.0));
            assert!(true_var(0.5) > beta_tilde && true_var(0.5) < beta);
        }
        // the case the Monte Carlo above leaves out: T = 1000, σ² = β over-disperses N(μ, 0.5²) by 0.3 %
        let (_, v) = exact_output_moments(&NoiseSchedule::ddpm(1000), 1.0, 0.5, PosteriorVariance::Beta);
        assert!((v / 0.25 - 1.0030).abs() < 1e-4, "{}", v / 0.25);
        let (_, v) = exact_output_moments(&sched, 0.0, 1.0, PosteriorVariance::Beta);
        assert!((v - 1.0).abs() < 1e-3, "N(0, I) data with σ² = β: variance {v}");
        let (_, v) = exact_output_moments(&sched, 0.0, 1.0, PosteriorVariance::BetaTilde);
        assert!(v < 0.93, "N(0, I) data with σ² = β̃ under-disperses: variance {v}");
    }

    /// The model sees the original timesteps in descending order, the callback every step, and the result is the
    /// last x̂₀ (no noise at t = 0).
    #[test]
    fn reports_every_step_with_original_timesteps() {
        let full = NoiseSchedule::ddpm(1000);
        let (timesteps, sched) = full.respaced(10);
        let seen = RefCell::new(Vec::new());
        let model = |x: &Tensor, t: &Tensor| {
            assert_eq!(t.size(), vec![x.size()[0]]);
            seen.borrow_mut().push(t.int64_value(&[0]) as usize);
            x * 0.1
        };
        let (mut steps, mut last_x0_hat) = (Vec::new(), None);
        tch::manual_seed(23);
        let x = Tensor::randn([5, 3, 4, 4], (Kind::Float, Device::Cpu)); // (B, C, H, W)
        let out = ddpm_sample(model, &sched, &timesteps, x, PosteriorVariance::BetaTilde, Threshold::None, &mut |st| {
            assert_eq!(st.x_t.size(), vec![5, 3, 4, 4]);
            steps.push((st.i, st.t));
            last_x0_hat = Some(st.x0_hat.copy());
        });
        let want: Vec<(usize, usize)> = (0..10).rev().map(|i| (i, timesteps[i])).collect();
        assert_eq!(steps, want);
        assert_eq!(*seen.borrow(), want.iter().map(|&(_, t)| t).collect::<Vec<_>>());
        assert_eq!(steps.first().unwrap().1, 999);
        assert_eq!(out.kind(), Kind::Float); // the f64 ᾱ scalar does not promote the f32 batch
        assert!((out - last_x0_hat.unwrap()).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn clipping_keeps_x0_hat_in_the_data_range() {
        let (timesteps, sched) = NoiseSchedule::cosine(1000).respaced(20);
        let model = |x: &Tensor, _: &Tensor| x.ones_like() * -3.0; // pushes x̂₀ far above 1
        let run = |clip| {
            tch::manual_seed(24);
            let mut in_range = true;
            let x = Tensor::randn([64, 2], (Kind::Float, Device::Cpu));
            let out = ddpm_sample(model, &sched, &timesteps, x, PosteriorVariance::Beta, clip, &mut |st| {
                in_range &= st.x0_hat.abs().max().double_value(&[]) <= 1.0;
            });
            (out.abs().max().double_value(&[]), in_range)
        };
        let (max_clipped, in_range) = run(Threshold::Static);
        assert!(max_clipped <= 1.0 + 1e-6 && in_range, "{max_clipped}");
        let (max_unclipped, in_range) = run(Threshold::None);
        assert!(max_unclipped > 1.0 && !in_range);
    }
}
