//! Distances between a set of samples and the distribution it should come from.
//!
//! [Energy] Székely & Rizzo 2013, "Energy statistics: A class of statistics based on distances", J. Stat. Plan.
//! Inference 143(8), eq. 2.
use crate::data::toy2d::GaussianMixture;
use tch::{Kind, Tensor};

/// Energy distance between sample sets x (N, d) and y (M, d) (V-statistic):
/// [Energy] eq. 2:  D²(X, Y) = 2 E‖X − Y‖ − E‖X − X′‖ − E‖Y − Y′‖,
/// which is ≥ 0 and zero exactly when the two distributions are equal.
pub fn energy_distance(x: &Tensor, y: &Tensor) -> f64 {
    let (x, y) = (x.to_kind(Kind::Double), y.to_kind(Kind::Double));
    let mean_dist = |a: &Tensor, b: &Tensor| Tensor::cdist(a, b, 2.0, None).mean(Kind::Double).double_value(&[]);
    2.0 * mean_dist(&x, &y) - mean_dist(&x, &x) - mean_dist(&y, &y)
}

/// Fraction of the samples in each component of `p` (by the most responsible component).
pub fn mode_weights(p: &GaussianMixture, x: &Tensor) -> Vec<f64> {
    let k = p.weights.len() as i64;
    let counts = p.assign(&x.to_kind(Kind::Double)).bincount::<Tensor>(None, k).to_kind(Kind::Double);
    let total = counts.sum(Kind::Double).double_value(&[]).max(1.0);
    (0..k).map(|i| counts.double_value(&[i]) / total).collect()
}

/// Total-variation distance between estimated and true mode weights: ½ Σ_k |ŵ_k − π_k| (0 = perfect, 1 = disjoint).
pub fn mode_weight_error(p: &GaussianMixture, x: &Tensor) -> f64 {
    0.5 * mode_weights(p, x).iter().zip(&p.weights).map(|(a, b)| (a - b).abs()).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn energy_distance_is_zero_for_equal_sets_and_grows_with_a_shift() {
        tch::manual_seed(0);
        let x = Tensor::randn([800, 2], (Kind::Double, Device::Cpu));
        assert!(energy_distance(&x, &x).abs() < 1e-12);
        let y = Tensor::randn([800, 2], (Kind::Double, Device::Cpu));
        let same = energy_distance(&x, &y);
        let near = energy_distance(&x, &(&y + 0.5));
        let far = energy_distance(&x, &(&y + 2.0));
        assert!(same < 0.02 && same < near && near < far, "{same} {near} {far}");
        assert!((energy_distance(&y, &x) - same).abs() < 1e-12);
    }

    #[test]
    fn mode_weights_of_exact_samples_match_the_mixture() {
        tch::manual_seed(1);
        let p = GaussianMixture::two_modes();
        let x = p.sample(20_000, Device::Cpu);
        assert!(mode_weight_error(&p, &x) < 0.01);
        let only_big = x.index(&[Some(p.assign(&x).eq(1).nonzero().squeeze_dim(1))]);
        assert!((mode_weight_error(&p, &only_big) - 0.2).abs() < 1e-12);
    }
}
