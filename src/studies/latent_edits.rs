//! Grading lesson 08's edits and speed with the crate's own tools:
//!
//! - **img2img**: test digits redrawn towards a *different* digit's prompt; the fraction the classifier reads as the
//!   new digit (and the fraction still read as the old one), per strength.
//! - **Inpainting**: the bottom half of test digits masked and redrawn for the digit's own prompt; how well the
//!   unmasked half survives (mean absolute pixel error, against the VAE's own reconstruction error there) and how
//!   often the completed digit reads right.
//! - **Speed**: images per second of lesson 06's pixel-space pipeline and of the latent one, at the same number of
//!   sampler steps (one guided UNet evaluation per step in both), measured one after the other in the same process.
//! - **Reconstructions**: what the autoencoder alone loses (PSNR, and whether the classifier still reads the digit).
use crate::data::captions::eval_prompts;
use crate::eval::image_metrics::{masked_mae, psnr};
use crate::nn::classifier::MnistClassifier;
use crate::nn::vae::AutoencoderKl;
use crate::pipelines::latent_diffusion::{Draw, LatentDiffusion};
use crate::pipelines::text_to_image::TextToImage;
use crate::plot;
use crate::studies::prompts::{number, ResultRow, TextToImageGrades};
use anyhow::Result;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// `lesson08 eval`: grades a saved lesson 08 pipeline (by default the shipped one) with `sampler`, as training does
/// ([`crate::studies::prompts::GradeArgs`]).
pub fn grade_saved(
    args: &crate::studies::prompts::GradeArgs,
    sampler: crate::sampling::registry::Sampler,
) -> Result<()> {
    use crate::pipelines::{bundle, latent_diffusion as ld};
    let (dir, (_, steps, _)) = (args.weights_dir(ld::shipped_dir), args.eval.resolve(false));
    let pipe = LatentDiffusion::load(&dir, Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", bundle::no_bundle(&dir, "08", "latent-diffusion")))?;
    let draw = |seed, guidance| Draw { guidance, sampler, steps, seed };
    let (data, clf) = crate::studies::prompts::GradeArgs::inputs()?;
    let mut generate = |p: &str, n, seed, w| pipe.generate(p, None, n, &draw(seed, w));
    let mut generate_each = |prompts: &[String], seed, w| pipe.generate_each(prompts, &draw(seed, w));
    args.grade("lesson08", &dir, (&data, &clf), &mut generate, &mut generate_each)?;
    // the autoencoder alone, on the 10 000 test digits, as training reports it
    let recon = reconstructions(&pipe.vae, &clf, (&data.test_images, &data.test_labels), Device::Cpu);
    let out = args.out_dir("lesson08");
    crate::cli::write_atomic(&out.join("autoencoder.json"), serde_json::to_string_pretty(&recon)?.as_bytes())?;
    println!("autoencoder: {}", serde_json::to_string(&recon)?);
    Ok(())
}

/// The digit test image i is redrawn into: never its own (label + 1 + i mod 9, mod 10).
pub fn new_digit(label: i64, i: i64) -> i64 {
    (label + 1 + i % 9) % 10
}

/// An edit of a batch of images for one prompt with one draw, returning one or more (B, 1, S, S) outputs.
type Edit<'a> = dyn FnMut(&Tensor, &str, &Draw) -> Result<Vec<Tensor>> + 'a;

/// Runs `edit(rows of images, prompt, draw)` once per prompt: image i goes to phrasing i mod 5 of [`eval_prompts`]
/// for digit `digits[i]`, each group with its own seed (`draw.seed` + 10·digit + phrasing). Returns the edited
/// images, each output (B, 1, S, S) back in its image's row: as many tensors as `edit` returns.
fn edit_by_prompt(images: &Tensor, digits: &[i64], draw: &Draw, edit: &mut Edit) -> Result<Vec<Tensor>> {
    let mut outputs: Vec<Tensor> = Vec::new();
    for digit in 0..10 {
        for (k, prompt) in eval_prompts(digit).iter().enumerate() {
            let rows: Vec<i64> =
                (0..digits.len() as i64).filter(|&i| digits[i as usize] == digit && i % 5 == k as i64).collect();
            if rows.is_empty() {
                continue;
            }
            let index = Tensor::from_slice(&rows);
            let draw = Draw { seed: draw.seed + (10 * digit) as u64 + k as u64, ..*draw };
            let edited = edit(&images.index_select(0, &index), prompt, &draw)?;
            if outputs.is_empty() {
                outputs = edited.iter().map(|_| images.zeros_like()).collect(); // (N, 1, S, S) each
            }
            for (out, x) in outputs.iter_mut().zip(&edited) {
                *out = out.index_copy(0, &index, x);
            }
        }
    }
    Ok(outputs)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Img2ImgPoint {
    pub strength: f64,
    /// Fraction read as the prompted (new) digit.
    pub new_digit: f64,
    /// Fraction still read as the input's digit.
    pub old_digit: f64,
}

// ANCHOR: img2img_study
/// img2img of `images` (N, 1, S, S) in [0, 1] with digit `labels` (N,) at each of `strengths`: image i is asked for
/// [`new_digit`] with phrasing i mod 5 of [`eval_prompts`]. Draws the first `shown` inputs' rows into `figure`.
pub fn img2img_study(
    pipe: &LatentDiffusion,
    clf: &MnistClassifier,
    (images, labels): (&Tensor, &Tensor),
    strengths: &[f64],
    draw: &Draw,
    shown: i64,
    figure: &Path,
) -> Result<Vec<Img2ImgPoint>> {
    let labels = Vec::<i64>::try_from(labels)?;
    let targets: Vec<i64> = labels.iter().enumerate().map(|(i, &l)| new_digit(l, i as i64)).collect();
    let (mut points, mut columns) = (Vec::new(), Vec::new());
    for &strength in strengths {
        let mut img2img = |x: &Tensor, prompt: &str, d: &Draw| Ok(vec![pipe.img2img(x, prompt, None, strength, d)?]);
        let out = edit_by_prompt(images, &targets, draw, &mut img2img)?.remove(0); // (N, 1, S, S)
        let predicted = Vec::<i64>::try_from(clf.probabilities(&out).argmax(-1, false).to_device(Device::Cpu))?;
        let frac = |want: &[i64]| predicted.iter().zip(want).filter(|(p, w)| p == w).count() as f64 / want.len() as f64;
        points.push(Img2ImgPoint { strength, new_digit: frac(&targets), old_digit: frac(&labels) });
        columns.push(out.narrow(0, 0, shown));
    }
    // one row per input: the input, then its redraw at each strength
    let mut all = vec![images.narrow(0, 0, shown).to_device(Device::Cpu)];
    all.extend(columns);
    let grid = Tensor::stack(&all, 1); // (shown, 1 + strengths, 1, S, S)
    let n_cols = 1 + strengths.len();
    let mut labels_fig = vec![String::new(); (shown as usize) * n_cols];
    labels_fig[0] = "input".into();
    for (j, s) in strengths.iter().enumerate() {
        labels_fig[1 + j] = format!("s={s}");
    }
    for i in 0..shown as usize {
        labels_fig[i * n_cols] = format!("→ {}", targets[i]);
    }
    let title = "img2img: each input redrawn towards another digit's prompt at strengths s";
    plot::image_grid(figure, title, &grid.flatten(0, 1), n_cols, 3, &labels_fig)?;
    Ok(points)
}
// ANCHOR_END: img2img_study

#[derive(Debug, Clone, serde::Serialize)]
pub struct InpaintReport {
    pub n: i64,
    /// Mean |output − input| over the unmasked pixels, before pasting them back (the decoder's doing).
    pub unmasked_mae: f64,
    /// The same error of the plain VAE reconstruction: what the decoder alone costs there.
    pub unmasked_mae_reconstruction: f64,
    /// After pasting the unmasked pixels back from the input (what `lesson08 inpaint` writes): 0 by construction.
    pub unmasked_mae_pasted: f64,
    /// Fraction of completed digits read as the prompted (their own) digit.
    pub accuracy: f64,
}

/// The bottom half of each of `images` (N, 1, S, S) masked and redrawn for its own digit's prompt (phrasing
/// i mod 5); the first `shown` rows (input, masked input, output, pasted) go into `figure`.
pub fn inpaint_study(
    pipe: &LatentDiffusion,
    clf: &MnistClassifier,
    images: &Tensor,
    labels: &Tensor,
    draw: &Draw,
    shown: i64,
    figure: &Path,
) -> Result<InpaintReport> {
    let (n, s) = (images.size()[0], images.size()[2]);
    let mask = Tensor::zeros([1, 1, s, s], (Kind::Float, Device::Cpu));
    let _ = mask.narrow(2, s / 2, s - s / 2).fill_(1.0); // redraw rows S/2..S
    let mut inpaint = |x: &Tensor, prompt: &str, d: &Draw| {
        let (decoded, pasted) = pipe.inpaint(x, &mask, prompt, None, d)?;
        Ok(vec![decoded, pasted])
    };
    let outputs = edit_by_prompt(images, &Vec::<i64>::try_from(labels)?, draw, &mut inpaint)?;
    let (decoded, pasted) = (&outputs[0], &outputs[1]); // (N, 1, S, S) each
    let keep = 1.0 - &mask;
    let reconstruction = pipe.decode(&pipe.encode(images));
    let accuracy = clf.accuracy(pasted, labels);
    let report = InpaintReport {
        n,
        unmasked_mae: masked_mae(decoded, images, &keep),
        unmasked_mae_reconstruction: masked_mae(&reconstruction, images, &keep),
        unmasked_mae_pasted: masked_mae(pasted, images, &keep),
        accuracy,
    };
    let k = shown.min(n);
    let masked_input = images.narrow(0, 0, k) * &keep + &mask * 0.5; // the redrawn half shown grey
    let rows = [images.narrow(0, 0, k), masked_input, decoded.narrow(0, 0, k), pasted.narrow(0, 0, k)];
    let labels_fig: Vec<String> = ["input", "mask", "output", "pasted"]
        .iter()
        .flat_map(|l| std::iter::once(l.to_string()).chain((1..k).map(|_| String::new())))
        .collect();
    let title = "inpainting: the bottom half redrawn for the digit's own prompt";
    plot::image_grid(figure, title, &Tensor::cat(&rows, 0), k as usize, 3, &labels_fig)?;
    Ok(report)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SpeedReport {
    pub images: i64,
    pub steps: usize,
    pub pixel_images_per_s: f64,
    pub latent_images_per_s: f64,
    /// latent / pixel.
    pub speedup: f64,
}

// ANCHOR: sampling_speed
/// Images per second of `pixel` (lesson 06: DDPM over 28×28 pixels) and `latent` (this lesson: `draw.sampler`
/// over 4 × 7 × 7 latents, plus the VAE decode), `n` images of one prompt at `draw.steps` steps and guidance
/// `draw.guidance` each; one image of each first, to warm up.
pub fn sampling_speed(pixel: &TextToImage, latent: &LatentDiffusion, n: i64, draw: &Draw) -> Result<SpeedReport> {
    let prompt = "a handwritten seven";
    let time = |f: &mut dyn FnMut(i64) -> Result<Tensor>| -> Result<f64> {
        let _ = f(1)?;
        let t = Instant::now();
        let _ = f(n)?;
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    let pixel_rate = time(&mut |k| pixel.generate(prompt, None, k, draw.guidance, draw.steps, draw.seed))?;
    let latent_rate = time(&mut |k| latent.generate(prompt, None, k, draw))?;
    Ok(SpeedReport {
        images: n,
        steps: draw.steps,
        pixel_images_per_s: pixel_rate,
        latent_images_per_s: latent_rate,
        speedup: latent_rate / pixel_rate,
    })
}
// ANCHOR_END: sampling_speed

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_digit_is_never_the_old_one_and_covers_the_others() {
        for label in 0..10 {
            let targets: std::collections::HashSet<i64> = (0..9).map(|i| new_digit(label, i)).collect();
            assert_eq!(targets.len(), 9);
            assert!(!targets.contains(&label));
        }
    }
}

/// How well the autoencoder alone keeps a digit: test digits through encoder (the posterior mean) and decoder.
#[derive(Debug, serde::Serialize)]
pub struct Reconstructions {
    /// The reconstructions (N, 1, 28, 28) in [0, 1], on the CPU (not in metrics.json).
    #[serde(skip)]
    pub images: Tensor,
    pub psnr_db: f64,
    /// Classifier accuracy on the reconstructions, and on the originals.
    pub accuracy: f64,
    pub original_accuracy: f64,
    /// The posterior q(z|x) of the test digits: its mean σ over all latent entries, the standard deviation of μ
    /// over them (what [`crate::nn::vae::scaling_factor`] divides by, nearly), and the mean KL per digit in nats.
    pub posterior_sigma_mean: f64,
    pub posterior_mean_std: f64,
    pub kl_per_digit: f64,
}

/// Encodes and decodes `test` (N, 1, 28, 28) in [0, 1] in chunks of 1000 on `device` (the VAE's) and grades the
/// result against `labels`; also measures the posterior of the test digits.
pub fn reconstructions(
    vae: &AutoencoderKl,
    clf: &MnistClassifier,
    (test, labels): (&Tensor, &Tensor),
    device: Device,
) -> Reconstructions {
    let (images, sigma, mean, kl) = tch::no_grad(|| {
        let x = (test * 2.0 - 1.0).to_device(device);
        let (mut chunks, mut sigma, mut mean, mut kl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for c in x.split(1000, 0) {
            let q = vae.encode(&c);
            sigma.push(q.std().to_device(Device::Cpu));
            mean.push(q.mean.to_device(Device::Cpu));
            kl.push(q.kl().to_device(Device::Cpu)); // (n,)
            chunks.push(vae.decode(&q.mean));
        }
        let images = ((Tensor::cat(&chunks, 0).clamp(-1.0, 1.0) + 1.0) / 2.0).to_device(Device::Cpu); // (N, 1, 28, 28)
        (images, Tensor::cat(&sigma, 0), Tensor::cat(&mean, 0), Tensor::cat(&kl, 0))
    });
    let (psnr_db, accuracy) = (psnr(test, &images), clf.accuracy(&images, labels));
    let scalar = |t: Tensor| t.to_kind(Kind::Double).double_value(&[]);
    Reconstructions {
        psnr_db,
        accuracy,
        original_accuracy: clf.accuracy(test, labels),
        posterior_sigma_mean: scalar(sigma.mean(Kind::Double)),
        posterior_mean_std: scalar(mean.std(true)),
        kl_per_digit: scalar(kl.mean(Kind::Double)),
        images,
    }
}

impl Reconstructions {
    /// The first `k` of `originals` (top row) above their reconstructions, into `figure`.
    pub fn plot(&self, figure: &Path, originals: &Tensor, k: i64) -> Result<()> {
        let shown = Tensor::cat(&[originals.narrow(0, 0, k), self.images.narrow(0, 0, k)], 0); // (2k, 1, 28, 28)
        plot::image_grid(figure, "test digits (top) and their VAE reconstructions", &shown, k as usize, 3, &[])
    }
}

/// Lesson 08's results.md table: training and the autoencoder from its `metrics`, the `grades`, then the edits and
/// the speed ([`edit_rows`]).
pub fn lesson08_results(
    metrics: &serde_json::Value,
    grades: &TextToImageGrades,
    edits: (f64, &[Img2ImgPoint], &InpaintReport, &SpeedReport),
) -> String {
    let n = |p: &str| number(metrics, p);
    let trained = |what: &str, at: &str| {
        let (steps, batch, s) =
            (n(&format!("{at}/steps")), n(&format!("{at}/batch_size")), n(&format!("{at}/seconds")));
        [format!("{what}, {steps} steps of {batch}"), format!("{s:.0} s"), String::new()]
    };
    let reported = |q: String, v: String| [q, v, String::new()];
    let before = [
        trained("autoencoder training", "/vae"),
        trained(&format!("latent UNet training ({} parameters)", n("/unet/parameters")), "/unet"),
        [
            "VAE + latent UNet training".into(),
            format!(
                "**{:.0} s** ({:.0} s with captioning and encoding the training set)",
                n("/vae_plus_unet_seconds"),
                n("/train_seconds_total")
            ),
            "≤ 10 min".into(),
        ],
        reported(
            format!("reconstructions of the {} test digits: PSNR", n("/vae/test_images")),
            format!("{:.2} dB", n("/vae/psnr_db")),
        ),
        [
            "classifier accuracy on those reconstructions (on the originals)".into(),
            format!(
                "**{:.4}** ({:.4})",
                n("/vae/reconstructions/accuracy"),
                n("/vae/reconstructions/original_accuracy")
            ),
            "≥ 0.98".into(),
        ],
        reported("scaling factor 1/σ̂".into(), format!("{:.4}", n("/vae/scaling_factor"))),
    ];
    let (strength, img2img, inpaint, speed) = edits;
    let after = edit_rows(strength, img2img, inpaint, speed);
    grades.results_table(&before, ["≥ 0.97", "≥ 0.96 / ≥ 0.90", "≥ 90 %", "≤ 3"], &after)
}

/// Lesson 08's rows of results (quantity, value, target) about its edits and its speed, img2img at `strength`.
pub fn edit_rows(
    strength: f64,
    img2img: &[Img2ImgPoint],
    inpaint: &InpaintReport,
    speed: &SpeedReport,
) -> Vec<ResultRow> {
    let at_strength = img2img.iter().find(|p| p.strength == strength).map_or(0.0, |p| p.new_digit);
    let n = inpaint.n;
    vec![
        [
            format!("img2img at strength {strength} towards another digit ({n} test digits)"),
            format!("**{:.0} %** read as the new digit", 100.0 * at_strength),
            "≥ 90 %".into(),
        ],
        [
            format!("inpainting the bottom half ({n} test digits): error on the kept half, before pasting"),
            format!(
                "{:.4} (the autoencoder alone: {:.4}; after pasting: {})",
                inpaint.unmasked_mae, inpaint.unmasked_mae_reconstruction, inpaint.unmasked_mae_pasted
            ),
            String::new(),
        ],
        [
            "inpainting: completed digits read as the prompted digit".into(),
            format!("{:.0} %", 100.0 * inpaint.accuracy),
            String::new(),
        ],
        [
            format!("sampling, {} images, {} steps: latent vs lesson 06's pixel pipeline", speed.images, speed.steps),
            format!(
                "**{:.1} vs {:.1} images/s: {:.1}×**",
                speed.latent_images_per_s, speed.pixel_images_per_s, speed.speedup
            ),
            "≥ 3×".into(),
        ],
    ]
}

/// The line lesson 08 prints about its edits and its speed, img2img at `strength`.
pub fn summary(strength: f64, img2img: &[Img2ImgPoint], inpaint: &InpaintReport, speed: &SpeedReport) -> String {
    let at_strength = img2img.iter().find(|p| p.strength == strength).map_or(0.0, |p| p.new_digit);
    format!(
        "img2img at strength {strength}: {:.1} % read as the new digit; inpainting: unmasked error {:.4} (VAE alone \
         {:.4}), {:.1} % read right; sampling {:.1} images/s latent vs {:.1} pixel: {:.1}x",
        100.0 * at_strength,
        inpaint.unmasked_mae,
        inpaint.unmasked_mae_reconstruction,
        100.0 * inpaint.accuracy,
        speed.latent_images_per_s,
        speed.pixel_images_per_s,
        speed.speedup
    )
}
