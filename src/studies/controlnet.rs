//! Lesson 13's measurements of a ControlNet on lesson 06's frozen pipeline: how closely samples follow their hint
//! (the F1 of their Canny edges against the hint's), whether they still follow the prompt, what happens when hint
//! and prompt disagree, and how both move with the control weight.
//!
//! [ControlNet] Zhang, Rao, Agrawala 2023, arXiv:2302.05543, sec. 4.3 (the conditioning scale) and Fig. 4 ("sudden
//! convergence": the model starts following the hint abruptly during training).
use crate::cli::markdown_table;
use crate::data::captions::held_out_prompt_per_row;
use crate::data::hints::HintKind;
use crate::data::to_unit;
use crate::diffusion::schedule::NoiseSchedule;
use crate::eval::edges::{edge_f1, mask_iou};
use crate::nn::classifier::MnistClassifier;
use crate::nn::controlnet::{ControlNet, ControlScale};
use crate::pipelines::text_to_image::TextToImage;
use crate::plot::{self, LinePanel};
use crate::sampling::controlled::{Control, ControlledGuidance};
use crate::sampling::ddpm::{sample, AncestralSampling};
use crate::sampling::wrappers::Threshold;
use crate::studies::guidance_methods::Tile;
use anyhow::{ensure, Context, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How lesson 13 draws: the pipeline's guidance w and DDPM steps, the seed of the noise, the control weight and
/// guess mode, and the window of the way through sampling where the control acts.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ControlDraw {
    pub guidance: f64,
    pub steps: usize,
    pub seed: u64,
    pub scale: ControlScale,
    pub window: (f64, f64),
}

// ANCHOR: draw_controlled
/// One image per prompt of `prompts` (at most 250) with the hint of the same row, `hints` (P or 1, C, H, W) in
/// [0, 1], from the noise of `draw.seed`: (P, 1, S, S) in [0, 1] on the CPU. A prompt the pipeline cannot read is an
/// error naming it.
pub fn draw_controlled(
    pipe: &TextToImage,
    control: &ControlNet,
    prompts: &[String],
    hints: &Tensor,
    draw: &ControlDraw,
) -> Result<Tensor> {
    ensure!((1..=250).contains(&prompts.len()), "give 1 to 250 images at once (--num), got {}", prompts.len());
    let c = &control.config;
    ensure!(
        c.unet == pipe.unet.0.config,
        "this ControlNet was trained for another UNet than the pipeline's: pass a ControlNet and a pipeline that belong together"
    );
    // the hint encoder's stride-s stages shrink the hint to the UNet's input size
    let side = pipe.config.image_size * c.hint_stride.pow(c.hint_embedding_channels.len() as u32 - 1);
    let size = hints.size();
    ensure!(
        size.len() == 4 && size[1] == c.hint_channels && size[2..] == [side, side],
        "the hint is {size:?}, this ControlNet reads ({}, {side}, {side}) hints: give a {side}×{side} PNG",
        c.hint_channels
    );
    let (conds, refused) = pipe.prompts.conds_each(prompts)?;
    if let Some(i) = refused.iter().position(|r| *r) {
        pipe.check_prompt(&prompts[i]).with_context(|| format!("prompt {i}"))?;
    }
    let (cond, uncond) = conds.context("no prompt to draw")?;
    let sched = NoiseSchedule::by_name(&pipe.config.schedule, pipe.config.num_train_timesteps)?;
    let model = ControlledGuidance {
        unet: &pipe.unet.0,
        controls: vec![Control {
            net: control,
            hint: hints.to_device(pipe.device()),
            scale: draw.scale,
            window: draw.window,
        }],
        cond,
        uncond,
        guidance: draw.guidance,
        // the steps `sample` takes
        timesteps: sched.respaced(draw.steps.min(sched.num_steps())).0.into_iter().map(|t| t as f64).collect(),
        kind: None,
    };
    let (p, s) = (prompts.len() as i64, pipe.config.image_size);
    tch::manual_seed(draw.seed as i64);
    let how =
        AncestralSampling { steps: draw.steps, variance: pipe.config.variance, threshold: Threshold::Static, batch: p };
    let x = sample(&model, &sched, &[p, 1, s, s], &how, pipe.device(), &mut |_, _| {});
    Ok(to_unit(&x).to_device(Device::Cpu)) // (P, 1, S, S)
}
// ANCHOR_END: draw_controlled

