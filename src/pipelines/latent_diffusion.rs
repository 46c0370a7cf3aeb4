//! Latent diffusion at MNIST scale: train the KL-autoencoder, measure its latent scale, train the text-conditioned
//! UNet on latents, and the pipeline that puts it together as Stable Diffusion does (tokenizer -> text encoder ->
//! UNet over latents under classifier-free guidance -> sampler -> VAE decoder), with img2img and inpainting.
//!
//! [LDM] Rombach et al. 2022, arXiv:2112.10752: sec. 3.1 (perceptual compression: x ≈ D(E(x)), diffusion on
//! z = E(x)), eq. 2 (L_LDM = E ‖ε − ε_θ(z_t, t, τ_θ(y))‖²), appendix G (the autoencoder's loss: reconstruction + a
//! KL-penalty of small weight; LPIPS and a patch discriminator we leave out), sec. 4.3.2 (rescaled latents).
//! [SDEdit] Meng et al. 2022, arXiv:2108.01073, sec. 3 and Algorithm 1: perturb the guide to noise level σ(t₀), then
//! solve the reverse process from t₀; img2img's "strength" is t₀ as a fraction of the steps (diffusers).
//! [RePaint] Lugmayr et al. 2022, arXiv:2201.09865, eq. 8: inpainting with an unconditional model by keeping the
//! known region from the data at every step; we keep it in the denoised estimate ([`KnownRegion`]).
//! Notation (code -> paper): vae.encode -> E (its posterior), vae.decode -> D, z -> scaled latent, keep -> 1 − m.

use crate::data::captions::AttributeBins;
use crate::data::to_unit;
use crate::diffusion::schedule::NoiseSchedule;
use crate::model::{Cond, Denoiser, EpsDenoiser};
use crate::nn::text_unet::TextUNet;
use crate::nn::unet::UNet;
use crate::nn::vae::AutoencoderKl;
use crate::pipelines::prompt_encoder::PromptEncoder;
use crate::pipelines::{bundle, finite_images};
use crate::sampling::grids::img2img_tail;
use crate::sampling::guidance::ClassifierFreeGuidance;
use crate::sampling::registry::Sampler;
use crate::sampling::wrappers::KnownRegion;
use crate::sampling::SamplerStep;
use crate::text::captions::CONTEXT_LEN;
use crate::validate::Validate;
use anyhow::{ensure, Result};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Where the weights of the full lesson 08 run ship, relative to the crate root.
pub const SHIPPED_DIR: &str = "data/lesson08";
/// Latent images per sampler call (twice as many rows go through the UNet with guidance).
const SAMPLE_BATCH: i64 = 500;

/// What the pipeline needs besides its networks; saved as `pipeline.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatentPipelineConfig {
    /// Side of the square images (28 for MNIST).
    pub image_size: i64,
    /// Tokens per prompt, start and end included.
    pub context_len: usize,
    /// Noise schedule the latent UNet was trained with and its T.
    pub schedule: String,
    pub num_train_timesteps: usize,
    /// Every token id of the training captions.
    pub seen_tokens: Vec<i64>,
}

impl Validate for LatentPipelineConfig {
    fn validate(&self) -> Result<(), String> {
        let c = self;
        crate::pipelines::check_text_pipeline(
            c.image_size,
            c.context_len,
            &c.schedule,
            c.num_train_timesteps,
            &c.seen_tokens,
        )
    }
}

impl LatentPipelineConfig {
    /// Lesson 08's: 28 × 28 digits, prompts of [`CONTEXT_LEN`] tokens, the latent UNet trained on `schedule` with
    /// T = 1000; `seen_tokens` from the training captions.
    pub fn mnist(schedule: &str, seen_tokens: Vec<i64>) -> Self {
        let (schedule, num_train_timesteps) = (schedule.to_string(), 1000);
        Self { image_size: 28, context_len: CONTEXT_LEN, schedule, num_train_timesteps, seen_tokens }
    }
}

/// How to draw: guidance scale, sampler and its steps, the seed of the starting noise (image i of a call uses the
/// noise drawn after seeding with `seed`, in order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    pub guidance: f64,
    pub sampler: Sampler,
    pub steps: usize,
    pub seed: u64,
}

