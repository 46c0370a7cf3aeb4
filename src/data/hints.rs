//! Spatial hints for ControlNet made from MNIST digits (lesson 13): the digit's Canny edges, as ControlNet's canny
//! annotator makes them from a photograph, and a coarse mask (the digit's blurred silhouette), a second kind of hint
//! that fixes where the ink goes but not the strokes.
//!
//! [ControlNet] Zhang, Rao, Agrawala 2023, arXiv:2302.05543, sec. 4 (Canny edges; user scribbles and masks among the
//! other conditions).
use crate::data::canny::{canny, CannyConfig, Gray, ANNOTATOR};
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// An image (H, W) in [0, 1] as 8 bits, x ↦ round(255 x).
fn to_gray(image: &Tensor) -> Result<Gray> {
    let (h, w) = image.size2()?;
    let pixels: Vec<f32> = Vec::<f32>::try_from(image.to_kind(Kind::Float).clamp(0.0, 1.0).flatten(0, -1))?;
    Ok(Gray {
        height: h as usize,
        width: w as usize,
        pixels: pixels.iter().map(|p| (p * 255.0).round() as u8).collect(),
    })
}

/// ControlNet's canny preprocessor for an RGB image (1, 3, H, W) in [0, 1] (on the CPU): [`canny`] with the
/// annotator's thresholds (100, 200) on its luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B, as OpenCV's RGB2GRAY;
/// OpenCV's Canny on the colour image itself takes the channel of largest gradient, which differs where a colour edge
/// has no luma edge), as a white-on-black RGB hint (1, 3, H, W) in {0, 1}.
pub fn canny_rgb_hint(image: &Tensor) -> Result<Tensor> {
    let size = image.size();
    ensure!(size.len() == 4 && size[..2] == [1, 3], "the control image is {size:?}: one RGB image (1, 3, H, W)");
    let edges = canny_hints(&crate::data::png::luma(image), &ANNOTATOR)?; // (1, 1, H, W)
    Ok(edges.expand([1, 3, size[2], size[3]], false).contiguous())
}

// ANCHOR: canny_hints
/// The Canny edges of images (N, 1, H, W) in [0, 1] (on the CPU): (N, 1, H, W), 1 on an edge, 0 elsewhere.
pub fn canny_hints(images: &Tensor, config: &CannyConfig) -> Result<Tensor> {
    let (n, c, h, w) = images.size4()?;
    ensure!(c == 1, "canny hints are made from one-channel images, got {c} channels");
    let mut out = Vec::with_capacity((n * h * w) as usize);
    for i in 0..n {
        let edges = canny(&to_gray(&images.get(i).get(0))?, config);
        out.extend(edges.pixels.iter().map(|&p| (p == 255) as u8 as f32));
    }
    Ok(Tensor::from_slice(&out).view([n, 1, h, w]))
}
// ANCHOR_END: canny_hints

/// The radius by which [`HintKind::Mask`] grows a digit's ink: its strokes' course is hidden, its place and size kept.
pub const MASK_RADIUS: i64 = 2;

/// The kinds of hint lesson 13 trains a ControlNet for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HintKind {
    /// The digit's Canny edges ([`canny_hints`] with the annotator's thresholds).
    Canny,
    /// A coarse mask: the digit's ink grown by [`MASK_RADIUS`] pixels ([`mask_hints`]).
    Mask,
}

impl HintKind {
    /// The hints of images (N, 1, H, W) in [0, 1]: (N, 1, H, W) of 0/1, on the CPU.
    pub fn make(self, images: &Tensor) -> Result<Tensor> {
        match self {
            HintKind::Canny => canny_hints(&images.to_device(tch::Device::Cpu), &crate::data::canny::ANNOTATOR),
            HintKind::Mask => Ok(mask_hints(&images.to_device(tch::Device::Cpu), MASK_RADIUS)),
        }
    }
}

/// A coarse mask of images (N, 1, H, W) in [0, 1]: pixels brighter than 0.5, dilated by `radius` pixels (a
/// (2r + 1)² max-pool), so it says where the digit is but not how its strokes run: (N, 1, H, W) of 0 and 1.
pub fn mask_hints(images: &Tensor, radius: i64) -> Tensor {
    let ink = images.gt(0.5).to_kind(Kind::Float); // (N, 1, H, W)
    let k = 2 * radius + 1;
    ink.max_pool2d([k, k], [1, 1], [radius, radius], [1, 1], false) // (N, 1, H, W)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::canny::ANNOTATOR;
    use tch::Device;

    #[test]
    fn hints_of_a_square_are_its_ring_and_its_grown_silhouette() {
        let img = Tensor::zeros([1, 1, 20, 20], (Kind::Float, Device::Cpu));
        let _ = img.narrow(2, 5, 10).narrow(3, 5, 10).fill_(1.0);
        let edges = canny_hints(&img, &ANNOTATOR).unwrap();
        assert_eq!(edges.size(), [1, 1, 20, 20]);
        assert_eq!(edges.get(0).get(0).get(8).nonzero().squeeze_dim(1), Tensor::from_slice(&[4i64, 14]));
        let mask = mask_hints(&img, 2);
        assert_eq!(mask.sum(Kind::Float).double_value(&[]), 14.0 * 14.0, "10 × 10 grown by 2 on each side");
        assert!(canny_hints(&Tensor::zeros([1, 3, 4, 4], (Kind::Float, Device::Cpu)), &ANNOTATOR).is_err());
    }
}
