//! A noise-conditional score network for 2-D data: s_θ(x, σ) ≈ ∇ₓ log p_σ(x).
//!
//! [NCSNv2] Song & Ermon 2020, "Improved Techniques for Training Score-Based Generative Models", arXiv:2006.09011.
//! [EDM] Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv:2206.00364.
//!
//! Two scalings keep the network's job the same size at every σ:
//! - input: c_in(σ) = 1/√(σ² + σ_data²) ([EDM] Table 1), so the network sees unit-variance inputs;
//! - output: s_θ(x, σ) = F_θ(c_in x, σ)/σ ([NCSNv2] sec. 3.3, technique 3), because ‖∇ log p_σ‖ ∝ 1/σ.
use crate::nn::layers::noise_embedding;
use crate::validate::{finite_in, in_range, Validate, MAX_DEPTH, MAX_WIDTH};
use tch::nn::{self, Module};
use tch::Tensor;

/// Size of the MLP; see [`ScoreMlpConfig::toy2d`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoreMlpConfig {
    /// Width of each hidden layer.
    pub hidden: i64,
    /// Number of hidden layers.
    pub depth: usize,
    /// Dimension of the sinusoidal embedding of ln σ.
    pub emb_dim: i64,
    /// Typical scale of the data, for c_in.
    pub sigma_data: f64,
}

impl Validate for ScoreMlpConfig {
    fn validate(&self) -> Result<(), String> {
        in_range("hidden", self.hidden, 1, MAX_WIDTH)?;
        in_range("depth", self.depth, 1, MAX_DEPTH)?;
        in_range("emb_dim", self.emb_dim, 2, MAX_WIDTH)?;
        finite_in("sigma_data", self.sigma_data, 1e-6, 1e6)
    }
}

impl ScoreMlpConfig {
    /// The lesson 01/02 network: 3 × 128 SiLU layers, about 38 k parameters.
    pub fn toy2d() -> Self {
        Self { hidden: 128, depth: 3, emb_dim: 32, sigma_data: 4.0 }
    }
    /// A small one for tests.
    pub fn tiny() -> Self {
        Self { hidden: 32, depth: 2, emb_dim: 8, sigma_data: 1.0 }
    }
}

/// The MLP: [c_in·x, emb(σ)] → hidden layers (SiLU) → 2 outputs, divided by σ.
#[derive(Debug)]
pub struct ScoreMlp {
    pub config: ScoreMlpConfig,
    layers: Vec<nn::Linear>,
    out: nn::Linear,
}

impl ScoreMlp {
    pub fn new(vs: nn::Path, config: ScoreMlpConfig) -> Self {
        let mut layers = Vec::new();
        let mut width = 2 + config.emb_dim;
        for i in 0..config.depth {
            layers.push(nn::linear(&vs / "layers" / i, width, config.hidden, Default::default()));
            width = config.hidden;
        }
        let out = nn::linear(&vs / "out", width, 2, Default::default());
        Self { config, layers, out }
    }

    // ANCHOR: score_mlp_forward
    /// x: (N, 2), sigma: (N,) -> the score estimate (N, 2).
    pub fn score(&self, x: &Tensor, sigma: &Tensor) -> Tensor {
        let s = sigma.unsqueeze(-1); // (N, 1)
        let c_in = (s.square() + self.config.sigma_data.powi(2)).rsqrt(); // [EDM] Table 1
        let mut h = Tensor::cat(&[x * c_in, noise_embedding(sigma, self.config.emb_dim)], -1); // (N, 2 + emb_dim)
        for layer in &self.layers {
            h = layer.forward(&h).silu();
        }
        self.out.forward(&h) / s // [NCSNv2] technique 3: s_θ(x, σ) = F_θ(x, σ)/σ
    }
    // ANCHOR_END: score_mlp_forward
}
