//! scratch-diffusion: diffusion models from scratch, lesson by lesson.
//!
//! The lessons in `lessons/` are thin binaries that read top to bottom like a notebook; everything they share lives
//! here, one concept per file:
//!
//! - [`cli`]: the flags every lesson takes (`--quick`, `--out`, `--seed`, `--threads`, `--device`, `--data-dir`),
//!   the run context, metrics.json / loss.csv writers and progress bars.
//! - [`data`]: MNIST (a verifying IDX reader) and 2-D Gaussian mixtures with an analytic density and score.
//! - [`diffusion`]: noise ladders and the denoising-score-matching objective.
//! - [`sampling`]: Langevin dynamics and annealed Langevin.
//! - [`nn`]: the networks (a noise-conditional MLP for 2-D data, a small noise-conditional score network for MNIST).
//! - [`eval`]: score errors against the analytic score, energy distance and mode weights of samples.
//! - [`train`]: atomic safetensors checkpoints with their resolved config beside them.
//! - [`text`]: a byte-level BPE tokenizer in the style of CLIP's (trainable on captions, loads CLIP's merges).
//! - [`sd`]: Stable Diffusion 1.x: its weights (diffusers folders, original single files through one key map) and
//!   its txt2img / img2img pipeline with the UIs' samplers.
//! - [`plot`]: loss curves, scatter / density / histogram, vector fields and image grids, with an embedded font.
pub mod cli;
pub mod data;
pub mod diffusion;
pub mod eval;
pub mod nn;
pub mod plot;
pub mod sampling;
pub mod sd;
pub mod text;
pub mod train;
