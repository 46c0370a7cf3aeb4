//! The KL-regularised autoencoder of latent diffusion: an encoder to the moments of a diagonal Gaussian posterior
//! q(z|x), a decoder back to pixels, and the KL term that keeps the latents near N(0, I).
//!
//! [LDM] Rombach et al. 2022, arXiv:2112.10752, sec. 3 and appendix G (the autoencoder: ResBlocks, a mid-block with
//! attention, a KL-penalty of weight ~10⁻⁶) and sec. 4.3.2 / appendix D.1 (rescale the latents by 1/σ̂ so the
//! diffusion model sees unit variance: Stable Diffusion's 0.18215).
//! [VAE] Kingma & Welling 2014, arXiv:1312.6114, sec. 2.4 (the reparameterisation z = μ + σ ⊙ ε) and appendix B
//! (KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ (μ² + σ² − 1 − log σ²)).
//! Module paths are diffusers' `AutoencoderKL` (encoder.conv_in, encoder.down_blocks.i.resnets.j,
//! encoder.down_blocks.i.downsamplers.0.conv, encoder.mid_block.{resnets.0, attentions.0, resnets.1},
//! encoder.conv_norm_out, encoder.conv_out, quant_conv, post_quant_conv, decoder.… with up_blocks.i.upsamplers.0),
//! so the same code loads Stable Diffusion's VAE (lesson 09).
//! Notation (code -> paper): mean, logvar -> μ, log σ²; moments -> the encoder's 2·C output; scaling_factor -> 1/σ̂.
use crate::nn::attention::fused_attention;
use crate::nn::layers::{silu_fresh, ResBlock, Upsample};
use crate::validate::{divides, finite_in, in_range, list_in, Validate, MAX_DEPTH, MAX_WIDTH};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// GroupNorm epsilon of every norm in the autoencoder (diffusers' AutoencoderKL: 1e-6).
const NORM_EPS: f64 = 1e-6;

/// The shape of an autoencoder; see the presets. Saved beside its weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Channels at each level of the encoder (the decoder mirrors them); every level but the last halves the
    /// resolution, so the latents are 2^(levels−1) times smaller per side.
    pub block_out_channels: Vec<i64>,
    /// Residual blocks per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    /// Channels C of the latent z.
    pub latent_channels: i64,
    /// GroupNorm groups (must divide every level's channels).
    pub norm_num_groups: i64,
    /// z for the diffusion model = scaling_factor · z_vae, chosen so that z has unit standard deviation on the data
    /// ([LDM] sec. 4.3.2); measured on the training set for our own VAE ([`scaling_factor`]).
    pub scaling_factor: f64,
}

impl Validate for VaeConfig {
    /// `norm_num_groups` must divide every level's channels; the scaling factor is a finite positive number.
    fn validate(&self) -> Result<(), String> {
        in_range("in_channels", self.in_channels, 1, MAX_WIDTH)?;
        in_range("out_channels", self.out_channels, 1, MAX_WIDTH)?;
        list_in("block_out_channels", &self.block_out_channels, None, 1, MAX_WIDTH)?;
        in_range("layers_per_block", self.layers_per_block, 1, MAX_DEPTH)?;
        in_range("latent_channels", self.latent_channels, 1, MAX_WIDTH)?;
        for &c in &self.block_out_channels {
            divides("block_out_channels", c, "norm_num_groups", self.norm_num_groups)?;
        }
        finite_in("scaling_factor", self.scaling_factor, 1e-6, 1e6)
    }
}

impl VaeConfig {
    /// A tiny autoencoder for tests: 8×8 → 4×4 latents with 2 channels.
    pub fn tiny() -> Self {
        Self {
            in_channels: 1,
            out_channels: 1,
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            latent_channels: 2,
            norm_num_groups: 4,
            scaling_factor: 1.0,
        }
    }
    /// The MNIST autoencoder of lesson 08: 28×28 → 14×14 → 7×7 with 16, 32, 32 channels and 4 latent channels, so a
    /// digit becomes 4 × 7 × 7 = 196 numbers (4× fewer than its pixels; SD: 512×512×3 → 64×64×4, 48×). Twice these
    /// widths cost 2.5× the time per step (1.9 against 4.8 steps of 64 per second on 2 cores), and these already
    /// reconstruct well enough for the classifier (chapter 08).
    pub fn mnist() -> Self {
        Self {
            in_channels: 1,
            out_channels: 1,
            block_out_channels: vec![16, 32, 32],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 16,
            scaling_factor: 1.0,
        }
    }

