//! Lesson 11's unCLIP experiments: what a decoder conditioned on CLIP image embeddings gives that direct text
//! conditioning does not — variations of a given digit, interpolations between two — and text → prior → decoder
//! against lesson 06's direct text-to-image model.
use crate::data::mnist::Mnist;
use crate::data::to_unit;
use crate::diffusion::schedule::NoiseSchedule;
use crate::eval::sample_quality::within_class_diversity;
use crate::nn::classifier::MnistClassifier;
use crate::nn::clip::l2_normalize;
use crate::nn::encoder_unet::EncoderUNetConfig;
use crate::nn::encoder_unet::NoisyClip;
use crate::nn::unclip::PriorConfig;
use crate::nn::unclip::{slerp, DiffusionPrior, PriorEps};
use crate::nn::unet::UNetConfig;
use crate::pipelines::text_to_image::{Draw, TextToImage};
use crate::sampling::ddpm::{sample, AncestralSampling, PosteriorVariance};
use crate::sampling::guidance::ClassifierFreeGuidance;
use crate::sampling::wrappers::Threshold;
use crate::studies::guidance_methods::{plot_rows, pooled_prompt_states};
use crate::train::unclip::Decoder;
use anyhow::Result;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How the decoder and the prior are sampled.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sampling {
    pub guidance: f64,
    pub steps: usize,
}

/// CLIP image embeddings of images (N, 1, H, W) in [0, 1]: the clean image's, t = 0 of the noise-aware tower, unit
/// rows (N, d).
pub fn image_embeddings(clip: &NoisyClip, images: &Tensor, device: Device) -> Tensor {
    let x = (images * 2.0 - 1.0).to_device(device);
    let t = Tensor::zeros([x.size()[0]], (Kind::Int64, device));
    tch::no_grad(|| clip.encode_image(&x, &t))
}

// ANCHOR: decode
/// The decoder's images for image embeddings `z` (n, d), guided by classifier-free guidance against the null
/// embedding at scale `how.guidance`, from the noise of `seed`: (n, 1, 28, 28) in [0, 1] on the CPU.
pub fn decode(decoder: &Decoder, sched: &NoiseSchedule, z: &Tensor, how: Sampling, seed: u64) -> Tensor {
    let (n, device) = (z.size()[0], z.device());
    let cond = decoder.tokens.context(z); // (n, k, D)
    let uncond = decoder.tokens.context(&z.zeros_like()); // the null embedding's tokens
    let guided = ClassifierFreeGuidance::new(&decoder.unet, cond, uncond, how.guidance);
    tch::manual_seed(seed as i64);
    let ddpm = AncestralSampling {
        steps: how.steps,
        variance: PosteriorVariance::BetaTilde,
        threshold: Threshold::Static,
        batch: n,
    };
    let x = tch::no_grad(|| sample(&guided, sched, &[n, 1, 28, 28], &ddpm, device, &mut |_, _| {}));
    to_unit(&x).to_device(Device::Cpu)
}
// ANCHOR_END: decode

// ANCHOR: prior_sample
/// Image embeddings drawn by the prior for text embeddings `text` (n, d): DDPM over the embedding with the prior's
/// clean-embedding prediction turned into ε, then put back on the unit sphere, where CLIP's embeddings live.
pub fn prior_sample(prior: &DiffusionPrior, sched: &NoiseSchedule, text: &Tensor, steps: usize, seed: u64) -> Tensor {
    let (n, d, device) = (text.size()[0], text.size()[1], text.device());
    let alpha_bar = sched.to_tensor_alpha_bar(device);
    let model = PriorEps { prior, text, alpha_bar: &alpha_bar };
    tch::manual_seed(seed as i64);
    let ddpm =
        AncestralSampling { steps, variance: PosteriorVariance::BetaTilde, threshold: Threshold::None, batch: n };
    let z = tch::no_grad(|| sample(&model, sched, &[n, d], &ddpm, device, &mut |_, _| {}));
    l2_normalize(&z) // (n, d)
}
// ANCHOR_END: prior_sample

/// Image variations: each source digit's embedding decoded `per` times.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Variations {
    pub sources: i64,
    pub per_source: i64,
    /// Share of the variations the classifier reads as their source's digit.
    pub class_kept: f64,
    /// Mean over variations of the RMS pixel difference to their source (pixels in [0, 1]).
    pub mean_pixel_distance: f64,
    /// The same between two different test digits of the same class, for scale.
    pub same_class_pixel_distance: f64,
}

/// RMS pixel difference of each pair of rows of `a` and `b` (N, 1, H, W): (N,).
fn rms_difference(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b).square().mean_dim([1, 2, 3].as_slice(), false, Kind::Float).sqrt()
}

