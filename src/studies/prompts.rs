//! How lessons 06 and 08 grade a text-to-image pipeline ([`grade_text_to_image`]), and lesson 06's figures of prompt
//! following: samples per phrasing, attribute pairs, a guidance sweep, and where in the image each token of a prompt
//! acts (the pipeline's cross-attention maps).
use crate::data::captions::Level;
use crate::data::captions::{attribute_prompts, Attribute};
use crate::data::to_unit;
use crate::eval::frechet::{evaluate_samples, SampleReport};
use crate::eval::prompt_accuracy::{self as grade, fraction_read_as, AttributeReport, PromptAccuracy};
use crate::nn::classifier::MnistClassifier;
use crate::pipelines::text_to_image::{Draw, TextToImage};
use crate::plot;
use anyhow::Result;
use std::path::Path;
use tch::{Device, Tensor};

/// Images per evaluation prompt that the Fréchet distance uses: 10 × 50 prompts = lesson 04's n = 500, so the floor
/// is lesson 04's.
pub const FD_PER_PROMPT: i64 = 10;

/// The evaluation flags of lessons 06 and 08.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Guidance scale w of the evaluation: ε̃ = ε_∅ + w (ε_c − ε_∅).
    #[arg(long, default_value_t = crate::pipelines::text_to_image::DEFAULT_GUIDANCE, value_parser = crate::cli::finite)]
    pub guidance: f64,
    /// Sampler steps of the evaluation [default: 20, or 5 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub sample_steps: Option<u64>,
    /// Samples per evaluation prompt (50 prompts; half as many per attribute prompt, 60 prompts) [default: 20, or 2
    /// with --quick].
    #[arg(long, value_parser = clap::value_parser!(i64).range(2..=1000))]
    pub eval_samples: Option<i64>,
}

impl EvalArgs {
    /// (guidance, sampler steps, samples per prompt), with the defaults of a full or a `--quick` run.
    pub fn resolve(&self, quick: bool) -> (f64, usize, i64) {
        let steps = self.sample_steps.unwrap_or(if quick { 5 } else { 20 }) as usize;
        (self.guidance, steps, self.eval_samples.unwrap_or(if quick { 2 } else { 20 }))
    }
}

/// `lesson06 eval` and `lesson08 eval`: grade a saved pipeline (by default the shipped one) as a training run does,
/// for example one from an earlier commit or a run with other flags, without training anything.
#[derive(clap::Args, Debug, Clone)]
pub struct GradeArgs {
    /// A saved pipeline (the weights/ folder of a training run) [default: the shipped one in data/lessonNN].
    #[arg(long)]
    pub weights: Option<std::path::PathBuf>,
    /// Where metrics.json and the figures go [default: out/lessonNN/eval].
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub eval: EvalArgs,
    /// Guidance scales of the sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 1.0, 2.0, 3.0, 5.0], value_parser = crate::cli::finite)]
    pub sweep: Vec<f64>,
    /// Seed of the evaluation's noise (a training run grades with its own seed, 0 by default).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads libtorch may use [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub threads: Option<i32>,
}

impl GradeArgs {
    /// The pipeline folder to grade: `--weights`, or lesson's shipped one from `shipped`.
    pub fn weights_dir(&self, shipped: impl FnOnce() -> std::path::PathBuf) -> std::path::PathBuf {
        self.weights.clone().unwrap_or_else(shipped)
    }

    /// Where the outputs go: `--out`, or out/`lesson`/eval.
    pub fn out_dir(&self, lesson: &str) -> std::path::PathBuf {
        self.out.clone().unwrap_or_else(|| crate::cli::crate_root().join("out").join(lesson).join("eval"))
    }

    /// MNIST and the shipped classifier, which grading reads: loaded once by the caller, who may grade more with them.
    pub fn inputs() -> Result<(crate::data::mnist::Mnist, MnistClassifier)> {
        Ok((
            crate::data::mnist::load(&crate::data::mnist::resolve_dir(None))?,
            MnistClassifier::load_shipped(Device::Cpu)?,
        ))
    }

