//! The lessons' experiments and figures, built on the library below: they measure and draw, and nothing under
//! `src/` but the lessons depends on them.
/// Lesson 05's attention check against libtorch and its cross-attention figure.
pub mod attention;
pub mod cascade;
pub mod controlnet;
/// Lesson 03's figures: noise schedules, the forward process on digits, DDPM samples over a 2-D density.
pub mod ddpm_figures;
pub mod finetune;
pub mod guidance;
pub mod guidance_methods;
pub mod langevin;
pub mod latent_edits;
pub mod nfe;
pub mod prompts;
pub mod sampler_figures;
/// Lesson 09's `--full-size`: SD 1.5's networks at full size, one guided UNet step timed against its FLOP count.
pub mod sd_files;
pub mod sd_full_size;
pub mod trajectory;
/// Lesson 04's figures: the UNet's parameters per block, samples from the same noises during training.
pub mod unclip;
pub mod unet_figures;
