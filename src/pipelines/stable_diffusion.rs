//! Stable Diffusion 1.x, text to image: tokens → CLIP text states → a guided sampler over 4-channel latents →
//! the VAE's decoder → pixels.
//!
//! [LDM] Rombach et al. 2022, arXiv:2112.10752 (sec. 3.3: the conditioned latent model; sec. 4.3.2: the scaling
//! factor). [CFG] Ho & Salimans 2022, arXiv:2207.12598 (guidance, here as SD's `guidance_scale` w).
//! [DDIM] Song et al. 2021, arXiv:2010.02502. [EDM] Karras et al. 2022, arXiv:2206.00364 (eq. 5, the Karras grid).
//! [k-diffusion] Crowson, `k_diffusion/sampling.py` and `external.py`: the σ grids and the names Stable Diffusion UIs
//! use. [SDEdit] Meng et al. 2022, arXiv:2108.01073 (img2img).
//!
//! SD 1.x was trained as a discrete-time ε-model on the "scaled linear" schedule (√β from √0.00085 to √0.012 over
//! T = 1000 steps). Every sampler here is lesson 07's, in σ-space, on an [`EpsDenoiser`] with fractional timesteps
//! (as k-diffusion feeds SD's UNet). Negative prompts are the ∅ branch of guidance. Image i of a call is drawn from
//! its own seed, seed + i, by libtorch's CPU generator, which `torch.Generator().manual_seed` also is: diffusers on
//! the CPU draws the same starting latents for the same seed.
use crate::cli::{CommonArgs, Run};
use crate::data::png::write_png_rgb_with_text;
use crate::data::png::{read_png_gray, read_png_rgb};
use crate::diffusion::schedule::NoiseSchedule;
use crate::model::EpsModel;
use crate::model::{sigma_of_timestep, sigmas_of_schedule, timestep_of_sigma, EpsDenoiser};
use crate::model::{Cond, CondEpsModel};
use crate::nn::controlnet::{ControlNet, ControlScale};
use crate::nn::layers::channels_last;
use crate::nn::taesd::Taesd;
use crate::sampling::controlled::{Control, ControlledGuidance};
use crate::sampling::grids::img2img_tail;
use crate::sampling::grids::{karras_sigmas, spaced_timesteps, TimestepSpacing, KARRAS_RHO};
use crate::sampling::guidance::ClassifierFreeGuidance;
use crate::sampling::lcm::{lcm_sample, lcm_timesteps};
use crate::sampling::registry::Sampler;
use crate::sampling::SamplerStep;
use crate::sd::embeddings::Embeddings;
use crate::sd::lora::{lora_hashes, merge_loras, parse_lora_flag, parse_prompt_loras, strip_lora_tags, LoraModels};
use crate::sd::lora::{Component, LoraFile, LoraUse, WeightBackup};
use crate::sd::weights::{load_controlnet, load_taesd, SdModels};
use crate::text::bpe::CLIP_CONTEXT_LEN;
use crate::text::Bpe;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// SD 1.x's training schedule: T and the scaled-linear β range ([LDM] configs `v1-inference.yaml`:
/// linear_start 0.00085, linear_end 0.012, timesteps 1000).
pub const NUM_TRAIN_TIMESTEPS: usize = 1000;
/// diffusers' SD 1.5 scheduler config: `steps_offset` 1 (DDIM's timesteps are k·T/S + 1, as CompVis' `ddim_discretize="uniform"`).
pub const DDIM_STEPS_OFFSET: usize = 1;
/// Where the CLIP vocabulary lives (see data/clip/README.md).
pub const CLIP_VOCAB: &str = "data/clip/bpe_simple_vocab_16e6.txt.gz";
/// Width and height must be multiples of the VAE's 8× (latents of whole cells) and lie in this range.
pub const MIN_SIZE: i64 = 64;
pub const MAX_SIZE: i64 = 2048;

/// The samplers under the names Stable Diffusion UIs give them (AUTOMATIC1111, ComfyUI), each one of lesson 07's
/// on the σ grid those UIs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdSampler {
    /// DDIM (η = 0) on SD's own timesteps k·⌊T/S⌋ + 1, ending at ᾱ₀ (diffusers' SD 1.5 `DDIMScheduler`).
    Ddim,
    /// Euler on k-diffusion's default grid: S timesteps evenly spaced from T − 1 to 0 (fractional), then σ = 0.
    Euler,
    /// Euler ancestral (η = 1) on the same grid.
    EulerA,
    /// DPM-Solver++(2M) on the same grid.
    DpmPp2m,
    /// DPM-Solver++(2M) on the Karras grid (ρ = 7) from σ_max = σ_{T−1} to σ_min = σ_0.
    DpmPp2mKarras,
    /// Latent consistency sampling (diffusers' `LCMScheduler`) on LCM's skipping-step grid, for models distilled to
    /// it (the LCM-LoRA for SD 1.5): 2–8 steps, guidance 1–2.
    Lcm,
}

impl SdSampler {
    pub const ALL: [SdSampler; 6] = [
        SdSampler::Ddim,
        SdSampler::Euler,
        SdSampler::EulerA,
        SdSampler::DpmPp2m,
        SdSampler::DpmPp2mKarras,
        SdSampler::Lcm,
    ];

    /// The UI name, written into the PNG's parameters.
    pub fn name(self) -> &'static str {
        match self {
            SdSampler::Ddim => "DDIM",
            SdSampler::Euler => "Euler",
            SdSampler::EulerA => "Euler a",
            SdSampler::DpmPp2m => "DPM++ 2M",
            SdSampler::DpmPp2mKarras => "DPM++ 2M Karras",
            SdSampler::Lcm => "LCM",
        }
    }

    /// The sampler of a UI name (any case; `_` or `-` for spaces: "euler_a", "dpm++-2m-karras").
    pub fn from_name(name: &str) -> Result<Self> {
        let norm = |s: &str| s.trim().to_lowercase().replace(['_', '-'], " ");
        Self::ALL.into_iter().find(|s| norm(s.name()) == norm(name)).ok_or_else(|| {
            let names: Vec<String> = Self::ALL.iter().map(|s| format!("\"{}\"", s.name())).collect();
            anyhow::anyhow!("unknown sampler \"{name}\": use one of {}", names.join(", "))
        })
    }

    /// Lesson 07's sampler that runs it (None for LCM, [`crate::sampling::lcm`]'s own loop).
    pub fn sampler(self) -> Option<Sampler> {
        match self {
            SdSampler::Ddim => Some(Sampler::Ddim),
            SdSampler::Euler => Some(Sampler::Euler),
            SdSampler::EulerA => Some(Sampler::EulerAncestral),
            SdSampler::DpmPp2m | SdSampler::DpmPp2mKarras => Some(Sampler::DpmSolverPp2m),
            SdSampler::Lcm => None,
        }
    }

    // ANCHOR: sd_grids
    /// The σ grid of `steps` steps on `sched` (descending, `steps` + 1 levels).
    pub fn sigmas(self, sched: &NoiseSchedule, steps: usize) -> Vec<f64> {
        let table = sigmas_of_schedule(sched); // σ_t, t = 0..T−1
        let t_max = (table.len() - 1) as f64;
        match self {
            SdSampler::Ddim => {
                let mut s: Vec<f64> = spaced_timesteps(table.len(), steps, TimestepSpacing::Leading)
                    .into_iter()
                    .map(|t| table[(t + DDIM_STEPS_OFFSET).min(table.len() - 1)])
                    .collect();
                // the last step goes to ᾱ₀ (diffusers `set_alpha_to_one=False`, CompVis' alphas_prev[0]), not to σ = 0
                s.push(table[0]);
                s
            }
            SdSampler::Euler | SdSampler::EulerA | SdSampler::DpmPp2m => {
                // k-diffusion `get_sigmas`: t = linspace(T − 1, 0, S), σ(t) by log-linear interpolation, then 0
                let mut s: Vec<f64> = (0..steps)
                    .map(|i| if steps == 1 { t_max } else { t_max * (1.0 - i as f64 / (steps - 1) as f64) })
                    .map(|t| sigma_of_timestep(&table, t))
                    .collect();
                s.push(0.0);
                s
            }
            // [EDM] eq. 5 between the model's own σ_min and σ_max
            SdSampler::DpmPp2mKarras => karras_sigmas(steps, table[0], table[table.len() - 1], KARRAS_RHO),
            // [LCM] sec. 4.2: the skipping-step grid, then σ = 0 (the last step returns ẑ₀)
            SdSampler::Lcm => {
                let mut s: Vec<f64> = lcm_timesteps(table.len(), steps).into_iter().map(|t| table[t]).collect();
                s.push(0.0);
                s
            }
        }
    }
    // ANCHOR_END: sd_grids
}

