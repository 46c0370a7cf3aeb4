//! Lesson 10's study: classifier-free, classifier and CLIP guidance measured on the same axes (how often the
//! asked-for digit, how far from real digits, how varied) as the scale sweeps, and Imagen's thresholding at large
//! guidance.
//!
//! [Guidance] Dhariwal & Nichol 2021, arXiv:2105.05233, Fig. 4 and Table 4 (the scale trades fidelity for
//! diversity). [GLIDE] Nichol et al. 2022, arXiv:2112.10741, sec. 5.1 and Fig. 6 (classifier-free guidance against
//! CLIP guidance). [Imagen] Saharia et al. 2022, arXiv:2205.11487, sec. 2.3 and 4.4 (thresholding at large w).
use crate::data::to_unit;
use crate::diffusion::forward::q_sample;
use crate::diffusion::schedule::NoiseSchedule;
use crate::eval::frechet::{evaluate_samples, SampleReport};
use crate::model::{EpsDenoiser, EpsModel};
use crate::nn::classifier::MnistClassifier;
use crate::nn::text_unet::{encode_context, lens_to_mask};
use crate::nn::unet::pooled_context;
use crate::pipelines::prompt_encoder::PromptEncoder;
use crate::pipelines::text_to_image::{Draw, TextToImage};
use crate::plot::{self, LinePanel};
use crate::sampling::ddpm::{AncestralSampling, PosteriorVariance};
use crate::sampling::registry::Sampler;
use crate::sampling::wrappers::{Threshold, Thresholded};
use crate::studies::guidance::{grade_guided, GuidanceReport};
use anyhow::Result;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// What the samples of each method are graded against: the shipped classifier (not the one that guides), the
/// MNIST test set, and the digit asked of each sample.
pub struct Grading<'a> {
    pub clf: &'a MnistClassifier,
    pub test_images: &'a Tensor,
    pub test_labels: &'a Tensor,
    /// (N,) the digit each sample was asked to be.
    pub requested: Tensor,
}

/// A labelled row of sample images for a figure: (label, (10, 1, H, W), one per digit).
pub type Tile = (String, Tensor);

/// One scale of one method: the sweep's row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MethodRow {
    pub method: String,
    /// Seconds to draw the samples of this scale.
    pub seconds: f64,
    #[serde(flatten)]
    pub report: GuidanceReport,
}

// ANCHOR: ddim_samples
/// Samples of an ε-model (guided or not) from the starting noise z (N, 1, H, W): DDIM (η = 0) over `steps` of the
/// model's own timesteps, x̂₀ clipped to [−1, 1] at every step as lessons 04–05 sample; (N, 1, H, W) in [0, 1].
pub fn ddim_samples(model: &dyn EpsModel, sched: &NoiseSchedule, z: &Tensor, steps: usize) -> Tensor {
    let eps = EpsDenoiser::new(model, sched);
    let clipped = Thresholded { inner: &eps, threshold: Threshold::Static };
    let x = Sampler::Ddim.sample(&clipped, sched, z, steps, &mut |_| {});
    to_unit(&x).to_device(Device::Cpu)
}
// ANCHOR_END: ddim_samples

/// Samples of an ε-model from the noise drawn after seeding with `seed` (the same z as `Tensor::randn` of `shape` there):
/// DDPM's ancestral sampler ([DDPM] Algorithm 2) over `steps` respaced timesteps, σ_t² = β_t, x̂₀ clipped to
/// [−1, 1]; (N, 1, H, W) in [0, 1]. What [Guidance] Algorithm 1 runs on.
pub fn ddpm_samples(
    model: &dyn EpsModel,
    sched: &NoiseSchedule,
    shape: &[i64],
    steps: usize,
    (seed, device): (i64, Device),
) -> Tensor {
    tch::manual_seed(seed);
    // all of them in one batch, so that the noise drawn is the one Tensor::randn(shape) draws after the seed
    let how =
        AncestralSampling { steps, variance: PosteriorVariance::Beta, threshold: Threshold::Static, batch: shape[0] };
    let x = crate::sampling::ddpm::sample(model, sched, shape, &how, device, &mut |_, _| {});
    to_unit(&x).to_device(Device::Cpu)
}

