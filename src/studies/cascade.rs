//! Lesson 11's cascade experiments: a 14×14 text-conditioned base model followed by a 14 → 28 super-resolution
//! stage, sampled at fixed augmentation levels, graded against lesson 06's direct 28×28 model.
use crate::data::to_unit;
use crate::diffusion::forward::{augment, augment_sigma};
use crate::diffusion::schedule::NoiseSchedule;
use crate::eval::frechet::evaluate_samples;
use crate::model::VAsEps;
use crate::nn::classifier::MnistClassifier;
use crate::nn::super_resolution::{upsample, LowResConditioned};
use crate::nn::unet::{UNet, UNetConfig};
use crate::pipelines::text_to_image::{Draw, TextToImage};
use crate::plot::{self, LinePanel};
use crate::sampling::ddpm::{sample, AncestralSampling, PosteriorVariance};
use crate::sampling::wrappers::Threshold;
use crate::studies::guidance_methods::{plot_rows, Tile};
use crate::train::ddpm::EpsObjective;
use crate::train::text_cond::{train_text_cond_unet, TextData};
use crate::train::trainer::{TrainRun, TrainerConfig};
use anyhow::{Context, Result};
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
    let alpha_bar = sched.to_tensor_alpha_bar(device);
    let z_s = augment(&alpha_bar, &z0, &levels, &eps); // [CDM] sec. 4.2, s fixed
    let low_up = upsample(&z_s, size); // (n, 1, H, W)
    let sigma = augment_sigma(&alpha_bar, &levels);
    let v_model = LowResConditioned { unet: sr, low_up: &low_up, sigma: &sigma };
    let model = VAsEps { v_model: &v_model, alpha_bar: &alpha_bar }; // the network predicts v
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

/// Everything lesson 11's cascade part measured.
pub struct CascadeReport {
    pub levels: Vec<LevelRow>,
    pub contenders: Vec<Contender>,
    pub best_level: usize,
    tiles: Vec<Tile>,
}

// ANCHOR: evaluate
/// Samples the cascade — `base` (14×14) for one prompt each, then each super-resolution model of `sr` (trained with
/// augmentation, without) at every level of `levels` from the same base samples — and lesson 06's `direct` model for
/// the same prompts; grades all of them (`grading`: the classifier, the asked digits, the test images) and times the
/// sampling. `train_seconds`: the base's and the two super-resolution models' training times, and lesson 06's
/// (see [`direct_train_seconds`]).
pub fn evaluate(
    (base, sr, direct): (&TextToImage, [&UNet; 2], &TextToImage),
    sched: &NoiseSchedule,
    (prompts, levels, draw): (&[String], &[usize], Draw),
    (clf, asked, test_images): (&MnistClassifier, &Tensor, &Tensor),
    train_seconds: [f64; 4],
) -> Result<CascadeReport> {
    let timed = |f: &mut dyn FnMut() -> Result<Tensor>| -> Result<(Tensor, f64)> {
        let started = std::time::Instant::now();
        Ok((f()?, started.elapsed().as_secs_f64()))
    };
    let (low, base_seconds) = timed(&mut || Ok(base.generate_each(prompts, &draw)?.0))?; // (n, 1, 14, 14)
    let device = base.device();
    let (mut levels_out, mut samples, mut sr_seconds) = (Vec::new(), Vec::new(), 0.0);
    for &level in levels {
        let how = (level, draw.steps, draw.seed + 1);
        let mut grades = Vec::new();
        for net in sr {
            let (x, secs) = timed(&mut || Ok(super_resolve(net, sched, &low, [28, 28], how, device)))?;
            sr_seconds = secs;
            grades.push(grade(clf, &x, asked, test_images));
            samples.push(x);
        }
        let (a, b) = (grades[0].frechet_distance, grades[1].frechet_distance);
        println!("level {level}: FD {a:.1} trained with augmentation, {b:.1} without");
        let without_augmentation = grades.pop().expect("two grades");
        levels_out.push(LevelRow { level, with_augmentation: grades.pop().expect("two grades"), without_augmentation });
    }
    let (direct_samples, direct_seconds) = timed(&mut || Ok(direct.generate_each(prompts, &draw)?.0))?;
    let direct_grade = grade(clf, &direct_samples, asked, test_images);
    let fd = |r: &LevelRow, i: usize| [&r.with_augmentation, &r.without_augmentation][i].frechet_distance;
    let best =
        |i: usize| (0..levels_out.len()).min_by(|&a, &b| fd(&levels_out[a], i).total_cmp(&fd(&levels_out[b], i)));
    let (best_aug, best_plain) = (best(0).context("no --levels")?, best(1).context("no --levels")?);
    let cascade_row = |i: usize, at: usize, name: &str| Contender {
        model: format!("cascade, {name}, s = {}", levels_out[at].level),
        train_seconds: train_seconds[0] + train_seconds[1 + i],
        sample_seconds: base_seconds + sr_seconds,
        grade: [&levels_out[at].with_augmentation, &levels_out[at].without_augmentation][i].clone(),
    };
    let contenders = vec![
        cascade_row(0, best_aug, "trained with augmentation"),
        cascade_row(1, best_plain, "trained without"),
        Contender {
            model: "lesson 06, direct 28×28".into(),
            train_seconds: train_seconds[3],
            sample_seconds: direct_seconds,
            grade: direct_grade,
        },
    ];
    let ten = |x: &Tensor| x.narrow(0, 0, 10.min(x.size()[0]));
    let tiles = vec![
        ("base 14×14".to_string(), ten(&low).upsample_nearest2d([28, 28], None, None)),
        (format!("SR (augmented), s = {}", levels_out[best_aug].level), ten(&samples[2 * best_aug])),
        (format!("SR (not augmented), s = {}", levels_out[0].level), ten(&samples[1])),
        ("lesson 06, direct".into(), ten(&direct_samples)),
    ];
    Ok(CascadeReport { best_level: levels_out[best_aug].level, levels: levels_out, contenders, tiles })
}
// ANCHOR_END: evaluate

