//! The UNet's encoder half with a pooled head: a network that reads a noised image x_t and its timestep t and gives
//! one vector, the noise-aware classifier p_φ(y | x_t, t) of classifier guidance (10 logits) or the noise-aware
//! image tower of CLIP guidance (an embedding). Lesson 10 trains both.
//!
//! [Guidance] Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", arXiv:2105.05233, sec. 4.1
//! ("we use the downsampling trunk of the UNet model with an attention pool at the 8x8 layer"), and guided-
//! diffusion's `EncoderUNetModel` (its `pool = "adaptive"`: GroupNorm, SiLU, global average pool, projection).
//! [GLIDE] Nichol et al. 2022, arXiv:2112.10741, sec. 2.3: the noised CLIP's image encoder f(x_t, t).
//! Module paths follow lesson 04's UNet (`time_embedding`, `conv_in`, `down_blocks.i.resnets.j`, `mid_block`), so the
//! trunk is the same code as the UNet's down half; the head is `out.norm` and `out.proj`.
use crate::nn::attention::SpatialSelfAttention;
use crate::nn::layers::{groups_for, silu_fresh, timestep_embedding, Downsample, ResBlock};
use crate::nn::unet::UNetConfig;
use crate::validate::{in_range, Validate, MAX_WIDTH};
use tch::nn::{self, Module};
use tch::Tensor;

/// The trunk's shape (a [`UNetConfig`]: channels per level, residual blocks per level, where the self-attention
/// is, the head width; `out_channels`, `cross_attention_dim` and the up half are unused) and the head's output width.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EncoderUNetConfig {
    pub trunk: UNetConfig,
    /// Width of the output: 10 logits for a digit classifier, d_e for a CLIP image tower.
    pub out_dim: i64,
}

impl Validate for EncoderUNetConfig {
    fn validate(&self) -> Result<(), String> {
        self.trunk.validate().map_err(|e| format!("trunk: {e}"))?;
        if self.trunk.cross_attention_dim.is_some() {
            return Err("trunk.cross_attention_dim must be null: the encoder reads no context".into());
        }
        in_range("out_dim", self.out_dim, 1, MAX_WIDTH)
    }
}

impl EncoderUNetConfig {
    /// Lesson 04's MNIST trunk (16, 32, 64 channels, self-attention at 7×7) with a head of `out_dim`.
    pub fn mnist(out_dim: i64) -> Self {
        Self { trunk: UNetConfig::mnist(), out_dim }
    }

    /// The tiny trunk of the tests and `--quick`.
    pub fn tiny(out_dim: i64) -> Self {
        Self { trunk: UNetConfig::tiny(), out_dim }
    }
}

/// A level of the trunk: its residual blocks, their self-attention (if the level has it), the downsampler.
#[derive(Debug)]
struct Level {
    resnets: Vec<ResBlock>,
    attentions: Vec<SpatialSelfAttention>,
    down: Option<Downsample>,
}

/// f(x_t, t): (B, C, H, W), (B,) -> (B, out_dim).
#[derive(Debug)]
pub struct EncoderUNet {
    pub config: EncoderUNetConfig,
    time_linear_1: nn::Linear,
    time_linear_2: nn::Linear,
    conv_in: nn::Conv2D,
    levels: Vec<Level>,
    mid_resnets: [ResBlock; 2],
    mid_attention: SpatialSelfAttention,
    out_norm: nn::GroupNorm,
    out_proj: nn::Linear,
}

impl EncoderUNet {
    pub fn new(vs: nn::Path, config: EncoderUNetConfig) -> Self {
        let u = &config.trunk;
        let ch = &u.block_out_channels;
        let (n, c0, emb, drop) = (ch.len(), ch[0], u.emb_dim(), u.dropout);
        let head_dim = |c: i64| u.attention_heads.map_or(u.head_dim, |h| c / h);
        let pad = nn::ConvConfig { padding: 1, ..Default::default() };
        let mut levels = Vec::new();
        let mut c_prev = c0;
        for (i, &c) in ch.iter().enumerate() {
            let p = &vs / "down_blocks" / i;
            let resnets = (0..u.layers_per_block)
                .map(|j| ResBlock::new(&p / "resnets" / j, if j == 0 { c_prev } else { c }, c, emb, drop))
                .collect();
            let attentions = if u.attention[i] {
                (0..u.layers_per_block)
                    .map(|j| SpatialSelfAttention::new(&p / "attentions" / j, c, head_dim(c)))
                    .collect()
            } else {
                vec![]
            };
            let down = (i + 1 < n).then(|| Downsample::new(&p / "downsamplers" / 0, c));
            levels.push(Level { resnets, attentions, down });
            c_prev = c;
        }
        let (c_last, m) = (ch[n - 1], &vs / "mid_block");
        Self {
            time_linear_1: nn::linear(&vs / "time_embedding" / "linear_1", c0, emb, Default::default()),
            time_linear_2: nn::linear(&vs / "time_embedding" / "linear_2", emb, emb, Default::default()),
            conv_in: nn::conv2d(&vs / "conv_in", u.in_channels, c0, 3, pad),
            levels,
            mid_resnets: [
                ResBlock::new(&m / "resnets" / 0, c_last, c_last, emb, drop),
                ResBlock::new(&m / "resnets" / 1, c_last, c_last, emb, drop),
            ],
            mid_attention: SpatialSelfAttention::new(&m / "attentions" / 0, c_last, head_dim(c_last)),
            out_norm: nn::group_norm(&vs / "out" / "norm", groups_for(c_last), c_last, Default::default()),
            out_proj: nn::linear(&vs / "out" / "proj", c_last, config.out_dim, Default::default()),
            config,
        }
    }

