//! Measuring what a model learned: score errors against an analytic score, and distances between sample sets.
pub mod classifier;
pub mod frechet;
pub mod prompt_accuracy;
pub mod sample_quality;
pub mod score_error;