// ANCHOR: variations
/// Decodes each source's own embedding `per` times from different noise: (the grade, the samples (S·per, 1, 28, 28)
/// with source s's variations in rows s·per … s·per + per − 1).
pub fn variations(
    (clip, decoder, clf): (&NoisyClip, &Decoder, &MnistClassifier),
    sched: &NoiseSchedule,
    (sources, labels, others): (&Tensor, &Tensor, &Tensor),
    per: i64,
    (how, seed): (Sampling, u64),
) -> (Variations, Tensor) {
    let device = clip.text_projection.ws.device();
    let z = image_embeddings(clip, sources, device); // (S, d)
    let s = z.size()[0];
    let repeated = z.repeat_interleave_self_int(per, 0, None); // (S·per, d)
    let samples = decode(decoder, sched, &repeated, how, seed); // (S·per, 1, 28, 28)
    let source_rows = sources.repeat_interleave_self_int(per, 0, None); // (S·per, 1, 28, 28)
    let asked = labels.repeat_interleave_self_int(per, 0, None);
    let read = clf.probabilities(&samples).argmax(-1, false);
    let kept = read.eq_tensor(&asked).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    let distance = rms_difference(&samples, &source_rows).mean(Kind::Float).double_value(&[]);
    let same_class = rms_difference(sources, others).mean(Kind::Float).double_value(&[]);
    let grade = Variations {
        sources: s,
        per_source: per,
        class_kept: kept,
        mean_pixel_distance: distance,
        same_class_pixel_distance: same_class,
    };
    (grade, samples)
}
// ANCHOR_END: variations

/// Decodes `points` embeddings spaced evenly along the great circle from `a` to `b` (d,), all from the same noise:
/// (points, 1, 28, 28).
pub fn interpolate(
    decoder: &Decoder,
    sched: &NoiseSchedule,
    (a, b): (&Tensor, &Tensor),
    points: i64,
    how: Sampling,
    seed: u64,
) -> Tensor {
    let path: Vec<Tensor> = (0..points).map(|i| slerp(a, b, i as f64 / (points - 1) as f64)).collect();
    let z = Tensor::stack(&path, 0); // (points, d)
                                     // the same starting noise for every point: decode one at a time from the same seed
    let rows: Vec<Tensor> = (0..points).map(|i| decode(decoder, sched, &z.narrow(0, i, 1), how, seed)).collect();
    Tensor::cat(&rows, 0)
}

/// Text → image by one route: prompt accuracy and within-digit diversity of samples for asked digits.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteGrade {
    pub route: String,
    pub n: i64,
    pub prompt_accuracy: f64,
    /// Mean pairwise distance of the classifier's features among samples of the same asked digit.
    pub diversity: f64,
    pub sample_seconds: f64,
}

/// Grades samples (n, 1, 28, 28) for the digits `asked` (n,).
pub fn grade_route(route: &str, clf: &MnistClassifier, samples: &Tensor, asked: &Tensor, seconds: f64) -> RouteGrade {
    let read = clf.probabilities(samples).argmax(-1, false);
    let accuracy = read.eq_tensor(asked).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    RouteGrade {
        route: route.into(),
        n: samples.size()[0],
        prompt_accuracy: accuracy,
        diversity: within_class_diversity(&clf.features(samples), asked),
        sample_seconds: seconds,
    }
}

/// The routes as a markdown table.
pub fn routes_table(rows: &[RouteGrade]) -> String {
    let mut t =
        String::from("| route | prompt accuracy | diversity (within digit) | sampling | n |\n|---|---|---|---|---|\n");
    for r in rows {
        t.push_str(&format!(
            "| {} | {:.3} | {:.2} | {:.1} s | {} |\n",
            r.route, r.prompt_accuracy, r.diversity, r.sample_seconds, r.n
        ));
    }
    t
}

/// The first test digit of each class 0–9 and the second, (10, 1, 28, 28) each, with their labels.
fn one_per_class(data: &Mnist) -> Result<(Tensor, Tensor, Tensor)> {
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for d in 0..10 {
        let idx = data.test_labels.eq(d).nonzero().squeeze_dim(1);
        anyhow::ensure!(idx.size()[0] >= 2, "the test set has fewer than two digits {d}");
        first.push(data.test_images.get(idx.int64_value(&[0])));
        second.push(data.test_images.get(idx.int64_value(&[1])));
    }
    Ok((Tensor::stack(&first, 0), Tensor::stack(&second, 0), Tensor::arange(10, tch::kind::INT64_CPU)))
}

/// Everything lesson 11's unCLIP part measured.
pub struct UnclipReport {
    pub variations: Variations,
    pub routes: Vec<RouteGrade>,
    /// Each source followed by its variations, (10·(1 + per), 1, 28, 28).
    grid: Tensor,
    per: i64,
    interpolations: Vec<(String, Tensor)>,
}

