//! Pixel-level distances between images: the reconstruction and inpainting measures of lesson 08.
use tch::{Kind, Tensor};

/// Mean absolute difference of `a` and `b` (B, 1, S, S) where `weight` (1 or B, 1, S, S) is 1.
pub fn masked_mae(a: &Tensor, b: &Tensor, weight: &Tensor) -> f64 {
    let w = weight.to_kind(Kind::Float).expand_as(a);
    ((a - b).abs() * &w).sum(Kind::Float).double_value(&[]) / w.sum(Kind::Float).double_value(&[]).max(1.0)
}

/// The peak signal-to-noise ratio of reconstructions in [0, 1]: 10 log₁₀(1 / MSE), in dB.
pub fn psnr(x: &Tensor, x_hat: &Tensor) -> f64 {
    let mse = (x - x_hat).square().mean(Kind::Float).double_value(&[]);
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn psnr_and_the_masked_error_match_their_definitions() {
        let x = Tensor::zeros([1, 1, 2, 2], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0.1f32, 0.1, 0.1, 0.1]).view([1, 1, 2, 2]);
        // MSE 0.01: 10 log₁₀(1 / 0.01) = 20 dB
        assert!((psnr(&x, &y) - 20.0).abs() < 1e-4);
        let z = Tensor::from_slice(&[0.0f32, 0.5, 0.0, 0.25]).view([1, 1, 2, 2]);
        let right_column = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 1.0]).view([1, 1, 2, 2]);
        assert!((masked_mae(&z, &x, &right_column) - 0.375).abs() < 1e-6);
        assert!(masked_mae(&z, &x, &(1.0 - &right_column)).abs() < 1e-9);
    }
}
