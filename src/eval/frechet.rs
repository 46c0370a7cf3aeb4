//! The Fréchet distance between two sets of features, and a report card for generated MNIST digits built on the
//! crate's own classifier ([`crate::nn::classifier`]): a "Fréchet LeNet distance" in the spirit of FID, with the
//! real-vs-real floor it should be read against, the class histogram and the classifier's confidence.
//!
//! [FID] Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
//! arXiv:1706.08500, eq. (6). [Fréchet] Dowson & Landau 1982, "The Fréchet distance between multivariate normal
//! distributions", J. Multivariate Anal. 12(3). [Bias] Chong & Forsyth 2020, "Effectively Unbiased FID and
//! Inception Score and where to find them", arXiv:1911.07023 (FD estimated from n samples is biased upward ∝ 1/n).
//!
//! Notation (code -> paper): mu -> μ, the mean of the features; sigma -> Σ, their covariance (1/(N−1)
//! normalisation, as numpy's `cov` in the reference FID code); sqrt_psd(A) -> A^{1/2}, the symmetric square root.
use crate::nn::classifier::MnistClassifier;
use tch::{Kind, Tensor};

/// Seed of the fixed permutation that picks the reference test images (the year of [FID]; any constant works, but
/// changing it changes every reported number slightly).
const REFERENCE_SEED: u64 = 2017;
const NUM_CLASSES: i64 = 10;

/// Mean (F,) and covariance (F, F) of features f (N, F), in f64.
fn mean_and_covariance(f: &Tensor) -> (Tensor, Tensor) {
    let f = f.to_kind(Kind::Double);
    let n = f.size()[0];
    assert!(n >= 2, "the Fréchet distance needs at least 2 feature vectors per set, got {n}");
    let mu = f.mean_dim(0, false, Kind::Double); // (F,)
    let centered = f - &mu; // (N, F)
    let sigma = centered.tr().matmul(&centered) / (n - 1) as f64; // (F, F)
    (mu, sigma)
}

/// Eigenvalues (ascending) and eigenvectors of a symmetric matrix, symmetrised first against round-off.
fn eigh(a: &Tensor) -> (Tensor, Tensor) {
    ((a + a.tr()) * 0.5).linalg_eigh("L")
}

/// The symmetric square root of a positive semi-definite matrix: V diag(√λ) Vᵀ, with round-off negatives λ < 0 set
/// to 0.
fn sqrt_psd(a: &Tensor) -> Tensor {
    let (lambda, v) = eigh(a);
    (&v * lambda.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&v.tr()) // (F, F)
}

/// Fréchet distance between the Gaussians fitted to features f1 (N, F) and f2 (M, F), computed in f64.
///
/// [FID] eq. (6):  d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}).
/// Σ₁Σ₂ is not symmetric, but it is similar to Σ₁^{1/2} Σ₂ Σ₁^{1/2} (conjugate by Σ₁^{1/2}), which is symmetric
/// positive semi-definite, so tr((Σ₁Σ₂)^{1/2}) = tr((Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}) = Σᵢ √λᵢ, its eigenvalues λᵢ
/// coming from a symmetric eigensolver (round-off negatives set to 0). Round-off can leave d² at −1e−12; it is
/// returned as 0; non-finite features (a diverged sampler's NaN images) give NaN, never a perfect 0.
pub fn frechet_distance(f1: &Tensor, f2: &Tensor) -> f64 {
    assert_eq!(f1.size()[1], f2.size()[1], "both feature sets need the same dimension F");
    let finite = |f: &Tensor| f.isfinite().all().int64_value(&[]) == 1;
    if !finite(f1) || !finite(f2) {
        return f64::NAN;
    }
    let (mu1, sigma1) = mean_and_covariance(f1);
    let (mu2, sigma2) = mean_and_covariance(&f2.to_device(f1.device()));
    let root1 = sqrt_psd(&sigma1);
    let (lambda, _) = eigh(&root1.matmul(&sigma2).matmul(&root1)); // Σ₁^{1/2} Σ₂ Σ₁^{1/2}
    let tr_sqrt = lambda.clamp_min(0.0).sqrt().sum(Kind::Double); // tr((Σ₁Σ₂)^{1/2})
    let mean_term = (&mu1 - &mu2).square().sum(Kind::Double); // ‖μ₁ − μ₂‖²
    let d2 = mean_term + sigma1.trace() + sigma2.trace() - tr_sqrt * 2.0;
    d2.double_value(&[]).max(0.0)
}

