//! Denoising score matching: learning ∇ log p without knowing p.
//!
//! [DSM] Vincent 2011, "A Connection Between Score Matching and Denoising Autoencoders", Neural Computation 23(7).
//! [NCSN] Song & Ermon 2019, arXiv:1907.05600.
//! Notation (code -> paper): x0 -> x, x_noisy -> x̃ = x + σz, z -> z ~ N(0, I), sigma -> σ, score -> s_θ(x̃, σ).
//!
//! [DSM] eq. (in sec. 4.2): matching s_θ to the score of the noised data p_σ is, up to a constant, the same as
//! matching it to the score of the noising kernel, ∇ log q_σ(x̃ | x) = −(x̃ − x)/σ² = −z/σ, which needs only samples.
//! [NCSN] eq. 5–6 with the weight λ(σ) = σ²:   ℓ(θ; σ) = ½ E ‖σ s_θ(x̃, σ) + z‖².
use crate::diffusion::append_dims;
use tch::{Kind, Tensor};

/// The σ²-weighted denoising-score-matching loss of [NCSN] eq. 6 for a batch `x0` (B, ...) with per-sample noise
/// levels `sigma` (B,). `score(x_noisy, sigma)` is the model. Returns the scalar mean over the batch.
// ANCHOR: dsm_loss
pub fn dsm_loss(score: impl Fn(&Tensor, &Tensor) -> Tensor, x0: &Tensor, sigma: &Tensor) -> Tensor {
    let z = x0.randn_like();
    let s = append_dims(sigma, x0); // (B, 1, ...)
    let x_noisy = x0 + &s * &z;
    let pred = score(&x_noisy, sigma);
    // [NCSN] eq. 6, λ(σ) = σ²:  ½ ‖σ s_θ(x̃, σ) + z‖², summed over dimensions, averaged over the batch
    let per_sample = (&s * pred + z).square().flatten(1, -1).sum_dim_intlist(1, false, Kind::Float) * 0.5;
    per_sample.mean(Kind::Float)
}
// ANCHOR_END: dsm_loss

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// For data x ~ N(μ, s² I) in d dimensions the noised density is N(μ, (s² + σ²) I), whose score
    /// −(x̃ − μ)/(s² + σ²) minimises the DSM loss; its minimum is E ½‖z − σ(x̃−μ)/(s²+σ²)‖² = (d/2) · s²/(s² + σ²).
    #[test]
    fn dsm_loss_is_minimised_by_the_analytic_noised_score() {
        tch::manual_seed(1);
        let (mu, s, d, n) = (1.5f64, 0.7f64, 2i64, 400_000i64);
        let x0 = Tensor::randn([n, d], (Kind::Float, Device::Cpu)) * s + mu;
        for sigma_v in [0.1f64, 0.5, 2.0] {
            let sigma = Tensor::full([n], sigma_v, (Kind::Float, Device::Cpu));
            let loss_with = |scale: f64, shift: f64| {
                tch::manual_seed(2); // the same noise for every candidate, so differences are not Monte Carlo noise
                let score = move |x: &Tensor, _: &Tensor| -(x - mu - shift) / (s * s + sigma_v * sigma_v) * scale;
                dsm_loss(score, &x0, &sigma).double_value(&[])
            };
            let best = loss_with(1.0, 0.0);
            let closed_form = d as f64 / 2.0 * s * s / (s * s + sigma_v * sigma_v);
            assert!((best - closed_form).abs() < 0.01 * closed_form.max(0.05), "σ={sigma_v}: {best} vs {closed_form}");
            for (scale, shift) in [(0.9, 0.0), (1.1, 0.0), (1.0, 0.1), (1.0, -0.1)] {
                assert!(
                    loss_with(scale, shift) > best,
                    "σ={sigma_v}: a perturbed score ({scale}, {shift}) scored lower"
                );
            }
        }
    }
}
