//! A small noise-conditional score network (NCSN) for 28×28 images: a three-level U-shaped stack of residual blocks
//! conditioned on σ. Lesson 04 builds a full UNet piece by piece; this is the minimum that learns MNIST scores.
//!
//! [NCSN] Song & Ermon 2019, arXiv:1907.05600 (noise-conditional score network, trained with [DSM]).
//! [NCSNv2] Song & Ermon 2020, arXiv:2006.09011, technique 3: s_θ(x, σ) = F_θ(x, σ)/σ.
//! [EDM] Karras et al. 2022, arXiv:2206.00364, Table 1: input scaling c_in(σ) = 1/√(σ² + σ_data²).
use crate::nn::layers::{noise_embedding, Downsample, ResBlock, Upsample};
use crate::validate::{finite_in, in_range, list_in, Validate, MAX_WIDTH};
use tch::nn::{self, Module};
use tch::Tensor;

/// Widths of the network; see the presets.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NcsnConfig {
    /// Channels at 28×28, 14×14 and 7×7.
    pub channels: [i64; 3],
    /// Width of the noise embedding.
    pub emb_dim: i64,
    /// Typical scale of the data, for c_in.
    pub sigma_data: f64,
}

impl Validate for NcsnConfig {
    fn validate(&self) -> Result<(), String> {
        list_in("channels", &self.channels, Some(3), 1, MAX_WIDTH)?;
        in_range("emb_dim", self.emb_dim, 2, MAX_WIDTH)?;
        finite_in("sigma_data", self.sigma_data, 1e-6, 1e6)
    }
}

impl NcsnConfig {
    /// The lesson 02 MNIST network (about 0.27 M parameters), sized to train in minutes on 2 CPU cores.
    pub fn mnist() -> Self {
        Self { channels: [16, 32, 64], emb_dim: 64, sigma_data: 0.5 }
    }
    /// A tiny one for tests and `--quick`.
    pub fn tiny() -> Self {
        Self { channels: [8, 16, 16], emb_dim: 16, sigma_data: 0.5 }
    }
}

/// The network. Shapes are for MNIST; any H, W divisible by 4 work.
#[derive(Debug)]
pub struct Ncsn {
    pub config: NcsnConfig,
    emb1: nn::Linear,
    emb2: nn::Linear,
    conv_in: nn::Conv2D,
    down: [ResBlock; 3],
    downsample: [Downsample; 2],
    mid: ResBlock,
    up: [ResBlock; 3],
    upsample: [Upsample; 2],
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Ncsn {
    pub fn new(vs: nn::Path, config: NcsnConfig) -> Self {
        let [c0, c1, c2] = config.channels;
        let e = config.emb_dim;
        let pad = nn::ConvConfig { padding: 1, ..Default::default() };
        let rb = |name: &str, i: usize, a: i64, b: i64| ResBlock::new(&vs / name / i, a, b, e, 0.0);
        Self {
            emb1: nn::linear(&vs / "time_embedding" / "linear_1", e, e, Default::default()),
            emb2: nn::linear(&vs / "time_embedding" / "linear_2", e, e, Default::default()),
            conv_in: nn::conv2d(&vs / "conv_in", 1, c0, 3, pad),
            down: [rb("down", 0, c0, c0), rb("down", 1, c0, c1), rb("down", 2, c1, c2)],
            downsample: [Downsample::new(&vs / "downsample" / 0, c0), Downsample::new(&vs / "downsample" / 1, c1)],
            mid: rb("mid", 0, c2, c2),
            up: [rb("up", 0, c0 + c0, c0), rb("up", 1, c1 + c1, c0), rb("up", 2, c2 + c2, c1)],
            upsample: [Upsample::new(&vs / "upsample" / 0, c0), Upsample::new(&vs / "upsample" / 1, c1)],
            norm_out: nn::group_norm(&vs / "conv_norm_out", crate::nn::layers::groups_for(c0), c0, Default::default()),
            conv_out: nn::conv2d(&vs / "conv_out", c0, 1, 3, pad),
            config,
        }
    }

    /// x: (B, 1, H, W), sigma: (B,) -> the score estimate (B, 1, H, W).
    pub fn score(&self, x: &Tensor, sigma: &Tensor, train: bool) -> Tensor {
        let s = sigma.view([-1, 1, 1, 1]); // (B, 1, 1, 1)
        let emb = noise_embedding(sigma, self.config.emb_dim).to_kind(x.kind()); // (B, E)
        let emb = self.emb2.forward(&self.emb1.forward(&emb).silu()); // (B, E)
        let c_in = (s.square() + self.config.sigma_data.powi(2)).rsqrt(); // [EDM] Table 1
        let h = self.conv_in.forward(&(x * c_in)); // (B, c0, H, W)
        let s0 = self.down[0].forward(&h, &emb, train); // (B, c0, H, W)
        let s1 = self.down[1].forward(&self.downsample[0].forward(&s0), &emb, train); // (B, c1, H/2, W/2)
        let s2 = self.down[2].forward(&self.downsample[1].forward(&s1), &emb, train); // (B, c2, H/4, W/4)
        let m = self.mid.forward(&s2, &emb, train); // (B, c2, H/4, W/4)
        let u2 = self.up[2].forward(&Tensor::cat(&[m, s2], 1), &emb, train); // (B, c1, H/4, W/4)
        let u1 = self.up[1].forward(&Tensor::cat(&[self.upsample[1].forward(&u2), s1], 1), &emb, train); // (B, c0, H/2, W/2)
        let u0 = self.up[0].forward(&Tensor::cat(&[self.upsample[0].forward(&u1), s0], 1), &emb, train); // (B, c0, H, W)
        let out = self.conv_out.forward(&self.norm_out.forward(&u0).silu()); // (B, 1, H, W)
        out / s // [NCSNv2] technique 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    #[test]
    fn output_shape_equals_input_shape_for_odd_batches() {
        let vs = VarStore::new(Device::Cpu);
        let net = Ncsn::new(vs.root(), NcsnConfig::tiny());
        let x = Tensor::randn([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        let sigma = Tensor::from_slice(&[1.0f32, 0.1, 0.01]);
        assert_eq!(net.score(&x, &sigma, false).size(), [3, 1, 28, 28]);
    }
}