/// Draws and grades the samples of `method` at every scale of `scales`: `draw(scale)` gives (N, 1, H, W) in [0, 1]
/// for the digits of `grading.requested`. Each row is logged as it is graded.
pub fn sweep(
    method: &str,
    scales: &[f64],
    draw: &mut dyn FnMut(f64) -> Tensor,
    grading: &Grading,
    tiles: &mut Vec<Tile>,
) -> Vec<MethodRow> {
    scales
        .iter()
        .map(|&s| {
            let started = std::time::Instant::now();
            let samples = draw(s);
            let seconds = started.elapsed().as_secs_f64();
            let g = grading;
            let report = grade_guided(g.clf, &samples, &g.requested, g.test_images, g.test_labels, s);
            println!(
                "{method} at {s}: accuracy {:.3}, FD/floor {:.2}, class entropy/ln 10 {:.3}, diversity {:.2} of real \
                 ({seconds:.0} s)",
                report.accuracy,
                report.samples.fd_over_floor,
                report.samples.entropy_over_max,
                report.diversity_over_real
            );
            tiles.push((format!("{method}, {s}"), first_of_each_digit(&samples, &g.requested)));
            MethodRow { method: method.to_string(), seconds, report }
        })
        .collect()
}

/// The first sample of each digit 0–9: (10, 1, H, W).
fn first_of_each_digit(samples: &Tensor, requested: &Tensor) -> Tensor {
    let idx: Vec<Tensor> = (0..10).map(|d| requested.eq(d).nonzero().get(0)).collect(); // 10 × (1,)
    samples.index_select(0, &Tensor::cat(&idx, 0)) // (10, 1, H, W)
}

// ANCHOR: matched
/// A method's Fréchet ratio and class entropy where its accuracy first reaches `target` as the scale grows, linear
/// between the two scales around the crossing: (scale, FD/floor, entropy/ln 10); None if it never gets there.
pub fn at_accuracy(rows: &[MethodRow], target: f64) -> Option<(f64, f64, f64)> {
    let point = |r: &MethodRow| (r.report.scale, r.report.samples.fd_over_floor, r.report.samples.entropy_over_max);
    let first = rows.first()?;
    if first.report.accuracy >= target {
        return Some(point(first));
    }
    rows.windows(2).find(|w| w[0].report.accuracy < target && w[1].report.accuracy >= target).map(|w| {
        let (a, b) = (point(&w[0]), point(&w[1]));
        let f = (target - w[0].report.accuracy) / (w[1].report.accuracy - w[0].report.accuracy);
        (a.0 + f * (b.0 - a.0), a.1 + f * (b.1 - a.1), a.2 + f * (b.2 - a.2))
    })
}
// ANCHOR_END: matched

/// Accuracy of `logits(x_t, t)` (N, 10) on test digits (N, 1, H, W) in [−1, 1] noised to each timestep of
/// `timesteps` (the same noise at every t): [(t, accuracy)].
pub fn accuracy_by_timestep(
    logits: &dyn Fn(&Tensor, &Tensor) -> Tensor,
    sched: &NoiseSchedule,
    (images, labels): (&Tensor, &Tensor),
    timesteps: &[usize],
) -> Vec<(f64, f64)> {
    let eps = images.randn_like();
    timesteps
        .iter()
        .map(|&t| {
            let tt = Tensor::full([images.size()[0]], t as i64, (Kind::Int64, images.device())); // (N,)
            let x_t = q_sample(&sched.to_tensor_alpha_bar(images.device()), images, &tt, &eps); // [DDPM] eq. 4
            let predicted = tch::no_grad(|| logits(&x_t, &tt)).argmax(-1, false).to_device(Device::Cpu);
            let acc = predicted.eq_tensor(&labels.to_device(Device::Cpu)).to_kind(Kind::Double).mean(Kind::Double);
            (t as f64, acc.double_value(&[]))
        })
        .collect()
}

/// The accuracy-by-timestep table: a row per timestep, a column per reader.
pub fn accuracy_by_timestep_table(series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let mut header = vec!["t"];
    header.extend(series.iter().map(|(n, _)| *n));
    let body: Vec<Vec<String>> = (0..series.first().map_or(0, |s| s.1.len()))
        .map(|i| {
            let mut row = vec![format!("{}", series[0].1[i].0)];
            row.extend(series.iter().map(|(_, p)| format!("{:.3}", p[i].1)));
            row
        })
        .collect();
    crate::cli::markdown_table(&header, &body)
}

