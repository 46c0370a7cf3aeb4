//! The lessons' experiments and figures, built on the library below: they measure and draw, and nothing under
//! `src/` but the lessons depends on them.
pub mod guidance;
pub mod langevin;
pub mod latent_edits;
pub mod nfe;
pub mod prompts;
pub mod sampler_figures;
/// Lesson 09's `--full-size`: SD 1.5's networks at full size, one guided UNet step timed against its FLOP count.
pub mod sd_full_size;
pub mod trajectory;
