//! Lesson 06's figures of prompt following: samples per phrasing, attribute pairs, a guidance sweep, and where in the
//! image each token of a prompt acts (the pipeline's cross-attention maps).
use crate::data::captions::Level;
use crate::data::to_unit;
use crate::eval::prompt_accuracy::{fraction_read_as, AttributeReport, PromptAccuracy};
use crate::nn::classifier::MnistClassifier;
use crate::pipelines::text_to_image::{Draw, TextToImage};
use crate::plot;
use anyhow::Result;
use std::path::Path;
use tch::{Device, Tensor};

/// Accuracy against the guidance scale: for each scale w of `scales`, `n` samples of "a handwritten <digit>" for
/// every digit (digit d from seed `seed + d` at every w, so a row of the figure differs only in w), graded by `clf`;
/// draws them into `figure`, a row per digit. `generate(prompt, n, seed, w)`.
pub fn guidance_sweep(
    generate: &mut dyn FnMut(&str, i64, u64, f64) -> Result<Tensor>,
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
    let _ = pipe.generate_with(prompt, None, 1, &Draw { guidance: w, steps, seed }, &mut |_, st| {
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