    /// [`Self::mnist`] at half the width, for `--quick` runs.
    pub fn mnist_tiny() -> Self {
        Self { block_out_channels: vec![8, 16, 16], norm_num_groups: 8, ..Self::mnist() }
    }
    /// Stable Diffusion 1.x's VAE (the `vae/config.json` of runwayml/stable-diffusion-v1-5): 512×512×3 → 64×64×4.
    pub fn sd15() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: SD_SCALING_FACTOR,
        }
    }
    /// Pixels per latent along a side: 2^(levels−1).
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
    /// The latent side for an image side (each downsampler rounds up: 28 → 14 → 7, 7 → 4).
    pub fn latent_size(&self, image_size: i64) -> i64 {
        (1..self.block_out_channels.len()).fold(image_size, |s, _| (s + 1) / 2)
    }
}

/// [LDM] sec. 4.3.2: Stable Diffusion's latent rescaling 1/σ̂ (diffusers' `scaling_factor`).
pub const SD_SCALING_FACTOR: f64 = 0.18215;

// ANCHOR: posterior
/// The diagonal Gaussian q(z|x) = N(μ, diag σ²) of an encoder output (diffusers' `DiagonalGaussianDistribution`).
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// log σ², clamped to [−30, 20] as in [LDM]'s code, so σ neither underflows nor explodes early in training.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// moments (B, 2C, h, w): μ in the first C channels, log σ² in the last C.
    pub fn from_moments(moments: &Tensor) -> Self {
        let parts = moments.chunk(2, 1); // 2 × (B, C, h, w)
        Self { mean: parts[0].shallow_clone(), logvar: parts[1].clamp(-30.0, 20.0) }
    }
    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }
    /// [VAE] sec. 2.4, the reparameterisation: z = μ + σ ⊙ ε, ε ~ N(0, I), differentiable in μ and σ.
    pub fn sample(&self) -> Tensor {
        &self.mean + self.std() * self.mean.randn_like()
    }
    /// [VAE] appendix B: KL(q(z|x) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over each latent: (B,).
    pub fn kl(&self) -> Tensor {
        let terms = self.mean.square() + self.logvar.exp() - 1.0 - &self.logvar; // (B, C, h, w)
        terms.sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float) * 0.5
    }
}
// ANCHOR_END: posterior

/// Self-attention over the pixels with one head as wide as the channels, biases on q, k, v, and a residual: the
/// attention of the autoencoder's mid-block (diffusers' `Attention` with `group_norm`, to_q, to_k, to_v, to_out.0).
#[derive(Debug)]
struct VaeAttention {
    group_norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl VaeAttention {
    fn new(vs: nn::Path, c: i64, groups: i64) -> Self {
        let norm = nn::GroupNormConfig { eps: NORM_EPS, ..Default::default() };
        Self {
            group_norm: nn::group_norm(&vs / "group_norm", groups, c, norm),
            to_q: nn::linear(&vs / "to_q", c, c, Default::default()),
            to_k: nn::linear(&vs / "to_k", c, c, Default::default()),
            to_v: nn::linear(&vs / "to_v", c, c, Default::default()),
            to_out: nn::linear(&vs / "to_out" / 0, c, c, Default::default()),
        }
    }

    /// x: (B, C, H, W) -> (B, C, H, W).
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("(B, C, H, W)");
        let tokens = self.group_norm.forward(x).view([b, c, h * w]).transpose(1, 2); // (B, HW, C)
        let (q, k, v) = (self.to_q.forward(&tokens), self.to_k.forward(&tokens), self.to_v.forward(&tokens));
        let out = self.to_out.forward(&fused_attention(&q, &k, &v, None)); // (B, HW, C)
        x + out.transpose(1, 2).reshape([b, c, h, w])
    }
}

