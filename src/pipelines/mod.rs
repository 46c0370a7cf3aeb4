//! Inference pipelines: trained networks and their noise schedule, saved and loaded as one bundle, sampled through
//! the sampler registry ([`crate::sampling::registry`]).
//!
//! - [`bundle`]: the folder a pipeline saves itself into, and `--ship`.
//! - [`draw_cli`]: lesson 08's `sample`, `img2img` and `inpaint` commands.
//! - [`ddpm`]: lesson 04's unconditional UNet (lesson 07 samples the shipped one).
//! - [`prompt_encoder`]: a tokenizer and a frozen text encoder, prompt in, context out (lessons 06 and 08).
//! - [`text_to_image`]: lesson 06, text to pixels.
//! - [`latent_diffusion`]: lesson 08, text to latents to pixels, with img2img and inpainting.
//! - [`stable_diffusion`]: lesson 09, SD 1.5's networks at full size and the web UIs' samplers.
pub mod bundle;
pub mod ddpm;
pub mod draw_cli;
pub mod latent_diffusion;
pub mod prompt_encoder;
pub mod stable_diffusion;
pub mod text_to_image;

use crate::sampling::guidance::MAX_SCALE;
use anyhow::{ensure, Result};
use std::path::PathBuf;
use tch::{Device, Tensor};

/// The flags of `lesson06 sample` and `lesson08 sample | img2img | inpaint`: a prompt in, PNGs out.
#[derive(clap::Args, Debug, Clone)]
pub struct PromptArgs {
    /// The prompt, free text: "a bold 7", "Seven, leaning LEFT", "the number 3". One naming no digit, or two, is
    /// drawn with a note on what to expect.
    #[arg(long)]
    pub prompt: String,
    /// A prompt to steer away from: its prediction replaces the empty prompt's, ε̃ = ε_neg + w (ε_c − ε_neg).
    #[arg(long)]
    pub negative: Option<String>,
    /// Number of images (for img2img and inpaint: outputs per input, each from its own noise).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(i64).range(1..=10000))]
    pub num: i64,
    /// Guidance scale w: ε̃ = ε_∅ + w (ε_c − ε_∅); 1 is the plain conditional model.
    #[arg(long, default_value_t = text_to_image::DEFAULT_GUIDANCE, value_parser = crate::cli::finite)]
    pub guidance: f64,
    /// Sampler steps.
    #[arg(long, default_value_t = text_to_image::DEFAULT_SAMPLE_STEPS as u64)]
    #[arg(value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub steps: u64,
    /// Seed of the starting noise: the same seed, the same images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the PNGs go [default: out/lessonNN/samples].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A saved pipeline (the weights/ folder of a training run) [default: the shipped one in data/lessonNN].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Threads libtorch may use [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub threads: Option<i32>,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu", value_parser = crate::cli::parse_device)]
    pub device: crate::cli::DeviceArg,
}

/// What a pixel-space pipeline's sampler does to its estimate x̂₀ at every step (lesson 06's `sample`; lesson 10
/// measures the three).
#[derive(clap::Args, Debug, Clone)]
pub struct ThresholdArgs {
    /// x̂₀ at each step: clipped to [−1, 1] (static), Imagen's dynamic thresholding (each sample scaled back into
    /// [−1, 1] by its --threshold-percentile of |x̂₀|: keeps large --guidance from saturating), or left alone (none).
    #[arg(long, value_enum, default_value_t = crate::sampling::wrappers::ThresholdKind::Static)]
    pub threshold: crate::sampling::wrappers::ThresholdKind,
    /// The percentile p of dynamic thresholding, in [0, 1] (Imagen: 0.995).
    #[arg(long, default_value_t = crate::sampling::wrappers::DYNAMIC_PERCENTILE, value_parser = crate::cli::unit_interval)]
    pub threshold_percentile: f64,
}

impl ThresholdArgs {
    pub fn threshold(&self) -> crate::sampling::wrappers::Threshold {
        self.threshold.with(self.threshold_percentile)
    }
}

/// `lessonNN tokens`: how a saved pipeline's tokenizer reads a prompt, token by token.
#[derive(clap::Args, Debug, Clone)]
pub struct TokensArgs {
    /// The prompt to look at.
    #[arg(long)]
    pub prompt: String,
    /// A saved pipeline (the weights/ folder of a training run) [default: the shipped one in data/lessonNN].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Threads libtorch may use [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub threads: Option<i32>,
}

