//! Measuring what a model learned: score errors against an analytic score, and distances between sample sets.
pub mod bits_per_dim;
pub mod classifier;
pub mod frechet;
pub mod latent_edits;
pub mod nfe_study;
pub mod prompt_accuracy;
pub mod sample_quality;
pub mod sampler_figures;
pub mod score_error;