    /// Grades the pipeline that `generate(prompt, n, seed, w)` and `generate_each(prompts, seed, w)` draw from, as
    /// [`grade_text_to_image`] does after training (all 64 held-out templates), on the CPU; writes metrics.json and the figures into `--out` (default
    /// out/`lesson`/eval) and prints the summary line.
    pub fn grade(
        &self,
        lesson: &str,
        weights: &Path,
        (data, clf): (&crate::data::mnist::Mnist, &MnistClassifier),
        generate: &mut GenerateAt,
        generate_each: &mut GenerateEachAt,
    ) -> Result<TextToImageGrades> {
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
        let out = self.out_dir(lesson);
        std::fs::create_dir_all(&out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
        let (w, steps, n) = self.eval.resolve(false);
        let setting = (w, n, self.seed, usize::MAX);
        let (stamp, since) = (crate::cli::RunStamp::now(lesson, self.seed), std::time::SystemTime::now());
        let started = std::time::Instant::now();
        let grades =
            grade_text_to_image((generate, generate_each), clf, setting, &self.sweep, &data.test_images, &out)?;
        let mut metrics = serde_json::json!({ "lesson": lesson, "weights": weights.display().to_string(),
            "guidance": w, "sample_steps": steps, "seed": self.seed, "threads": tch::get_num_threads(),
            "seconds": started.elapsed().as_secs_f64(), "run": stamp });
        crate::cli::merge(&mut metrics, serde_json::json!(grades));
        crate::cli::write_atomic(&out.join("metrics.json"), serde_json::to_string_pretty(&metrics)?.as_bytes())?;
        crate::cli::write_manifest(&out, &stamp, since)?;
        println!("{}\noutputs in {}", grades.summary(), out.display());
        Ok(grades)
    }
}

/// `lesson06 eval`: grades a saved lesson 06 pipeline (by default the shipped one) with the DDPM sampler it trains
/// with.
pub fn grade_saved(args: &GradeArgs) -> Result<()> {
    use crate::pipelines::{bundle, text_to_image as t2i};
    let (dir, (_, steps, _)) = (args.weights_dir(t2i::shipped_dir), args.eval.resolve(false));
    let pipe = TextToImage::load(&dir, Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", bundle::no_bundle(&dir, "06", "text")))?;
    let draw = |seed, guidance| Draw::new(guidance, steps, seed);
    let mut generate = |p: &str, n, seed, w| pipe.generate_with(p, None, n, &draw(seed, w), &mut |_, _| {});
    let mut generate_each = |prompts: &[String], seed, w| pipe.generate_each(prompts, &draw(seed, w));
    let (data, clf) = GradeArgs::inputs()?;
    args.grade("lesson06", &dir, (&data, &clf), &mut generate, &mut generate_each).map(drop)
}

/// How many images [`grade_text_to_image`] draws with `n` samples per prompt, `sweep` guidance scales and `held_out`
/// held-out templates (for a progress bar).
pub fn images_graded(n: i64, sweep: usize, held_out: usize) -> u64 {
    let half = (n / 2).max(1) as u64;
    50 * n as u64 + 2 * 30 * half + 20 * sweep as u64 + 20 * held_out as u64 + 2 * 30 * half
}

/// `n` images of one prompt at guidance w: (prompt, n, seed, w) -> (n, 1, S, S) in [0, 1].
pub type GenerateAt<'a> = dyn FnMut(&str, i64, u64, f64) -> Result<Tensor> + 'a;

/// One image per prompt at guidance w, in one batch: (prompts, seed, w) -> (images, refused), the pipelines'
/// `generate_each` ([`grade::GenerateEach`] with the scale).
pub type GenerateEachAt<'a> = dyn FnMut(&[String], u64, f64) -> Result<(Tensor, Vec<bool>)> + 'a;

/// What lessons 06 and 08 measure of a text-to-image pipeline (the keys of their metrics.json).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TextToImageGrades {
    /// Whether samples of the 50 digit prompts read as their digit ([`grade::prompt_accuracy`]).
    pub prompt_accuracy: PromptAccuracy,
    /// Whether thickness, slant and size follow the prompt ([`grade::attribute_directions`]).
    pub attributes: AttributeReport,
    pub attribute_fraction_following_thickness_slant: f64,
    /// Lesson 04's Fréchet harness on the first [`FD_PER_PROMPT`] samples of each prompt (n = 500 at full size).
    pub samples: SampleReport,
    /// The same on every sample (a larger n, a lower floor).
    pub samples_all: SampleReport,
    /// (w, accuracy) of the guidance sweep.
    pub guidance_sweep: Vec<(f64, f64)>,
    /// Prompt accuracy on the held-out phrasings no caption matches (`data/prompts/held_out.txt`), one sample each.
    pub held_out_prompt_accuracy: PromptAccuracy,
    /// Attribute control on held-out phrasings (`data/prompts/held_out_attributes.txt`, one template per digit).
    pub held_out_attributes: AttributeReport,
    pub held_out_attribute_fraction_following_thickness_slant: f64,
}

/// Grades a text-to-image pipeline through `generate(prompt, n, seed, w)`: `n` samples per digit prompt and half as
/// many per attribute prompt at guidance `w`, from seeds derived from `seed`; the Fréchet distance against
/// `test_images` (N, 1, 28, 28) in [0, 1]; accuracy at each scale of `sweep`; then one sample of every prompt of the
/// first `held_out` held-out templates, a digit's prompts in one batch (`generate_each(prompts, seed, w)`). Draws prompt_samples.png, attribute_control.png and guidance_sweep.png into
/// `out`.
// ANCHOR: grade
pub fn grade_text_to_image(
    (generate, generate_each): (&mut GenerateAt, &mut GenerateEachAt),
    clf: &MnistClassifier,
    (w, n, seed, held_out): (f64, i64, u64, usize),
    sweep: &[f64],
    test_images: &Tensor,
    out: &Path,
) -> Result<TextToImageGrades> {
    let mut at_w = |prompt: &str, n: i64, seed: u64| generate(prompt, n, seed, w);
    let (prompt_accuracy, samples, _) = grade::prompt_accuracy(&mut at_w, clf, n, 1000 * seed)?;
    let (attributes, pairs) = grade::attribute_directions(
        &mut at_w,
        (&Attribute::ALL, &attribute_prompts),
        (n / 2).max(1),
        1000 * seed + 100,
    )?;
    let following = attributes.fraction_following(&[Attribute::Thickness, Attribute::Slant]);
    let image = &samples.size()[1..]; // (1, S, S)
    let by_prompt = samples.view([&[-1, n], image].concat().as_slice()); // (prompts, n, 1, S, S)
    let first = by_prompt.narrow(1, 0, FD_PER_PROMPT.min(n)).reshape([&[-1], image].concat().as_slice());
    let quality = evaluate_samples(clf, &first, test_images);
    let quality_all = evaluate_samples(clf, &samples, test_images);
    let guidance_sweep = guidance_sweep(generate, clf, sweep, 2, 1000 * seed + 200, &out.join("guidance_sweep.png"))?;
    plot_prompt_samples(&out.join("prompt_samples.png"), &samples, &prompt_accuracy, 2)?;
    plot_attribute_pairs(&out.join("attribute_control.png"), &attributes, &pairs, 3)?;
    let mut at_w = |prompt: &str, n: i64, seed: u64| generate(prompt, n, seed, w);
    let (held_out_prompt_accuracy, held_out_samples) = grade::held_out_accuracy(
        &mut |p: &[String], seed| generate_each(p, seed, w),
        clf,
        1000 * seed + 300,
        held_out,
    )?;
    plot_held_out_samples(&out.join("held_out_samples.png"), &held_out_samples, &held_out_prompt_accuracy)?;
    let phrasings = (Attribute::ALL.as_slice(), &grade::held_out_attribute_pair as &dyn Fn(_, _) -> _);
    let (held_out_attributes, _) =
        grade::attribute_directions(&mut at_w, phrasings, (n / 2).max(1), 1000 * seed + 400)?;
    let held_out_following = held_out_attributes.fraction_following(&[Attribute::Thickness, Attribute::Slant]);
    Ok(TextToImageGrades {
        prompt_accuracy,
        attributes,
        attribute_fraction_following_thickness_slant: following,
        samples: quality,
        samples_all: quality_all,
        guidance_sweep,
        held_out_prompt_accuracy,
        held_out_attributes,
        held_out_attribute_fraction_following_thickness_slant: held_out_following,
    })
}
// ANCHOR_END: grade

/// A row of a results table: quantity, value, target (empty: reported).
pub type ResultRow = [String; 3];

/// `pointer` of `metrics` as a number (NaN when missing), for the results tables the lessons write.
pub fn number(metrics: &serde_json::Value, pointer: &str) -> f64 {
    metrics.pointer(pointer).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN)
}

