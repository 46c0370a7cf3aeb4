//! Building blocks shared by the networks: the sinusoidal embedding of a noise level, a residual block with noise
//! conditioning, and 2× down/up-sampling.
//!
//! [Transformer] Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762, sec. 3.5.
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239, appendix B (ResBlocks with GroupNorm, embedding added per channel).
use crate::nn::lora::{Adaptable, AdaptableLayers};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Sinusoidal embedding of scalars (B,) -> (B, dim), [Transformer] sec. 3.5 with the positions replaced by `t`:
/// for i < dim/2, fᵢ = max_period^(−i/(dim/2)), emb = [cos(t·fᵢ), sin(t·fᵢ)] (cosine first, as diffusers'
/// `flip_sin_to_cos=True`, the Stable Diffusion layout).
// ANCHOR: timestep_embedding
pub fn timestep_embedding(t: &Tensor, dim: i64, max_period: f64) -> Tensor {
    assert!(dim % 2 == 0, "embedding dimension must be even");
    let half = dim / 2;
    let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * (-max_period.ln() / half as f64)).exp(); // (half,)
    let args = t.to_kind(Kind::Float).unsqueeze(-1) * freqs.unsqueeze(0); // (B, half)
    Tensor::cat(&[args.cos(), args.sin()], -1) // (B, dim)
}
// ANCHOR_END: timestep_embedding

/// Spreads ln σ over the range of "timesteps" the sinusoidal frequencies resolve (1 … 1/max_period): ln σ ∈ [−5, 3]
/// becomes [−1250, 750], so both the fastest and the slowest frequencies see a useful change across the ladder.
pub const NOISE_EMB_SCALE: f64 = 250.0;

/// Embedding of noise levels σ (B,) -> (B, dim): the sinusoidal embedding of NOISE_EMB_SCALE · ln σ.
pub fn noise_embedding(sigma: &Tensor, dim: i64) -> Tensor {
    timestep_embedding(&(sigma.log() * NOISE_EMB_SCALE), dim, 10_000.0)
}

/// A residual block conditioned on an embedding: GroupNorm → SiLU → 3×3 conv → (+ projected embedding, one value per
/// channel) → GroupNorm → SiLU → dropout → 3×3 conv, plus a 1×1 conv on the skip path when channels change.
/// [DDPM] appendix B; names as diffusers' `ResnetBlock2D`.
#[derive(Debug)]
pub struct ResBlock {
    norm1: nn::GroupNorm,
    conv1: Adaptable,
    /// None in an unconditioned block (the VAE's: diffusers' `ResnetBlock2D` with `temb_channels=None`).
    time_emb_proj: Option<nn::Linear>,
    norm2: nn::GroupNorm,
    conv2: Adaptable,
    conv_shortcut: Option<nn::Conv2D>,
    dropout: f64,
}

/// The same (B, C, H, W) tensor with channels-last strides (NHWC in memory): oneDNN's convolutions, GroupNorm and
/// nearest upsampling run natively on it, and libtorch's ops keep the layout, so one conversion of the input and of
/// the conv weights carries through a network. PyTorch's "channels last" guide recommends it for CPU inference;
/// measured on SD 1.5 (chapter 09), it takes a sixth off the UNet step and a fifth off the VAE decode. Values are
/// unchanged; only the order of the reductions inside a convolution can differ.
pub fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]) // (B, C, H, W), strides (HWC, 1, WC, C)
}

/// SiLU of a fresh activation (one that nothing else holds), computed in its own memory when no gradient will flow
/// back through it: the same values as `x.silu()`, one activation-sized allocation fewer. Under autograd SiLU's
/// backward needs its input, so a tensor that requires grad takes the copying path. The residual sums of the networks
/// are added into their fresh left-hand side (`h += x`) for the same reason; that one is safe under autograd too,
/// since neither a convolution's nor a linear layer's backward reads its output. Measured on SD 1.5 (chapter 09).
pub fn silu_fresh(mut x: Tensor) -> Tensor {
    if x.requires_grad() {
        x.silu()
    } else {
        let _ = x.silu_();
        x
    }
}