/// accuracy_by_timestep.png: accuracy against the timestep for each series (the noise-aware classifier, the noised
/// CLIP's zero-shot pick, the graders' classifier that never saw noise).
pub fn plot_accuracy_by_timestep(path: &Path, series: &[(&str, Vec<(f64, f64)>)]) -> Result<()> {
    let panel = LinePanel {
        title: "reading the digit from x_t".into(),
        x_desc: "timestep t (noisier to the right)".into(),
        y_desc: "accuracy on noised test digits".into(),
        log_y: false,
        series: series.iter().map(|(n, p)| (n.to_string(), p.clone())).collect(),
    };
    plot::line_panels(path, "Why the guiding classifier must see noise", 640, 420, &[panel])
}

/// guidance_comparison.png: accuracy against the Fréchet ratio and against class entropy, a curve per method as its
/// scale sweeps.
pub fn plot_comparison(path: &Path, rows: &[MethodRow]) -> Result<()> {
    let mut methods: Vec<&str> = rows.iter().map(|r| r.method.as_str()).collect();
    methods.dedup();
    let series = |x: &dyn Fn(&MethodRow) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        methods
            .iter()
            .map(|m| {
                let pts = rows.iter().filter(|r| r.method == *m).map(|r| (x(r), r.report.accuracy)).collect();
                (m.to_string(), pts)
            })
            .collect()
    };
    let panels = [
        LinePanel {
            title: "fidelity against realism".into(),
            x_desc: "Fréchet distance / floor (lower: closer to real digits)".into(),
            y_desc: "accuracy (the digit asked for)".into(),
            log_y: false,
            series: series(&|r| r.report.samples.fd_over_floor),
        },
        LinePanel {
            title: "fidelity against class balance".into(),
            x_desc: "class entropy / ln 10".into(),
            y_desc: "accuracy (the digit asked for)".into(),
            log_y: false,
            series: series(&|r| r.report.samples.entropy_over_max),
        },
    ];
    plot::line_panels(path, "Guidance methods as their scale sweeps (each point a scale)", 560, 420, &panels)
}

/// The frozen text encoder's pooled state (its last real token's, CLIP's pooled output) of token ids (N, L) with
/// `lens` (N,) real tokens each: (N, D), in chunks, without gradients.
pub fn pooled_text_states(prompts: &PromptEncoder, ids: &Tensor, lens: &Tensor) -> Tensor {
    let (n, l) = (ids.size()[0], ids.size()[1]);
    let device = prompts.device();
    let chunks: Vec<Tensor> = (0..n)
        .step_by(1024)
        .map(|s| {
            let len = 1024.min(n - s);
            let ids = ids.narrow(0, s, len).to_device(device);
            let mask = lens_to_mask(&lens.narrow(0, s, len).to_device(device), l); // (b, L)
            let cond = encode_context(&prompts.text_encoder, &ids, &mask); // (b, L, D)
            pooled_context(&cond.context, cond.mask.as_ref()) // (b, D)
        })
        .collect();
    Tensor::cat(&chunks, 0) // (N, D)
}

/// The pooled states (N, D) of prompts as a user types them (each checked as the pipeline checks its prompts).
pub fn pooled_prompt_states(prompts: &PromptEncoder, texts: &[String]) -> Result<Tensor> {
    let rows: Result<Vec<Tensor>> = texts
        .iter()
        .map(|p| {
            prompts.check_prompt(p)?;
            let (_, cond) = prompts.context(p); // (1, L, D)
            Ok(pooled_context(&cond.context, cond.mask.as_ref())) // (1, D)
        })
        .collect();
    Ok(Tensor::cat(&rows?, 0)) // (N, D)
}

/// A grid of sample rows, each labelled: (label, (10, 1, H, W)) -> one row per entry, digits 0–9 across.
pub fn plot_rows(path: &Path, title: &str, rows: &[Tile]) -> Result<()> {
    let images = Tensor::cat(&rows.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>(), 0); // (10·rows, 1, H, W)
    let labels: Vec<String> = rows
        .iter()
        .flat_map(|(l, t)| (0..t.size()[0]).map(move |j| if j == 0 { l.clone() } else { String::new() }))
        .collect();
    plot::image_grid(path, title, &images, 10, 2, &labels)
}