/// Lesson 06's results.md table, from its `metrics` (training) and `grades`.
pub fn lesson06_results(metrics: &serde_json::Value, grades: &TextToImageGrades) -> String {
    let n = |p: &str| number(metrics, p);
    let trained = format!(
        "**{:.0} s** (mini-CLIP {:.0} s, UNet {:.0} s), {} threads",
        n("/train_seconds_total"),
        n("/clip/seconds"),
        n("/unet_seconds"),
        tch::get_num_threads()
    );
    let before = [
        ["training time: captions, BPE, mini-CLIP, UNet".into(), trained, "≤ 10 min".into()],
        [
            "mini-CLIP zero-shot accuracy (\"a handwritten seven\" …)".into(),
            format!("{:.3}", n("/clip/zero_shot_accuracy")),
            String::new(),
        ],
    ];
    let targets = ["≥ 0.98", "≥ 0.97 / ≥ 0.90", "≥ 90 %", "≤ 2.30 (the first pipeline's)"];
    grades.results_table(&before, targets, &[])
}

impl TextToImageGrades {
    /// Lessons 06 and 08's table of results (quantity | value | target): the rows `before` (training), then the
    /// grades with `targets` = (prompt accuracy, held-out prompt accuracy, attribute pairs, FD / floor), then `after`.
    pub fn results_table(&self, before: &[ResultRow], targets: [&str; 4], after: &[ResultRow]) -> String {
        let (a, h, q) = (&self.prompt_accuracy, &self.held_out_prompt_accuracy, &self.samples);
        let worst = |p: &PromptAccuracy| {
            let digits: Vec<String> =
                (0..10).filter(|&d| p.per_digit[d] == p.worst_digit).map(|d| d.to_string()).collect();
            format!("digit{} {}", if digits.len() > 1 { "s" } else { "" }, digits.join(", "))
        };
        let pct = |f: f64| format!("{:.0} %", 100.0 * f);
        let size = |r: &AttributeReport| pct(r.fraction_following(&[Attribute::Size]));
        let sweep: Vec<String> = self.guidance_sweep.iter().map(|(w, acc)| format!("{w}: {acc:.2}")).collect();
        let row = |q: &str, v: String, t: &str| [q.to_string(), v, t.to_string()];
        let grades = [
            row(
                "prompt accuracy, the captions' phrasings: mean / worst digit",
                format!("**{:.3}** / {:.2} ({})", a.overall, a.worst_digit, worst(a)),
                targets[0],
            ),
            row(
                &format!("prompt accuracy, {} held-out prompts: mean / worst digit", h.per_prompt.len()),
                format!("**{:.3}** / {:.3} ({})", h.overall, h.worst_digit, worst(h)),
                targets[1],
            ),
            row(
                "thickness and slant follow the prompt: the captions' phrasings, held-out ones",
                format!(
                    "**{}** and **{}** of digit × attribute pairs (size: {} and {})",
                    pct(self.attribute_fraction_following_thickness_slant),
                    pct(self.held_out_attribute_fraction_following_thickness_slant),
                    size(&self.attributes),
                    size(&self.held_out_attributes)
                ),
                targets[2],
            ),
            row(
                &format!("Fréchet distance / floor, n = {}", q.n),
                format!("**{:.2} / {:.2} = {:.2}**", q.frechet_distance, q.frechet_floor, q.fd_over_floor),
                targets[3],
            ),
            row(
                &format!("the same at all n = {} samples", self.samples_all.n),
                format!(
                    "{:.2} / {:.2} = {:.2}",
                    self.samples_all.frechet_distance, self.samples_all.frechet_floor, self.samples_all.fd_over_floor
                ),
                "",
            ),
            row(
                "mean classifier confidence, class entropy / ln 10",
                format!("{:.3}, {:.3}", q.mean_confidence, q.entropy_over_max),
                "",
            ),
            row("prompt accuracy against w (2 samples per digit)", sweep.join(", "), ""),
        ];
        let rows: Vec<Vec<String>> = before.iter().chain(&grades).chain(after).map(|r| r.to_vec()).collect();
        crate::cli::markdown_table(&["quantity", "value", "target"], &rows)
    }

