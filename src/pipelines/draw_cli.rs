//! Lesson 08's `sample`, `img2img` and `inpaint` commands: their flags ([`DrawArgs`], [`Img2ImgArgs`],
//! [`InpaintArgs`]) and [`draw_cmd`], which loads a latent-diffusion bundle and writes PNGs.
use crate::data::png::read_png_gray;
use crate::pipelines::latent_diffusion::{self as ld, Draw, LatentDiffusion};
use crate::pipelines::{bundle, PromptArgs};
use crate::sampling::registry::Sampler;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// img2img's default strength: chapter 08 grades the pipeline here (≥ 90 % of outputs read as the new digit).
pub const STRENGTH: f64 = 0.8;

/// `lesson08 sample`: a prompt in, PNGs out, with the sampler of the registry.
#[derive(Args, Debug)]
pub struct DrawArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Sampler: ddpm, ddim, euler, heun, euler_a, dpm_solver_2, dpm_solver_3, dpm_solver_pp_2m (or the UI names).
    #[arg(long, default_value_t = Sampler::DpmSolverPp2m.key().to_string())]
    pub sampler: String,
}

/// `lesson08 img2img`: a digit redrawn towards a prompt.
#[derive(Args, Debug)]
pub struct Img2ImgArgs {
    /// The input digit: a 28×28 PNG (any colour type; white strokes on black, as MNIST).
    #[arg(long)]
    pub image: PathBuf,
    /// How far to noise the input before redrawing it, 0 (keep) to 1 (ignore it).
    #[arg(long, default_value_t = STRENGTH)]
    pub strength: f64,
    #[command(flatten)]
    pub draw: DrawArgs,
}

/// `lesson08 inpaint`: the masked part of a digit redrawn.
#[derive(Args, Debug)]
pub struct InpaintArgs {
    /// The input digit: a 28×28 PNG.
    #[arg(long)]
    pub image: PathBuf,
    /// A 28×28 PNG, white (> 0.5) where to redraw, black where to keep the input.
    #[arg(long)]
    pub mask: PathBuf,
    #[command(flatten)]
    pub draw: DrawArgs,
}

/// What a drawing command does to its input.
pub enum Edit {
    /// Draw from noise.
    None,
    /// img2img of the PNG at this strength.
    Img2Img(PathBuf, f64),
    /// Inpainting of the PNG under the mask PNG.
    Inpaint(PathBuf, PathBuf),
}

/// Loads the bundle of `--weights` (or the shipped one) and draws for the prompt; `edit` says from what.
pub fn draw_cmd(args: DrawArgs, edit: Edit) -> Result<()> {
    let (sampler, device) = (Sampler::from_name(&args.sampler).context("--sampler")?, args.prompt.init()?);
    let a = args.prompt;
    let draw = Draw { guidance: a.guidance, sampler, steps: a.steps as usize, seed: a.seed };
    let dir = a.weights_dir(ld::shipped_dir);
    let pipe =
        LatentDiffusion::load(&dir, device).with_context(|| bundle::no_bundle(&dir, "08", "latent-diffusion"))?;
    for note in pipe.text.notes(&a.prompt)? {
        println!("{note}"); // words the captions never had, no digit or several
    }
    let (n, negative) = (a.num, a.negative.as_deref());
    // ANCHOR: draw_cmd
    let (images, what) = match &edit {
        Edit::None => (pipe.generate(&a.prompt, negative, n, &draw)?, String::new()),
        Edit::Img2Img(path, strength) => {
            let input = read_png_gray(path)?.expand([n, 1, -1, -1], false).contiguous(); // n copies, own noise each
            let out = pipe.img2img(&input, &a.prompt, negative, *strength, &draw)?;
            (out, format!(", img2img of {} at strength {strength}", path.display()))
        }
        Edit::Inpaint(path, mask_path) => {
            let input = read_png_gray(path)?.expand([n, 1, -1, -1], false).contiguous();
            let mask = read_png_gray(mask_path)?;
            let (_, pasted) = pipe.inpaint(&input, &mask, &a.prompt, negative, &draw)?;
            (pasted, format!(", inpainting {} under {}", path.display(), mask_path.display()))
        }
    };
    // ANCHOR_END: draw_cmd
    bundle::write_samples(
        &a.out_dir("lesson08"),
        &images,
        &a.title(&format!("{} × {}{what}", a.steps, sampler.ui_name())),
    )
}