/// Most images one command draws (they are written one by one as they finish).
pub const MAX_BATCH: usize = 64;

/// What to draw; the fields Stable Diffusion UIs show.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub prompt: String,
    /// The ∅ branch of guidance ("" is SD's unconditional prompt).
    pub negative_prompt: String,
    pub steps: usize,
    /// Guidance scale w: ε̃ = ε_∅ + w (ε_c − ε_∅); w ≤ 1 is the prompt's branch alone (one UNet call per step), as in
    /// diffusers.
    pub cfg_scale: f64,
    /// Image i uses seed + i.
    pub seed: u64,
    pub width: i64,
    pub height: i64,
    pub sampler: SdSampler,
    pub batch: usize,
}

impl GenerateParams {
    /// SD 1.5's usual settings: 512², 20 steps of Euler a, w = 7.
    pub fn new(prompt: &str) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps: 20,
            cfg_scale: 7.0,
            seed: 0,
            width: 512,
            height: 512,
            sampler: SdSampler::EulerA,
            batch: 1,
        }
    }

    /// Rejects what cannot run, each with its fix.
    pub fn check(&self) -> Result<()> {
        for (what, v) in [("width", self.width), ("height", self.height)] {
            ensure!(
                v % 8 == 0 && (MIN_SIZE..=MAX_SIZE).contains(&v),
                "--{what} {v} must be a multiple of 8 between {MIN_SIZE} and {MAX_SIZE} (the VAE works on 8×8 cells): \
                 try {}",
                (v.clamp(MIN_SIZE, MAX_SIZE) / 8) * 8
            );
        }
        ensure!(
            (1..=NUM_TRAIN_TIMESTEPS).contains(&self.steps),
            "--steps {} must lie in 1..={NUM_TRAIN_TIMESTEPS}: 20 is SD's usual number",
            self.steps
        );
        ensure!(
            self.sampler != SdSampler::Lcm || self.steps <= crate::sampling::lcm::ORIGINAL_INFERENCE_STEPS,
            "--steps {} with LCM: its grid has {} steps (2–8 is what it is for)",
            self.steps,
            crate::sampling::lcm::ORIGINAL_INFERENCE_STEPS
        );
        ensure!(self.cfg_scale.is_finite(), "--cfg-scale must be a number (SD's usual is 7), got {}", self.cfg_scale);
        ensure!(
            (1..=MAX_BATCH).contains(&self.batch),
            "--batch {} must lie in 1..={MAX_BATCH} (each image is written as it finishes; for more, run again with \
             another --seed)",
            self.batch
        );
        ensure!(
            self.cfg_scale.abs() <= crate::sampling::guidance::MAX_SCALE,
            "--cfg-scale {} is beyond ±{}: SD's usual is 7, and far larger scales only saturate the image",
            self.cfg_scale,
            crate::sampling::guidance::MAX_SCALE
        );
        Ok(())
    }

    /// The `parameters` text AUTOMATIC1111's web UI writes into its PNGs (and reads back with "PNG Info"):
    /// the prompt, a "Negative prompt:" line when there is one, then the settings of image `index` of the batch.
    pub fn infotext(&self, index: usize, model: &str, strength: Option<f64>) -> String {
        let mut s = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            s += &format!("\nNegative prompt: {}", self.negative_prompt);
        }
        s += &format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {model}",
            self.steps,
            self.sampler.name(),
            self.cfg_scale,
            self.seed + index as u64,
            self.width,
            self.height
        );
        if let Some(strength) = strength {
            s += &format!(", Denoising strength: {strength}");
        }
        s
    }
}

/// What every drawing command of lesson 09 takes (`tour`, `generate`, `img2img`): the lesson's common flags and the
/// settings under the web UIs' names, which [`DrawArgs::params`] turns into [`GenerateParams`].
#[derive(clap::Args, Debug)]
pub struct DrawArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// SD 1.x weights: a diffusers folder (unet/, vae/, text_encoder/) or an original .safetensors single file.
    /// Without it, the tiny random model of the tour.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Sampler steps [default: 20, or 4 with --quick].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale w (1 or less: no guidance, one UNet call per step; LCM wants 1–2).
    #[arg(long, default_value_t = 7.0)]
    pub cfg_scale: f64,
    /// Image size, multiples of 8 [default: 512 with --weights, 64 for the tiny model].
    #[arg(long)]
    pub width: Option<i64>,
    #[arg(long)]
    pub height: Option<i64>,
    /// DDIM, Euler, "Euler a", "DPM++ 2M", "DPM++ 2M Karras" or LCM (with an LCM-LoRA: 4 steps, --cfg-scale 1).
    #[arg(long, default_value = "Euler a")]
    pub sampler: String,
    /// Images; image i uses --seed + i.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Weights' dtype on the CPU: auto (bf16 where the CPU has bf16 units: AVX-512 BF16 or AMX; else f32), f32, or
    /// bf16 (half the memory; slower than f32 without those units).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    #[command(flatten)]
    pub extras: ExtrasArgs,
}

/// `lesson09 img2img`: [`DrawArgs`] and the image to start from.
#[derive(clap::Args, Debug)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    pub draw: DrawArgs,
    /// The PNG to start from (its width and height must be multiples of 8).
    #[arg(long)]
    pub image: PathBuf,
    /// How much of the sampler's grid runs: 0 returns the image (through the VAE), 1 starts from pure noise.
    #[arg(long, default_value_t = 0.75)]
    pub strength: f64,
    /// How the image is encoded: a sample of the VAE's posterior (diffusers' and the web UIs' default) or its mean.
    #[arg(long, value_enum, default_value = "sample")]
    pub posterior: Posterior,
}

impl Img2ImgArgs {
    pub fn edit(&self) -> Edit {
        Edit::Img2img { image: self.image.clone(), strength: self.strength, posterior: self.posterior }
    }
}

/// `lesson09 inpaint`: [`DrawArgs`], the image and its mask.
#[derive(clap::Args, Debug)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub draw: DrawArgs,
    /// The PNG to repaint (its width and height must be multiples of 8).
    #[arg(long)]
    pub image: PathBuf,
    /// A PNG of the same size: white where the picture is redrawn, black where it is kept.
    #[arg(long)]
    pub mask: PathBuf,
}

impl InpaintArgs {
    pub fn edit(&self) -> Edit {
        Edit::Inpaint { image: self.image.clone(), mask: self.mask.clone() }
    }
}

/// What a drawing command starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    Txt2img,
    Img2img { image: PathBuf, strength: f64, posterior: Posterior },
    Inpaint { image: PathBuf, mask: PathBuf },
}