    /// The summary line the lessons print.
    pub fn summary(&self) -> String {
        let (a, q, all) = (&self.prompt_accuracy, &self.samples, &self.samples_all);
        format!(
            "prompt accuracy {:.3} (worst digit {:.3}; held-out phrasings {:.3}, worst digit {:.3}); thickness and slant \
             follow the prompt in {:.0} % of digit × attribute pairs ({:.0} % in held-out phrasings); Fréchet distance \
             {:.2}, floor {:.2}, ratio {:.2} (n = {}; at all {} images: ratio {:.2})",
            a.overall,
            a.worst_digit,
            self.held_out_prompt_accuracy.overall,
            self.held_out_prompt_accuracy.worst_digit,
            100.0 * self.attribute_fraction_following_thickness_slant,
            100.0 * self.held_out_attribute_fraction_following_thickness_slant,
            q.frechet_distance,
            q.frechet_floor,
            q.fd_over_floor,
            q.n,
            all.n,
            all.fd_over_floor
        )
    }
}

/// Accuracy against the guidance scale: for each scale w of `scales`, `n` samples of "a handwritten <digit>" for
/// every digit (digit d from seed `seed + d` at every w, so a row of the figure differs only in w), graded by `clf`;
/// draws them into `figure`, a row per digit. `generate(prompt, n, seed, w)`.
pub fn guidance_sweep(
    generate: &mut GenerateAt,
    clf: &MnistClassifier,
    scales: &[f64],
    n: i64,
    seed: u64,
    figure: &Path,
) -> Result<Vec<(f64, f64)>> {
    let (mut tiles, mut labels, mut accuracy) = (Vec::new(), Vec::new(), vec![0.0; scales.len()]);
    for (digit, prompt) in (0..10).zip(crate::nn::clip::digit_prompts()) {
        for (i, &w) in scales.iter().enumerate() {
            let x = generate(&prompt, n, seed + digit as u64, w)?.to_device(Device::Cpu); // (n, 1, 28, 28)
            accuracy[i] += fraction_read_as(clf, &x, digit) / 10.0;
            labels.extend((0..n).map(|j| if j == 0 && digit == 0 { format!("w={w}") } else { String::new() }));
            tiles.push(x);
        }
    }
    let title = "\"a handwritten <digit>\" at guidance scales w, the same noise along a row";
    plot::image_grid(figure, title, &Tensor::cat(&tiles, 0), n as usize * scales.len(), 2, &labels)?;
    Ok(scales.iter().copied().zip(accuracy).collect())
}