/// How a set of generated digits looks to the classifier.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SampleReport {
    /// Samples graded (and test images in each reference set).
    pub n: i64,
    /// FD between the samples' features and those of n reference test images.
    pub frechet_distance: f64,
    /// FD between two disjoint sets of n test images: what a perfect generator would score at this n.
    pub frechet_floor: f64,
    /// frechet_distance / frechet_floor: ≈ 1 for samples as good as real digits.
    pub fd_over_floor: f64,
    /// Fraction of samples the classifier puts in each class 0–9.
    pub class_histogram: Vec<f64>,
    /// Entropy of the class histogram, H = −Σ_k p_k ln p_k, in nats (at most ln 10 ≈ 2.303, all classes equally).
    pub class_entropy: f64,
    /// class_entropy / ln 10: 1 for balanced classes, 0 when every sample is the same digit.
    pub entropy_over_max: f64,
    /// Mean over samples of the largest softmax probability: low for digits the classifier cannot read.
    pub mean_confidence: f64,
}

/// The header of the lessons' sample-quality tables: a row per model, [`SampleReport::row`].
pub const QUALITY_HEADER: [&str; 8] = [
    "network",
    "recipe",
    "steps × batch",
    "training time",
    "Fréchet distance",
    "FD / floor",
    "class entropy / ln 10",
    "mean confidence",
];

impl SampleReport {
    /// A row of a [`QUALITY_HEADER`] table: the network, its recipe, (steps, batch), training seconds, then
    /// [`Self::cells`].
    pub fn row(&self, network: &str, recipe: &str, (steps, batch): (u64, i64), seconds: f64) -> Vec<String> {
        let head = [network.to_string(), recipe.to_string(), format!("{steps} × {batch}"), format!("{seconds:.0} s")];
        head.into_iter().chain(self.cells()).collect()
    }

    /// The cells of a results table: Fréchet distance, FD / floor, class entropy / ln 10, mean confidence.
    pub fn cells(&self) -> [String; 4] {
        [
            format!("{:.2}", self.frechet_distance),
            format!("{:.2}", self.fd_over_floor),
            format!("{:.3}", self.entropy_over_max),
            format!("{:.3}", self.mean_confidence),
        ]
    }
}