/// ResBlock, attention, ResBlock at the lowest resolution (diffusers' `UNetMidBlock2D` without a time embedding).
#[derive(Debug)]
struct MidBlock {
    resnets: [ResBlock; 2],
    attention: VaeAttention,
}

impl MidBlock {
    fn new(vs: nn::Path, c: i64, groups: i64) -> Self {
        Self {
            resnets: [
                ResBlock::unconditioned(&vs / "resnets" / 0, c, c, groups, NORM_EPS),
                ResBlock::unconditioned(&vs / "resnets" / 1, c, c, groups, NORM_EPS),
            ],
            attention: VaeAttention::new(&vs / "attentions" / 0, c, groups),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.resnets[0].forward_opt(x, None, false);
        self.resnets[1].forward_opt(&self.attention.forward(&h), None, false)
    }
}

/// 2× downsampling as diffusers' VAE does it: pad one row and column at the bottom and right, then a 3×3 conv of
/// stride 2 without padding: (B, C, H, W) -> (B, C, ⌈H/2⌉, ⌈W/2⌉).
#[derive(Debug)]
struct VaeDownsample {
    conv: nn::Conv2D,
}

impl VaeDownsample {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1])) // (B, C, H + 1, W + 1)
    }
}

/// Pixels -> the moments of q(z|x) (before quant_conv).
#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    down: Vec<(Vec<ResBlock>, Option<VaeDownsample>)>,
    mid: MidBlock,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &VaeConfig) -> Self {
        let ch = &cfg.block_out_channels;
        let (g, n) = (cfg.norm_num_groups, ch.len());
        let pad = nn::ConvConfig { padding: 1, ..Default::default() };
        let conv_in = nn::conv2d(&vs / "conv_in", cfg.in_channels, ch[0], 3, pad);
        let mut c_prev = ch[0];
        let mut down = Vec::new();
        for (i, &c) in ch.iter().enumerate() {
            let p = &vs / "down_blocks" / i;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResBlock::unconditioned(&p / "resnets" / j, if j == 0 { c_prev } else { c }, c, g, NORM_EPS))
                .collect();
            let stride2 = nn::ConvConfig { stride: 2, ..Default::default() };
            let downsample = (i + 1 < n)
                .then(|| VaeDownsample { conv: nn::conv2d(&p / "downsamplers" / 0 / "conv", c, c, 3, stride2) });
            down.push((resnets, downsample));
            c_prev = c;
        }
        let c_last = ch[n - 1];
        let norm = nn::GroupNormConfig { eps: NORM_EPS, ..Default::default() };
        Self {
            conv_in,
            down,
            mid: MidBlock::new(&vs / "mid_block", c_last, g),
            conv_norm_out: nn::group_norm(&vs / "conv_norm_out", g, c_last, norm),
            conv_out: nn::conv2d(&vs / "conv_out", c_last, 2 * cfg.latent_channels, 3, pad),
        }
    }

    /// x (B, C_in, H, W) -> (B, 2C, h, w).
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for (resnets, downsample) in &self.down {
            for r in resnets {
                h = r.forward_opt(&h, None, false);
            }
            if let Some(d) = downsample {
                h = d.forward(&h);
            }
        }
        let h = self.mid.forward(&h);
        self.conv_out.forward(&silu_fresh(self.conv_norm_out.forward(&h)))
    }
}