/// Stable Diffusion's parts at MNIST scale: `text` holds the `tokenizer` and the frozen `text_encoder`; `unet`
/// predicts ε on scaled latents; `vae` maps latents and pixels; `scheduler` is the noise schedule the UNet learned
/// and the samplers of lesson 07 walk it.
pub struct LatentDiffusion {
    pub config: LatentPipelineConfig,
    pub text: PromptEncoder,
    pub unet: TextUNet,
    pub vae: AutoencoderKl,
    pub scheduler: NoiseSchedule,
    /// The attribute terciles of the training captions (None in toy pipelines).
    pub bins: Option<AttributeBins>,
    unet_vs: VarStore,
    vae_vs: VarStore,
}

impl LatentDiffusion {
    /// Assembles a pipeline from trained parts: the prompt encoder (lesson 06's, frozen), the latent UNet and the
    /// autoencoder, each with its VarStore.
    pub fn new(
        config: LatentPipelineConfig,
        text: PromptEncoder,
        (unet_vs, unet): (VarStore, TextUNet),
        (mut vae_vs, vae): (VarStore, AutoencoderKl),
        bins: Option<AttributeBins>,
    ) -> Result<Self> {
        ensure!(config.context_len == text.context_len, "the pipeline and its prompt encoder read different lengths");
        let (u, v) = (&unet.0.config, &vae.config);
        ensure!(
            u.cross_attention_dim == Some(text.hidden_size()),
            "the UNet must cross-attend to the text states' width"
        );
        ensure!(
            u.in_channels == v.latent_channels && u.out_channels == v.latent_channels,
            "the UNet has {} input channels, the VAE's latents {}: they must match",
            u.in_channels,
            v.latent_channels
        );
        vae_vs.freeze();
        let scheduler = NoiseSchedule::by_name(&config.schedule, config.num_train_timesteps)?;
        Ok(Self { config, text, unet, vae, scheduler, bins, unet_vs, vae_vs })
    }

    pub fn device(&self) -> Device {
        self.unet_vs.device()
    }

    /// The latent shape (C, h, w) of one image.
    pub fn latent_shape(&self) -> [i64; 3] {
        let v = &self.vae.config;
        let h = v.latent_size(self.config.image_size);
        [v.latent_channels, h, h]
    }

    /// Pixels (B, 1, S, S) in [0, 1] -> scaled latents z = s · μ (the posterior mean: img2img starts from the image
    /// itself, not a noisy draw of it).
    pub fn encode(&self, images: &Tensor) -> Tensor {
        let x = images.to_kind(Kind::Float).to_device(self.device()) * 2.0 - 1.0;
        tch::no_grad(|| self.vae.encode(&x).mean * self.vae.config.scaling_factor)
    }

