//! The noise side of diffusion: schedules, the forward process, noise ladders, the denoising-score-matching
//! objective, and DDPM's variational bound computed exactly on Gaussian data ([`elbo`]).
pub mod elbo;
pub mod forward;
pub mod ladder;
pub mod schedule;
pub mod score_matching;

use tch::Tensor;

/// Reshapes a per-sample value (B,) so it broadcasts against a batch `like` of any rank: (B, 1, 1, ...).
pub fn append_dims(v: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![v.size()[0]];
    shape.resize(like.dim(), 1);
    v.view(shape.as_slice())
}
