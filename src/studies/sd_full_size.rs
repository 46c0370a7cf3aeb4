//! Stable Diffusion 1.5 at full size with random weights (lesson 09's `--full-size`): the parameter counts of its
//! three networks, and one guided UNet step (∅ and the prompt in one batch of 2, the 64 × 64 latents of a 512²
//! image, 77 context tokens) timed against the FLOPs [`unet_flops`] counts block by block. Chapter 09 sets the two
//! side by side.
use crate::nn::layers::channels_last;
use crate::sd::flops::{unet_flops, BlockFlops};
use crate::sd::{SdConfig, SdModels};
use crate::text::bpe::CLIP_CONTEXT_LEN;
use anyhow::{Context, Result};
use std::fmt;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One guided step evaluates the UNet on ∅ and on the prompt together.
const GUIDED_BATCH: i64 = 2;
/// The latents of a 512 × 512 image, 8× smaller on each side.
const LATENT_SIZE: i64 = 64;
/// A timestep in the middle of SD's T = 1000 (the cost does not depend on it).
const TIMESTEP: i64 = 500;

/// What the study measured; lesson 09 writes it into metrics.json as `full_size`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FullSizeReport {
    /// Text encoder, UNet, VAE.
    pub parameters: [i64; 3],
    /// FLOPs of one guided UNet step, in units of 10¹².
    pub unet_step_tflop: f64,
    /// The second call's time (the first also pays for allocation and kernel choices).
    pub unet_step_s: f64,
    pub gflop_per_s: f64,
    /// Where the step's FLOPs go, block by block.
    pub blocks: Vec<BlockFlops>,
    /// Seconds to build the three networks.
    #[serde(skip)]
    pub build_s: f64,
    /// Seconds of the first UNet call.
    #[serde(skip)]
    pub first_call_s: f64,
}

/// Builds the networks of `config` on `device` (random weights), counts a guided UNet step's FLOPs and times it.
pub fn run(config: SdConfig, device: Device) -> Result<FullSizeReport> {
    run_at(config, LATENT_SIZE, device)
}

/// [`run`] on latents of `n` × `n`.
fn run_at(config: SdConfig, n: i64, device: Device) -> Result<FullSizeReport> {
    let t0 = Instant::now();
    let models = SdModels::new(config, device)?;
    let build_s = t0.elapsed().as_secs_f64();
    let unet = &models.config.unet;
    let context_dim = unet.cross_attention_dim.context("the study times a text-conditioned UNet")?;
    let (b, l) = (GUIDED_BATCH, CLIP_CONTEXT_LEN as i64);
    let blocks = unet_flops(unet, b, n, n, l);
    let total: f64 = blocks.iter().map(BlockFlops::total).sum();
    let x = channels_last(&Tensor::randn([b, unet.in_channels, n, n], (Kind::Float, device))); // (2, 4, n, n)
    let context = Tensor::randn([b, l, context_dim], (Kind::Float, device)); // (2, 77, 768)
    let t = Tensor::from_slice(&[TIMESTEP; GUIDED_BATCH as usize]).to_device(device);
    let mut times = Vec::new();
    for _ in 0..2 {
        let t0 = Instant::now();
        tch::no_grad(|| drop(models.unet.forward_cond(&x, &t, Some(&context), None, false)));
        times.push(t0.elapsed().as_secs_f64());
    }
    let step = times[1];
    Ok(FullSizeReport {
        parameters: models.num_parameters(),
        unet_step_tflop: total / 1e12,
        unet_step_s: step,
        gflop_per_s: total / step / 1e9,
        blocks,
        build_s,
        first_call_s: times[0],
    })
}

/// The report as lesson 09 prints it: the counts, a line per block, then the step's time and rate.
impl fmt::Display for FullSizeReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "{:?} parameters (text, UNet, VAE), built in {:.1} s", self.parameters, self.build_s)?;
        let total: f64 = self.blocks.iter().map(BlockFlops::total).sum();
        for r in &self.blocks {
            writeln!(
                f,
                "   {:<14} {:>7.1} GFLOP ({:>4.1} %: conv {:.0}, linear {:.0}, attention {:.0})",
                r.block,
                r.total() / 1e9,
                100.0 * r.total() / total,
                r.conv / 1e9,
                r.linear / 1e9,
                r.attention / 1e9
            )?;
        }
        write!(
            f,
            "   one guided UNet step: {:.1} TFLOP in {:.1} s ({:.0} GFLOP/s; first call {:.1} s)",
            self.unet_step_tflop, self.unet_step_s, self.gflop_per_s, self.first_call_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_layout_reports_its_counts_and_a_row_per_block() {
        let report = run_at(SdConfig::tiny(), 8, Device::Cpu).unwrap(); // the latents of a 64² image
        let models = SdModels::new(SdConfig::tiny(), Device::Cpu).unwrap();
        assert_eq!(report.parameters, models.num_parameters());
        assert!(!report.blocks.is_empty() && report.unet_step_s > 0.0 && report.gflop_per_s > 0.0);
        let json = serde_json::to_value(&report).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        for key in ["parameters", "unet_step_tflop", "unet_step_s", "gflop_per_s", "blocks"] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert_eq!(keys.len(), 5, "the timings of the build and the first call are printed, not saved");
        let text = report.to_string();
        assert_eq!(text.lines().count(), report.blocks.len() + 2, "{text}");
    }
}
