//! Lesson 11's cascade experiments: a 14×14 text-conditioned base model followed by a 14 → 28 super-resolution
//! stage, sampled at fixed augmentation levels, graded against lesson 06's direct 28×28 model.
use crate::data::to_unit;
use crate::diffusion::forward::augment;
use crate::diffusion::schedule::NoiseSchedule;
use crate::eval::frechet::evaluate_samples;
use crate::nn::classifier::MnistClassifier;
use crate::nn::super_resolution::{level_fraction, upsample, LowResConditioned};
use crate::nn::unet::UNet;
use crate::plot::{self, LinePanel};
use crate::sampling::ddpm::{sample, AncestralSampling, PosteriorVariance};
use crate::sampling::wrappers::Threshold;
use anyhow::Result;
use std::path::Path;
use tch::{Device, Kind, Tensor};

// ANCHOR: sample_sr
/// The second stage: from low-resolution samples (n, 1, h, w) in [0, 1], augmented to the fixed `level` (the same
/// noise for every level: drawn from `seed`), `steps` respaced DDPM steps of the super-resolution UNet: (n, 1, H, W)
/// in [0, 1] on the CPU, H×W = `size`.
pub fn super_resolve(
    sr: &UNet,
    sched: &NoiseSchedule,
    low: &Tensor,
    size: [i64; 2],
    (level, steps, seed): (usize, usize, u64),
    device: Device,
) -> Tensor {
    let n = low.size()[0];
    tch::manual_seed(seed as i64);
    let z0 = (low * 2.0 - 1.0).to_device(device); // [0, 1] -> [−1, 1]
    let eps = Tensor::randn(z0.size(), (Kind::Float, device));
    let levels = Tensor::full([n], level as i64, (Kind::Int64, device));
    let z_s = augment(&sched.to_tensor_alpha_bar(device), &z0, &levels, &eps); // [CDM] sec. 4.2, s fixed
    let low_up = upsample(&z_s, size); // (n, 1, H, W)
    let level = level_fraction(&levels, sched.num_steps());
    let model = LowResConditioned { unet: sr, low_up: &low_up, level: &level };
    let how =
        AncestralSampling { steps, variance: PosteriorVariance::BetaTilde, threshold: Threshold::Static, batch: n };
    let x = tch::no_grad(|| sample(&model, sched, &[n, 1, size[0], size[1]], &how, device, &mut |_, _| {}));
    to_unit(&x).to_device(Device::Cpu)
}
// ANCHOR_END: sample_sr

/// How a set of samples for asked digits looks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Grade {
    pub n: i64,
    /// Fréchet distance of the classifier's features against n test digits (lesson 04's harness).
    pub frechet_distance: f64,
    /// Share of samples the classifier reads as the digit their prompt asked for.
    pub prompt_accuracy: f64,
}

/// Grades `samples` (n, 1, 28, 28) in [0, 1] drawn for the digits `asked` (n,).
pub fn grade(clf: &MnistClassifier, samples: &Tensor, asked: &Tensor, test_images: &Tensor) -> Grade {
    let report = evaluate_samples(clf, samples, test_images);
    let read = clf.probabilities(samples).argmax(-1, false);
    let accuracy = read.eq_tensor(&asked.to_device(read.device())).to_kind(Kind::Float).mean(Kind::Float);
    Grade {
        n: samples.size()[0],
        frechet_distance: report.frechet_distance,
        prompt_accuracy: accuracy.double_value(&[]),
    }
}

/// FD at one sampling level, for the model trained with and without augmentation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LevelRow {
    pub level: usize,
    pub with_augmentation: Grade,
    pub without_augmentation: Grade,
}

/// cascade_levels.png: FD against the sampling level, with and without augmentation in training, and lesson 06's
/// direct model as a line.
pub fn plot_levels(path: &Path, rows: &[LevelRow], direct: f64) -> Result<()> {
    let series = |f: &dyn Fn(&LevelRow) -> f64| rows.iter().map(|r| (r.level as f64, f(r))).collect::<Vec<_>>();
    let flat = |v: f64| rows.iter().map(|r| (r.level as f64, v)).collect::<Vec<_>>();
    let panel = LinePanel {
        title: "the super-resolution stage's input, noised to level s".into(),
        x_desc: "augmentation level s at sampling (timesteps of T = 1000)".into(),
        y_desc: "Fréchet distance (lower is better)".into(),
        log_y: false,
        series: vec![
            ("trained with augmentation".into(), series(&|r| r.with_augmentation.frechet_distance)),
            ("trained without".into(), series(&|r| r.without_augmentation.frechet_distance)),
            ("lesson 06, direct 28×28".into(), flat(direct)),
        ],
    };
    plot::line_panels(path, "Conditioning augmentation: FD of the cascade's samples", 640, 420, &[panel])
}

/// The level sweep as a markdown table.
pub fn levels_table(rows: &[LevelRow]) -> String {
    let mut t = String::from(
        "| level s | FD, trained with augmentation | FD, trained without | accuracy, with | accuracy, without |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let (a, b) = (&r.with_augmentation, &r.without_augmentation);
        t.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.3} | {:.3} |\n",
            r.level, a.frechet_distance, b.frechet_distance, a.prompt_accuracy, b.prompt_accuracy
        ));
    }
    t
}

/// One line of the cascade-vs-direct table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Contender {
    pub model: String,
    pub train_seconds: f64,
    pub sample_seconds: f64,
    pub grade: Grade,
}

/// The cascade-vs-direct table (markdown).
pub fn contenders_table(rows: &[Contender]) -> String {
    let mut t = String::from(
        "| model | training | sampling (all samples) | Fréchet distance | prompt accuracy | n |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        t.push_str(&format!(
            "| {} | {:.0} s | {:.1} s | {:.1} | {:.3} | {} |\n",
            r.model, r.train_seconds, r.sample_seconds, r.grade.frechet_distance, r.grade.prompt_accuracy, r.grade.n
        ));
    }
    t
}
