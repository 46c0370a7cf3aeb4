//! Denoisers that wrap a denoiser, so every sampler gains them: x̂₀ clamped to the data range ("static
//! thresholding") and inpainting by keeping a known region.
//!
//! [RePaint] Lugmayr et al. 2022, arXiv:2201.09865, eq. 8: inpainting with an unconditional model by keeping the
//! known region from the data at every step; we keep it in the denoised estimate ([`KnownRegion`]).
//! Notation (code -> paper): keep -> 1 − m, z0 -> the known latent.
use crate::model::Denoiser;
use tch::Tensor;

/// x̂₀ clamped to [lo, hi] around any denoiser ("static thresholding": lesson 04's DDPM sampler clips x̂₀ the same
/// way). Every sampler of a study goes through the same wrapper, so the comparison stays fair.
pub struct Clamped<'a> {
    pub inner: &'a dyn Denoiser,
    pub range: (f64, f64),
}

impl Denoiser for Clamped<'_> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        self.inner.denoise(x, sigma).clamp(self.range.0, self.range.1)
    }
}

// ANCHOR: known_region
/// Inpainting as a denoiser that wraps a denoiser ([RePaint] eq. 8, applied to the estimate x̂₀ instead of x_t):
/// D'(x; σ) = keep · z₀ + (1 − keep) · D(x; σ). Every sampler of lesson 07 moves x towards its denoised estimates,
/// so the kept region of x goes to the known latent z₀ (exactly, for the first-order solvers: x − z₀ shrinks by
/// σ_{i+1}/σ_i per step), and the network repaints the rest while seeing the kept region at every noise level.
pub struct KnownRegion<'a> {
    pub inner: &'a dyn Denoiser,
    /// The known latent z₀ (B, C, h, w) (or batch 1).
    pub known: Tensor,
    /// 1 where z₀ is kept, 0 where the model draws: (B or 1, 1, h, w).
    pub keep: Tensor,
}

impl Denoiser for KnownRegion<'_> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        &self.keep * &self.known + (1.0 - &self.keep) * self.inner.denoise(x, sigma)
    }
}
// ANCHOR_END: known_region