// ANCHOR: evaluate
/// Image variations of one test digit per class, two interpolations, and text → image by three routes for `prompts`
/// (asking for the digits `asked`): the prior's embedding decoded, a real test digit's embedding decoded (what a
/// perfect prior could give), and lesson 06's `direct` model.
pub fn evaluate(
    (clip, prior, decoder, direct, clf): (&NoisyClip, &DiffusionPrior, &Decoder, &TextToImage, &MnistClassifier),
    sched: &NoiseSchedule,
    data: &Mnist,
    (prompts, asked): (&[String], &Tensor),
    (how, seed): (Sampling, u64),
) -> Result<UnclipReport> {
    let device = clip.text_projection.ws.device();
    let (sources, others, labels) = one_per_class(data)?;
    let per = 8;
    let (grade, samples) = variations((clip, decoder, clf), sched, (&sources, &labels, &others), per, (how, seed));
    println!("variations: class kept {:.3}, mean pixel distance {:.3}", grade.class_kept, grade.mean_pixel_distance);
    let rows: Vec<Tensor> =
        (0..10).map(|i| Tensor::cat(&[sources.narrow(0, i, 1), samples.narrow(0, i * per, per)], 0)).collect();
    let grid = Tensor::cat(&rows, 0); // (10·(1 + per), 1, 28, 28)
    let z = image_embeddings(clip, &sources, device); // (10, d)
    let interpolations = [(0, 6), (1, 7), (3, 8)]
        .iter()
        .map(|&(a, b)| {
            let path = interpolate(decoder, sched, (&z.get(a), &z.get(b)), 10, how, seed + 1);
            (format!("{a} → {b}"), path)
        })
        .collect();
    // text → image, three routes
    let timed = |f: &mut dyn FnMut() -> Result<Tensor>| -> Result<(Tensor, f64)> {
        let started = std::time::Instant::now();
        Ok((f()?, started.elapsed().as_secs_f64()))
    };
    let (via_prior, prior_secs) = timed(&mut || {
        let pooled = pooled_prompt_states(&direct.prompts, prompts)?.to_device(device); // (n, D)
        let text = tch::no_grad(|| clip.encode_text(&pooled)); // (n, d)
        let z = prior_sample(prior, sched, &text, how.steps, seed + 2); // (n, d)
        Ok(decode(decoder, sched, &z, how, seed + 3))
    })?;
    let real = real_digits_for(data, asked)?; // (n, 1, 28, 28): test digits of the asked classes
    let (via_real, real_secs) =
        timed(&mut || Ok(decode(decoder, sched, &image_embeddings(clip, &real, device), how, seed + 3)))?;
    let (via_direct, direct_secs) =
        timed(&mut || Ok(direct.generate_each(prompts, &Draw::new(how.guidance, how.steps, seed + 3))?.0))?;
    let routes = vec![
        grade_route("text → prior → decoder", clf, &via_prior, asked, prior_secs),
        grade_route("a real test digit's embedding → decoder", clf, &via_real, asked, real_secs),
        grade_route("lesson 06, text → image directly", clf, &via_direct, asked, direct_secs),
    ];
    Ok(UnclipReport { variations: grade, routes, grid, per, interpolations })
}
// ANCHOR_END: evaluate

/// For each asked digit (n,), a different test digit of that class: (n, 1, 28, 28).
fn real_digits_for(data: &Mnist, asked: &Tensor) -> Result<Tensor> {
    let asked: Vec<i64> = Vec::try_from(asked)?;
    let mut used = [0i64; 10];
    let mut rows = Vec::with_capacity(asked.len());
    for d in asked {
        let idx = data.test_labels.eq(d).nonzero().squeeze_dim(1);
        let k = (used[d as usize] + 2) % idx.size()[0]; // past the two the variations use
        used[d as usize] += 1;
        rows.push(data.test_images.get(idx.int64_value(&[k])));
    }
    Ok(Tensor::stack(&rows, 0))
}

impl UnclipReport {
    /// variations.png and interpolations.png in `dir`.
    pub fn plot(&self, dir: &Path) -> Result<()> {
        let title = "Variations: a test digit (left), then decodings of its CLIP image embedding";
        crate::plot::image_grid(&dir.join("variations.png"), title, &self.grid, (1 + self.per) as usize, 2, &[])?;
        let title = "Interpolations between two test digits' image embeddings (slerp), same noise";
        plot_rows(&dir.join("interpolations.png"), title, &self.interpolations)
    }

    /// The results.md sections.
    pub fn sections(&self) -> Vec<(&'static str, String)> {
        let v = &self.variations;
        let variations = format!(
            "| sources | variations each | class kept | mean pixel distance to the source | between two test digits of a class |\n|---|---|---|---|---|\n| {} | {} | {:.3} | {:.3} | {:.3} |\n",
            v.sources, v.per_source, v.class_kept, v.mean_pixel_distance, v.same_class_pixel_distance
        );
        vec![("variations", variations), ("routes", routes_table(&self.routes))]
    }

    /// metrics.json's unCLIP part.
    pub fn metrics(
        &self,
        (tower, prior, decoder): (&EncoderUNetConfig, &PriorConfig, &UNetConfig),
        (clip_steps, prior_steps, decoder_steps): (u64, u64, u64),
        seconds: [f64; 3],
    ) -> serde_json::Value {
        serde_json::json!({
            "clip_tower": {"network": tower, "steps": clip_steps, "seconds": seconds[0]},
            "prior": {"network": prior, "steps": prior_steps, "seconds": seconds[1]},
            "decoder": {"network": decoder, "steps": decoder_steps, "seconds": seconds[2]},
            "variations": self.variations, "routes": self.routes,
        })
    }
}