/// A fixed permutation of 0..t (Fisher–Yates driven by SplitMix64 from [`REFERENCE_SEED`]): the same reference images
/// on every machine and in every run, drawn from the whole test set (its first and second halves were written by
/// different populations, so "the first n" would not be representative).
pub(crate) fn fixed_permutation(t: i64) -> Vec<i64> {
    let mut state = REFERENCE_SEED;
    let mut next = || {
        // SplitMix64: Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators", OOPSLA.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut p: Vec<i64> = (0..t).collect();
    for i in (1..p.len()).rev() {
        p.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    p
}

/// Grades generated samples (N, 1, 28, 28) against the MNIST test images (T, 1, 28, 28). Samples are first clamped to
/// [0, 1] (what one sees when they are saved as images). With n = min(N, T/2) (extra samples are not used), the
/// fixed permutation of the test set gives two disjoint reference sets of n images: FD(samples, first set) is
/// compared with the floor FD(second set, first set). Both use the same n because FD estimates are biased
/// upward by roughly 1/n [Bias]. The floor is itself one draw: with the shipped classifier, FD between the first
/// reference set and other disjoint sets of real test digits ranges over about 0.7–1.4 × the floor at n = 500 or
/// 1000, so read fd_over_floor ≲ 1.4 as "indistinguishable from real digits at this n".
pub fn evaluate_samples(clf: &MnistClassifier, samples: &Tensor, test_images: &Tensor) -> SampleReport {
    let t = test_images.size()[0];
    let n = samples.size()[0].min(t / 2);
    assert!(n >= 2, "need at least 2 samples and 4 test images, got {} and {t}", samples.size()[0]);
    let order = fixed_permutation(t);
    let pick = |range: std::ops::Range<usize>| {
        let idx = Tensor::from_slice(&order[range]).to_device(test_images.device());
        test_images.index_select(0, &idx) // (n, 1, 28, 28)
    };
    let n_us = n as usize;
    let reference = clf.features(&pick(0..n_us)); // (n, F)
    let other_real = clf.features(&pick(n_us..2 * n_us)); // (n, F)
    let samples = samples.narrow(0, 0, n).clamp(0.0, 1.0);
    let frechet = frechet_distance(&clf.features(&samples), &reference);
    let floor = frechet_distance(&other_real, &reference);

    let (confidence, predicted) = clf.probabilities(&samples).max_dim(1, false); // (n,), (n,)
    let counts = predicted.bincount::<Tensor>(None, NUM_CLASSES).to_kind(Kind::Double) / n as f64; // (10,)
    let class_histogram: Vec<f64> = (0..NUM_CLASSES).map(|k| counts.double_value(&[k])).collect();
    // H = −Σ_k p_k ln p_k = Σ_k p_k ln(1/p_k), with 0 ln 0 = 0 (the second form gives +0, not −0, for one class)
    let class_entropy: f64 = class_histogram.iter().filter(|&&p| p > 0.0).map(|&p| p * (1.0 / p).ln()).sum();
    SampleReport {
        n,
        frechet_distance: frechet,
        frechet_floor: floor,
        fd_over_floor: frechet / floor,
        class_histogram,
        class_entropy,
        entropy_over_max: class_entropy / (NUM_CLASSES as f64).ln(),
        mean_confidence: confidence.mean(Kind::Double).double_value(&[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_features_give_a_nan_distance_not_zero() {
        let ok = Tensor::randn([50, 4], (Kind::Double, tch::Device::Cpu));
        let bad = ok.full_like(f64::NAN);
        assert!(frechet_distance(&bad, &ok).is_nan());
        assert!(frechet_distance(&ok, &ok) < 1e-9);
    }
    use crate::data::mnist;
    use tch::Device;

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Double, Device::Cpu))
    }

    /// n samples whose empirical mean is exactly μ and empirical covariance exactly L Lᵀ: whiten Gaussian noise with
    /// its own empirical moments, then colour it.
    fn with_moments(n: i64, mu: &Tensor, l: &Tensor) -> Tensor {
        let z = randn(&[n, mu.size()[0]]);
        let (m, c) = mean_and_covariance(&z);
        let (lambda, v) = eigh(&c);
        let inv_root = (&v * lambda.rsqrt().unsqueeze(0)).matmul(&v.tr()); // C^{-1/2}
        let white = (z - m).matmul(&inv_root); // (n, F): mean 0, covariance I
        white.matmul(&l.tr()) + mu // (n, F): mean μ, covariance L Lᵀ
    }

    /// A random symmetric positive definite matrix G Gᵀ/F + 0.1 I.
    fn random_spd(f: i64) -> Tensor {
        let g = randn(&[f, f]);
        g.matmul(&g.tr()) / f as f64 + Tensor::eye(f, (Kind::Double, Device::Cpu)) * 0.1
    }

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-300)
    }

    #[test]
    fn fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric() {
        tch::manual_seed(0);
        let l = random_spd(32).linalg_cholesky(false);
        let x = randn(&[400, 32]).matmul(&l.tr());
        let scale = mean_and_covariance(&x).1.trace().double_value(&[]);
        assert!(frechet_distance(&x, &x) < 1e-9 * scale, "{}", frechet_distance(&x, &x));
        // fewer samples than dimensions: Σ is singular, the clamp keeps the square roots real
        let few = x.narrow(0, 0, 12);
        let d = frechet_distance(&few, &few);
        assert!(d.is_finite() && d < 1e-5 * scale, "{d}");
        let y = randn(&[300, 32]) * 1.5 + 0.2;
        let (xy, yx) = (frechet_distance(&x, &y), frechet_distance(&y, &x));
        assert!(xy > 1.0 && rel(xy, yx) < 1e-10, "{xy} {yx}");
        // f32 input gives the f64 answer to f32 precision
        assert!(rel(frechet_distance(&x.to_kind(Kind::Float), &y.to_kind(Kind::Float)), xy) < 1e-5);
    }

    #[test]
    fn fd_of_commuting_covariances_matches_the_closed_form() {
        tch::manual_seed(1);
        let f = 16;
        let (mu1, mu2) = (randn(&[f]), randn(&[f]) * 0.5);
        let a = Tensor::rand([f], (Kind::Double, Device::Cpu)) * 4.0 + 0.1; // variances of set 1
        let b = Tensor::rand([f], (Kind::Double, Device::Cpu)) * 4.0 + 0.1; // variances of set 2
        let x = with_moments(200, &mu1, &a.sqrt().diag(0));
        let y = with_moments(300, &mu2, &b.sqrt().diag(0));
        // diagonal Σ commute: (Σ₁Σ₂)^{1/2} = diag(√(aᵢbᵢ)), so d² = ‖μ₁ − μ₂‖² + Σᵢ (√aᵢ − √bᵢ)²
        let want = ((&mu1 - &mu2).square().sum(Kind::Double) + (a.sqrt() - b.sqrt()).square().sum(Kind::Double))
            .double_value(&[]);
        let got = frechet_distance(&x, &y);
        assert!(rel(got, want) < 1e-6, "{got} vs {want}");
        // one dimension: d² = (μ₁ − μ₂)² + (σ₁ − σ₂)²
        let one =
            |mu: f64, s: f64| with_moments(50, &Tensor::from_slice(&[mu]), &Tensor::from_slice(&[s]).view([1, 1]));
        assert!(rel(frechet_distance(&one(1.0, 2.0), &one(-0.5, 0.5)), 1.5f64.powi(2) + 1.5f64.powi(2)) < 1e-9);
    }

    #[test]
    fn fd_of_non_commuting_covariances_matches_a_second_route() {
        tch::manual_seed(2);
        let f = 24;
        let (sigma1, sigma2) = (random_spd(f), random_spd(f));
        let commutator = sigma1.matmul(&sigma2) - sigma2.matmul(&sigma1);
        assert!(commutator.norm().double_value(&[]) > 0.1 * sigma1.matmul(&sigma2).norm().double_value(&[]));
        let (l1, l2) = (sigma1.linalg_cholesky(false), sigma2.linalg_cholesky(false));
        let (mu1, mu2) = (randn(&[f]), randn(&[f]));
        let got = frechet_distance(&with_moments(100, &mu1, &l1), &with_moments(150, &mu2, &l2));
        // Second route, with Cholesky factors Σ = L Lᵀ and no symmetric square root: (L₂ᵀL₁)(L₂ᵀL₁)ᵀ = L₂ᵀ Σ₁ L₂ has
        // the eigenvalues of Σ₁ L₂ L₂ᵀ = Σ₁Σ₂, so tr((Σ₁Σ₂)^{1/2}) = Σ singular values of L₂ᵀ L₁ (nuclear norm).
        let (_, singular, _) = l2.tr().matmul(&l1).svd(true, false);
        let want = (&mu1 - &mu2).square().sum(Kind::Double) + sigma1.trace() + sigma2.trace()
            - singular.sum(Kind::Double) * 2.0;
        let want = want.double_value(&[]);
        assert!(rel(got, want) < 1e-8, "{got} vs {want}");
    }

    #[test]
    fn fixed_permutation_is_a_permutation_that_mixes_both_halves() {
        let p = fixed_permutation(10_000);
        assert_eq!(p, fixed_permutation(10_000));
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10_000).collect::<Vec<_>>());
        let first_half = p[..1000].iter().filter(|&&i| i < 5000).count();
        assert!((430..570).contains(&first_half), "{first_half} of the first 1000 from the first half");
    }

    /// The MNIST test set and the shipped classifier.
    fn test_set_and_classifier() -> (Tensor, Tensor, MnistClassifier) {
        let data = mnist::load(&mnist::resolve_dir(None)).unwrap();
        (data.test_images, data.test_labels, MnistClassifier::load_shipped(Device::Cpu).unwrap())
    }

    #[test]
    fn real_test_digits_score_at_the_floor_with_balanced_confident_classes() {
        let (images, _, clf) = test_set_and_classifier();
        let order = fixed_permutation(images.size()[0]);
        for n in [500usize, 1000] {
            // real digits disjoint from both reference sets (which are order[..2n])
            let idx = Tensor::from_slice(&order[2 * n..3 * n]);
            let r = evaluate_samples(&clf, &images.index_select(0, &idx), &images);
            println!("n = {n}: {r:?}");
            assert_eq!(r.n, n as i64);
            assert!((0.6..1.6).contains(&r.fd_over_floor), "{r:?}"); // the spread of real-vs-real draws
            assert!(r.entropy_over_max > 0.99 && r.mean_confidence > 0.95, "{r:?}");
            assert!((r.class_histogram.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn noise_and_a_single_digit_are_caught() {
        let (images, labels, clf) = test_set_and_classifier();
        tch::manual_seed(3);
        let noise = Tensor::rand([500, 1, 28, 28], (Kind::Float, Device::Cpu));
        let r = evaluate_samples(&clf, &noise, &images);
        println!("uniform noise: {r:?}");
        assert!(r.fd_over_floor > 100.0, "{r:?}");
        assert!(r.entropy_over_max < 0.5 || r.mean_confidence < 0.5, "{r:?}");
        // mode collapse: 500 real sevens are sharp and confident, but one class only and far from the test set
        let sevens = images.index_select(0, &labels.eq(7).nonzero().squeeze_dim(1).narrow(0, 0, 500));
        let r = evaluate_samples(&clf, &sevens, &images);
        println!("only sevens: {r:?}");
        assert!(r.class_histogram[7] > 0.98 && r.entropy_over_max < 0.1 && r.mean_confidence > 0.95, "{r:?}");
        assert!(r.fd_over_floor > 10.0, "{r:?}");
    }
}
