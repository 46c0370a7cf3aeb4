//! Noise ladders: the sequence of noise levels σ₁ > σ₂ > … > σ_L a noise-conditional score network is trained on
//! and annealed Langevin walks down.
//!
//! [NCSN] Song & Ermon 2019, arXiv:1907.05600, sec. 4.1: {σᵢ} is a positive geometric sequence, σ₁ large enough to
//! cover the gaps between modes, σ_L small enough to leave the data almost untouched.

/// L noise levels from `sigma_max` down to `sigma_min` with a constant ratio: σᵢ = σ₁ · (σ_L/σ₁)^((i−1)/(L−1)).
pub fn geometric(sigma_max: f64, sigma_min: f64, levels: usize) -> Vec<f64> {
    assert!(sigma_max >= sigma_min && sigma_min > 0.0 && levels >= 1, "need σ_max ≥ σ_min > 0 and L ≥ 1");
    if levels == 1 {
        return vec![sigma_max];
    }
    (0..levels).map(|i| sigma_max * (sigma_min / sigma_max).powf(i as f64 / (levels - 1) as f64)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_ladder_has_endpoints_and_constant_ratio() {
        let s = geometric(10.0, 0.1, 5);
        assert_eq!(s.len(), 5);
        assert!((s[0] - 10.0).abs() < 1e-12 && (s[4] - 0.1).abs() < 1e-12);
        for w in s.windows(2) {
            assert!((w[1] / w[0] - 0.1f64.powf(0.5)).abs() < 1e-12);
        }
    }
}
