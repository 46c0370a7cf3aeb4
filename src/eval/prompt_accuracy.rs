//! Does the picture follow the prompt? Two measures for text-to-image MNIST, both with tools of the crate:
//!
//! - **Prompt accuracy**: for every digit d and every fixed phrasing of [`eval_prompts`] ("7", "seven", "a
//!   handwritten seven", "the number 7", "an image of the digit 7"), n samples; the fraction that the shipped
//!   classifier reads as d, per phrasing and per digit.
//! - **Attribute direction**: for every digit d and attribute a, the pair of prompts of [`attribute_prompts`](crate::data::captions::attribute_prompts) ("a thin
//!   7" / "a bold 7", "a 7 leaning left" / "a 7 leaning right", "a small 7" / "a large 7"), n samples each from the
//!   same noise; the pair follows its prompts when the mean measured attribute ([`stroke_stats`], the measure the
//!   captions were written from) of the "high" samples exceeds that of the "low" ones.
//!
//! Sampling is a closure, `generate(prompt, n, seed) -> (n, 1, 28, 28)` in [0, 1], so any pipeline (or a stand-in
//! in the tests) can be graded. The figures of lesson 06 that show them are in [`crate::studies::prompts`].
use crate::data::captions::{
    eval_prompts, held_out_attribute_prompts, held_out_prompts, stroke_stats, Attribute, StrokeStats,
};
use crate::nn::classifier::MnistClassifier;
use crate::pipelines::prompt_encoder::PromptRefused;
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// `generate(prompt, n, seed)` on the CPU, and whether the pipeline refused the prompt ([`PromptRefused`]: too long,
/// no known word), which graders count as missed: its samples are then n black 28×28 images.
fn draw(generate: &mut Generate, prompt: &str, n: i64, seed: u64) -> Result<(Tensor, bool)> {
    match generate(prompt, n, seed) {
        Ok(x) => Ok((x.to_device(Device::Cpu), false)),
        Err(e) if e.chain().any(|c| c.is::<PromptRefused>()) => {
            Ok((Tensor::zeros([n, 1, 28, 28], (Kind::Float, Device::Cpu)), true))
        }
        Err(e) => Err(e),
    }
}

/// What draws the samples: (prompt, n, seed) -> (n, 1, H, W) in [0, 1].
pub type Generate<'a> = dyn FnMut(&str, i64, u64) -> Result<Tensor> + 'a;

/// The accuracy of one phrasing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PromptScore {
    pub prompt: String,
    pub digit: i64,
    pub accuracy: f64,
    /// Whether the pipeline refused the prompt (too long, no known word): accuracy 0.
    pub refused: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PromptAccuracy {
    pub samples_per_prompt: i64,
    /// Prompts the pipeline refused to draw, counted as missed.
    pub refused: usize,
    pub per_prompt: Vec<PromptScore>,
    /// Digit d's accuracy over all its phrasings, d = 0..9.
    pub per_digit: Vec<f64>,
    /// The lowest of `per_digit`: the number the ≥ 98 % target is about.
    pub worst_digit: f64,
    pub overall: f64,
}

/// Draws `n` samples for each phrasing of each digit (prompt i of the 50 from seed `seed + i`) and grades them with
/// `clf`. Returns the scores, all samples (50·n, 1, H, W) on the CPU in prompt order, and the digit each was asked
/// for (50·n,).
pub fn prompt_accuracy(
    generate: &mut Generate,
    clf: &MnistClassifier,
    n: i64,
    seed: u64,
) -> Result<(PromptAccuracy, Tensor, Tensor)> {
    prompt_accuracy_on(generate, clf, (n, seed), &eval_prompts)
}

/// What draws one sample for each of many prompts in one batch: (prompts, seed) -> ((P, 1, H, W) in [0, 1], which
/// prompts the pipeline refused ([`PromptRefused`]; their images are black)). The pipelines' `generate_each`.
pub type GenerateEach<'a> = dyn FnMut(&[String], u64) -> Result<(Tensor, Vec<bool>)> + 'a;

