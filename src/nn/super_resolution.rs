//! The super-resolution stage of a cascade (lesson 11): a UNet at the high resolution that reads, beside x_t, the
//! low-resolution image upsampled to its size and the level of noise that image was augmented with.
//!
//! [CDM] Ho et al. 2021, "Cascaded Diffusion Models for High Fidelity Image Generation", arXiv:2106.15282, sec. 2
//! (the low-resolution image z is bilinearly upsampled and concatenated to x_t along the channels) and sec. 4.2
//! (Gaussian conditioning augmentation: z is noised to a level s that the model is also told).
//! CDM and Imagen give s to the network through an embedding, as the timestep; here it is a constant input channel
//! holding the noise's standard deviation σ_s = √(1 − ᾱ_s) (FFDNet's noise-level map, Zhang, Zuo, Zhang 2018,
//! arXiv:1710.04026, sec. III-B), which tells the network the same thing without a second embedding path through the
//! UNet.
use crate::model::EpsModel;
use crate::nn::unet::UNet;
use tch::Tensor;

/// Channels the super-resolution UNet reads: x_t, the upsampled low-resolution image, the level map.
pub const SR_IN_CHANNELS: i64 = 3;

/// Bilinear upsampling of (B, C, h, w) to (B, C, H, W) (half-pixel centres, as PyTorch's `align_corners=False`).
pub fn upsample(low: &Tensor, size: [i64; 2]) -> Tensor {
    low.upsample_bilinear2d(size, false, None, None)
}

// ANCHOR: sr_input
/// What the super-resolution UNet reads: [x_t, up(z_s), σ_s] along the channels, (B, 3, H, W) from x_t (B, 1, H, W),
/// the augmented low-resolution image upsampled to H×W (B, 1, H, W) and the augmentation noise's σ_s (B,).
pub fn sr_input(x_t: &Tensor, low_up: &Tensor, sigma: &Tensor) -> Tensor {
    let (b, _, h, w) = x_t.size4().expect("x_t (B, 1, H, W)");
    let level_map = sigma.to_kind(x_t.kind()).view([b, 1, 1, 1]).expand([b, 1, h, w], false); // (B, 1, H, W)
    Tensor::cat(&[x_t, &low_up.to_kind(x_t.kind()), &level_map], 1) // (B, 3, H, W)
}
// ANCHOR_END: sr_input

/// The super-resolution UNet with one batch's conditioning: ε_θ(x_t, t | z_s, s), an [`EpsModel`] for the trainer
/// and the sampler.
pub struct LowResConditioned<'a> {
    pub unet: &'a UNet,
    /// The augmented low-resolution images, upsampled: (B, 1, H, W) in about [−1, 1].
    pub low_up: &'a Tensor,
    /// The augmentation noise's standard deviation σ_s of each: (B,).
    pub sigma: &'a Tensor,
}

impl EpsModel for LowResConditioned<'_> {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
        self.unet.forward(&sr_input(x_t, self.low_up, self.sigma), t, train) // (B, 1, H, W)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The UNet sees exactly the upsampled low-resolution image in its second channel and σ_s in its third.
    #[test]
    fn the_unet_reads_x_t_the_upsampled_low_resolution_image_and_the_level() {
        let x_t = Tensor::randn([2, 1, 4, 4], tch::kind::FLOAT_CPU);
        // a 2×2 image with a bright top-left pixel: bilinear ×2 puts 1 at (0, 0) and 0.75 at (0, 1) and (1, 0)
        let low = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0]).view([1, 1, 2, 2]).repeat([2, 1, 1, 1]);
        let up = upsample(&low, [4, 4]);
        assert_eq!(up.size(), [2, 1, 4, 4]);
        let row: Vec<f32> = Vec::try_from(up.get(0).get(0).get(0)).unwrap();
        assert_eq!(row, [1.0, 0.75, 0.25, 0.0]);
        let input = sr_input(&x_t, &up, &Tensor::from_slice(&[0.0f32, 0.25]));
        assert_eq!(input.size(), [2, SR_IN_CHANNELS, 4, 4]);
        assert!(input.narrow(1, 0, 1).equal(&x_t) && input.narrow(1, 1, 1).equal(&up));
        assert!(input.get(0).get(2).eq(0.0).all().int64_value(&[]) == 1);
        assert!(input.get(1).get(2).eq(0.25).all().int64_value(&[]) == 1);
    }
}