impl Edit {
    /// The lesson09 subcommand's name.
    pub fn command(&self) -> &'static str {
        match self {
            Edit::Txt2img => "generate",
            Edit::Img2img { .. } => "img2img",
            Edit::Inpaint { .. } => "inpaint",
        }
    }

    /// img2img's strength (written into the PNGs' parameters).
    pub fn strength(&self) -> Option<f64> {
        match self {
            Edit::Img2img { strength, .. } => Some(*strength),
            _ => None,
        }
    }
}

/// What users add to SD 1.5 (`lesson09 generate`, `img2img`): LoRAs, textual-inversion embeddings, ControlNets.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ExtrasArgs {
    /// A LoRA file merged into the weights, FILE or FILE:W (W multiplies its update; repeat for several).
    #[arg(long = "lora", value_name = "FILE[:W]")]
    pub loras: Vec<String>,
    /// Where the prompt's `<lora:NAME:W>` (or `<lora:NAME:TE:UNET>`) finds NAME.safetensors.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Textual-inversion embeddings (.safetensors) the prompts may use by name (the file's, or diffusers' token).
    #[arg(long, value_name = "DIR")]
    pub embedding_dir: Option<PathBuf>,
    /// A ControlNet for SD 1.5: a diffusers folder or an original .safetensors file (repeat for several: they sum).
    #[arg(long = "controlnet", value_name = "PATH")]
    pub controlnets: Vec<PathBuf>,
    /// The control image of each --controlnet, in the same order (a PNG; resized to the picture if need be).
    #[arg(long = "control-image", value_name = "PNG")]
    pub control_images: Vec<PathBuf>,
    /// What makes the hint from each control image: none (it is the hint: edges, a pose, a depth map) or canny.
    #[arg(long = "control", value_enum, default_values_t = [Preprocessor::None])]
    pub preprocessors: Vec<Preprocessor>,
    /// Control weight of each ControlNet (one value: all of them).
    #[arg(long = "control-scale", default_values_t = [1.0])]
    pub control_scales: Vec<f64>,
    /// Guess mode ("my prompt is more important" in the web UI): the ControlNets steer the prompt's branch only.
    #[arg(long)]
    pub guess_mode: bool,
    /// Fraction of the steps after which the ControlNets start acting.
    #[arg(long, default_value_t = 0.0)]
    pub control_start: f64,
    /// Fraction of the steps after which they stop.
    #[arg(long, default_value_t = 1.0)]
    pub control_end: f64,
    /// Decode with TAESD (the madebyollin/taesd folder, or its safetensors file) instead of the VAE: a fraction of the
    /// time, softer detail.
    #[arg(long, value_name = "PATH")]
    pub taesd: Option<PathBuf>,
    /// With --taesd: write each step's x̂₀, decoded by TAESD, to preview.png (the web UIs' live preview).
    #[arg(long, requires = "taesd")]
    pub preview: bool,
}

/// A control image's preprocessor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preprocessor {
    None,
    Canny,
}

impl ExtrasArgs {
    /// Loads the embeddings, merges the LoRAs (the flags' and the prompts'), and adds the ControlNets with their hints
    /// (each preprocessed hint is written as `control_K.png` into the run's folder). Returns what it did, to print.
    pub fn attach(&self, sd: &mut StableDiffusion, prompt: &str, run: &Run) -> Result<Vec<String>> {
        let mut said = Vec::new();
        if let Some(dir) = &self.embedding_dir {
            sd.embeddings = Embeddings::load_dir(dir, sd.models.config.text.hidden_size)?;
            let names: Vec<&str> = sd.embeddings.list.iter().map(|e| e.name.as_str()).collect();
            said.push(format!("embeddings from {}: {}", dir.display(), names.join(", ")));
        }
        let flags = self.loras.iter().map(|f| parse_lora_flag(f)).collect::<Result<Vec<_>>>()?;
        sd.add_loras(&flags, prompt, self.lora_dir.as_deref())?;
        for lora in &sd.loras {
            let (te, unet) = (lora.count(Component::TextEncoder), lora.count(Component::Unet));
            said.push(format!(
                "LoRA {} ({:?} layout): {te} text-encoder and {unet} UNet modules merged",
                lora.name, lora.format
            ));
        }
        if let Some(path) = &self.taesd {
            sd.taesd = Some(load_taesd(path, sd.device()).with_context(|| format!("--taesd {}", path.display()))?);
            sd.models.release_vae_decoder(); // 49 M parameters TAESD replaces
            said.push(format!("TAESD from {} decodes the images (the VAE's decoder is freed)", path.display()));
        }
        let n = self.controlnets.len();
        ensure!(
            self.control_images.len() == n,
            "{n} --controlnet and {} --control-image: give each ControlNet its control image, in the same order",
            self.control_images.len()
        );
        let per = |len: usize, flag: &str| {
            ensure!(len == 1 || len == n, "--{flag} takes one value or one per --controlnet ({n}), got {len}");
            Ok(())
        };
        per(self.preprocessors.len(), "control")?;
        per(self.control_scales.len(), "control-scale")?;
        ensure!(
            self.control_start <= self.control_end,
            "--control-start {} is after --control-end {}: the ControlNets would never act",
            self.control_start,
            self.control_end
        );
        for (k, (net, image)) in self.controlnets.iter().zip(&self.control_images).enumerate() {
            let pick = |v: usize| if v == 1 { 0 } else { k };
            let preprocessor = self.preprocessors[pick(self.preprocessors.len())];
            let image = read_png_rgb(image).with_context(|| format!("--control-image {}", image.display()))?;
            let hint = match preprocessor {
                Preprocessor::None => image,
                Preprocessor::Canny => crate::data::hints::canny_rgb_hint(&image)?,
            };
            let module = format!("{preprocessor:?}").to_lowercase();
            write_png_rgb_with_text(&run.path(&format!("control_{k}.png")), &hint.get(0), "preprocessor", &module)?;
            let scale = ControlScale {
                conditioning_scale: self.control_scales[pick(self.control_scales.len())],
                guess_mode: self.guess_mode,
            };
            sd.add_control(net, hint, &module, scale, (self.control_start, self.control_end))
                .with_context(|| format!("--controlnet {}", net.display()))?;
            said.push(format!(
                "ControlNet {k}: {} reading {module} hint {}",
                net.display(),
                run.path(&format!("control_{k}.png")).display()
            ));
        }
        Ok(said)
    }
}

impl DrawArgs {
    /// The settings of these flags for a run with `seed` (`quick`: 4 steps unless --steps says otherwise; the size
    /// defaults to SD 1.5's 512² with --weights, to 64² for the tiny model); what cannot run is an error with its fix.
    pub fn params(&self, quick: bool, seed: u64) -> Result<GenerateParams> {
        let full = self.weights.is_some();
        let p = GenerateParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps.unwrap_or(if quick { 4 } else { 20 }),
            cfg_scale: self.cfg_scale,
            seed,
            width: self.width.unwrap_or(if full { 512 } else { 64 }),
            height: self.height.unwrap_or(if full { 512 } else { 64 }),
            sampler: SdSampler::from_name(&self.sampler).context("--sampler")?,
            batch: self.batch,
        };
        p.check()?;
        Ok(p)
    }
}

/// SD's UNet as the conditional ε-model of lesson 06's guidance: latents and context cast to the weights' dtype at
/// the door, ε̂ back to the latents' (f32) dtype; the inpainting model's mask and masked-image latents (1, 1 + C, h, w)
/// appended to its input, as diffusers appends them after `scale_model_input`.
struct SdUNet<'a>(&'a SdModels, Kind, Option<Tensor>);

impl<'a> SdUNet<'a> {
    fn new(models: &'a SdModels, kind: Kind) -> Self {
        Self(models, kind, None)
    }