/// How long lesson 06's direct model trains on this CPU: `timed_steps` of its recipe (`cfg` with lesson 06's batch and
/// learning rate) run here and scaled to the steps its own run took (book/src/figures/lesson06/metrics.json), so that
/// the cascade-vs-direct table compares training times measured on one machine in one run.
pub fn direct_train_seconds(
    direct: &TextToImage,
    text: TextData,
    images: &Tensor,
    objective: &EpsObjective,
    cfg: &TrainerConfig,
) -> Result<f64> {
    let path = crate::cli::crate_root().join("book/src/figures/lesson06/metrics.json");
    let read = || -> Option<f64> {
        let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
        metrics["train_steps"].as_f64()
    };
    let steps = read().with_context(|| format!("{}: lesson 06's run, with its train_steps", path.display()))?;
    let run = TrainRun::new(direct.device(), |_| {});
    let (_, _, timed) = train_text_cond_unet(&direct.unet.0.config, text, images, objective, cfg, run)?;
    Ok(timed.seconds / cfg.steps as f64 * steps)
}

impl CascadeReport {
    /// cascade_levels.png and cascade_stages.png in `dir`.
    pub fn plot(&self, dir: &Path) -> Result<()> {
        let direct = self.contenders.last().map_or(f64::NAN, |c| c.grade.frechet_distance);
        plot_levels(&dir.join("cascade_levels.png"), &self.levels, direct)?;
        plot_rows(&dir.join("cascade_stages.png"), "The cascade's stages for \"a handwritten 0\" … \"9\"", &self.tiles)
    }

    /// The results.md sections: the level sweep and the comparison with the direct model.
    pub fn sections(&self) -> Vec<(&'static str, String)> {
        vec![("levels", levels_table(&self.levels)), ("contenders", contenders_table(&self.contenders))]
    }

    /// metrics.json's cascade part.
    pub fn metrics(
        &self,
        base: &UNetConfig,
        sr: &UNetConfig,
        (base_steps, sr_steps, max_level): (u64, u64, usize),
    ) -> serde_json::Value {
        serde_json::json!({
            "base": {"network": base, "steps": base_steps}, "super_resolution": {"network": sr, "steps": sr_steps,
            "max_level": max_level}, "levels": self.levels, "contenders": self.contenders, "best_level": self.best_level,
            "lesson06_train_seconds_here": self.contenders.last().map(|c| c.train_seconds),
        })
    }
}