/// A row per digit: its first `k` samples of each phrasing (`samples` as [`prompt_accuracy`] returns them), the
/// digit's accuracy under the row's first image.
pub fn plot_prompt_samples(path: &Path, samples: &Tensor, report: &PromptAccuracy, k: i64) -> Result<()> {
    let (n, k) = (report.samples_per_prompt, k.min(report.samples_per_prompt));
    let tiles: Vec<Tensor> = (0..report.per_prompt.len() as i64).map(|p| samples.narrow(0, p * n, k)).collect();
    let row = 5 * k; // five phrasings per digit
    let accuracy = |d: i64| format!("{d}: {:.0} %", 100.0 * report.per_digit[d as usize]);
    let labels: Vec<String> =
        (0..10 * row).map(|i| if i % row == 0 { accuracy(i / row) } else { String::new() }).collect();
    let title = format!("{k} per phrasing: d · word · a handwritten word · the number d · an image of the digit d");
    plot::image_grid(path, &title, &Tensor::cat(&tiles, 0), row as usize, 3, &labels)
}

/// Held-out templates shown in held_out_samples.png, when the run graded them.
const SHOWN_HELD_OUT: [&str; 8] = [
    "Draw the digit {d}.",
    "can you draw {a} {d}?",
    "{a} messy {d}",
    "#{d} in ink",
    "{D} NOW!!!",
    "{a} {d} for my homework",
    "my favourite number is {d}",
    "write the number {d} by hand",
];