    fn with_extra_channels(self, extra: Tensor) -> Self {
        Self(self.0, self.1, Some(extra))
    }
}

impl CondEpsModel for SdUNet<'_> {
    fn eps_cond(&self, x_t: &Tensor, t: &Tensor, cond: &Cond, _train: bool) -> Tensor {
        let x_t = match &self.2 {
            Some(extra) => {
                let s = extra.size();
                Tensor::cat(&[x_t, &extra.expand([x_t.size()[0], s[1], s[2], s[3]], false)], 1)
                // (B, 2C + 1, h, w)
            }
            None => x_t.shallow_clone(),
        };
        let x = channels_last(&x_t.to_kind(self.1)); // (B, C_in, h, w) in NHWC memory, as the conv weights
        let eps = self.0.unet.forward_cond(&x, t, Some(&cond.context.to_kind(self.1)), cond.mask.as_ref(), false);
        eps.to_kind(x_t.kind())
    }
}

/// The pipeline: the three networks, the CLIP tokenizer and the training schedule, and what users add to them: LoRAs
/// merged into the weights, textual-inversion embeddings the prompts may name, ControlNets.
pub struct StableDiffusion {
    pub models: SdModels,
    pub tokenizer: Bpe,
    pub schedule: NoiseSchedule,
    /// Written into the PNGs' parameters ("Model: …").
    pub model_name: String,
    /// The LoRAs merged into the weights (for the PNGs' `Lora hashes`).
    pub loras: Vec<LoraFile>,
    pub embeddings: Embeddings,
    /// Summed, as diffusers' `MultiControlNetModel` (none: plain guidance).
    pub controls: Vec<SdControl>,
    /// TAESD, when it decodes the images in place of the VAE ([`crate::nn::taesd`]).
    pub taesd: Option<(VarStore, Taesd)>,
    /// The weights LoRAs changed, when [`Self::keep_lora_backup`] asked for them.
    lora_backup: Option<WeightBackup>,
    /// Prompts encoded ahead ([`Self::encode_ahead_and_release`]): their states, and whether they were cut.
    encoded: std::collections::HashMap<String, (Tensor, bool)>,
}

/// A ControlNet with its hint and settings (diffusers' `StableDiffusionControlNetPipeline` arguments).
pub struct SdControl {
    pub vs: VarStore,
    pub net: ControlNet,
    /// (1, 3, H, W) in [0, 1], RGB, the image's size (`ControlNet` resizes it if it is not).
    pub hint: Tensor,
    pub scale: ControlScale,
    /// (start, end): `control_guidance_start`, `control_guidance_end`.
    pub window: (f64, f64),
    /// For the PNG's parameters: the file's name and the preprocessor ("none", "canny").
    pub name: String,
    pub module: String,
}

/// How img2img encodes its input image: diffusers' and the web UIs' default samples the VAE's posterior (with the
/// image's generator, before its noise is drawn); `Mean` takes μ (diffusers' `sample_mode="argmax"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Posterior {
    Sample,
    Mean,
}

/// Images and what the run noticed.
pub struct Generated {
    /// (B, 3, H, W) in [0, 1] on the CPU.
    pub images: Tensor,
    /// E.g. a prompt cut at 77 tokens.
    pub warnings: Vec<String>,
    /// The settings the images were drawn with (img2img takes its size from the input image).
    pub params: GenerateParams,
}

/// Sees image i of a batch as soon as it is decoded, (1, 3, H, W) in [0, 1], with the settings it was drawn with:
/// write it, so an interrupted batch keeps the images already made.
pub type OnImage<'a> = dyn FnMut(usize, &GenerateParams, &Tensor) -> Result<()> + 'a;

/// `data/clip/…` under the working directory if it is there, else under the crate root.
pub fn clip_vocab_path() -> PathBuf {
    crate::cli::shipped_path(CLIP_VOCAB, "")
}

impl StableDiffusion {
    pub fn new(models: SdModels, model_name: &str) -> Result<Self> {
        let tokenizer = Bpe::load_clip_vocab_gz(clip_vocab_path())?;
        ensure!(
            tokenizer.vocab_size() as i64 == models.config.text.vocab_size
                && models.config.text.max_position_embeddings == CLIP_CONTEXT_LEN as i64,
            "the text encoder reads {} tokens of a {}-token vocabulary; SD 1.x's CLIP reads {CLIP_CONTEXT_LEN} of {}",
            models.config.text.max_position_embeddings,
            models.config.text.vocab_size,
            tokenizer.vocab_size()
        );
        let schedule = NoiseSchedule::scaled_linear(NUM_TRAIN_TIMESTEPS);
        Ok(Self {
            models,
            tokenizer,
            schedule,
            model_name: model_name.into(),
            loras: Vec::new(),
            embeddings: Embeddings::default(),
            controls: Vec::new(),
            taesd: None,
            lora_backup: None,
            encoded: Default::default(),
        })
    }