/// How samples drawn for `requested` digits (N,) with `hints` (N, 1, H, W) grade.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControlGrade {
    /// Mean over samples of how closely each follows its hint: for edges, the F1 of its Canny edges against the
    /// hint's with a one-pixel tolerance ([`edge_f1`]); for masks, the IoU of its grown ink with the mask
    /// ([`mask_iou`]).
    pub fidelity: f64,
    /// The same without tolerance: edge F1 with exact pixel matches (for masks, equal to `fidelity`).
    pub fidelity_exact: f64,
    /// Share of samples the shipped classifier reads as the requested digit.
    pub accuracy: f64,
}

// ANCHOR: grade
/// Grades samples (N, 1, H, W) in [0, 1]: each one's own hint, made the way the hints were (the same Canny, the same
/// mask), against the hint it was drawn with, and the shipped classifier against the requested digits.
pub fn grade(
    clf: &MnistClassifier,
    samples: &Tensor,
    (requested, hints): (&Tensor, &Tensor),
    kind: HintKind,
) -> Result<ControlGrade> {
    let (own, hints) = (kind.make(samples)?, hints.to_device(Device::Cpu)); // (N, 1, H, W) each
    let mean = |t: Tensor| t.mean(Kind::Double).double_value(&[]);
    let (fidelity, fidelity_exact) = match kind {
        HintKind::Canny => (mean(edge_f1(&own, &hints, 1)), mean(edge_f1(&own, &hints, 0))),
        HintKind::Mask => {
            let iou = mean(mask_iou(&own, &hints));
            (iou, iou)
        }
    };
    let read = clf.probabilities(samples).argmax(-1, false); // (N,)
    let accuracy = read.eq_tensor(&requested.to_device(read.device())).to_kind(Kind::Double).mean(Kind::Double);
    Ok(ControlGrade { fidelity, fidelity_exact, accuracy: accuracy.double_value(&[]) })
}
// ANCHOR_END: grade

/// The held-out measurement set: the first `n` test digits, their hints, each asked for by a held-out phrasing of
/// its own label (`prompts`) and, for the disagreement study, of the digit d + 5 mod 10 (`wrong`, `other`).
pub struct EvalSet {
    pub images: Tensor,
    pub hints: Tensor,
    pub asked: Tensor,
    pub prompts: Vec<String>,
    pub other: Tensor,
    pub wrong: Vec<String>,
}

/// [`held_out_prompt_per_row`] for digits (N,) i64.
fn phrasings(digits: &Tensor) -> Result<Vec<String>> {
    Ok(held_out_prompt_per_row(&Vec::<i64>::try_from(digits)?))
}

impl EvalSet {
    /// The set from test images (N', 1, H, W) in [0, 1] and labels (N',), its first `n` rows.
    pub fn new(test_images: &Tensor, test_labels: &Tensor, n: i64, kind: HintKind) -> Result<Self> {
        let (images, asked) = (test_images.narrow(0, 0, n), test_labels.narrow(0, 0, n));
        let other = (&asked + 5).remainder(10); // (N,)
        Ok(Self {
            hints: kind.make(&images)?,
            prompts: phrasings(&asked)?,
            wrong: phrasings(&other)?,
            images,
            asked,
            other,
        })
    }

    /// The first `k` rows.
    pub fn head(&self, k: i64) -> Self {
        let n = |t: &Tensor| t.narrow(0, 0, k);
        let (prompts, wrong) = (self.prompts[..k as usize].to_vec(), self.wrong[..k as usize].to_vec());
        Self {
            images: n(&self.images),
            hints: n(&self.hints),
            asked: n(&self.asked),
            prompts,
            other: n(&self.other),
            wrong,
        }
    }
}