impl TokensArgs {
    /// Prints the tokens, ids and unseen tokens of `--prompt` for lesson `lesson`'s pipeline (`shipped`: its
    /// shipped folder), then what `sample` would note about the prompt.
    pub fn run(&self, lesson: &str, shipped: impl FnOnce() -> PathBuf) -> Result<()> {
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
        let dir = self.weights.clone().unwrap_or_else(shipped);
        let encoder = bundle::load_prompt_encoder(&dir, Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", bundle::no_bundle(&dir, lesson, "text")))?;
        println!("{}", encoder.describe_tokens(&self.prompt));
        match encoder.notes(&self.prompt) {
            Ok(notes) => notes.iter().for_each(|n| println!("{n}")),
            Err(e) => println!("sample would refuse it: {e:#}"),
        }
        Ok(())
    }
}

/// The fields both text pipelines' `pipeline.json` share ([`crate::validate::Validate`]): image and context sizes,
/// the schedule's name and T, the seen token ids.
pub(crate) fn check_text_pipeline(
    image_size: i64,
    context_len: usize,
    schedule: &str,
    num_train_timesteps: usize,
    seen_tokens: &[i64],
) -> std::result::Result<(), String> {
    use crate::validate::in_range;
    in_range("image_size", image_size, 1, 1024)?;
    in_range("context_len", context_len, 2, 1024)?;
    if !matches!(schedule, "linear" | "cosine") {
        return Err(format!("`schedule` is \"{schedule}\": it must be \"linear\" or \"cosine\""));
    }
    in_range("num_train_timesteps", num_train_timesteps, 2, 100_000)?;
    match seen_tokens.iter().find(|t| **t < 0) {
        Some(t) => Err(format!("`seen_tokens` holds {t}: token ids are ≥ 0")),
        None => Ok(()),
    }
}

/// `images` unless they hold NaN or infinities, which would be written as a black PNG with exit status 0.
pub(crate) fn finite_images(images: Tensor) -> Result<Tensor> {
    let fix = "the weights give non-finite values (check the weights files) or the guidance scale is too large";
    crate::cli::ensure_finite(&images, "the generated image", fix)?;
    Ok(images)
}

/// One image (C, H, W) = `image` per prompt: the rows of `drawn` (one per prompt read, in order) where `refused` is
/// false, black ones where it is true (graders count those prompts as missed). (P, C, H, W) on the CPU.
pub(crate) fn black_where_refused(drawn: Option<Tensor>, refused: &[bool], image: [i64; 3]) -> Tensor {
    let black = Tensor::zeros([1, image[0], image[1], image[2]], (tch::Kind::Float, tch::Device::Cpu));
    let mut next = 0;
    let rows: Vec<Tensor> = refused
        .iter()
        .map(|&r| match (&drawn, r) {
            (Some(x), false) => {
                next += 1;
                x.narrow(0, next - 1, 1).to_device(tch::Device::Cpu)
            }
            _ => black.shallow_clone(),
        })
        .collect();
    Tensor::cat(&rows, 0)
}

/// The guidance scale `w` if it is a number within ±[`MAX_SCALE`].
pub(crate) fn check_guidance(w: f64) -> Result<()> {
    ensure!(
        w.is_finite() && w.abs() <= MAX_SCALE,
        "the guidance scale must be a number within ±{MAX_SCALE}, got {w} (2 to 8 are the useful ones)"
    );
    Ok(())
}

impl PromptArgs {
    /// Applies --threads and returns the device of --device.
    pub fn init(&self) -> Result<Device> {
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
        self.device.resolve()
    }

    /// --out, or `out/LESSON/samples`.
    pub fn out_dir(&self, lesson: &str) -> PathBuf {
        self.out.clone().unwrap_or_else(|| PathBuf::from(format!("out/{lesson}/samples")))
    }

    /// --weights, or `shipped` (the pipeline's shipped bundle).
    pub fn weights_dir(&self, shipped: impl FnOnce() -> PathBuf) -> PathBuf {
        self.weights.clone().unwrap_or_else(shipped)
    }

    /// The title of a sample grid: the prompt, the negative prompt and the settings.
    pub fn title(&self, how: &str) -> String {
        let negative = self.negative.as_deref().map_or(String::new(), |n| format!(", negative \"{n}\""));
        format!("\"{}\"{negative}, w = {}, {how}, seed {}", self.prompt, self.guidance, self.seed)
    }
}