/// Groups for GroupNorm: 32 as in [DDPM], fewer for narrow layers (it must divide the channel count).
pub fn groups_for(channels: i64) -> i64 {
    [32, 16, 8, 4, 2, 1].into_iter().find(|g| channels % g == 0 && channels / g >= 2).unwrap_or(1)
}

impl ResBlock {
    pub fn new(vs: nn::Path, c_in: i64, c_out: i64, emb_dim: i64, dropout: f64) -> Self {
        let groups = (groups_for(c_in), groups_for(c_out));
        Self::build(&vs, c_in, c_out, Some(emb_dim), groups, Default::default(), dropout)
    }

    /// A block without an embedding (the VAE's), with `groups` GroupNorm groups of epsilon `eps` in both norms.
    pub fn unconditioned(vs: nn::Path, c_in: i64, c_out: i64, groups: i64, eps: f64) -> Self {
        let norm = nn::GroupNormConfig { eps, ..Default::default() };
        Self::build(&vs, c_in, c_out, None, (groups, groups), norm, 0.0)
    }

    // The variables are created in this order (it decides which random numbers initialise which weight, so a
    // trained lesson reproduces bit for bit only while it stays).
    fn build(
        vs: &nn::Path,
        c_in: i64,
        c_out: i64,
        emb_dim: Option<i64>,
        groups: (i64, i64),
        norm: nn::GroupNormConfig,
        dropout: f64,
    ) -> Self {
        let conv = nn::ConvConfig { padding: 1, ..Default::default() };
        Self {
            norm1: nn::group_norm(vs / "norm1", groups.0, c_in, norm),
            conv1: Adaptable::conv2d(vs / "conv1", c_in, c_out, 3, conv),
            time_emb_proj: emb_dim.map(|e| nn::linear(vs / "time_emb_proj", e, c_out, Default::default())),
            norm2: nn::group_norm(vs / "norm2", groups.1, c_out, norm),
            conv2: Adaptable::conv2d(vs / "conv2", c_out, c_out, 3, conv),
            conv_shortcut: (c_in != c_out)
                .then(|| nn::conv2d(vs / "conv_shortcut", c_in, c_out, 1, Default::default())),
            dropout,
        }
    }

    /// x: (B, C_in, H, W), emb: (B, emb_dim) -> (B, C_out, H, W).
    pub fn forward(&self, x: &Tensor, emb: &Tensor, train: bool) -> Tensor {
        self.forward_opt(x, Some(emb), train)
    }

    // ANCHOR: resblock_forward
    /// x: (B, C_in, H, W), emb: (B, emb_dim) or None (a block without an embedding) -> (B, C_out, H, W).
    pub fn forward_opt(&self, x: &Tensor, emb: Option<&Tensor>, train: bool) -> Tensor {
        let mut h = self.conv1.forward(&silu_fresh(self.norm1.forward(x)));
        if let (Some(proj), Some(emb)) = (&self.time_emb_proj, emb) {
            h += proj.forward(&emb.silu()).unsqueeze(-1).unsqueeze(-1); // (B, C_out, 1, 1)
        }
        let mut h = self.conv2.forward(&silu_fresh(self.norm2.forward(&h)).dropout(self.dropout, train));
        match &self.conv_shortcut {
            Some(c) => h += c.forward(x), // the skip, into the fresh output (see `silu_fresh`)
            None => h += x,
        }
        h
    }
    // ANCHOR_END: resblock_forward
}

impl AdaptableLayers for ResBlock {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>) {
        out.extend([&mut self.conv1, &mut self.conv2]);
    }
}

/// 2× downsampling with a strided 3×3 conv: (B, C, H, W) -> (B, C, ⌈H/2⌉, ⌈W/2⌉).
#[derive(Debug)]
pub struct Downsample {
    conv: nn::Conv2D,
}

impl Downsample {
    pub fn new(vs: nn::Path, c: i64) -> Self {
        Self { conv: nn::conv2d(&vs / "conv", c, c, 3, nn::ConvConfig { stride: 2, padding: 1, ..Default::default() }) }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.conv.forward(x)
    }
}

/// 2× upsampling: nearest neighbour, then a 3×3 conv: (B, C, H, W) -> (B, C, 2H, 2W).
#[derive(Debug)]
pub struct Upsample {
    conv: nn::Conv2D,
}

