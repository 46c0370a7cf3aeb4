//! The variational bound DDPM trains, term by term, computed exactly where everything is Gaussian: data
//! x₀ ~ N(μ, s²) (one pixel; pixels are independent) and the ideal reverse model, whose mean uses E[x₀ | x_t].
//! It shows where L_simple comes from and what it drops (chapter 03, "Where L_simple comes from").
//!
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239: eq. 5 (the bound as L_T + Σ L_{t−1} + L_0), eq. 7 (the posterior
//! q(x_{t−1} | x_t, x₀) = N(μ̃_t, β̃_t)), eq. 8 (L_{t−1} as a squared error of means), eq. 12 (as a weighted squared
//! error of the noise), sec. 3.2 (σ_t² = β_t or β̃_t, the two extremes).
//! [Gauss] The KL divergence of two normal laws: KL(N(m₁, v₁) ‖ N(m₂, v₂)) = ½ (ln(v₂/v₁) + (v₁ + (m₁ − m₂)²)/v₂ − 1).
//! For a trained model the same terms come from its noise errors ([`step_kl`], [`prior_kl`],
//! [`discretized_decoder_nll`]; [DDPM] eq. 13 for the decoder of 8-bit data), summed by
//! `eval::bits_per_dim::mnist_vlb_bits_per_dim`.
//! Notation (code -> paper): paper step t = 1..T is index t − 1 of the schedule; `v` -> Var(x₀ | x_t).
use crate::diffusion::schedule::{NoiseSchedule, PosteriorVariance};
use tch::{Kind, Tensor};

/// The bound's terms, in nats per pixel, averaged over the data, and the exact negative log-likelihood they bound.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianVlb {
    /// L_T = E KL(q(x_T | x₀) ‖ N(0, 1)): how far the forward chain's end is from the prior.
    pub l_prior: f64,
    /// L_{t−1} = E KL(q(x_{t−1} | x_t, x₀) ‖ p(x_{t−1} | x_t)) for paper steps t = 2..T (index t − 2).
    pub l_steps: Vec<f64>,
    /// L_0 = E[−ln p(x₀ | x₁)], a Gaussian decoder of variance β₁ (continuous data; DDPM discretises pixels).
    pub l_decoder: f64,
    /// E[−ln N(x₀; μ, s²)] = ½ ln(2π e s²), what the bound bounds.
    pub nll: f64,
}

impl GaussianVlb {
    /// L_T + Σ L_{t−1} + L_0 ([DDPM] eq. 5), ≥ [`Self::nll`].
    pub fn total(&self) -> f64 {
        self.l_prior + self.l_steps.iter().sum::<f64>() + self.l_decoder
    }
}

/// Var(x₀ | x_t) for x₀ ~ N(μ, s²) and x_t = √ᾱ x₀ + √(1 − ᾱ) ε: Gaussian conditioning, s²(1 − ᾱ)/(ᾱ s² + 1 − ᾱ).
pub fn posterior_data_variance(s2: f64, alpha_bar: f64) -> f64 {
    s2 * (1.0 - alpha_bar) / (alpha_bar * s2 + 1.0 - alpha_bar)
}

/// [Gauss] KL(N(m₁, v₁) ‖ N(m₂, v₂)) averaged over a squared mean gap `gap2` = E(m₁ − m₂)².
fn gaussian_kl(v1: f64, v2: f64, gap2: f64) -> f64 {
    0.5 * ((v2 / v1).ln() + (v1 + gap2) / v2 - 1.0)
}

/// The bound of the ideal model on data N(`mu`, `s2`) under `sched` with reverse variances `variance` (σ₁² = β₁ in
/// the decoder either way: β̃₁ = 0).
// ANCHOR: gaussian_vlb
pub fn gaussian_vlb(mu: f64, s2: f64, sched: &NoiseSchedule, variance: PosteriorVariance) -> GaussianVlb {
    let n = sched.num_steps();
    // L_T: q(x_T | x₀) = N(√ᾱ_T x₀, 1 − ᾱ_T) against N(0, 1), the mean gap averaged with E x₀² = μ² + s²
    let ab_t = sched.alpha_bar(n - 1);
    let l_prior = gaussian_kl(1.0 - ab_t, 1.0, ab_t * (mu * mu + s2));
    let l_steps = (1..n)
        .map(|i| {
            let (beta, ab, ab_prev) = (sched.betas[i], sched.alpha_bar(i), sched.alpha_bar_prev(i));
            // [DDPM] eq. 7: μ̃_t = a x₀ + b x_t with a = √ᾱ_{t−1} β_t/(1 − ᾱ_t); the ideal model puts E[x₀ | x_t] in place
            // of x₀, so μ̃_t − μ_θ = a (x₀ − E[x₀ | x_t]) and its mean square is a² Var(x₀ | x_t)
            let a = ab_prev.sqrt() * beta / (1.0 - ab);
            let gap2 = a * a * posterior_data_variance(s2, ab);
            gaussian_kl(sched.posterior_variance(i), variance.sigma_squared(sched, i), gap2)
        })
        .collect();
    // L_0: at t = 1, a = 1 and b = 0, so μ_θ(x₁) = E[x₀ | x₁]: −ln N(x₀; E[x₀ | x₁], β₁) averaged
    let beta1 = sched.betas[0];
    let l_decoder = 0.5 * (2.0 * std::f64::consts::PI * beta1).ln()
        + posterior_data_variance(s2, sched.alpha_bar(0)) / (2.0 * beta1);
    let nll = 0.5 * (2.0 * std::f64::consts::PI * std::f64::consts::E * s2).ln();
    GaussianVlb { l_prior, l_steps, l_decoder, nll }
}
// ANCHOR_END: gaussian_vlb

