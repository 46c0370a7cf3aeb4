//! Data sets: MNIST from its canonical IDX files, and 2-D Gaussian mixtures whose density and score are exact.
pub mod canny;
pub mod captions;
pub mod hints;
pub mod mnist;
pub mod png;
pub mod signatures;
pub mod toy2d;

use tch::Tensor;

/// Images in [−1, 1] -> [0, 1] (for figures and the classifier).
pub fn to_unit(x: &Tensor) -> Tensor {
    ((x + 1.0) / 2.0).clamp(0.0, 1.0)
}