/// Latents (after post_quant_conv) -> pixels.
#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid: MidBlock,
    up: Vec<(Vec<ResBlock>, Option<Upsample>)>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &VaeConfig) -> Self {
        let reversed: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let (g, n) = (cfg.norm_num_groups, reversed.len());
        let pad = nn::ConvConfig { padding: 1, ..Default::default() };
        let conv_in = nn::conv2d(&vs / "conv_in", cfg.latent_channels, reversed[0], 3, pad);
        let mid = MidBlock::new(&vs / "mid_block", reversed[0], g);
        let mut c_prev = reversed[0];
        let mut up = Vec::new();
        for (i, &c) in reversed.iter().enumerate() {
            let p = &vs / "up_blocks" / i;
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| ResBlock::unconditioned(&p / "resnets" / j, if j == 0 { c_prev } else { c }, c, g, NORM_EPS))
                .collect();
            up.push((resnets, (i + 1 < n).then(|| Upsample::new(&p / "upsamplers" / 0, c))));
            c_prev = c;
        }
        let c0 = reversed[n - 1];
        let norm = nn::GroupNormConfig { eps: NORM_EPS, ..Default::default() };
        Self {
            conv_in,
            mid,
            up,
            conv_norm_out: nn::group_norm(&vs / "conv_norm_out", g, c0, norm),
            conv_out: nn::conv2d(&vs / "conv_out", c0, cfg.out_channels, 3, pad),
        }
    }

    /// z (B, C, h, w) -> (B, C_out, H, W).
    fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.mid.forward(&self.conv_in.forward(z));
        for (resnets, upsample) in &self.up {
            for r in resnets {
                h = r.forward_opt(&h, None, false);
            }
            if let Some(u) = upsample {
                h = u.forward(&h);
            }
        }
        self.conv_out.forward(&silu_fresh(self.conv_norm_out.forward(&h)))
    }
}

/// The autoencoder: `encode` gives q(z|x), `decode` maps a latent back to pixels. Images are in [−1, 1].
#[derive(Debug)]
pub struct AutoencoderKl {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: nn::Conv2D,
    post_quant_conv: nn::Conv2D,
}

impl AutoencoderKl {
    pub fn new(vs: nn::Path, config: VaeConfig) -> Self {
        assert!(
            config.block_out_channels.iter().all(|c| c % config.norm_num_groups == 0),
            "norm_num_groups must divide every level's channels"
        );
        let l = config.latent_channels;
        Self {
            encoder: Encoder::new(&vs / "encoder", &config),
            decoder: Decoder::new(&vs / "decoder", &config),
            quant_conv: nn::conv2d(&vs / "quant_conv", 2 * l, 2 * l, 1, Default::default()),
            post_quant_conv: nn::conv2d(&vs / "post_quant_conv", l, l, 1, Default::default()),
            config,
        }
    }

    // ANCHOR: vae_encode_decode
    /// x (B, C_in, H, W) in [−1, 1] -> q(z|x) with μ, log σ² of shape (B, C, H/f, W/f) (unscaled latents).
    pub fn encode(&self, x: &Tensor) -> DiagonalGaussian {
        DiagonalGaussian::from_moments(&self.quant_conv.forward(&self.encoder.forward(x)))
    }

    /// z (B, C, h, w) (unscaled) -> x̂ (B, C_out, H, W), roughly in [−1, 1] (not clamped).
    pub fn decode(&self, z: &Tensor) -> Tensor {
        self.decoder.forward(&self.post_quant_conv.forward(z))
    }
    // ANCHOR_END: vae_encode_decode
}