// ANCHOR: model_terms
/// L_{t−1} of one image for a trained ε-model at schedule index `t` ≥ 1 (paper step t + 1), in nats: [Gauss] summed
/// over the image's `dims` pixels with v₁ = β̃_t, v₂ = σ_t² (`variance`), and the mean gap of [DDPM] eq. 12,
/// ‖μ̃_t − μ_θ‖² = β_t²/(α_t (1 − ᾱ_t)) ‖ε − ε_θ(x_t, t)‖², from `err2` = ‖ε − ε_θ‖² of one draw of x_t.
pub fn step_kl(sched: &NoiseSchedule, t: usize, variance: PosteriorVariance, err2: f64, dims: i64) -> f64 {
    let (beta, ab) = (sched.betas[t], sched.alpha_bar(t));
    let (v1, v2) = (sched.posterior_variance(t), variance.sigma_squared(sched, t));
    let gap2 = beta * beta / ((1.0 - beta) * (1.0 - ab)) * err2; // α_t = 1 − β_t
    0.5 * dims as f64 * ((v2 / v1).ln() + v1 / v2 - 1.0) + gap2 / (2.0 * v2)
}

/// L_T of images `x0` (B, …): KL(q(x_T | x₀) ‖ N(0, I)) = Σ_pixels ½ (−ln(1 − ᾱ_T) + (1 − ᾱ_T) + ᾱ_T x₀² − 1),
/// [Gauss] with m₁ = √ᾱ_T x₀, v₁ = 1 − ᾱ_T. (B,) nats, f64.
pub fn prior_kl(sched: &NoiseSchedule, x0: &Tensor) -> Tensor {
    let ab = sched.alpha_bar(sched.num_steps() - 1);
    let per_pixel = x0.to_kind(Kind::Double).square() * (0.5 * ab) + 0.5 * (-(1.0 - ab).ln() + (1.0 - ab) - 1.0);
    per_pixel.flatten(1, -1).sum_dim_intlist(1, false, Kind::Double)
}