/// [`prompt_accuracy`] on the held-out phrasings of `data/prompts/held_out.txt` ([`held_out_prompts`]: the first
/// `templates` templates, numeral and word forms), which no training caption matches: how the model copes with
/// prompts as people write them. One sample per prompt, a digit's prompts in one batch from seed `seed + digit`
/// (`generate_each`). Returns the scores and the samples, digit by digit, each digit's prompts in template order
/// (numeral, then word).
pub fn held_out_accuracy(
    generate_each: &mut GenerateEach,
    clf: &MnistClassifier,
    seed: u64,
    templates: usize,
) -> Result<(PromptAccuracy, Tensor)> {
    let (mut per_prompt, mut samples) = (Vec::new(), Vec::new());
    for digit in 0..10 {
        let prompts = held_out_prompts(digit, templates);
        let (x, refused) = generate_each(&prompts, seed + digit as u64)?;
        let x = x.to_device(Device::Cpu); // (P, 1, H, W)
        ensure!(
            x.size()[0] == prompts.len() as i64 && refused.len() == prompts.len(),
            "generate_each must return one image and one refusal flag per prompt"
        );
        let read: Vec<i64> = Vec::try_from(clf.probabilities(&x).argmax(-1, false).to_device(Device::Cpu))?; // (P,)
        for ((prompt, refused), read) in prompts.into_iter().zip(refused).zip(read) {
            let accuracy = if !refused && read == digit { 1.0 } else { 0.0 };
            per_prompt.push(PromptScore { prompt, digit, accuracy, refused });
        }
        samples.push(x);
    }
    Ok((report(per_prompt, 1), Tensor::cat(&samples, 0)))
}

/// [`prompt_accuracy`] with the phrasings `prompts(digit)`.
fn prompt_accuracy_on(
    generate: &mut Generate,
    clf: &MnistClassifier,
    (n, seed): (i64, u64),
    prompts: &dyn Fn(i64) -> Vec<String>,
) -> Result<(PromptAccuracy, Tensor, Tensor)> {
    ensure!(n >= 1, "prompt accuracy needs at least one sample per prompt");
    let (mut per_prompt, mut samples, mut asked) = (Vec::new(), Vec::new(), Vec::new());
    for digit in 0..10 {
        for prompt in prompts(digit) {
            let (x, refused) = draw(generate, &prompt, n, seed + per_prompt.len() as u64)?; // (n, 1, H, W)
            let accuracy = if refused { 0.0 } else { fraction_read_as(clf, &x, digit) };
            per_prompt.push(PromptScore { prompt, digit, accuracy, refused });
            samples.push(x);
            asked.push(Tensor::full([n], digit, (Kind::Int64, Device::Cpu)));
        }
    }
    Ok((report(per_prompt, n), Tensor::cat(&samples, 0), Tensor::cat(&asked, 0)))
}

/// The accuracy per digit (the mean over its phrasings), the worst digit's and the mean over digits.
fn report(per_prompt: Vec<PromptScore>, samples_per_prompt: i64) -> PromptAccuracy {
    let mean = |v: &mut dyn Iterator<Item = f64>| {
        let (sum, count) = v.fold((0.0, 0), |(s, c), a| (s + a, c + 1));
        sum / count as f64
    };
    let per_digit: Vec<f64> =
        (0..10).map(|d| mean(&mut per_prompt.iter().filter(|p| p.digit == d).map(|p| p.accuracy))).collect();
    PromptAccuracy {
        samples_per_prompt,
        refused: per_prompt.iter().filter(|p| p.refused).count(),
        worst_digit: per_digit.iter().copied().fold(f64::INFINITY, f64::min),
        overall: mean(&mut per_digit.iter().copied()),
        per_digit,
        per_prompt,
    }
}

/// The measurement of `attribute` in one image's stroke statistics.
pub fn measure(stats: &StrokeStats, attribute: Attribute) -> f64 {
    (match attribute {
        Attribute::Thickness => stats.thickness,
        Attribute::Slant => stats.slant,
        Attribute::Size => stats.size,
    }) as f64
}

/// One digit × attribute pair of prompts and what their samples measure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttributePair {
    pub digit: i64,
    pub attribute: Attribute,
    /// The (low, high) prompts, e.g. ("a thin 7", "a bold 7").
    pub prompts: [String; 2],
    /// Mean measured attribute of the samples of each prompt.
    pub means: [f64; 2],
    /// Whether the high prompt's samples measure more than the low prompt's.
    pub follows: bool,
    /// Whether the pipeline refused either prompt (then the pair does not follow).
    pub refused: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AttributeReport {
    pub samples_per_prompt: i64,
    pub pairs: Vec<AttributePair>,
    /// Per attribute checked, the fraction of the ten digits whose pair follows its prompts.
    pub per_attribute: Vec<(Attribute, f64)>,
}

