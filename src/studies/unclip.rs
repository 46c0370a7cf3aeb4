//! Lesson 11's unCLIP experiments: what a decoder conditioned on CLIP image embeddings gives that direct text
//! conditioning does not — variations of a given digit, interpolations between two — and text → prior → decoder
//! against lesson 06's direct text-to-image model.
use crate::data::to_unit;
use crate::diffusion::schedule::NoiseSchedule;
use crate::eval::sample_quality::within_class_diversity;
use crate::nn::classifier::MnistClassifier;
use crate::nn::clip::l2_normalize;
use crate::nn::encoder_unet::NoisyClip;
use crate::nn::unclip::{slerp, DiffusionPrior, PriorEps};
use crate::sampling::ddpm::{sample, AncestralSampling, PosteriorVariance};
use crate::sampling::guidance::ClassifierFreeGuidance;
use crate::sampling::wrappers::Threshold;
use crate::train::unclip::Decoder;
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
