//! Metrics only: how far samples are from the data (Fréchet distance with the crate classifier's features, energy
//! distance, mode weights), how well a model follows its prompt or an edge hint, score errors, image distances and
//! bits/dim.
pub mod bits_per_dim;
pub mod edges;
pub mod frechet;
pub mod image_metrics;
pub mod prompt_accuracy;
pub mod sample_quality;
pub mod score_error;
pub mod signatures;