impl Upsample {
    pub fn new(vs: nn::Path, c: i64) -> Self {
        Self { conv: nn::conv2d(&vs / "conv", c, c, 3, nn::ConvConfig { padding: 1, ..Default::default() }) }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (h, w) = (x.size()[2], x.size()[3]);
        self.forward_to(x, [2 * h, 2 * w])
    }
    /// Nearest-neighbour resize to `size` (H', W'), then the conv: the UNet's way up from an odd size (7×7 → 4×4 on
    /// the way down comes back as 4×4 → 7×7), as diffusers' `Upsample2D(output_size=…)`.
    pub fn forward_to(&self, x: &Tensor, size: [i64; 2]) -> Tensor {
        self.conv.forward(&x.upsample_nearest2d(size, None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    #[test]
    fn timestep_embedding_matches_the_formula_and_separates_inputs() {
        let t = Tensor::from_slice(&[0.0f32, 3.0, 250.0]);
        let e = timestep_embedding(&t, 8, 10_000.0);
        assert_eq!(e.size(), [3, 8]);
        // [Transformer] sec. 3.5: f_i = 10000^(−i/4); element (row 1, i = 1) is cos(3 · 10000^(−1/4))
        let want = (3.0f64 * 10_000f64.powf(-0.25)).cos();
        assert!((e.double_value(&[1, 1]) - want).abs() < 1e-6);
        assert!((e.double_value(&[1, 5]) - (3.0f64 * 10_000f64.powf(-0.25)).sin()).abs() < 1e-6);
        assert!((e.get(0) - e.get(1)).abs().max().double_value(&[]) > 0.1);
    }

    #[test]
    fn resblock_and_resampling_shapes() {
        let vs = VarStore::new(Device::Cpu);
        let rb = ResBlock::new(vs.root() / "rb", 8, 16, 12, 0.1);
        let x = Tensor::randn([3, 8, 7, 7], (Kind::Float, Device::Cpu));
        let emb = Tensor::randn([3, 12], (Kind::Float, Device::Cpu));
        assert_eq!(rb.forward(&x, &emb, true).size(), [3, 16, 7, 7]);
        let down = Downsample::new(vs.root() / "d", 8);
        assert_eq!(down.forward(&x).size(), [3, 8, 4, 4]);
        let up = Upsample::new(vs.root() / "u", 8);
        assert_eq!(up.forward(&x).size(), [3, 8, 14, 14]);
        // names mirror diffusers' ResnetBlock2D
        let names: Vec<String> = vs.variables().into_keys().collect();
        for k in [
            "rb.norm1.weight",
            "rb.conv1.weight",
            "rb.time_emb_proj.weight",
            "rb.conv_shortcut.weight",
            "d.conv.weight",
        ] {
            assert!(names.iter().any(|n| n == k), "missing {k} in {names:?}");
        }
    }

    #[test]
    fn inference_in_place_gives_the_training_values_and_training_still_back_propagates() {
        tch::manual_seed(4);
        let vs = VarStore::new(Device::Cpu);
        for (name, c_out) in [("same", 8), ("wider", 16)] {
            let rb = ResBlock::new(vs.root() / name, 8, c_out, 12, 0.0);
            let x = Tensor::randn([2, 8, 5, 5], (Kind::Float, Device::Cpu));
            let emb = Tensor::randn([2, 12], (Kind::Float, Device::Cpu));
            let train = rb.forward(&x, &emb, false); // requires grad: SiLU copies
            let infer = tch::no_grad(|| rb.forward(&x, &emb, false)); // SiLU and the skip sum in place
            assert!(train.requires_grad() && !infer.requires_grad());
            assert_eq!((&train - &infer).abs().max().double_value(&[]), 0.0, "{name}");
            train.sum(Kind::Float).backward();
        }
        for (name, var) in vs.variables() {
            assert!(var.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "no gradient for {name}");
        }
        // silu_fresh itself: x·σ(x), either way
        let x = Tensor::randn([7], (Kind::Float, Device::Cpu));
        let want = &x * x.sigmoid();
        assert!((silu_fresh(x.copy()) - &want).abs().max().double_value(&[]) < 1e-6);
    }
}