impl AttributeReport {
    /// The fraction of the digit × attribute pairs of `attributes` that follow their prompts.
    pub fn fraction_following(&self, attributes: &[Attribute]) -> f64 {
        let pairs: Vec<&AttributePair> = self.pairs.iter().filter(|p| attributes.contains(&p.attribute)).collect();
        pairs.iter().filter(|p| p.follows).count() as f64 / pairs.len().max(1) as f64
    }
}

// ANCHOR: attribute_directions
/// For each attribute and digit, `n` samples of the low and of the high prompt of `prompts(digit, attribute)`
/// ([`attribute_prompts`](crate::data::captions::attribute_prompts), or [`held_out_attribute_pair`]) from the same seed (the same starting noise, so only the
/// prompt differs), measured with [`stroke_stats`]. Returns the report and the samples of each pair, (low, high),
/// each (n, 1, H, W), in the report's order.
pub fn attribute_directions(
    generate: &mut Generate,
    (attributes, prompts): (&[Attribute], &dyn Fn(i64, Attribute) -> [String; 2]),
    n: i64,
    seed: u64,
) -> Result<(AttributeReport, Vec<[Tensor; 2]>)> {
    ensure!(n >= 1, "the attribute check needs at least one sample per prompt");
    let (mut pairs, mut samples) = (Vec::new(), Vec::new());
    for &attribute in attributes {
        for digit in 0..10 {
            let prompts = prompts(digit, attribute);
            let pair_seed = seed + pairs.len() as u64;
            let (low, low_refused) = draw(generate, &prompts[0], n, pair_seed)?; // (n, 1, H, W)
            let (high, high_refused) = draw(generate, &prompts[1], n, pair_seed)?;
            let mean_of = |x: &Tensor| -> Result<f64> {
                Ok(stroke_stats(x)?.iter().map(|s| measure(s, attribute)).sum::<f64>() / n as f64)
            };
            let (means, refused) = ([mean_of(&low)?, mean_of(&high)?], low_refused || high_refused);
            let follows = !refused && means[1] > means[0];
            pairs.push(AttributePair { digit, attribute, prompts, means, follows, refused });
            samples.push([low, high]);
        }
    }
    let per_attribute = attributes.iter().map(|&a| (a, fraction(&pairs, a))).collect();
    Ok((AttributeReport { samples_per_prompt: n, pairs, per_attribute }, samples))
}
// ANCHOR_END: attribute_directions

/// A held-out (low, high) phrasing of `attribute` for `digit`: template `digit mod count` of
/// `data/prompts/held_out_attributes.txt` ("Draw a thin 7." / "Draw a bold 7."), so the ten digits read different
/// templates.
pub fn held_out_attribute_pair(digit: i64, attribute: Attribute) -> [String; 2] {
    let mut pairs = held_out_attribute_prompts(digit, attribute);
    let i = digit as usize % pairs.len();
    pairs.swap_remove(i)
}

fn fraction(pairs: &[AttributePair], attribute: Attribute) -> f64 {
    let of: Vec<&AttributePair> = pairs.iter().filter(|p| p.attribute == attribute).collect();
    of.iter().filter(|p| p.follows).count() as f64 / of.len().max(1) as f64
}