    /// Scaled latents -> pixels (B, 1, S, S) in [0, 1] on the CPU.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let x = tch::no_grad(|| self.vae.decode(&(z / self.vae.config.scaling_factor)));
        to_unit(&x.clamp(-1.0, 1.0)).to_device(Device::Cpu)
    }

    fn check_draw(&self, draw: &Draw) -> Result<()> {
        crate::pipelines::check_guidance(draw.guidance)?;
        let t = self.scheduler.num_steps();
        ensure!(
            (1..=t).contains(&draw.steps),
            "--steps must lie in 1..={t} (the training schedule), got {}",
            draw.steps
        );
        ensure!(
            draw.sampler != Sampler::PredictorCorrector,
            "the predictor–corrector sampler runs in SDE time and cannot start part-way: pick another --sampler"
        );
        Ok(())
    }

    /// Runs `draw.sampler` with guidance from latents `start` (B, C, h, w) already at the first σ of `sigmas`, with
    /// the denoiser optionally wrapped by `wrap` (inpainting), in batches; returns the final latents.
    fn run(
        &self,
        (cond, uncond): (Cond, Cond),
        draw: &Draw,
        (start, sigmas): (&Tensor, &[f64]),
        wrap: Option<(&Tensor, &Tensor)>,
        cb: &mut dyn FnMut(i64, SamplerStep),
    ) -> Result<Tensor> {
        let guided = ClassifierFreeGuidance::new(&self.unet, cond, uncond, draw.guidance);
        let denoiser = EpsDenoiser::new(&guided, &self.scheduler);
        let n = start.size()[0];
        let mut out = Vec::new();
        for s in (0..n).step_by(SAMPLE_BATCH as usize) {
            let b = SAMPLE_BATCH.min(n - s);
            let x = start.narrow(0, s, b);
            let region = wrap.map(|(known, keep)| KnownRegion {
                inner: &denoiser,
                known: known.narrow(0, s, b),
                keep: keep.narrow(0, s, b),
            });
            let d: &dyn Denoiser = match &region {
                Some(r) => r,
                None => &denoiser,
            };
            out.push(tch::no_grad(|| draw.sampler.run(d, x, sigmas, &mut |st| cb(s, st))));
        }
        Ok(Tensor::cat(&out, 0))
    }

    // ANCHOR: generate
    /// `n` images (n, 1, S, S) in [0, 1] on the CPU for `prompt` (guided away from `negative`, None or blank: ∅).
    pub fn generate(&self, prompt: &str, negative: Option<&str>, n: i64, draw: &Draw) -> Result<Tensor> {
        self.generate_with(prompt, negative, n, draw, &mut |_, _| {})
    }

    /// [`Self::generate`] with `cb` seeing every sampler step (its first argument: the batch's first image).
    pub fn generate_with(
        &self,
        prompt: &str,
        negative: Option<&str>,
        n: i64,
        draw: &Draw,
        cb: &mut dyn FnMut(i64, SamplerStep),
    ) -> Result<Tensor> {
        ensure!(n >= 1, "asked for {n} images: ask for at least one");
        self.check_draw(draw)?;
        let sigmas = draw.sampler.grid(&self.scheduler, draw.steps);
        tch::manual_seed(draw.seed as i64);
        let shape = self.latent_shape();
        let z_t = Tensor::randn([n, shape[0], shape[1], shape[2]], (Kind::Float, self.device())); // z_T ~ N(0, I)
        let start = z_t * (1.0 + sigmas[0] * sigmas[0]).sqrt(); // σ-space: x = z_T √(1 + σ₀²)
        let z0 = self.run(self.text.cond_uncond(prompt, negative)?, draw, (&start, &sigmas), None, cb)?;
        finite_images(self.decode(&z0)) // D(z₀ / s)
    }
    // ANCHOR_END: generate

    /// One image per prompt of `prompts` (at most 500), all in one batch from the noise of `draw.seed`, with plain
    /// CFG: (P, 1, S, S) in [0, 1] on the CPU, and which prompts the pipeline refused (their images are black):
    /// [`TextToImage::generate_each`](crate::pipelines::text_to_image::TextToImage::generate_each) for latents.
    pub fn generate_each(&self, prompts: &[String], draw: &Draw) -> Result<(Tensor, Vec<bool>)> {
        ensure!((1..=SAMPLE_BATCH as usize).contains(&prompts.len()), "give 1 to {SAMPLE_BATCH} prompts at once");
        self.check_draw(draw)?;
        let (conds, refused) = self.text.conds_each(prompts)?;
        let drawn = match conds {
            Some(conds) => {
                let sigmas = draw.sampler.grid(&self.scheduler, draw.steps);
                tch::manual_seed(draw.seed as i64);
                let shape = self.latent_shape();
                let z_t = Tensor::randn([conds.0.batch(), shape[0], shape[1], shape[2]], (Kind::Float, self.device()));
                let start = z_t * (1.0 + sigmas[0] * sigmas[0]).sqrt(); // as in generate
                let z0 = self.run(conds, draw, (&start, &sigmas), None, &mut |_, _| {})?;
                Some(finite_images(self.decode(&z0))?)
            }
            None => None,
        };
        let s = self.config.image_size;
        Ok((crate::pipelines::black_where_refused(drawn, &refused, [1, s, s]), refused))
    }

    // ANCHOR: img2img
    /// [SDEdit] img2img: encode `images` (B, 1, S, S) in [0, 1], noise them to the σ that `strength` ∈ [0, 1] picks
    /// on the sampler's grid of `draw.steps` (diffusers: the last ⌊steps · strength⌋ steps run), and denoise towards
    /// `prompt`. Strength 0 returns the VAE's reconstruction; strength 1 starts from pure noise and ignores the image.
    pub fn img2img(
        &self,
        images: &Tensor,
        prompt: &str,
        negative: Option<&str>,
        strength: f64,
        draw: &Draw,
    ) -> Result<Tensor> {
        ensure!((0.0..=1.0).contains(&strength), "--strength must lie in [0, 1], got {strength}");
        self.check_image(images, "the input image")?;
        self.check_draw(draw)?;
        let z0 = self.encode(images);
        let sigmas = draw.sampler.grid(&self.scheduler, draw.steps);
        let tail = img2img_tail(&sigmas, strength); // σ from σ_start down to 0
        if tail.len() == 1 {
            let _ = self.text.cond_uncond(prompt, negative)?; // no step runs, but the prompt is still checked
            return Ok(self.decode(&z0));
        }
        tch::manual_seed(draw.seed as i64);
        let start = &z0 + z0.randn_like() * tail[0]; // q(z_σ | z₀) in σ-space: z₀ + σ ε
        let z = self.run(self.text.cond_uncond(prompt, negative)?, draw, (&start, tail), None, &mut |_, _| {})?;
        finite_images(self.decode(&z))
    }
    // ANCHOR_END: img2img

    // ANCHOR: inpaint
    /// Inpainting: redraws the pixels where `mask` (B or 1, 1, S, S) is 1 so that the whole matches `prompt`, and
    /// keeps the rest of `images` (B, 1, S, S) in [0, 1]. A latent cell is redrawn if any of its pixels is masked
    /// (max-pooling the mask by the VAE's factor); the known latents are held by [`KnownRegion`]. Returns the
    /// decoded images and the same with the unmasked pixels pasted back from the input (what the user sees).
    pub fn inpaint(
        &self,
        images: &Tensor,
        mask: &Tensor,
        prompt: &str,
        negative: Option<&str>,
        draw: &Draw,
    ) -> Result<(Tensor, Tensor)> {
        self.check_image(images, "the input image")?;
        let (b, s) = (images.size()[0], self.config.image_size);
        let m = mask.size();
        ensure!(
            m.len() == 4 && (m[0] == b || m[0] == 1) && m[1..] == [1, s, s],
            "the mask is {m:?}, the image {:?}: it must be one {s}×{s} grayscale mask per image (or one for all)",
            images.size()
        );
        self.check_draw(draw)?;
        let mask =
            mask.to_kind(Kind::Float).gt(0.5).to_kind(Kind::Float).to_device(self.device()).expand([b, 1, s, s], false);
        let f = self.vae.config.downsample_factor();
        let repaint = mask.max_pool2d([f, f], [f, f], [0, 0], [1, 1], true); // (B, 1, h, w): 1 = redraw the cell
        let z0 = self.encode(images);
        let sigmas = draw.sampler.grid(&self.scheduler, draw.steps);
        tch::manual_seed(draw.seed as i64);
        let start = z0.randn_like() * (1.0 + sigmas[0] * sigmas[0]).sqrt();
        let keep = 1.0 - repaint;
        let z = self.run(
            self.text.cond_uncond(prompt, negative)?,
            draw,
            (&start, &sigmas),
            Some((&z0, &keep)),
            &mut |_, _| {},
        )?;
        let decoded = finite_images(self.decode(&z))?;
        let mask = mask.to_device(Device::Cpu);
        let pasted = &mask * &decoded + (1.0 - &mask) * images.to_kind(Kind::Float).to_device(Device::Cpu);
        Ok((decoded, pasted))
    }
    // ANCHOR_END: inpaint

    fn check_image(&self, images: &Tensor, what: &str) -> Result<()> {
        let (size, s) = (images.size(), self.config.image_size);
        ensure!(
            size.len() == 4 && size[0] >= 1 && size[1..] == [1, s, s],
            "{what} is {size:?}: it must be {s}×{s} grayscale (an MNIST-sized digit), (B, 1, {s}, {s})"
        );
        Ok(())
    }

    /// Writes the bundle into `dir`: pipeline.json, merges.txt, text_encoder, unet and vae safetensors (each with its
    /// config JSON beside it) and, if known, attribute_bins.json.
    pub fn save(&self, dir: &Path) -> Result<()> {
        bundle::save_config(dir, &self.config)?;
        self.text.save(dir)?;
        bundle::save_network(dir, "unet", &self.unet_vs, &self.unet.0.config)?;
        bundle::save_network(dir, "vae", &self.vae_vs, &self.vae.config)?;
        bundle::save_bins(dir, self.bins.as_ref())
    }

    /// Loads a bundle written by [`Self::save`] onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let config: LatentPipelineConfig = bundle::load_config(dir, "latent pipeline")?;
        let text = PromptEncoder::load(dir, config.context_len, &config.seen_tokens, device)?;
        let unet = bundle::load_network(dir, "unet", device, |p, c| TextUNet(UNet::new(p, c)))?;
        let vae = bundle::load_network(dir, "vae", device, AutoencoderKl::new)?;
        Self::new(config, text, unet, vae, bundle::load_bins(dir)?)
    }
}