/// One control weight of the sweep.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SweepRow {
    pub scale: f64,
    pub guess_mode: bool,
    pub grade: ControlGrade,
}

// ANCHOR: sweep
/// Draws the set at every control weight of `scales` (0: the frozen pipeline, the baseline), then at the positive
/// ones in guess mode, and grades each; the figure rows: the digits, their hints, the first ten samples per weight.
pub fn scale_sweep(
    (pipe, control, clf): (&TextToImage, &ControlNet, &MnistClassifier),
    set: &EvalSet,
    (scales, kind): (&[f64], HintKind),
    draw_at: &dyn Fn(f64, bool) -> ControlDraw,
) -> Result<(Vec<SweepRow>, Vec<Tile>)> {
    let mut tiles = vec![
        ("test digits".to_string(), set.images.narrow(0, 0, 10)),
        ("hints".to_string(), set.hints.narrow(0, 0, 10)),
    ];
    let normal = scales.iter().map(|&s| (s, false));
    let guess = scales.iter().filter(|&&s| s > 0.0).map(|&s| (s, true));
    let mut rows = vec![];
    for (scale, guess_mode) in normal.chain(guess) {
        let samples = draw_controlled(pipe, control, &set.prompts, &set.hints, &draw_at(scale, guess_mode))?;
        let grade = grade(clf, &samples, (&set.asked, &set.hints), kind)?;
        let mode = if guess_mode { " (guess mode)" } else { "" };
        println!(
            "control {scale}{mode}: fidelity {:.3} (exact {:.3}), accuracy {:.3}",
            grade.fidelity, grade.fidelity_exact, grade.accuracy
        );
        if !guess_mode {
            tiles.push((format!("control {scale}"), samples.narrow(0, 0, 10)));
        }
        rows.push(SweepRow { scale, guess_mode, grade });
    }
    Ok((rows, tiles))
}
// ANCHOR_END: sweep

/// Hint and prompt at odds at one control weight: which digit the samples are read as.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Clash {
    pub scale: f64,
    /// Share read as the hint's digit d …
    pub hint_digit: f64,
    /// … and as the prompt's d + 5.
    pub prompt_digit: f64,
}

/// The hint of digit d with a prompt for d + 5 at each weight of `scales`: who wins, and the figure rows.
pub fn disagreement(
    (pipe, control, clf): (&TextToImage, &ControlNet, &MnistClassifier),
    set: &EvalSet,
    scales: &[f64],
    draw_at: &dyn Fn(f64, bool) -> ControlDraw,
) -> Result<(Vec<Clash>, Vec<Tile>)> {
    let (mut rows, mut tiles) = (vec![], vec![("hint of d".to_string(), set.hints.narrow(0, 0, 10))]);
    for &scale in scales {
        let samples = draw_controlled(pipe, control, &set.wrong, &set.hints, &draw_at(scale, false))?;
        let (hint_digit, prompt_digit) = who_wins(clf, &samples, &set.asked, &set.other);
        println!("hint of d, prompt for d + 5, control {scale}: the hint's digit {hint_digit:.3}, the prompt's {prompt_digit:.3}");
        tiles.push((format!("prompt d+5, {scale}"), samples.narrow(0, 0, 10)));
        rows.push(Clash { scale, hint_digit, prompt_digit });
    }
    Ok((rows, tiles))
}

