//! The variational bound DDPM trains, term by term, computed exactly where everything is Gaussian: data
//! x₀ ~ N(μ, s²) (one pixel; pixels are independent) and the ideal reverse model, whose mean uses E[x₀ | x_t].
//! It shows where L_simple comes from and what it drops (chapter 03, "Where L_simple comes from").
//!
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239: eq. 5 (the bound as L_T + Σ L_{t−1} + L_0), eq. 7 (the posterior
//! q(x_{t−1} | x_t, x₀) = N(μ̃_t, β̃_t)), eq. 8 (L_{t−1} as a squared error of means), eq. 12 (as a weighted squared
//! error of the noise), sec. 3.2 (σ_t² = β_t or β̃_t, the two extremes).
//! [Gauss] The KL divergence of two normal laws: KL(N(m₁, v₁) ‖ N(m₂, v₂)) = ½ (ln(v₂/v₁) + (v₁ + (m₁ − m₂)²)/v₂ − 1).
//! Notation (code -> paper): paper step t = 1..T is index t − 1 of the schedule; `v` -> Var(x₀ | x_t).
use crate::diffusion::schedule::{NoiseSchedule, PosteriorVariance};

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
}