/// The README of the shipped bundle; `how` says how the run that made it was set up.
pub fn readme(how: &str) -> String {
    format!(
        "# Lesson 08 pipeline\n\nWhat `lesson08 sample`, `img2img` and `inpaint` load by default: lesson 06's BPE \
         merges and frozen text encoder, the latent UNet, the autoencoder (its `scaling_factor` in vae.json) and the \
         attribute bins of the captions.\n\nMade by `./run.sh lesson 08 --ship --threads {threads}` ({how}, on \
         {threads} threads).\n",
        threads = tch::get_num_threads()
    )
}

/// `data/lesson08` under the working directory if it holds a bundle, else under the crate root.
pub fn shipped_dir() -> PathBuf {
    crate::cli::shipped_path(SHIPPED_DIR, "pipeline.json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint;
    use crate::nn::text_encoder::{TextEncoder, TextEncoderConfig};
    use crate::nn::unet::UNetConfig;
    use crate::nn::vae::VaeConfig;
    use crate::text::Bpe;

    /// A pipeline with random weights on 8×8 images (4×4 latents of 2 channels) and prompts about "zero" and "one".
    fn toy() -> LatentDiffusion {
        tch::manual_seed(0);
        let corpus: Vec<String> = ["zero", "one", "a thin zero"].repeat(2).into_iter().map(String::from).collect();
        let bpe = Bpe::train(&corpus, 20);
        let text_config = TextEncoderConfig { vocab_size: bpe.vocab_size() as i64, ..TextEncoderConfig::tiny() };
        let text_vs = VarStore::new(Device::Cpu);
        let _ = TextEncoder::new(text_vs.root() / "text_model", text_config.clone());
        let seen: Vec<i64> = bpe.seen_tokens(&corpus).into_iter().collect();
        let text = PromptEncoder::new(bpe, text_config, &text_vs, 8, &seen, Device::Cpu).unwrap();
        let vae_vs = VarStore::new(Device::Cpu);
        let vae = AutoencoderKl::new(vae_vs.root(), VaeConfig { scaling_factor: 0.7, ..VaeConfig::tiny() });
        let unet_vs = VarStore::new(Device::Cpu);
        let unet_config = UNetConfig { in_channels: 2, out_channels: 2, ..UNetConfig::tiny_cond(16) };
        let unet = TextUNet(UNet::new(unet_vs.root(), unet_config));
        let config = LatentPipelineConfig {
            image_size: 8,
            context_len: 8,
            schedule: "cosine".into(),
            num_train_timesteps: 1000,
            seen_tokens: seen,
        };
        LatentDiffusion::new(config, text, (unet_vs, unet), (vae_vs, vae), None).unwrap()
    }

    fn draw(sampler: Sampler) -> Draw {
        Draw { guidance: 2.0, sampler, steps: 4, seed: 3 }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn generation_is_seeded_and_the_bundle_round_trips() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        let pipe = toy();
        assert_eq!(pipe.latent_shape(), [2, 4, 4]);
        let a = pipe.generate("a thin zero", None, 3, &draw(Sampler::DpmSolverPp2m)).unwrap();
        assert_eq!(a.size(), [3, 1, 8, 8]);
        assert!(a.min().double_value(&[]) >= 0.0 && a.max().double_value(&[]) <= 1.0);
        assert!(a.equal(&pipe.generate("a thin zero", None, 3, &draw(Sampler::DpmSolverPp2m)).unwrap()));
        let other = Draw { seed: 4, ..draw(Sampler::DpmSolverPp2m) };
        assert!(!a.equal(&pipe.generate("a thin zero", None, 3, &other).unwrap()));
        let dir = tempfile::tempdir().unwrap();
        pipe.save(dir.path()).unwrap();
        let loaded = LatentDiffusion::load(dir.path(), Device::Cpu).unwrap();
        assert_eq!(loaded.vae.config.scaling_factor, 0.7, "the scaling factor travels with the VAE");
        assert!(loaded.generate("a thin zero", None, 3, &draw(Sampler::DpmSolverPp2m)).unwrap().equal(&a));
        std::fs::remove_file(dir.path().join("vae.safetensors")).unwrap();
        let missing = format!("{:#}", LatentDiffusion::load(dir.path(), Device::Cpu).err().unwrap());
        assert!(missing.contains("vae.safetensors"), "{missing}");
        tch::set_num_threads(threads);
    }

    #[test]
    fn img2img_at_strength_zero_is_the_reconstruction_and_at_one_ignores_the_image() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        let pipe = toy();
        let image = Tensor::rand([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let d = draw(Sampler::Euler);
        let zero = pipe.img2img(&image, "one", None, 0.0, &d).unwrap();
        assert!(max_diff(&zero, &pipe.decode(&pipe.encode(&image))) < 1e-6);
        // strength 1 runs the whole grid from z₀ + σ_max ε: with σ_max = 80 the image's trace is ~1 % of the start,
        // so another image changes the output far less than another seed does
        let one = pipe.img2img(&image, "one", None, 1.0, &d).unwrap();
        let other_image = max_diff(&one, &pipe.img2img(&image.rand_like(), "one", None, 1.0, &d).unwrap());
        let other_seed = max_diff(&one, &pipe.img2img(&image, "one", None, 1.0, &Draw { seed: 9, ..d }).unwrap());
        assert!(other_image < 0.25 * other_seed, "{other_image} vs {other_seed}");
        let half = pipe.img2img(&image, "one", None, 0.5, &d).unwrap();
        assert!(max_diff(&half, &zero) > 1e-4, "a strength between changes the image");
        let err = |r: Result<Tensor>| format!("{:#}", r.unwrap_err());
        assert!(err(pipe.img2img(&image, "one", None, 1.5, &d)).contains("--strength"));
        let wrong = Tensor::rand([1, 1, 9, 8], (Kind::Float, Device::Cpu));
        assert!(err(pipe.img2img(&wrong, "one", None, 0.5, &d)).contains("8×8 grayscale"));
        assert!(err(pipe.img2img(&image, "zebra", None, 0.0, &d)).contains("\"zebra\""), "checked even at 0");
        tch::set_num_threads(threads);
    }

    #[test]
    fn inpainting_keeps_the_known_latents_and_pastes_the_unmasked_pixels() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        let pipe = toy();
        let image = Tensor::rand([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let mask = Tensor::zeros([1, 1, 8, 8], (Kind::Float, Device::Cpu));
        let _ = mask.narrow(3, 0, 3).fill_(1.0); // redraw columns 0..3: latent columns 0 and 1 (factor 2)
        for sampler in [Sampler::Euler, Sampler::DpmSolverPp2m, Sampler::Ddim] {
            let (decoded, pasted) = pipe.inpaint(&image, &mask, "one", None, &draw(sampler)).unwrap();
            assert!(max_diff(&(&pasted * (1.0 - &mask)), &(&image * (1.0 - &mask))) < 1e-7, "{sampler:?}");
            assert!(max_diff(&(&pasted * &mask), &(&decoded * &mask)) < 1e-7);
        }
        // the latents themselves: the kept cells end exactly at z₀ (first-order: x − z₀ shrinks by σ_{i+1}/σ_i)
        let z0 = pipe.encode(&image);
        let keep = Tensor::ones([1, 1, 4, 4], (Kind::Float, Device::Cpu));
        let _ = keep.narrow(3, 0, 2).fill_(0.0);
        let d = draw(Sampler::Euler);
        let sigmas = d.sampler.grid(&pipe.scheduler, d.steps);
        let start = z0.randn_like() * (1.0 + sigmas[0] * sigmas[0]).sqrt();
        let keep = keep.expand([2, 1, 4, 4], false);
        let z = pipe
            .run(pipe.text.cond_uncond("one", None).unwrap(), &d, (&start, &sigmas), Some((&z0, &keep)), &mut |_, _| {})
            .unwrap();
        assert!(max_diff(&(&z * &keep), &(&z0 * &keep)) < 1e-5);
        assert!(max_diff(&z, &z0) > 1e-3, "the masked cells are redrawn");
        let err = format!(
            "{:#}",
            pipe.inpaint(&image, &Tensor::zeros([1, 1, 4, 4], (Kind::Float, Device::Cpu)), "one", None, &d)
                .unwrap_err()
        );
        assert!(err.contains("the mask is [1, 1, 4, 4]"), "{err}");
        tch::set_num_threads(threads);
    }

    /// Issue 17, defect 1: numbers out of range in a saved bundle's configs are refused when it loads, naming the file
    /// and the field, before any network is built.
    #[test]
    fn a_bundle_with_configs_out_of_range_is_refused_naming_the_field() {
        let pipe = toy();
        let dir = tempfile::tempdir().unwrap();
        pipe.save(dir.path()).unwrap();
        let cases = [
            ("unet.json", "head_dim", serde_json::json!(0)),
            ("unet.json", "layers_per_block", serde_json::json!(1_000_000_000_000u64)),
            ("pipeline.json", "image_size", serde_json::json!(0)),
            ("pipeline.json", "image_size", serde_json::json!(100_000)),
            ("vae.json", "norm_num_groups", serde_json::json!(0)),
            ("vae.json", "latent_channels", serde_json::json!(0)),
            ("vae.json", "scaling_factor", serde_json::json!(0.0)),
            ("text_encoder.json", "num_attention_heads", serde_json::json!(0)),
            ("text_encoder.json", "layer_norm_eps", serde_json::json!(-1.0)),
        ];
        for (file, field, value) in cases {
            // pipeline.json is plain JSON; a network's config lives inside its safetensors file
            let path =
                dir.path().join(file.replace(".json", if file == "pipeline.json" { ".json" } else { ".safetensors" }));
            let good = std::fs::read(&path).unwrap();
            let edit = |json: &str| -> String {
                let mut json: serde_json::Value = serde_json::from_str(json).unwrap();
                json[field] = value.clone();
                json.to_string()
            };
            if file == "pipeline.json" {
                std::fs::write(&path, edit(&String::from_utf8(good.clone()).unwrap())).unwrap();
            } else {
                let mut meta = checkpoint::read_metadata(&path).unwrap();
                let config = edit(&meta[checkpoint::CONFIG_KEY]);
                meta.insert(checkpoint::CONFIG_KEY.to_string(), config);
                checkpoint::write_tensors(&path, &Tensor::read_safetensors(&path).unwrap(), &meta).unwrap();
            }
            let e = format!("{:#}", LatentDiffusion::load(dir.path(), Device::Cpu).err().unwrap());
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(e.contains(name) && e.contains(&format!("`{field}`")), "{file} {field}: {e}");
            std::fs::write(&path, good).unwrap();
        }
        assert!(LatentDiffusion::load(dir.path(), Device::Cpu).is_ok());
    }

    /// [`LatentDiffusion::generate_each`]: one prompt draws what `generate` draws from the same seed (a
    /// deterministic sampler: the start noise is all the randomness); refused prompts come back black and flagged.
    #[test]
    fn generate_each_draws_a_batch_of_prompts_and_flags_the_refused() {
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        let pipe = toy();
        let d = draw(Sampler::DpmSolverPp2m);
        let (x, refused) = pipe.generate_each(&["a thin zero".into()], &d).unwrap();
        assert!(
            x.allclose(&pipe.generate("a thin zero", None, 1, &d).unwrap(), 1e-6, 1e-6, false) && refused == [false]
        );
        let (x, refused) = pipe.generate_each(&["one".into(), "zebra".into()], &d).unwrap();
        assert_eq!((x.size(), refused), (vec![2, 1, 8, 8], vec![false, true]));
        assert_eq!(x.get(1).abs().sum(Kind::Float).double_value(&[]), 0.0);
        tch::set_num_threads(threads);
    }
}
