//! How far a learned score is from the exact one, overall and in the regions the data never visits.
use crate::data::toy2d::GaussianMixture;
use tch::{Device, Kind, Tensor};

/// Score errors at one noise level σ.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ScoreErrors {
    pub sigma: f64,
    /// E_{x~p_σ} ‖s_θ(x) − ∇log p_σ(x)‖² / E_{x~p_σ} ‖∇log p_σ(x)‖²: the error where the noised data lives
    /// (the quantity denoising score matching minimises, made relative).
    pub weighted_rel_error: f64,
    /// The same ratio averaged uniformly over the grid points of the plot box where the *clean* density is below
    /// 10⁻³ of its peak: the low-density region, the same region for every σ.
    pub low_density_rel_error: f64,
}

/// Measures [`ScoreErrors`] of `learned` (x (N, 2) -> score (N, 2)) against the analytic score of `p` noised at σ,
/// with `n_mc` samples of p_σ and an `grid`×`grid` grid over [lo, hi]².
pub fn score_errors(
    p: &GaussianMixture,
    sigma: f64,
    learned: impl Fn(&Tensor) -> Tensor,
    n_mc: i64,
    grid: usize,
) -> ScoreErrors {
    let p_sigma = p.noised(sigma);
    let sq = |t: Tensor| t.square().sum_dim_intlist(-1, false, Kind::Double); // (N,)
    let x = p_sigma.sample(n_mc, Device::Cpu);
    let truth = p_sigma.score(&x);
    let weighted = sq(learned(&x) - &truth).mean(Kind::Double) / sq(truth).mean(Kind::Double);

    let (lo, hi) = p.bounds();
    let g = crate::plot::grid_points(lo, hi, grid);
    let log_p = p.log_prob(&g);
    let low = log_p.le_tensor(&(log_p.max() + 1e-3f64.ln())); // (G,) bool
    let g_low = g.index(&[Some(low.nonzero().squeeze_dim(1))]); // (G_low, 2)
    let truth_low = p_sigma.score(&g_low);
    let low_err = sq(learned(&g_low) - &truth_low).mean(Kind::Double) / sq(truth_low).mean(Kind::Double);
    ScoreErrors {
        sigma,
        weighted_rel_error: weighted.double_value(&[]),
        low_density_rel_error: low_err.double_value(&[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_score_has_zero_error_and_zero_score_has_error_one() {
        tch::manual_seed(0);
        let p = GaussianMixture::two_modes();
        let exact = score_errors(&p, 0.5, |x| p.noised(0.5).score(x), 5000, 40);
        assert!(exact.weighted_rel_error < 1e-10 && exact.low_density_rel_error < 1e-10);
        let zero = score_errors(&p, 0.5, |x| x.zeros_like(), 5000, 40);
        assert!((zero.weighted_rel_error - 1.0).abs() < 1e-9 && (zero.low_density_rel_error - 1.0).abs() < 1e-9);
    }
}
