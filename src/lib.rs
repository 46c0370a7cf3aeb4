//! scratch-diffusion: diffusion models from scratch, lesson by lesson.
//!
//! The lessons in `lessons/` are thin binaries that read top to bottom like a notebook; everything they share lives
//! here, one concept per file, in layers whose imports run one way, top to bottom (`tests/layering.rs` holds them):
//!
//! - [`data`]: MNIST (a verifying IDX reader), 2-D Gaussian mixtures with an analytic score, captions written from
//!   each digit's measured strokes, PNG in and out.
//! - [`text`]: a byte-level BPE tokenizer in the style of CLIP's (trainable on captions, loads CLIP's merges), and
//!   captioned MNIST as token ids.
//! - [`diffusion`]: noise schedules, the forward process, noise ladders, the denoising-score-matching objective.
//! - [`model`]: what networks and samplers share: ε-models (plain and conditional), their conditioning [`model::Cond`]
//!   (a context and, for prompts, its padding mask), and the denoiser D(x, σ) → x̂₀ with its adapters.
//! - [`nn`]: the networks only: MLPs, the UNet (unconditional, class- and text-conditioned), attention, the text
//!   encoder, the mini-CLIP, the VAE, the graders' classifier, the UNet's encoder half that reads noised images
//!   (lesson 10's noise-aware classifier and noised CLIP).
//! - [`sampling`]: samplers as plain functions over a σ grid, one registry with the UIs' names, and the denoisers
//!   that wrap a denoiser (classifier-free, classifier and CLIP guidance, static and dynamic thresholding, inpainting).
//! - [`sd`]: Stable Diffusion 1.x weight files: safetensors, the key map of original single files, loaders.
//! - [`train`]: one training loop that every model of the crate trains on, the objectives, and named recipes.
//! - [`pipelines`]: trained networks put together for inference, saved and loaded as bundles of one format
//!   ([`pipelines::bundle`]), and the flags of the sampling commands.
//! - [`eval`]: metrics only.
//! - [`studies`]: the lessons' experiments and figures.
//!
//! Four utilities import nothing else of the crate, so every layer may use them: [`cli`] (the flags every lesson
//! takes, the run context, metrics.json / loss.csv writers, progress bars, atomic writes, paths of shipped files),
//! [`plot`] (figures with an embedded font) and [`checkpoint`] (weights with their config beside them, atomically);
//! and [`validate`], the range checks every config read from a file passes before a tensor is built from it.
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod diffusion;
pub mod eval;
pub mod model;
pub mod nn;
pub mod pipelines;
pub mod plot;
pub mod sampling;
pub mod sd;
pub mod studies;
pub mod text;
pub mod train;
pub mod validate;
