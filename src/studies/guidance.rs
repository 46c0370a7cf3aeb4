//! Lesson 05's study of classifier-free guidance: the two numbers that show what it trades, how often the samples are
//! the class asked for and how varied they are within a class, against the guidance scale.
//!
//! [CFG] Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598, Figure 3 (the trade-off).
use crate::eval::frechet::{evaluate_samples, SampleReport};
use crate::eval::sample_quality::within_class_diversity;
use crate::nn::classifier::MnistClassifier;
use crate::plot::{self, LinePanel};
use anyhow::Result;
use std::path::Path;
use tch::{Kind, Tensor};

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

/// samples_by_class.png: a row per digit, then for each scale of `scales` its first `k` samples;
/// `samples[i][digit]` are the samples (n, 1, 28, 28) in [0, 1] of `digit` at `scales[i]`, from the same noises at
/// every scale.
pub fn plot_samples_by_class(path: &Path, samples: &[Vec<Tensor>], scales: &[f64], k: i64) -> Result<()> {
    let (mut grid, mut tile_labels) = (Vec::new(), Vec::new());
    for digit in 0..10 {
        for (i, &w) in scales.iter().enumerate() {
            grid.push(samples[i][digit as usize].narrow(0, 0, k));
            tile_labels.extend((0..k).map(|j| if j == 0 { format!("w={w}") } else { String::new() }));
        }
    }
    let cols = scales.len() * k as usize;
    plot::image_grid(
        path,
        "Digits 0–9 (rows) at guidance scales w, the same noise per digit",
        &Tensor::cat(&grid, 0),
        cols,
        2,
        &tile_labels,
    )
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

    #[test]
    fn the_samples_by_class_grid_renders_a_row_per_digit() {
        let dir = tempfile::tempdir().unwrap();
        let per_digit = || (0..10).map(|_| Tensor::rand([3, 1, 28, 28], (Kind::Float, tch::Device::Cpu))).collect();
        let samples: Vec<Vec<Tensor>> = vec![per_digit(), per_digit()];
        let path = dir.path().join("samples_by_class.png");
        plot_samples_by_class(&path, &samples, &[0.0, 3.0], 2).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
    }
}