/// A row per held-out template of [`SHOWN_HELD_OUT`] (numeral and word forms alternate by row), a column per digit:
/// the one sample of each prompt ([`grade::held_out_accuracy`]'s `samples` and `report`, n = 1), with the
/// template and its accuracy over the ten digits under the row's first image.
pub fn plot_held_out_samples(path: &Path, samples: &Tensor, report: &PromptAccuracy) -> Result<()> {
    let per_digit = report.per_prompt.len() as i64 / 10; // 2 × templates graded
    let templates = crate::data::captions::held_out_templates();
    let shown: Vec<usize> = SHOWN_HELD_OUT
        .iter()
        .filter_map(|t| templates.iter().position(|u| u == t))
        .filter(|&i| (2 * i as i64) < per_digit)
        .collect();
    let (mut tiles, mut labels) = (Vec::new(), Vec::new());
    for (row, &t) in shown.iter().enumerate() {
        let index = |d: i64| d * per_digit + 2 * t as i64 + (row % 2) as i64; // numeral, then word
        let right = (0..10).filter(|&d| report.per_prompt[index(d) as usize].accuracy > 0.5).count();
        for d in 0..10 {
            tiles.push(samples.narrow(0, index(d), 1));
            let form = if row % 2 == 0 { "numeral" } else { "word" };
            labels.push(if d == 0 { format!("\"{}\" ({form}): {right}/10", templates[t]) } else { String::new() });
        }
    }
    anyhow::ensure!(!tiles.is_empty(), "no shown held-out template was graded");
    let title = "Held-out prompts, never a training caption: one sample each, digits 0-9";
    plot::image_grid(path, title, &Tensor::cat(&tiles, 0), 10, 3, &labels)
}

/// A row per digit: for each attribute its first `k` low samples, then the `k` high ones from the same noise.
pub fn plot_attribute_pairs(path: &Path, report: &AttributeReport, samples: &[[Tensor; 2]], k: i64) -> Result<()> {
    let k = k.min(report.samples_per_prompt);
    let (mut tiles, mut labels) = (Vec::new(), Vec::new());
    for digit in 0..10 {
        for (pair, [low, high]) in report.pairs.iter().zip(samples).filter(|(p, _)| p.digit == digit) {
            for (x, level) in [(low, Level::Low), (high, Level::High)] {
                tiles.push(x.narrow(0, 0, k));
                let word = pair.attribute.word(level).unwrap_or_default();
                labels.extend((0..k).map(|j| if j == 0 && digit == 0 { word.to_string() } else { String::new() }));
            }
        }
    }
    let cols = (tiles.len() / 10) * k as usize;
    plot::image_grid(path, "Low, high prompt per attribute, same noise", &Tensor::cat(&tiles, 0), cols, 2, &labels)
}

// ANCHOR: token_attention
/// cross_attention.png: along one reverse chain of `prompt` at guidance `w` (`steps` steps from the noise of `seed`),
/// at four steps: x_t, x̂₀, and one map per token of how the pixels of the finest cross-attention feature maps share
/// their attention among the prompt's tokens (white: the largest weight in the figure).
pub fn plot_token_attention(
    path: &Path,
    pipe: &TextToImage,
    prompt: &str,
    w: f64,
    steps: usize,
    seed: u64,
) -> Result<()> {
    let keep = [steps - 1, (steps - 1) * 2 / 3, (steps - 1) / 3, 0];
    let mut chain = Vec::new();
    let _ = pipe.generate_with(prompt, None, 1, &Draw::new(w, steps, seed), &mut |_, st| {
        if keep.contains(&st.i) {
            chain.push((st.t, to_unit(st.x_t), to_unit(st.x0_hat), st.x_t.copy()));
        }
    })?;
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    for (t, x_t, x0_hat, x) in &chain {
        let (maps, tokens) = pipe.token_attention_maps(x, *t, prompt)?; // (tokens, 1, h, w)
        rows.push([
            x_t.to_device(Device::Cpu),
            x0_hat.to_device(Device::Cpu),
            maps.upsample_nearest2d([28, 28], None, None),
        ]);
        labels.extend([format!("x_t t={t}"), "x̂₀".into()].into_iter().chain(tokens));
    }
    let top = rows.iter().map(|[_, _, m]| m.max().double_value(&[])).fold(1e-12, f64::max);
    let tiles: Vec<Tensor> =
        rows.iter().flat_map(|[x, x0, m]| [x.shallow_clone(), x0.shallow_clone(), m / top]).collect();
    let title = format!("Cross-attention to each token of \"{prompt}\", w = {w}");
    plot::image_grid(path, &title, &Tensor::cat(&tiles, 0), labels.len() / chain.len().max(1), 3, &labels)
}
// ANCHOR_END: token_attention