    // ANCHOR: forward
    /// x_t (B, C, H, W), t (B,) timesteps (any numeric kind) -> (B, out_dim).
    pub fn forward(&self, x: &Tensor, t: &Tensor, train: bool) -> Tensor {
        let c0 = self.config.trunk.block_out_channels[0];
        let temb = timestep_embedding(t, c0, 10_000.0).to_kind(x.kind()); // (B, c0)
        let emb = self.time_linear_2.forward(&self.time_linear_1.forward(&temb).silu()); // (B, 4·c0)
        let mut h = self.conv_in.forward(x); // (B, c0, H, W)
        for level in &self.levels {
            for (j, resnet) in level.resnets.iter().enumerate() {
                h = resnet.forward(&h, &emb, train);
                if let Some(a) = level.attentions.get(j) {
                    h = a.forward(&h);
                }
            }
            if let Some(d) = &level.down {
                h = d.forward(&h); // (B, c_i, H/2, W/2)
            }
        }
        h = self.mid_resnets[0].forward(&h, &emb, train);
        h = self.mid_attention.forward(&h);
        // (B, c_last, h, w)
        h = self.mid_resnets[1].forward(&h, &emb, train);
        // guided-diffusion's adaptive pool: GroupNorm, SiLU, the mean over positions, a projection
        let pooled = silu_fresh(self.out_norm.forward(&h)).mean_dim([2i64, 3].as_slice(), false, h.kind()); // (B, c_last)
        self.out_proj.forward(&pooled) // (B, out_dim)
    }
    // ANCHOR_END: forward
}

// ANCHOR: noisy_clip
/// GLIDE's noised CLIP at MNIST scale ([GLIDE] sec. 2.3): an [`EncoderUNet`] image tower f(x_t, t) that sees noised
/// images, a projection of a frozen text encoder's pooled states into the same space, and the temperature. Names as
/// transformers' `CLIPModel` where they exist (`vision_model`, `text_projection`, `logit_scale`).
#[derive(Debug)]
pub struct NoisyClip {
    pub vision_model: EncoderUNet,
    pub text_projection: nn::Linear,
    logit_scale: Tensor,
}

impl NoisyClip {
    /// The image tower of `config` (its `out_dim` is d_e) and a projection from text states of width `text_dim`.
    pub fn new(vs: nn::Path, config: EncoderUNetConfig, text_dim: i64) -> Self {
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        Self {
            text_projection: nn::linear(&vs / "text_projection", text_dim, config.out_dim, no_bias),
            logit_scale: vs.var("logit_scale", &[], nn::Init::Const(crate::nn::clip::LOGIT_SCALE_INIT)),
            vision_model: EncoderUNet::new(&vs / "vision_model", config),
        }
    }

    /// x_t (B, C, H, W), t (B,) -> f(x_t, t) (B, d_e), unit rows.
    pub fn encode_image(&self, x_t: &Tensor, t: &Tensor) -> Tensor {
        crate::nn::clip::l2_normalize(&self.vision_model.forward(x_t, t, false))
    }

    /// The frozen text encoder's pooled states (B, D) -> g(c) (B, d_e), unit rows.
    pub fn encode_text(&self, pooled: &Tensor) -> Tensor {
        crate::nn::clip::l2_normalize(&self.text_projection.forward(pooled))
    }

    /// The temperature's logarithm t ([CLIP] sec. 2.5), clipped to ln 100 as the mini-CLIP's.
    pub fn logit_scale(&self) -> Tensor {
        self.logit_scale.clamp_max(crate::nn::clip::LOGIT_SCALE_MAX)
    }
}
// ANCHOR_END: noisy_clip

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn the_encoder_reads_image_and_timestep_and_shares_the_unet_trunk_names() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let enc = EncoderUNet::new(vs.root(), EncoderUNetConfig::tiny(10));
        let x = Tensor::randn([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        let out = tch::no_grad(|| enc.forward(&x, &Tensor::from_slice(&[0i64, 0, 900]), false));
        assert_eq!(out.size(), [3, 10]);
        let x2 = x.get(0).unsqueeze(0).repeat([2, 1, 1, 1]);
        let by_t = tch::no_grad(|| enc.forward(&x2, &Tensor::from_slice(&[10i64, 900]), false));
        assert!((by_t.get(0) - by_t.get(1)).abs().max().double_value(&[]) > 1e-6, "t changes the output");
        // the trunk's names are the UNet's down half
        let unet_vs = nn::VarStore::new(Device::Cpu);
        let _unet = crate::nn::unet::UNet::new(unet_vs.root(), UNetConfig::tiny());
        let unet_names = unet_vs.variables();
        for (name, t) in vs.variables() {
            if !name.starts_with("out.") {
                assert_eq!(unet_names.get(&name).map(|u| u.size()), Some(t.size()), "{name}");
            }
        }
        let mut bad = EncoderUNetConfig::tiny(10);
        bad.trunk.cross_attention_dim = Some(8);
        assert!(bad.validate().unwrap_err().contains("cross_attention_dim"));
    }
}
