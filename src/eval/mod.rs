//! Measuring what a model learned: score errors against an analytic score, and distances between sample sets.
pub mod sample_quality;
pub mod score_error;
pub mod classifier;
pub mod frechet;