// ANCHOR: scaling_factor
/// [LDM] sec. 4.3.2: 1/σ̂, with σ̂ the standard deviation of the latents z ~ q(z|x) over `images` (every element of
/// every latent of the batch), so that scaling_factor · z has unit variance. SD measured 1/0.18215 ≈ 5.49 on its
/// first batch of data; we measure on more images.
pub fn scaling_factor(vae: &AutoencoderKl, images: &Tensor, batch: i64) -> f64 {
    let latents: Vec<Tensor> = tch::no_grad(|| {
        (0..images.size()[0])
            .step_by(batch as usize)
            .map(|s| {
                let n = batch.min(images.size()[0] - s);
                vae.encode(&images.narrow(0, s, n)).sample()
            })
            .collect()
    });
    1.0 / Tensor::cat(&latents, 0).std(true).double_value(&[])
}
// ANCHOR_END: scaling_factor

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    #[test]
    fn the_kl_matches_its_formula_and_is_zero_only_for_the_prior() {
        let opts = (Kind::Float, Device::Cpu);
        let (mu, logvar) =
            (Tensor::from_slice(&[0.5f32, -1.0]).view([1, 2, 1, 1]), Tensor::from_slice(&[0.3f32, -2.0]));
        let moments = Tensor::cat(&[mu, logvar.view([1, 2, 1, 1])], 1);
        let q = DiagonalGaussian::from_moments(&moments);
        // [VAE] appendix B by hand: ½ Σ (μ² + σ² − 1 − log σ²)
        let want = 0.5 * ((0.25 + 0.3f64.exp() - 1.0 - 0.3) + (1.0 + (-2.0f64).exp() - 1.0 + 2.0));
        assert!((q.kl().double_value(&[0]) - want).abs() < 1e-5);
        let prior = DiagonalGaussian::from_moments(&Tensor::zeros([3, 4, 2, 2], opts));
        assert_eq!(prior.kl().size(), [3]);
        assert!(prior.kl().abs().max().double_value(&[]) < 1e-7);
        // a KL of a general Gaussian is positive
        let any = DiagonalGaussian::from_moments(&Tensor::randn([3, 4, 2, 2], opts));
        assert!(any.kl().min().double_value(&[]) > 0.0);
    }

    #[test]
    fn the_reparameterised_sample_has_the_posterior_moments() {
        tch::manual_seed(0);
        let (mu, logvar) = (0.7f64, (0.3f64 * 0.3).ln());
        let moments = Tensor::cat(
            &[
                Tensor::full([4000, 1, 5, 5], mu, (Kind::Float, Device::Cpu)),
                Tensor::full([4000, 1, 5, 5], logvar, (Kind::Float, Device::Cpu)),
            ],
            1,
        );
        let z = DiagonalGaussian::from_moments(&moments).sample(); // 100 000 draws of N(0.7, 0.3²)
                                                                   // mean within 5 standard errors (0.3/√10⁵ ≈ 0.00095); std within 1 %
        assert!((z.mean(Kind::Float).double_value(&[]) - mu).abs() < 0.005);
        assert!((z.std(true).double_value(&[]) / 0.3 - 1.0).abs() < 0.01);
    }

    #[test]
    fn encode_and_decode_shapes_and_names_mirror_diffusers() {
        let vs = VarStore::new(Device::Cpu);
        let vae = AutoencoderKl::new(vs.root(), VaeConfig::mnist());
        let x = Tensor::rand([2, 1, 28, 28], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let q = vae.encode(&x);
        assert_eq!((q.mean.size(), q.logvar.size()), (vec![2, 4, 7, 7], vec![2, 4, 7, 7]));
        assert_eq!(VaeConfig::mnist().latent_size(28), 7);
        assert_eq!(vae.decode(&q.sample()).size(), [2, 1, 28, 28]);
        let names: Vec<String> = vs.variables().into_keys().collect();
        for k in [
            "encoder.conv_in.weight",
            "encoder.down_blocks.0.resnets.0.conv1.weight",
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            "encoder.down_blocks.1.downsamplers.0.conv.weight",
            "encoder.mid_block.attentions.0.to_q.bias",
            "encoder.mid_block.attentions.0.to_out.0.weight",
            "encoder.mid_block.attentions.0.group_norm.weight",
            "encoder.conv_out.weight",
            "quant_conv.weight",
            "post_quant_conv.bias",
            "decoder.mid_block.resnets.1.norm2.bias",
            "decoder.up_blocks.0.resnets.1.conv2.weight",
            "decoder.up_blocks.1.upsamplers.0.conv.weight",
            "decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
            "decoder.conv_norm_out.weight",
        ] {
            assert!(names.iter().any(|n| n == k), "missing {k}");
        }
        assert!(!names.iter().any(|n| n.contains("time_emb_proj") || n.contains("down_blocks.2.downsamplers")));
        assert!(!names.iter().any(|n| n.contains("up_blocks.2.upsamplers")));
    }

    #[test]
    fn the_scaling_factor_makes_latents_unit_variance() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let vae = AutoencoderKl::new(vs.root(), VaeConfig::tiny());
        let x = Tensor::rand([64, 1, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let s = scaling_factor(&vae, &x, 16);
        assert!(s.is_finite() && s > 0.0);
        let z = tch::no_grad(|| vae.encode(&x).sample()) * s;
        // a fresh draw of the same latents: unit variance up to the sampling noise of 2 048 elements
        assert!((z.std(true).double_value(&[]) - 1.0).abs() < 0.05, "{}", z.std(true).double_value(&[]));
    }
}