    /// Loads weights from a diffusers folder or a single file and names the model after it.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        Self::load_in(path, device, Kind::Float)
    }

    /// [`Self::load`] into weights of `kind`.
    pub fn load_in(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let models = SdModels::load_in(path, device, kind)?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string();
        Self::new(models, &name)
    }

    pub fn device(&self) -> Device {
        self.models.unet_vs.device()
    }

    /// Casts every weight (the three networks', the ControlNets' and TAESD's) to `kind`.
    pub fn set_kind(&mut self, kind: Kind) {
        self.models.set_kind(kind);
        for c in &mut self.controls {
            c.vs.set_kind(kind);
        }
        if let Some((vs, _)) = &mut self.taesd {
            vs.set_kind(kind);
        }
    }

    // ANCHOR: encode_prompt
    /// τ(y): the CLIP text encoder's last hidden state (1, 77, D) of `prompt`, tokenised as SD 1.x does (start
    /// token, at most 75 tokens, end token, padded with the end token); the flag says whether the prompt was cut.
    /// `<lora:…>` tags are removed first (their LoRAs are merged by [`Self::add_loras`]); the names of
    /// [`Self::embeddings`] read their vectors.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, bool)> {
        if let Some((states, cut)) = self.encoded.get(prompt) {
            return Ok((states.shallow_clone(), *cut));
        }
        ensure!(
            !self.models.released.text_encoder,
            "the text encoder was released to save memory: load the model again"
        );
        let text = strip_lora_tags(prompt);
        let vocab = self.models.config.text.vocab_size;
        let tokens = self.embeddings.tokenize(&self.tokenizer, &text, vocab, CLIP_CONTEXT_LEN)?;
        let ids = Tensor::from_slice(&tokens.encoded.ids).view([1, CLIP_CONTEXT_LEN as i64]).to_device(self.device());
        let extra = tokens.extra.map(|e| e.to_device(self.device()));
        // SD 1.x attends to all 77 states, the padding's too: no mask
        let encoder = &self.models.text_encoder;
        let hidden = tch::no_grad(|| encoder.forward_with_extra_tokens(&ids, None, extra.as_ref())); // (1, 77, D)
        Ok((hidden.to_kind(Kind::Float), tokens.encoded.truncated))
    }
    // ANCHOR_END: encode_prompt

    /// Encodes `prompts` now and frees the text encoder (123 M parameters, 0.5 GB in f32) for the rest of the run:
    /// a command that draws one prompt needs it only once. Other prompts are refused afterwards.
    pub fn encode_ahead_and_release(&mut self, prompts: &[&str]) -> Result<()> {
        for prompt in prompts {
            let encoded = self.encode_prompt(prompt)?;
            self.encoded.insert(prompt.to_string(), encoded);
        }
        self.models.release_text_encoder();
        Ok(())
    }

    /// Merges LoRAs into the weights: `flags` (`--lora FILE:W`) and those the prompt names (`<lora:NAME:W>`, found in
    /// `dir`; as in the web UI, tags in the negative prompt are only removed); every file is checked against the model
    /// before any weight changes, and a file given twice is refused (it would be merged twice).
    pub fn add_loras(&mut self, flags: &[LoraUse], prompt: &str, dir: Option<&Path>) -> Result<()> {
        let mut uses = flags.to_vec();
        uses.extend(parse_prompt_loras(prompt, dir)?.1);
        let key = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        for (i, u) in uses.iter().enumerate() {
            if uses[..i].iter().any(|v| key(&v.path) == key(&u.path)) {
                bail!(
                    "the LoRA {} is given twice (--lora or <lora:…>): give it once, with one multiplier",
                    u.path.display()
                );
            }
        }
        let backup = self.lora_backup.as_mut();
        self.loras.extend(merge_loras(&LoraModels::sd(&self.models), &uses, backup)?);
        Ok(())
    }

    /// Keeps a copy of every weight a LoRA changes from now on, so that [`Self::remove_loras`] can take them out (the
    /// web UI's way of switching LoRAs without reloading: a copy of the changed weights, up to a quarter of the UNet).
    pub fn keep_lora_backup(&mut self) {
        self.lora_backup.get_or_insert_with(WeightBackup::default);
    }

    /// Puts back the weights the LoRAs merged since [`Self::keep_lora_backup`] changed, bit for bit.
    pub fn remove_loras(&mut self) -> Result<()> {
        let backup =
            self.lora_backup.as_mut().context("no LoRA backup was kept: call keep_lora_backup before add_loras")?;
        backup.restore(&self.models);
        self.loras.clear();
        Ok(())
    }

    /// N(0, I) draws of `shape` from the global generator, in NCHW order as torch's generator fills them (a
    /// channels-last `randn_like` would permute them), on the pipeline's device.
    fn randn(&self, shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(self.device())
    }

    /// Latents (1, 4, H/8, W/8) ~ N(0, I) from `seed` alone (libtorch's CPU generator, as torch's): the VP x_T.
    pub fn initial_noise(&self, seed: u64, width: i64, height: i64) -> Tensor {
        let f = self.models.config.vae.downsample_factor();
        tch::manual_seed(seed as i64);
        let c = self.models.config.vae.latent_channels;
        self.randn(&[1, c, height / f, width / f])
    }

    /// Scaled latents -> pixels (B, 3, H, W) in [0, 1] on the CPU: x = D(z / s), mapped from [−1, 1]; with
    /// [`Self::taesd`], TAESD's decoder of the scaled latents themselves.
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let kind = self.models.kind();
        if let Some((_, taesd)) = &self.taesd {
            // TAESD decodes the scaled latents themselves ([TAESD])
            let x = tch::no_grad(|| taesd.decode(&channels_last(&latents.to_kind(kind)))).to_kind(Kind::Float);
            return x.clamp(0.0, 1.0).to_device(Device::Cpu);
        }
        assert!(!self.models.released.vae_decoder, "the VAE's decoder was released: TAESD decodes");
        let vae = &self.models.vae;
        // [LDM] sec. 4.3.2: the UNet's latents are s · z, s = scaling_factor
        let z = channels_last(&(latents / vae.config.scaling_factor).to_kind(kind));
        let x = tch::no_grad(|| vae.decode(&z)).to_kind(Kind::Float);
        ((x + 1.0) / 2.0).clamp(0.0, 1.0).to_device(Device::Cpu)
    }

    /// Pixels (B, 3, H, W) in [0, 1] -> scaled latents s · μ (the posterior mean).
    pub fn encode(&self, images: &Tensor) -> Tensor {
        let x = channels_last(&(images.to_device(self.device()) * 2.0 - 1.0).to_kind(self.models.kind()));
        let mean = tch::no_grad(|| self.models.vae.encode(&x).mean).to_kind(Kind::Float);
        mean * self.models.vae.config.scaling_factor
    }

    fn contexts(&self, p: &GenerateParams, warnings: &mut Vec<String>) -> Result<(Tensor, Tensor)> {
        let (cond, cut) = self.encode_prompt(&p.prompt)?;
        let (uncond, cut_negative) = self.encode_prompt(&p.negative_prompt)?;
        for (what, cut) in [("prompt", cut), ("negative prompt", cut_negative)] {
            if cut {
                warnings.push(format!("the {what} is longer than CLIP's 75 tokens: the rest was cut off"));
            }
        }
        Ok((cond, uncond))
    }

    /// txt2img and img2img feed the UNet the latents alone: the inpainting model (2C + 1 input channels) is for
    /// [`Self::inpaint`] only.
    pub fn check_unet_input(&self) -> Result<()> {
        let (c_in, c) = (self.models.config.unet.in_channels, self.models.config.vae.latent_channels);
        ensure!(
            c_in == c,
            "this is SD's inpainting model (its UNet reads {c_in} channels): use `lesson09 inpaint --image IN.png \
             --mask MASK.png`, or an SD 1.5 model for generate and img2img"
        );
        Ok(())
    }

    /// ε̂ of both branches of guidance, (ε_∅, ε_c), (1, 4, h, w) each, for the σ-space latents `x` (1, 4, h, w) at
    /// level `sigma`, called as a sampler step calls the UNet: with x_vp, at σ's fractional timestep, ∅ (`uncond`)
    /// and the prompt (`cond`) in one batch of 2.
    pub fn eps_branches(&self, x: &Tensor, sigma: f64, cond: &Tensor, uncond: &Tensor) -> (Tensor, Tensor) {
        // [EDM] Table 1, VP: c_in(σ) = 1/√(σ² + 1), so x · c_in = x_vp
        let c_in = 1.0 / (1.0 + sigma * sigma).sqrt();
        let t = timestep_of_sigma(&sigmas_of_schedule(&self.schedule), sigma);
        let x2 = Tensor::cat(&[x, x], 0) * c_in; // (2, 4, h, w)
        let both = Cond::new(Tensor::cat(&[uncond, cond], 0)); // (2, 77, D)
        let unet = SdUNet::new(&self.models, self.models.kind());
        let eps = tch::no_grad(|| unet.eps_cond(&x2, &Tensor::from_slice(&[t; 2]), &both, false)).chunk(2, 0);
        (eps[0].shallow_clone(), eps[1].shallow_clone()) // (1, 4, h, w) each
    }

    // ANCHOR: denoise_loop
    /// Runs `p.sampler` with guidance from `x` (1, 4, h, w), already at the first level of `sigmas`, and returns
    /// the VP latents at the last level (= x̂₀ when it is 0).
    fn denoise(
        &self,
        p: &GenerateParams,
        cond: &Tensor,
        uncond: &Tensor,
        x: Tensor,
        sigmas: &[f64],
        cb: &mut dyn FnMut(SamplerStep),
    ) -> Tensor {
        let unet = SdUNet::new(&self.models, self.models.kind());
        // [CFG] ε̃ = ε_∅ + w (ε_c − ε_∅), one batch of 2 per step (∅ = the negative prompt); as in diffusers, w ≤ 1 is
        // the prompt's branch alone
        let w = p.cfg_scale.max(1.0);
        let guided = ClassifierFreeGuidance::new(&unet, cond.shallow_clone(), uncond.shallow_clone(), w);
        let controlled = (!self.controls.is_empty()).then(|| self.controlled(p, cond, uncond, sigmas));
        let model: &dyn EpsModel = match &controlled {
            Some(c) => c,
            None => &guided,
        };
        self.sample(p, model, x, sigmas, cb)
    }

    /// Runs `p.sampler` on the ε-model `model` from `x` at `sigmas[0]`; the VP latents at the last level.
    fn sample(
        &self,
        p: &GenerateParams,
        model: &dyn EpsModel,
        x: Tensor,
        sigmas: &[f64],
        cb: &mut dyn FnMut(SamplerStep),
    ) -> Tensor {
        let denoiser = EpsDenoiser::new(model, &self.schedule).with_interpolated_timesteps();
        let x = tch::no_grad(|| match p.sampler.sampler() {
            Some(sampler) => sampler.run(&denoiser, x, sigmas, cb),
            None => {
                let table = sigmas_of_schedule(&self.schedule);
                let ts: Vec<f64> = sigmas[..sigmas.len() - 1].iter().map(|&s| timestep_of_sigma(&table, s)).collect();
                lcm_sample(&denoiser, x, sigmas, &ts, cb)
            }
        });
        // σ-space -> VP latents: x_vp = x / √(1 + σ²) (DDIM ends at σ_0 = √((1 − ᾱ₀)/ᾱ₀), the others at 0)
        let last = sigmas[sigmas.len() - 1];
        x / (1.0 + last * last).sqrt()
    }

    /// Guidance with [`Self::controls`] over the σ grid `sigmas` (its steps' fractional timesteps decide each
    /// ControlNet's window, as diffusers' `controlnet_keep` does over the scheduler's timesteps).
    fn controlled(&self, p: &GenerateParams, cond: &Tensor, uncond: &Tensor, sigmas: &[f64]) -> ControlledGuidance<'_> {
        let table = sigmas_of_schedule(&self.schedule);
        let steps = sigmas.len() - 1;
        let mut timesteps: Vec<f64> = sigmas[..steps].iter().map(|&s| timestep_of_sigma(&table, s)).collect();
        timesteps.reverse(); // ascending
        let kind = self.models.kind();
        ControlledGuidance {
            unet: &self.models.unet,
            controls: self
                .controls
                .iter()
                .map(|c| Control { net: &c.net, hint: self.fitted_hint(c, p), scale: c.scale, window: c.window })
                .collect(),
            cond: Cond::new(cond.shallow_clone()),
            uncond: Cond::new(uncond.shallow_clone()),
            guidance: p.cfg_scale.max(1.0), // w ≤ 1: the prompt alone, as diffusers
            timesteps,
            kind: Some(kind),
        }
    }

    /// Adds a ControlNet (a diffusers folder or an original single file) reading `hint` (1, 3, H, W) in [0, 1];
    /// `module` names the preprocessor that made the hint, for the PNG's parameters.
    pub fn add_control(
        &mut self,
        path: &Path,
        hint: Tensor,
        module: &str,
        scale: ControlScale,
        window: (f64, f64),
    ) -> Result<()> {
        ensure!(
            scale.conditioning_scale.is_finite() && (0.0..=1.0).contains(&window.0) && (0.0..=1.0).contains(&window.1),
            "--control-scale must be a number and --control-start/--control-end lie in [0, 1]"
        );
        let size = hint.size();
        ensure!(size.len() == 4 && size[..2] == [1, 3], "the control image is {size:?}: one RGB image (1, 3, H, W)");
        let (vs, net) = load_controlnet(path, &self.models.config.unet, self.device())?;
        let mut vs = vs;
        vs.set_kind(self.models.kind());
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("controlnet").to_string();
        self.controls.push(SdControl { vs, net, hint, scale, window, name, module: module.into() });
        Ok(())
    }

    /// A control's hint at the image's size: stretched (bilinear, antialiased) where it differs, with a warning
    /// ([`Self::control_warnings`]); the web UI's default crops it to the picture's aspect ratio first.
    fn fitted_hint(&self, c: &SdControl, p: &GenerateParams) -> Tensor {
        let size = c.hint.size();
        let hint = c.hint.to_device(self.device());
        if size[2] == p.height && size[3] == p.width {
            return hint;
        }
        hint.internal_upsample_bilinear2d_aa([p.height, p.width], false, None, None).clamp(0.0, 1.0)
    }

    fn control_warnings(&self, p: &GenerateParams, warnings: &mut Vec<String>) {
        for c in &self.controls {
            let size = c.hint.size();
            if size[2] != p.height || size[3] != p.width {
                let (w, h) = (p.width, p.height);
                warnings
                    .push(format!("the control image for {} is {}x{}: resized to {w}x{h}", c.name, size[3], size[2]));
            }
        }
    }

    /// txt2img: `p.batch` images; `cb(i, step)` sees every sampler step of image i.
    pub fn txt2img(
        &self,
        p: &GenerateParams,
        cb: &mut dyn FnMut(usize, SamplerStep),
        on_image: &mut OnImage,
    ) -> Result<Generated> {
        p.check()?;
        self.check_unet_input()?;
        let mut warnings = Vec::new();
        let (cond, uncond) = self.contexts(p, &mut warnings)?;
        self.control_warnings(p, &mut warnings);
        let sigmas = p.sampler.sigmas(&self.schedule, p.steps);
        let mut images = Vec::new();
        for i in 0..p.batch {
            let latents = self.txt2img_one(p, i, (&cond, &uncond), &sigmas, cb);
            images.push(self.finish(p, i, &latents, on_image)?);
        }
        Ok(Generated { images: Tensor::cat(&images, 0), warnings, params: p.clone() })
    }

    /// Decodes image i's latents, refuses a non-finite image, and hands it to `on_image`.
    fn finish(&self, p: &GenerateParams, i: usize, latents: &Tensor, on_image: &mut OnImage) -> Result<Tensor> {
        let image = self.decode(latents); // (1, 3, H, W)
        crate::cli::ensure_finite(
            &image,
            &format!("image {i}"),
            "the weights or the settings give non-finite values: check the weights file, or lower --cfg-scale",
        )?;
        on_image(i, p, &image)?;
        Ok(image)
    }

    /// The final latents (1, 4, H/8, W/8) of image i of a txt2img batch, from its own noise (seed + i).
    fn txt2img_one(
        &self,
        p: &GenerateParams,
        i: usize,
        (cond, uncond): (&Tensor, &Tensor),
        sigmas: &[f64],
        cb: &mut dyn FnMut(usize, SamplerStep),
    ) -> Tensor {
        let z_t = self.initial_noise(p.seed + i as u64, p.width, p.height); // VP x_T ~ N(0, I)
        let x = z_t * (1.0 + sigmas[0] * sigmas[0]).sqrt(); // σ-space: x = x_T √(1 + σ₀²) = x_T / √ᾱ
        self.denoise(p, cond, uncond, x, sigmas, &mut |s| cb(i, s))
    }

    /// txt2img up to the VAE: the final latents (B, 4, H/8, W/8) and the warnings.
    pub fn txt2img_latents(
        &self,
        p: &GenerateParams,
        cb: &mut dyn FnMut(usize, SamplerStep),
    ) -> Result<(Tensor, Vec<String>)> {
        p.check()?;
        self.check_unet_input()?;
        let mut warnings = Vec::new();
        let (cond, uncond) = self.contexts(p, &mut warnings)?;
        self.control_warnings(p, &mut warnings);
        let sigmas = p.sampler.sigmas(&self.schedule, p.steps);
        let latents: Vec<Tensor> =
            (0..p.batch).map(|i| self.txt2img_one(p, i, (&cond, &uncond), &sigmas, cb)).collect();
        Ok((Tensor::cat(&latents, 0), warnings))
    }
    // ANCHOR_END: denoise_loop

    /// Writes image i of `images` (B, 3, H, W) as the run's `image_NN_seedS.png` (NN = i, S = seed + i) with the
    /// web UIs' infotext of its settings in a `parameters` chunk (`strength`: img2img's); returns the paths.
    pub fn save_pngs(
        &self,
        run: &Run,
        p: &GenerateParams,
        images: &Tensor,
        strength: Option<f64>,
    ) -> Result<Vec<PathBuf>> {
        (0..images.size()[0] as usize).map(|i| self.save_png(run, p, i, &images.get(i as i64), strength)).collect()
    }

    /// A live preview of a sampler step: its x̂₀ (1, 4, h, w) decoded by TAESD into `path` (a PNG overwritten each
    /// step); an error without TAESD (the VAE would cost as much as the step).
    pub fn write_preview(&self, path: &Path, denoised: &Tensor) -> Result<()> {
        let (_, taesd) = self.taesd.as_ref().context("previews need --taesd")?;
        let kind = self.models.kind();
        let x = tch::no_grad(|| taesd.decode(&channels_last(&denoised.to_kind(kind)))).to_kind(Kind::Float);
        crate::data::png::write_png_rgb_with_text(
            path,
            &x.clamp(0.0, 1.0).to_device(Device::Cpu).get(0),
            "preview",
            "x̂₀",
        )
    }

    /// [`GenerateParams::infotext`] with what the web UI adds: each ControlNet's settings and the LoRAs' hashes.
    pub fn infotext(&self, p: &GenerateParams, i: usize, strength: Option<f64>) -> String {
        let mut text = p.infotext(i, &self.model_name, strength);
        for (k, c) in self.controls.iter().enumerate() {
            text += &format!(
                ", ControlNet {k}: \"Module: {}, Model: {}, Weight: {}, Guidance Start: {}, Guidance End: {}{}\"",
                c.module,
                c.name,
                c.scale.conditioning_scale,
                c.window.0,
                c.window.1,
                if c.scale.guess_mode { ", Control Mode: My prompt is more important" } else { "" }
            );
        }
        if let Some(hashes) = lora_hashes(&self.loras) {
            text += &format!(", {hashes}");
        }
        text
    }

    /// Writes `image` (3, H, W) or (1, 3, H, W), image i of a batch drawn with `p`, as [`Self::save_pngs`] does.
    pub fn save_png(
        &self,
        run: &Run,
        p: &GenerateParams,
        i: usize,
        image: &Tensor,
        strength: Option<f64>,
    ) -> Result<PathBuf> {
        let path = run.path(&format!("image_{:02}_seed{}.png", i, p.seed + i as u64));
        let infotext = self.infotext(p, i, strength);
        let image = if image.dim() == 4 { image.get(0) } else { image.shallow_clone() }; // (3, H, W)
        write_png_rgb_with_text(&path, &image, "parameters", &infotext)?;
        Ok(path)
    }

    /// Runs `edit` (reading its PNGs) with `p`: txt2img, img2img or inpainting.
    pub fn draw(
        &self,
        edit: &Edit,
        p: &GenerateParams,
        cb: &mut dyn FnMut(usize, SamplerStep),
        on_image: &mut OnImage,
    ) -> Result<Generated> {
        match edit {
            Edit::Txt2img => self.txt2img(p, cb, on_image),
            Edit::Img2img { image, strength, posterior } => {
                self.img2img(&read_png_rgb(image)?, *strength, *posterior, p, cb, on_image)
            }
            Edit::Inpaint { image, mask } => {
                self.inpaint(&read_png_rgb(image)?, &read_png_gray(mask)?, p, cb, on_image)
            }
        }
    }

    // ANCHOR: inpaint
    /// Inpainting with SD's inpainting model (a UNet reading 9 channels: the latents, the mask at latent size and the
    /// masked image's latents; diffusers' `StableDiffusionInpaintPipeline` at strength 1): `mask` (1, 1, H, W), white
    /// (≥ 0.5) where the picture is redrawn; the rest of `image` (1, 3, H, W) in [0, 1] is what the model sees.
    pub fn inpaint(
        &self,
        image: &Tensor,
        mask: &Tensor,
        p: &GenerateParams,
        cb: &mut dyn FnMut(usize, SamplerStep),
        on_image: &mut OnImage,
    ) -> Result<Generated> {
        let c = self.models.config.vae.latent_channels;
        ensure!(
            self.models.config.unet.in_channels == 2 * c + 1,
            "inpaint needs SD's inpainting model (a UNet of {} input channels; this one reads {}): download \
             stable-diffusion-v1-5/stable-diffusion-inpainting",
            2 * c + 1,
            self.models.config.unet.in_channels
        );
        ensure!(self.controls.is_empty(), "ControlNets are not supported with the inpainting model");
        let (size, msize) = (image.size(), mask.size());
        ensure!(size.len() == 4 && size[..2] == [1, 3], "the input image is {size:?}: one RGB image (1, 3, H, W)");
        ensure!(
            msize == [1, 1, size[2], size[3]],
            "the mask is {msize:?}: one grey image of the image's size, {:?}",
            &size[2..]
        );
        let p = GenerateParams { width: size[3], height: size[2], ..p.clone() };
        p.check().context("the input image's size")?;
        let mut warnings = Vec::new();
        let (cond, uncond) = self.contexts(&p, &mut warnings)?;
        let mask = mask.ge(0.5).to_kind(Kind::Float).to_device(self.device()); // diffusers binarises at 0.5
        let keep: Tensor = 1.0 - &mask;
        let masked = (image.to_device(self.device()) * 2.0 - 1.0) * keep; // [−1, 1], 0 under the mask
        let f = self.models.config.vae.downsample_factor();
        let small = mask.upsample_nearest2d([size[2] / f, size[3] / f], None, None); // (1, 1, h, w)
        let q = tch::no_grad(|| self.models.vae.encode(&channels_last(&masked.to_kind(self.models.kind()))));
        let sigmas = p.sampler.sigmas(&self.schedule, p.steps);
        let (mean, std) = (q.mean.to_kind(Kind::Float).contiguous(), q.std().to_kind(Kind::Float)); // (1, 4, h, w) each
        let mut images = Vec::new();
        for i in 0..p.batch {
            // image i's generator draws, in diffusers' order, the starting noise and then the posterior's ε
            let z_t = self.initial_noise(p.seed + i as u64, p.width, p.height);
            let masked_latents = (&mean + &std * self.randn(&mean.size())) * self.models.vae.config.scaling_factor;
            let extra = Tensor::cat(&[&small, &masked_latents], 1); // (1, 1 + C, h, w), appended to the UNet's input
            let unet = SdUNet::new(&self.models, self.models.kind()).with_extra_channels(extra);
            let w = p.cfg_scale.max(1.0); // w ≤ 1: the prompt alone, as diffusers
            let guided = ClassifierFreeGuidance::new(&unet, cond.shallow_clone(), uncond.shallow_clone(), w);
            let x = z_t * (1.0 + sigmas[0] * sigmas[0]).sqrt();
            let latents = self.sample(&p, &guided, x, &sigmas, &mut |s| cb(i, s));
            images.push(self.finish(&p, i, &latents, on_image)?);
        }
        Ok(Generated { images: Tensor::cat(&images, 0), warnings, params: p })
    }
    // ANCHOR_END: inpaint

    // ANCHOR: img2img
    /// [SDEdit] img2img from `image` (1, 3, H, W) in [0, 1] (H, W multiples of 8): encode (a sample of the VAE's
    /// posterior, or its mean), noise to the level that `strength` picks on the sampler's grid (the last
    /// ⌊steps · strength⌋ steps run, as diffusers), denoise.
    pub fn img2img(
        &self,
        image: &Tensor,
        strength: f64,
        posterior: Posterior,
        p: &GenerateParams,
        cb: &mut dyn FnMut(usize, SamplerStep),
        on_image: &mut OnImage,
    ) -> Result<Generated> {
        ensure!((0.0..=1.0).contains(&strength), "--strength must lie in [0, 1] (0 keeps the image), got {strength}");
        self.check_unet_input()?;
        let size = image.size();
        ensure!(size.len() == 4 && size[..2] == [1, 3], "the input image is {size:?}: one RGB image (1, 3, H, W)");
        let p = GenerateParams { width: size[3], height: size[2], ..p.clone() };
        p.check().context("the input image's size")?;
        let mut warnings = Vec::new();
        let (cond, uncond) = self.contexts(&p, &mut warnings)?;
        self.control_warnings(&p, &mut warnings);
        let x = channels_last(&(image.to_device(self.device()) * 2.0 - 1.0).to_kind(self.models.kind()));
        let q = tch::no_grad(|| self.models.vae.encode(&x)); // q(z | x) = N(μ, σ²)
        let s = self.models.vae.config.scaling_factor;
        let sigmas = p.sampler.sigmas(&self.schedule, p.steps);
        let tail = img2img_tail(&sigmas, strength); // σ from σ_start down to 0
        let (mean, std) = (q.mean.to_kind(Kind::Float).contiguous(), q.std().to_kind(Kind::Float)); // (1, 4, h, w) each
        let mut images = Vec::new();
        for i in 0..p.batch {
            // image i's generator draws, in diffusers' order, the posterior's ε and then the noise
            tch::manual_seed((p.seed + i as u64) as i64);
            let z0 = match posterior {
                // z₀ = s (μ + σ ε_q), ε_q ~ N(0, I) ([LDM] sec. 4.3.2's scaling; diffusers' `latent_dist.sample`)
                Posterior::Sample => (&mean + &std * self.randn(&mean.size())) * s,
                Posterior::Mean => &mean * s,
            };
            let latents = if tail.len() == 1 {
                z0
            } else {
                let noise = self.randn(&mean.size());
                let x = &z0 + noise * tail[0]; // q(z_σ | z₀) in σ-space: z₀ + σ ε
                self.denoise(&p, &cond, &uncond, x, tail, &mut |s| cb(i, s))
            };
            images.push(self.finish(&p, i, &latents, on_image)?);
        }
        Ok(Generated { images: Tensor::cat(&images, 0), warnings, params: p })
    }
    // ANCHOR_END: img2img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_match_the_reference_schedulers() {
        let sched = NoiseSchedule::scaled_linear(NUM_TRAIN_TIMESTEPS);
        let table = sigmas_of_schedule(&sched);
        // diffusers DDIMScheduler (SD 1.5 config), 4 steps: timesteps 751, 501, 251, 1, then ᾱ₀
        let ddim = SdSampler::Ddim.sigmas(&sched, 4);
        assert_eq!(ddim, [table[751], table[501], table[251], table[1], table[0]]);
        // k-diffusion get_sigmas: σ_max = σ_999 ≈ 14.6146, σ_min = σ_0 ≈ 0.0292 (SD 1.x's published range)
        let euler = SdSampler::EulerA.sigmas(&sched, 10);
        assert_eq!(euler.len(), 11);
        assert!((euler[0] - 14.6146).abs() < 1e-3 && (euler[9] - 0.0292).abs() < 1e-4 && euler[10] == 0.0, "{euler:?}");
        let karras = SdSampler::DpmPp2mKarras.sigmas(&sched, 10);
        assert!((karras[0] - euler[0]).abs() < 1e-12 && (karras[9] - euler[9]).abs() < 1e-12);
        assert!(karras.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn sampler_names_and_bad_settings_are_explained() {
        for s in SdSampler::ALL {
            assert_eq!(SdSampler::from_name(s.name()).unwrap(), s);
        }
        assert_eq!(SdSampler::from_name("euler_a").unwrap(), SdSampler::EulerA);
        assert_eq!(SdSampler::from_name("dpm++-2m-karras").unwrap(), SdSampler::DpmPp2mKarras);
        let e = SdSampler::from_name("PLMS").unwrap_err().to_string();
        assert!(e.contains("PLMS") && e.contains("\"Euler a\""), "{e}");
        let ok = GenerateParams::new("a cat");
        ok.check().unwrap();
        let e = GenerateParams { width: 500, ..ok.clone() }.check().unwrap_err().to_string();
        assert!(e.contains("--width 500") && e.contains("multiple of 8") && e.contains("try 496"), "{e}");
        let e = GenerateParams { steps: 0, ..ok.clone() }.check().unwrap_err().to_string();
        assert!(e.contains("--steps 0"), "{e}");
        assert!(GenerateParams { cfg_scale: f64::NAN, ..ok }.check().is_err());
    }

    #[test]
    fn draw_flags_default_to_the_models_size_and_the_runs_budget() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            draw: DrawArgs,
        }
        let parse = |args: &[&str]| <Cli as clap::Parser>::try_parse_from([&["lesson09"], args].concat()).unwrap().draw;
        let tiny = parse(&[]).params(true, 3).unwrap();
        assert_eq!((tiny.steps, tiny.width, tiny.height, tiny.seed), (4, 64, 64, 3));
        assert_eq!((tiny.sampler, tiny.cfg_scale, tiny.batch), (SdSampler::EulerA, 7.0, 1));
        let full = parse(&["--weights", "sd15/", "--height", "768"]).params(false, 0).unwrap();
        assert_eq!((full.steps, full.width, full.height), (20, 512, 768));
        let e = parse(&["--sampler", "PLMS"]).params(false, 0).unwrap_err();
        assert!(format!("{e:#}").starts_with("--sampler: "), "{e:#}");
    }

    /// The tour's one UNet evaluation, combined by [CFG], is the guided ε̂ every sampler step uses.
    #[test]
    fn eps_branches_guided_are_the_samplers_guided_eps() {
        tch::manual_seed(0);
        let sd = StableDiffusion::new(SdModels::new(crate::sd::SdConfig::tiny(), Device::Cpu).unwrap(), "t").unwrap();
        let (cond, _) = sd.encode_prompt("a cat").unwrap();
        let (uncond, _) = sd.encode_prompt("").unwrap();
        let (sigma, w): (f64, f64) = (3.0, 7.5);
        let x = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu)) * (1.0 + sigma * sigma).sqrt();
        let (eps_uncond, eps_cond) = sd.eps_branches(&x, sigma, &cond, &uncond);
        let ours = &eps_uncond + (&eps_cond - &eps_uncond) * w;
        let unet = SdUNet::new(&sd.models, sd.models.kind());
        let guided = ClassifierFreeGuidance::new(&unet, cond, uncond, w);
        let denoiser = EpsDenoiser::new(&guided, &sd.schedule).with_interpolated_timesteps();
        // x̂₀ = x − σ ε̃  ([EDM] Table 1, VP)
        let x0 = tch::no_grad(|| crate::model::denoise_at(&denoiser, &x, sigma));
        let theirs = (&x - x0) / sigma;
        let err = (ours - theirs).abs().max().double_value(&[]);
        assert!(err < 1e-4, "max |ε̃ − ε̃_sampler| = {err}");
    }

    #[test]
    fn infotext_is_automatic1111s_format() {
        let p = GenerateParams {
            negative_prompt: "blurry".into(),
            seed: 42,
            sampler: SdSampler::DpmPp2mKarras,
            ..GenerateParams::new("a photo of a cat")
        };
        assert_eq!(
            p.infotext(1, "v1-5-pruned-emaonly", None),
            "a photo of a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 43, \
             Size: 512x512, Model: v1-5-pruned-emaonly"
        );
        let p = GenerateParams { cfg_scale: 7.5, ..GenerateParams::new("x") };
        let text = p.infotext(0, "m", Some(0.75));
        assert!(
            !text.contains("Negative prompt")
                && text.ends_with("CFG scale: 7.5, Seed: 0, Size: 512x512, Model: m, Denoising strength: 0.75"),
            "{text}"
        );
    }
}
