//! The lessons' experiments and figures, built on the library below: they measure and draw, and nothing under
//! `src/` but the lessons depends on them.
pub mod guidance;
pub mod langevin;
pub mod latent_edits;
pub mod nfe;
pub mod prompts;
pub mod sampler_figures;
pub mod trajectory;