/// L_0 = −ln p(x₀ | x₁) of images `x0` (B, …) at the 256 levels of 8-bit data in [−1, 1], [DDPM] eq. 13: the
/// decoder N(`mean`, `var`) integrated over each level's bin of width 2/255, the outermost bins open to ±∞. (B,)
/// nats, f64.
pub fn discretized_decoder_nll(x0: &Tensor, mean: &Tensor, var: f64) -> Tensor {
    let (x, centred) = (x0.to_kind(Kind::Double), (x0 - mean).to_kind(Kind::Double));
    let phi = |z: Tensor| (z / std::f64::consts::SQRT_2).erf() * 0.5 + 0.5; // the standard normal CDF Φ
    let (upper, lower) = (phi((&centred + 1.0 / 255.0) / var.sqrt()), phi((&centred - 1.0 / 255.0) / var.sqrt()));
    let inner = &upper - &lower; // Φ((x + 1/255 − μ)/σ) − Φ((x − 1/255 − μ)/σ)
    let p = (lower.neg() + 1.0).where_self(&x.gt(0.999), &inner); // the top level: 1 − Φ((x − 1/255 − μ)/σ)
    let p = upper.where_self(&x.lt(-0.999), &p); // the bottom level: Φ((x + 1/255 − μ)/σ)
    p.clamp_min(1e-12).log().neg().flatten(1, -1).sum_dim_intlist(1, false, Kind::Double)
}
// ANCHOR_END: model_terms

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound is above the true negative log-likelihood at every T; with σ_t² = β_t it closes as T grows (the
    /// gap falls about as 1/T), with β̃_t it does not: for data with a spread, β̃_t is too small where the data's own
    /// variance dominates the step ([DDPM] sec. 3.2).
    #[test]
    fn the_bound_holds_and_closes_as_t_grows_with_beta() {
        let (mu, s2) = (0.5, 0.25);
        let mut gaps = Vec::new();
        for t in [50, 200, 1000, 4000] {
            let sched = NoiseSchedule::ddpm(t);
            let beta = gaussian_vlb(mu, s2, &sched, PosteriorVariance::Beta);
            let tilde = gaussian_vlb(mu, s2, &sched, PosteriorVariance::BetaTilde);
            assert!(beta.total() > beta.nll && tilde.total() > tilde.nll, "T = {t}: {beta:?}");
            assert!(tilde.total() - tilde.nll > 0.3, "T = {t}: β̃ leaves a gap");
            // chapter 03's table: cargo test --release --lib elbo -- --nocapture
            println!("| {t} | {:.4} | {:.2} |", beta.total() - beta.nll, tilde.total() - tilde.nll);
            gaps.push(beta.total() - beta.nll);
        }
        for w in gaps.windows(2) {
            assert!(w[1] < 0.3 * w[0], "the gap shrinks about 4× per 4× steps: {gaps:?}");
        }
        assert!(gaps[3] < 5e-4, "{gaps:?}");
    }

    /// [DDPM] eq. 12: with ε-prediction, L_{t−1} = β_t²/(2σ_t² α_t (1 − ᾱ_t)) E‖ε − ε_θ‖² + C. For the ideal predictor
    /// E‖ε − E[ε | x_t]‖² is the irreducible ᾱ s²/(ᾱ s² + 1 − ᾱ) of chapter 03, and the weighted error must equal the
    /// mean-gap term a² Var(x₀ | x_t) that [`gaussian_vlb`] uses; L_simple drops the weight.
    #[test]
    fn the_weight_l_simple_drops_is_eq_12s() {
        let (s2, sched) = (0.25, NoiseSchedule::ddpm(1000));
        for i in [1, 10, 300, 999] {
            let (beta, ab, ab_prev) = (sched.betas[i], sched.alpha_bar(i), sched.alpha_bar_prev(i));
            let a = ab_prev.sqrt() * beta / (1.0 - ab);
            let mean_gap = a * a * posterior_data_variance(s2, ab);
            let eps_error = ab * s2 / (ab * s2 + 1.0 - ab);
            let weighted = beta * beta / ((1.0 - beta) * (1.0 - ab)) * eps_error;
            assert!((mean_gap - weighted).abs() < 1e-12 * mean_gap.max(1e-30), "t = {i}: {mean_gap} vs {weighted}");
        }
    }

    /// The terms computed from a model's noise errors are the closed-form ones when the model is ideal: on 200 000
    /// pixels of N(μ, s²) data, ε_θ = E[ε | x_t] and one draw of x_t per pixel, Σ step_kl / D matches
    /// [`gaussian_vlb`]'s L_{t−1} for both variances, and prior_kl its L_T.
    #[test]
    fn a_models_terms_match_the_closed_form_for_the_ideal_model() {
        let (mu, s2, d): (f64, f64, i64) = (0.5, 0.25, 200_000);
        let sched = NoiseSchedule::ddpm(1000);
        tch::manual_seed(0);
        let x0 = Tensor::randn([1, d], (Kind::Double, tch::Device::Cpu)) * s2.sqrt() + mu; // (1, D)
        for variance in [PosteriorVariance::Beta, PosteriorVariance::BetaTilde] {
            let exact = gaussian_vlb(mu, s2, &sched, variance);
            for t in [1, 50, 400, 999] {
                let ab = sched.alpha_bar(t);
                let eps = x0.randn_like();
                let x_t = &x0 * ab.sqrt() + &eps * (1.0 - ab).sqrt();
                let ideal = (&x_t - ab.sqrt() * mu) * ((1.0 - ab).sqrt() / (ab * s2 + 1.0 - ab)); // E[ε | x_t]
                let err2 = (eps - ideal).square().sum(Kind::Double).double_value(&[]);
                let (got, want) = (step_kl(&sched, t, variance, err2, d) / d as f64, exact.l_steps[t - 1]);
                assert!((got - want).abs() < 0.02 * want, "{variance:?} t = {t}: {got} vs {want}");
            }
            let prior = prior_kl(&sched, &x0).double_value(&[0]) / d as f64;
            assert!((prior - exact.l_prior).abs() < 0.01 * exact.l_prior, "{prior} vs {}", exact.l_prior);
        }
    }

    /// [DDPM] eq. 13's decoder is a distribution over the 256 levels: their probabilities sum to 1 for any mean and
    /// variance, and a narrow decoder centred on a level puts almost all of it there.
    #[test]
    fn the_discretised_decoder_sums_to_one_over_the_levels() {
        let levels = Tensor::arange(256, (Kind::Double, tch::Device::Cpu)).view([256, 1]) * (2.0 / 255.0) - 1.0;
        for (mean, var) in [(0.3, 0.01), (-0.97, 1e-4), (1.4, 0.5)] {
            let nll = discretized_decoder_nll(&levels, &levels.full_like(mean), var); // (256,)
            let total = nll.neg().exp().sum(Kind::Double).double_value(&[]);
            assert!((total - 1.0).abs() < 1e-9, "mean {mean}, var {var}: {total}");
        }
        let sharp = discretized_decoder_nll(&levels, &levels, 1e-6); // σ = 0.001, a quarter of the half-bin
        assert!(sharp.max().double_value(&[]) < 1e-3);
    }
}