/// The fraction of `samples` (N, 1, 28, 28) that `clf` reads as `digit`.
pub fn fraction_read_as(clf: &MnistClassifier, samples: &Tensor, digit: i64) -> f64 {
    let predicted = clf.probabilities(samples).argmax(-1, false).to_device(Device::Cpu); // (N,)
    predicted.eq(digit).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::captions::{attribute_prompts, DIGIT_WORDS};

    /// A 28×28 parallelogram stroke, `width` wide and `height` tall, sheared `shear` pixels right per pixel up,
    /// moved `dx` pixels right: (1, 1, 28, 28).
    fn stroke(width: f64, height: f64, shear: f64, dx: f64) -> Tensor {
        let pixels: Vec<f32> = (0..28 * 28)
            .map(|i| {
                let (x, y) = ((i % 28) as f64 + 0.5 - 14.0 - dx, 14.0 - (i / 28) as f64 - 0.5);
                f32::from(y.abs() <= height / 2.0 && (x - shear * y).abs() <= width / 2.0)
            })
            .collect();
        Tensor::from_slice(&pixels).view([1, 1, 28, 28])
    }

    /// Strokes that do what the attribute words say (or ignore them), jittered sideways by the seed.
    fn strokes(prompt: &str, n: i64, seed: u64, obey: bool) -> Tensor {
        let prompt = crate::data::captions::normalize_prompt(prompt); // "Draw a THIN 7." reads "draw a thin 7"
        let has = |w: &str| obey && prompt.split(' ').any(|p| p == w);
        let width = if has("thin") {
            2.0
        } else if has("bold") {
            4.0
        } else {
            3.0
        };
        let shear = if has("left") {
            -0.3
        } else if has("right") {
            0.3
        } else {
            0.0
        };
        let height = if has("small") {
            12.0
        } else if has("large") {
            20.0
        } else {
            16.0
        };
        Tensor::cat(
            &(0..n).map(|i| stroke(width, height, shear, ((seed + i as u64) % 3) as f64)).collect::<Vec<_>>(),
            0,
        )
    }

    #[test]
    fn attribute_pairs_follow_when_the_strokes_do_what_the_words_say() -> Result<()> {
        let all = (Attribute::ALL.as_slice(), &attribute_prompts as &dyn Fn(i64, Attribute) -> [String; 2]);
        let (report, samples) = attribute_directions(&mut |p, n, s| Ok(strokes(p, n, s, true)), all, 2, 0)?;
        assert_eq!((report.pairs.len(), samples.len(), samples[0][0].size()), (30, 30, vec![2, 1, 28, 28]));
        assert_eq!(report.pairs[0].prompts, ["a thin 0", "a bold 0"]);
        assert!(report.pairs.iter().all(|p| p.follows), "{:?}", report.pairs);
        assert_eq!(report.fraction_following(&[Attribute::Thickness, Attribute::Slant]), 1.0);
        // a model that ignores the attribute words draws the same strokes for both prompts: no pair follows
        let slant = ([Attribute::Slant].as_slice(), all.1);
        let (ignored, _) = attribute_directions(&mut |p, n, s| Ok(strokes(p, n, s, false)), slant, 2, 0)?;
        assert_eq!(ignored.per_attribute, [(Attribute::Slant, 0.0)]);
        // the held-out phrasings: one template per digit, each read the same way by a model that obeys the words
        let held_out = (Attribute::ALL.as_slice(), &held_out_attribute_pair as &dyn Fn(i64, Attribute) -> [String; 2]);
        let (report, _) = attribute_directions(&mut |p, n, s| Ok(strokes(p, n, s, true)), held_out, 2, 0)?;
        assert!(report.pairs.iter().all(|p| p.follows), "{:?}", report.pairs);
        assert_eq!(report.pairs[0].prompts, ["Draw a thin 0.", "Draw a bold 0."]);
        assert_eq!(report.pairs[11].prompts, ["please make me a 1 leaning left", "please make me a 1 leaning right"]);
        Ok(())
    }

    /// A prompt the pipeline refuses (too long for an old context, no known word) is graded as missed, shown black,
    /// and counted; any other error stops the grading.
    #[test]
    fn refused_prompts_count_as_missed_and_other_errors_stop_the_grading() -> Result<()> {
        let clf = MnistClassifier::load_shipped(Device::Cpu)?;
        let refuse = |p: &str| anyhow::Error::new(PromptRefused(format!("{p:?} is too long"))).context("in the prompt");
        let mut generate =
            |p: &str, n, s| if p.contains("number") { Err(refuse(p)) } else { Ok(strokes(p, n, s, true)) };
        let (report, samples, _) = prompt_accuracy(&mut generate, &clf, 1, 0)?;
        assert_eq!((report.refused, samples.size()), (10, vec![50, 1, 28, 28])); // "the number d", each digit
        assert!(report
            .per_prompt
            .iter()
            .filter(|p| p.refused)
            .all(|p| p.accuracy == 0.0 && p.prompt.contains("number")));
        let thickness =
            ([Attribute::Thickness].as_slice(), &attribute_prompts as &dyn Fn(i64, Attribute) -> [String; 2]);
        let mut bold_refused =
            |p: &str, n, s| if p.contains("bold") { Err(refuse(p)) } else { Ok(strokes(p, n, s, true)) };
        let (pairs, _) = attribute_directions(&mut bold_refused, thickness, 1, 0)?;
        assert!(pairs.pairs.iter().all(|p| p.refused && !p.follows));
        assert!(prompt_accuracy(&mut |_, _, _| anyhow::bail!("out of memory"), &clf, 1, 0).is_err());
        Ok(())
    }

    /// Held-out prompts go to `generate_each` a digit at a time, one image each; a refused prompt's black image
    /// counts as missed, and a reply with the wrong number of images stops the grading.
    #[test]
    fn held_out_prompts_are_graded_a_digit_per_batch() -> Result<()> {
        let data = crate::data::mnist::load(&crate::data::mnist::resolve_dir(None))?;
        let clf = MnistClassifier::load_shipped(Device::Cpu)?;
        let first_of =
            |d: i64| data.test_images.index_select(0, &data.test_labels.eq(d).nonzero().narrow(0, 0, 1).view([1]));
        let mut calls = Vec::new();
        let mut each = |prompts: &[String], seed: u64| {
            calls.push((prompts.len(), seed));
            let refused: Vec<bool> = prompts.iter().map(|p| p.contains("homework")).collect();
            let rows: Vec<Tensor> = prompts
                .iter()
                .zip(&refused)
                .map(|(p, &r)| {
                    if r {
                        Tensor::zeros([1, 1, 28, 28], tch::kind::FLOAT_CPU)
                    } else {
                        first_of(crate::data::captions::digits_named(p)[0])
                    }
                })
                .collect();
            Ok((Tensor::cat(&rows, 0), refused))
        };
        let (report, samples) = held_out_accuracy(&mut each, &clf, 300, 64)?;
        let homework = held_out_prompts(0, 64).iter().filter(|p| p.contains("homework")).count();
        assert!(homework > 0);
        assert_eq!((report.per_prompt.len(), samples.size()), (1280, vec![1280, 1, 28, 28]));
        assert_eq!(calls, (0..10).map(|d| (128, 300 + d)).collect::<Vec<_>>());
        assert_eq!(report.refused, 10 * homework);
        assert!(report.per_prompt.iter().filter(|p| p.refused).all(|p| p.accuracy == 0.0));
        let expected = 1.0 - homework as f64 / 128.0; // the first test image of each digit reads right
        assert!(report.per_digit.iter().all(|&a| (a - expected).abs() < 1e-12), "{:?}", report.per_digit);
        let mut short = |_: &[String], _: u64| Ok((Tensor::zeros([1, 1, 28, 28], tch::kind::FLOAT_CPU), vec![false]));
        assert!(held_out_accuracy(&mut short, &clf, 0, 2).is_err());
        Ok(())
    }

    #[test]
    fn prompt_accuracy_is_counted_per_phrasing_and_digit() -> Result<()> {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1); // small batches: a second thread would only spin-wait
        let data = crate::data::mnist::load(&crate::data::mnist::resolve_dir(None))?;
        let clf = MnistClassifier::load_shipped(Device::Cpu)?;
        // the digit a prompt names, and the first n test images of a digit
        let digit_of = |p: &str| {
            (0..10).find(|&d| p.split_whitespace().any(|w| w == d.to_string() || w == DIGIT_WORDS[d as usize]))
        };
        let real = |d: i64, n: i64| {
            data.test_images.index_select(0, &data.test_labels.eq(d).nonzero().squeeze_dim(1).narrow(0, 0, n))
        };
        let (good, samples, asked) = prompt_accuracy(&mut |p, n, _| Ok(real(digit_of(p).unwrap(), n)), &clf, 4, 0)?;
        assert_eq!((samples.size(), asked.size()), (vec![200, 1, 28, 28], vec![200]));
        assert_eq!(good.per_prompt[7].prompt, "a handwritten one");
        assert!(good.worst_digit >= 0.75 && good.overall >= 0.95, "{good:?}");
        // always a 1: digit 1 is always right, every other digit always wrong
        let (ones, _, _) = prompt_accuracy(&mut |_, n, _| Ok(real(1, n)), &clf, 4, 0)?;
        assert_eq!((ones.per_digit[1], ones.per_digit[0], ones.worst_digit), (1.0, 0.0, 0.0));
        assert!((ones.overall - 0.1).abs() < 1e-12);
        tch::set_num_threads(threads);
        Ok(())
    }
}
