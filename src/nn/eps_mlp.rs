//! The simplest ε-prediction network for images: flatten the pixels, append the time embedding, and run an MLP of
//! pre-LayerNorm residual blocks, h ← h + W₂ SiLU(W₁ LN(h)) ([PreLN] Xiong et al. 2020, arXiv:2002.04745). The
//! residual path matters: without it the MLP must first learn to pass x_t through three layers, and after a short run
//! its samples are still noise.
//! Lesson 03 trains it on MNIST to show what a network without spatial structure can and cannot learn; lesson 04
//! replaces it with a UNet at the same training budget.
//!
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239: ε_θ(x_t, t), trained with L_simple (eq. 14).
use crate::nn::layers::timestep_embedding;
use crate::validate::{in_range, Validate, MAX_DEPTH, MAX_WIDTH};
use tch::nn::{self, Module};
use tch::Tensor;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpsMlpConfig {
    /// Pixels per image (C·H·W).
    pub dim: i64,
    pub hidden: i64,
    pub depth: usize,
    /// Width of the sinusoidal time embedding.
    pub emb_dim: i64,
}

impl Validate for EpsMlpConfig {
    fn validate(&self) -> Result<(), String> {
        in_range("dim", self.dim, 1, 1 << 24)?;
        in_range("hidden", self.hidden, 1, MAX_WIDTH)?;
        in_range("depth", self.depth, 1, MAX_DEPTH)?;
        in_range("emb_dim", self.emb_dim, 2, MAX_WIDTH)
    }
}

impl EpsMlpConfig {
    /// Lesson 03's MNIST network: 784 + 128 → 1024, 2 residual blocks of width 1024, → 784 (about 5.9 M parameters).
    pub fn mnist() -> Self {
        Self { dim: 784, hidden: 1024, depth: 2, emb_dim: 128 }
    }
    /// Lesson 03's 2-D network.
    pub fn toy2d() -> Self {
        Self { dim: 2, hidden: 128, depth: 3, emb_dim: 32 }
    }
    /// A tiny one for tests and --quick.
    pub fn tiny(dim: i64) -> Self {
        Self { dim, hidden: 64, depth: 2, emb_dim: 16 }
    }
}

#[derive(Debug)]
pub struct EpsMlp {
    pub config: EpsMlpConfig,
    input: nn::Linear,
    blocks: Vec<(nn::LayerNorm, nn::Linear, nn::Linear)>,
    norm_out: nn::LayerNorm,
    out: nn::Linear,
}

impl EpsMlp {
    pub fn new(vs: nn::Path, config: EpsMlpConfig) -> Self {
        let h = config.hidden;
        let input = nn::linear(&vs / "input", config.dim + config.emb_dim, h, Default::default());
        let blocks = (0..config.depth)
            .map(|i| {
                let b = &vs / "blocks" / i;
                (
                    nn::layer_norm(&b / "norm", vec![h], Default::default()),
                    nn::linear(&b / "fc1", h, h, Default::default()),
                    nn::linear(&b / "fc2", h, h, Default::default()),
                )
            })
            .collect();
        let norm_out = nn::layer_norm(&vs / "norm_out", vec![h], Default::default());
        let out = nn::linear(&vs / "out", h, config.dim, Default::default());
        Self { config, input, blocks, norm_out, out }
    }

    /// x_t: (B, ...) with C·H·W = dim, t: (B,) timesteps -> ε̂ with the shape of x_t.
    pub fn forward(&self, x_t: &Tensor, t: &Tensor) -> Tensor {
        let shape = x_t.size();
        let temb = timestep_embedding(t, self.config.emb_dim, 10_000.0).to_kind(x_t.kind()); // (B, emb_dim)
        let mut h = self.input.forward(&Tensor::cat(&[x_t.flatten(1, -1), temb], 1)); // (B, hidden)
        for (norm, fc1, fc2) in &self.blocks {
            h = &h + fc2.forward(&fc1.forward(&norm.forward(&h)).silu()); // [PreLN] residual block
        }
        self.out.forward(&self.norm_out.forward(&h).silu()).view(shape.as_slice())
        // (B, ...)
    }
}

impl crate::model::EpsModel for EpsMlp {
    fn eps(&self, x_t: &Tensor, t: &Tensor, _train: bool) -> Tensor {
        self.forward(x_t, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    #[test]
    fn keeps_the_input_shape() {
        let vs = VarStore::new(Device::Cpu);
        let net = EpsMlp::new(vs.root(), EpsMlpConfig::tiny(784));
        let x = Tensor::randn([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert_eq!(net.forward(&x, &Tensor::from_slice(&[0i64, 1, 2])).size(), [3, 1, 28, 28]);
    }
}
