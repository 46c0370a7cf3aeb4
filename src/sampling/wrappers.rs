//! Denoisers that wrap a denoiser, so every sampler gains them: x̂₀ clamped to the data range ("static
//! thresholding"), Imagen's dynamic thresholding, and inpainting by keeping a known region.
//!
//! [Imagen] Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding",
//! arXiv:2205.11487, sec. 2.3 ("static thresholding", "dynamic thresholding") and Figure A.10 (the code).
//! [RePaint] Lugmayr et al. 2022, arXiv:2201.09865, eq. 8: inpainting with an unconditional model by keeping the
//! known region from the data at every step; we keep it in the denoised estimate ([`KnownRegion`]).
//! Notation (code -> paper): keep -> 1 − m, z0 -> the known latent.
use crate::diffusion::append_dims;
use crate::model::Denoiser;
use tch::{Kind, Tensor};

/// Imagen's default percentile p for dynamic thresholding ([Imagen] sec. 2.3 and Fig. A.10: 99.5 %).
pub const DYNAMIC_PERCENTILE: f64 = 0.995;

// ANCHOR: threshold
/// What a sampler does to its estimate x̂₀ of data in [−1, 1] before stepping towards it ([Imagen] sec. 2.3).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Threshold {
    /// x̂₀ as the network gives it.
    None,
    /// x̂₀ clipped to [−1, 1] (what lessons 03–06 have always done).
    Static,
    /// Per sample, s = the `percentile` quantile of |x̂₀|, at least 1; then x̂₀ ← clip(x̂₀, −s, s)/s.
    Dynamic { percentile: f64 },
}

impl Threshold {
    /// x̂₀ (B, ...) thresholded, row by row for the dynamic kind.
    pub fn apply(&self, x0: &Tensor) -> Tensor {
        match *self {
            Threshold::None => x0.shallow_clone(),
            Threshold::Static => x0.clamp(-1.0, 1.0),
            Threshold::Dynamic { percentile } => dynamic_threshold(x0, percentile),
        }
    }

    /// A short name for tables and metrics.json: none, static, dynamic (p = 0.995).
    pub fn name(&self) -> String {
        match self {
            Threshold::None => "none".into(),
            Threshold::Static => "static".into(),
            Threshold::Dynamic { percentile } => format!("dynamic (p = {percentile})"),
        }
    }
}

/// The kinds of [`Threshold`] by name, for command lines (`--threshold dynamic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ThresholdKind {
    None,
    Static,
    Dynamic,
}

impl ThresholdKind {
    /// The threshold of this kind; `percentile` is used by the dynamic one.
    pub fn with(self, percentile: f64) -> Threshold {
        match self {
            ThresholdKind::None => Threshold::None,
            ThresholdKind::Static => Threshold::Static,
            ThresholdKind::Dynamic => Threshold::Dynamic { percentile },
        }
    }
}

/// [Imagen] sec. 2.3, Fig. A.10: s = max(quantile_p(|x̂₀|), 1) per sample; x̂₀ ← clip(x̂₀, −s, s)/s. Where every
/// |x̂₀| ≤ 1, s = 1 and nothing changes; where the network overshoots the data range (large guidance), the whole
/// sample is scaled back inside it instead of having its overshooting pixels flattened at ±1.
pub fn dynamic_threshold(x0: &Tensor, percentile: f64) -> Tensor {
    assert!((0.0..=1.0).contains(&percentile), "the percentile must lie in [0, 1], got {percentile}");
    let b = x0.size()[0];
    // |x̂₀| (B, N)
    let abs = x0.abs().reshape([b, -1]).to_kind(Kind::Float);
    // [Imagen] Fig. A.10: s = max(quantile_p(|x̂₀|), 1), (B,), interpolated between order statistics as numpy's
    let s = abs.quantile_scalar(percentile, Some(1), false, "linear").clamp_min(1.0).to_kind(x0.kind());
    // (B, 1, ...)
    let s = append_dims(&s, x0);
    // [Imagen] Fig. A.10: x̂₀ ← clip(x̂₀, −s, s)/s
    x0.maximum(&(-&s)).minimum(&s) / s
}
// ANCHOR_END: threshold

/// Any denoiser with its x̂₀ thresholded ([`Threshold`]): how every σ-space sampler gains Imagen's options.
pub struct Thresholded<'a> {
    pub inner: &'a dyn Denoiser,
    pub threshold: Threshold,
}

impl Denoiser for Thresholded<'_> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        self.threshold.apply(&self.inner.denoise(x, sigma))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn rows(v: &[&[f64]]) -> Tensor {
        let n = v[0].len() as i64;
        Tensor::from_slice(&v.concat()).view([v.len() as i64, n])
    }

    /// [Imagen] Fig. A.10 by hand: row 1 has |x̂₀| = 0.5, 1, 2, 4 (the 50 % quantile, interpolated, is 1.5), row 2
    /// stays inside [−1, 1] (s clamps to 1: untouched).
    #[test]
    fn dynamic_thresholding_matches_its_formula_and_leaves_in_range_samples_alone() {
        let x0 = rows(&[&[0.5, -1.0, 2.0, -4.0], &[0.2, -0.9, 1.0, 0.0]]);
        let got = dynamic_threshold(&x0, 0.5);
        // s = 1.5: clip(x, −1.5, 1.5)/1.5
        let want = rows(&[&[0.5 / 1.5, -1.0 / 1.5, 1.0, -1.0], &[0.2, -0.9, 1.0, 0.0]]);
        assert!((got - want).abs().max().double_value(&[]) < 1e-12);
        // p = 1: s is the largest |x̂₀|, so the sample is divided by it and nothing is clipped
        let got = dynamic_threshold(&x0, 1.0);
        let want = rows(&[&[0.125, -0.25, 0.5, -1.0], &[0.2, -0.9, 1.0, 0.0]]);
        assert!((got - want).abs().max().double_value(&[]) < 1e-12);
        // the s ≥ 1 clamp: a sample whose quantile is below 1 is not scaled up
        let small = rows(&[&[0.1, 0.2, 0.3, 0.4]]);
        assert!(dynamic_threshold(&small, 0.5).equal(&small));
        // images (B, C, H, W): each sample has its own s
        let img =
            Tensor::cat(&[Tensor::full([1, 1, 2, 2], 3.0, (Kind::Double, Device::Cpu)), x0.view([2, 1, 2, 2])], 0);
        let out = dynamic_threshold(&img, DYNAMIC_PERCENTILE);
        assert!(out.get(0).eq(1.0).all().int64_value(&[]) == 1, "3/3");
        assert!((out.get(2) - x0.get(1).view([1, 2, 2])).abs().max().double_value(&[]) < 1e-12);
    }

    #[test]
    fn static_thresholding_clips_and_none_passes_through() {
        let x0 = rows(&[&[0.5, -3.0, 2.0, -0.25]]);
        assert!(Threshold::None.apply(&x0).equal(&x0));
        assert!(Threshold::Static.apply(&x0).equal(&rows(&[&[0.5, -1.0, 1.0, -0.25]])));
        let d = |x: &Tensor, _: &Tensor| x * 2.0;
        let wrapped = Thresholded { inner: &d, threshold: Threshold::Static };
        let sigma = Tensor::from_slice(&[1.0f64]);
        assert!(wrapped.denoise(&x0, &sigma).equal(&rows(&[&[1.0, -1.0, 1.0, -0.5]])));
    }
}