/// How saturated samples (N, 1, H, W) in [0, 1] are: the share of their ink pixels (> 0.1) at full white (≥ 254/255),
/// and the share of all pixels at either end (≤ 1/255 or ≥ 254/255), a measure of our own (Imagen shows saturation
/// in pictures, with no number), which MNIST's black background dominates.
pub fn saturation(samples: &Tensor) -> (f64, f64) {
    let x = samples.to_kind(Kind::Double);
    let (white, black) = (x.ge(254.0 / 255.0), x.le(1.0 / 255.0));
    let ink = x.gt(0.1);
    let count = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
    let ink_white = count(&white.logical_and(&ink)) / count(&ink).max(1.0);
    (ink_white, count(&white.logical_or(&black)) / x.numel() as f64)
}

/// One (threshold, w) cell of the thresholding study.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThresholdRow {
    pub threshold: String,
    pub guidance: f64,
    pub accuracy: f64,
    /// Share of ink pixels at full white ([`saturation`]).
    pub ink_saturation: f64,
    /// Share of all pixels at 0 or 1.
    pub pixels_at_ends: f64,
    pub samples: SampleReport,
}

// ANCHOR: thresholding
/// Lesson 06's pipeline at each guidance scale of `scales` with each threshold of `thresholds`, one image per prompt
/// of `prompts` (asked digits `requested`), from the same noise: a row per (threshold, w), and the first image of
/// each digit per cell for the figure.
pub fn thresholding_study(
    pipe: &TextToImage,
    prompts: &[String],
    (thresholds, scales): (&[Threshold], &[f64]),
    (steps, seed): (usize, u64),
    grading: &Grading,
) -> Result<(Vec<ThresholdRow>, Vec<Tile>)> {
    let (mut rows, mut tiles) = (Vec::new(), Vec::new());
    for threshold in thresholds {
        for &w in scales {
            let draw = Draw { threshold: *threshold, ..Draw::new(w, steps, seed) };
            let (samples, _) = pipe.generate_each(prompts, &draw)?; // (P, 1, 28, 28) in [0, 1]
            let probs = grading.clf.probabilities(&samples);
            let correct = probs.argmax(-1, false).eq_tensor(&grading.requested);
            let (ink_saturation, pixels_at_ends) = saturation(&samples);
            let row = ThresholdRow {
                threshold: threshold.name(),
                guidance: w,
                accuracy: correct.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]),
                ink_saturation,
                pixels_at_ends,
                samples: evaluate_samples(grading.clf, &samples, grading.test_images),
            };
            println!(
                "threshold {} at w = {w}: accuracy {:.3}, ink at full white {:.3}, FD/floor {:.2}",
                row.threshold, row.accuracy, row.ink_saturation, row.samples.fd_over_floor
            );
            tiles.push((format!("{}, w={w}", threshold.name()), first_of_each_digit(&samples, &grading.requested)));
            rows.push(row);
        }
    }
    Ok((rows, tiles))
}
// ANCHOR_END: thresholding

/// thresholding.png: ink saturation, Fréchet ratio and accuracy against w, a line per threshold.
pub fn plot_thresholding(path: &Path, rows: &[ThresholdRow]) -> Result<()> {
    let mut names: Vec<&str> = rows.iter().map(|r| r.threshold.as_str()).collect();
    names.dedup();
    let panel = |title: &str, y: &str, f: &dyn Fn(&ThresholdRow) -> f64| LinePanel {
        title: title.into(),
        x_desc: "guidance scale w".into(),
        y_desc: y.into(),
        log_y: false,
        series: names
            .iter()
            .map(|n| (n.to_string(), rows.iter().filter(|r| r.threshold == *n).map(|r| (r.guidance, f(r))).collect()))
            .collect(),
    };
    let panels = [
        panel("saturation", "share of ink pixels at full white", &|r| r.ink_saturation),
        panel("Fréchet distance", "FD / floor", &|r| r.samples.fd_over_floor),
        panel("fidelity", "accuracy (the digit asked for)", &|r| r.accuracy),
    ];
    plot::line_panels(
        path,
        "Thresholding x̂₀ at large guidance (lesson 06's pipeline, held-out prompts)",
        420,
        340,
        &panels,
    )
}