/// results.md's tables: the sweep, fidelity by training step, the disagreement.
pub fn results_tables(
    sweep: &[SweepRow],
    by_step: &[(usize, ControlGrade)],
    clashes: &[Clash],
    kind: HintKind,
) -> Vec<(&'static str, String)> {
    let f = |v: f64| format!("{v:.3}");
    let (fid, exact) = match kind {
        HintKind::Canny => ("edge F1 (1 px)", "edge F1 (exact)"),
        HintKind::Mask => ("mask IoU", "mask IoU (same)"),
    };
    let sweep_rows: Vec<Vec<String>> = sweep
        .iter()
        .map(|r| {
            let mode = if r.guess_mode { "guess" } else { "normal" };
            vec![r.scale.to_string(), mode.into(), f(r.grade.fidelity), f(r.grade.fidelity_exact), f(r.grade.accuracy)]
        })
        .collect();
    let step_rows: Vec<Vec<String>> =
        by_step.iter().map(|(s, g)| vec![s.to_string(), f(g.fidelity), f(g.fidelity_exact), f(g.accuracy)]).collect();
    let clash_rows: Vec<Vec<String>> =
        clashes.iter().map(|c| vec![c.scale.to_string(), f(c.hint_digit), f(c.prompt_digit)]).collect();
    vec![
        ("scale", markdown_table(&["control weight", "mode", fid, exact, "accuracy"], &sweep_rows)),
        ("by_step", markdown_table(&["step", fid, exact, "accuracy"], &step_rows)),
        (
            "disagreement",
            markdown_table(&["control weight", "read as the hint's digit d", "as the prompt's d + 5"], &clash_rows),
        ),
    ]
}

/// Which digit the classifier reads in samples (N, 1, H, W) drawn with the hint of one digit and a prompt for
/// another: the share of the hint's digit `hint_digits` (N,) and of the prompt's `prompt_digits` (N,).
pub fn who_wins(clf: &MnistClassifier, samples: &Tensor, hint_digits: &Tensor, prompt_digits: &Tensor) -> (f64, f64) {
    let read = clf.probabilities(samples).argmax(-1, false).to_device(Device::Cpu); // (N,)
    let share = |d: &Tensor| read.eq_tensor(d).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    (share(hint_digits), share(prompt_digits))
}

/// control_by_step.png: fidelity and accuracy of the snapshot samples against the training step.
pub fn plot_by_step(path: &Path, points: &[(usize, ControlGrade)], baseline: f64) -> Result<()> {
    let line = |f: &dyn Fn(&ControlGrade) -> f64| points.iter().map(|(s, g)| (*s as f64, f(g))).collect::<Vec<_>>();
    let flat = points.iter().map(|(s, _)| (*s as f64, baseline)).collect();
    let panel = LinePanel {
        title: "following the hint while the ControlNet trains".into(),
        x_desc: "training step".into(),
        y_desc: "fidelity to the hint / accuracy".into(),
        log_y: false,
        series: vec![
            ("fidelity with control".into(), line(&|g| g.fidelity)),
            ("fidelity without control".into(), flat),
            ("fidelity, exact pixels".into(), line(&|g| g.fidelity_exact)),
            ("accuracy (the prompt's digit)".into(), line(&|g| g.accuracy)),
        ],
    };
    plot::line_panels(path, "Control fidelity against training steps (held-out hints)", 640, 420, &[panel])
}

/// control_scale.png: fidelity and accuracy against the control weight, with and without guess mode.
pub fn plot_scale_sweep(path: &Path, rows: &[SweepRow]) -> Result<()> {
    let series = |guess: bool, f: &dyn Fn(&ControlGrade) -> f64| -> Vec<(f64, f64)> {
        rows.iter().filter(|r| r.guess_mode == guess).map(|r| (r.scale, f(&r.grade))).collect()
    };
    let panel = |title: &str, y: &str, f: &dyn Fn(&ControlGrade) -> f64| LinePanel {
        title: title.into(),
        x_desc: "control weight (conditioning scale)".into(),
        y_desc: y.into(),
        log_y: false,
        series: vec![("normal".into(), series(false, f)), ("guess mode".into(), series(true, f))],
    };
    let panels = [
        panel("following the hint", "fidelity (edge F1 at one pixel, or mask IoU)", &|g| g.fidelity),
        panel("following the prompt", "accuracy (the prompt's digit)", &|g| g.accuracy),
    ];
    plot::line_panels(path, "The control weight, from the frozen model (0) to 1.5", 480, 380, &panels)
}
