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
pub fn within_class_diversity(features: &Tensor, labels: &Tensor) -> f64 {
    let labels = labels.to_device(features.device());
    let per_class: Vec<f64> = (0..10)
        .filter_map(|k| {
            let idx = labels.eq(k).nonzero().squeeze_dim(1); // (n_k,)
            (idx.size()[0] >= 2).then(|| mean_pairwise_distance(&features.index_select(0, &idx)))
        })
        .collect();
    per_class.iter().sum::<f64>() / per_class.len().max(1) as f64
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