/// The comparison table: a row per method and scale.
pub fn comparison_table(rows: &[MethodRow]) -> String {
    let f = |v: f64| format!("{v:.3}");
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let (g, q) = (&r.report, &r.report.samples);
            vec![
                r.method.clone(),
                g.scale.to_string(),
                f(g.accuracy),
                f(g.mean_p_requested),
                format!("{:.2}", q.fd_over_floor),
                f(q.entropy_over_max),
                format!("{:.2}", g.diversity_over_real),
                format!("{:.0}", r.seconds),
            ]
        })
        .collect();
    let header = [
        "method",
        "scale",
        "accuracy",
        "p(asked digit)",
        "FD / floor",
        "class entropy / ln 10",
        "diversity / real",
        "seconds",
    ];
    crate::cli::markdown_table(&header, &body)
}

/// The matched-accuracy table: for each target accuracy and method, the scale, Fréchet ratio and class entropy where
/// the method's accuracy reaches it.
pub fn matched_table(methods: &[(&str, &[MethodRow])], targets: &[f64]) -> String {
    let cells = |target: f64, name: &str, rows: &[MethodRow]| {
        let mut row = vec![format!("{target:.2}"), name.to_string()];
        match at_accuracy(rows, target) {
            Some((s, fd, h)) => row.extend([format!("{s:.2}"), format!("{fd:.2}"), format!("{h:.3}")]),
            None => {
                let best = rows.iter().map(|r| r.report.accuracy).fold(0.0, f64::max);
                row.extend([format!("not reached (best {best:.3})"), "–".into(), "–".into()])
            }
        }
        row
    };
    let body: Vec<Vec<String>> =
        targets.iter().flat_map(|&t| methods.iter().map(move |(name, rows)| cells(t, name, rows))).collect();
    let header = ["accuracy", "method", "scale", "FD / floor", "class entropy / ln 10"];
    crate::cli::markdown_table(&header, &body)
}

/// The thresholding table, ending with the [`saturation`] of real test digits, `real` (ink at full white, pixels at
/// 0 or 1), for reference.
pub fn thresholding_table(rows: &[ThresholdRow], real: (f64, f64)) -> String {
    let mut body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.threshold.clone(),
                r.guidance.to_string(),
                format!("{:.3}", r.accuracy),
                format!("{:.3}", r.ink_saturation),
                format!("{:.3}", r.pixels_at_ends),
                format!("{:.2}", r.samples.fd_over_floor),
            ]
        })
        .collect();
    let dash = || "–".to_string();
    body.push(vec![
        "real test digits".into(),
        dash(),
        dash(),
        format!("{:.3}", real.0),
        format!("{:.3}", real.1),
        dash(),
    ]);
    let header = ["x̂₀", "w", "accuracy", "ink at full white", "pixels at 0 or 1", "FD / floor"];
    crate::cli::markdown_table(&header, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scale: f64, accuracy: f64, fd: f64) -> MethodRow {
        let samples = SampleReport {
            n: 10,
            frechet_distance: fd,
            frechet_floor: 1.0,
            fd_over_floor: fd,
            class_histogram: vec![0.1; 10],
            class_entropy: 2.0,
            entropy_over_max: 0.9,
            mean_confidence: 0.9,
        };
        let report = GuidanceReport {
            scale,
            accuracy,
            mean_p_requested: accuracy,
            diversity: 1.0,
            diversity_real: 1.0,
            diversity_over_real: 1.0,
            samples,
        };
        MethodRow { method: "m".into(), seconds: 0.0, report }
    }

    #[test]
    fn matched_accuracy_interpolates_between_the_scales_around_the_crossing() {
        let rows = [row(1.0, 0.5, 2.0), row(2.0, 0.8, 3.0), row(4.0, 1.0, 5.0)];
        let (s, fd, _) = at_accuracy(&rows, 0.9).unwrap();
        assert!((s - 3.0).abs() < 1e-12 && (fd - 4.0).abs() < 1e-12, "{s} {fd}");
        assert_eq!(at_accuracy(&rows, 0.4).map(|p| p.0), Some(1.0), "already there at the first scale");
        assert!(at_accuracy(&rows[..2], 0.9).is_none(), "never reached");
    }

    #[test]
    fn saturation_counts_ink_at_full_white_and_pixels_at_the_ends() {
        // 4 pixels: background 0, ink 0.5, ink 1.0, ink 1.0
        let x = Tensor::from_slice(&[0.0f32, 0.5, 1.0, 1.0]).view([1, 1, 2, 2]);
        let (ink, ends) = saturation(&x);
        assert!((ink - 2.0 / 3.0).abs() < 1e-12 && (ends - 0.75).abs() < 1e-12);
    }
}
