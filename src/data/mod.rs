//! Data sets: MNIST from its canonical IDX files, and 2-D Gaussian mixtures whose density and score are exact.
pub mod captions;
pub mod mnist;
pub mod png;
pub mod toy2d;
