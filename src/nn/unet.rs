//! A UNet for diffusion on small images, assembled from the pieces in `layers` and `attention`: the sinusoidal time
//! embedding and its MLP, residual blocks with time injection, strided-conv downsampling, nearest-neighbour
//! upsampling, skip connections, and self-attention at the low resolutions.
//!
//! [UNet] Ronneberger, Fischer, Brox 2015, "U-Net", arXiv:1505.04597 (the encoder-decoder with skip connections).
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239, appendix B (the diffusion variant: GroupNorm ResBlocks, time
//! embedding added in every block, self-attention at 16×16).
//! [LDM] Rombach et al. 2022, arXiv:2112.10752, sec. 3.3 (the conditional variant: a spatial transformer with
//! cross-attention to a context τ_θ(y) where the unconditional net has self-attention).
//! Module paths follow diffusers' `UNet2DModel` (conv_in, time_embedding.linear_1, down_blocks.i.resnets.j,
//! down_blocks.i.attentions.j, down_blocks.i.downsamplers.0, mid_block, up_blocks.i..., conv_norm_out, conv_out), and
//! with a context its `UNet2DConditionModel` (the same, with down_blocks.i.attentions.j a `Transformer2DModel`).
//! [SDXL] Podell et al. 2023, arXiv:2307.01952, sec. 2.1: besides cross-attention, the pooled text embedding is
//! projected and added to the time embedding (diffusers: `class_embed_type="projection"`, module `class_embedding`).
use crate::nn::attention::SpatialSelfAttention;
use crate::nn::layers::{groups_for, silu_fresh, timestep_embedding, Downsample, ResBlock, Upsample};
use crate::nn::lora::{Adaptable, AdaptableLayers};
use crate::nn::transformer::SpatialTransformer;
use crate::validate::{divides, finite_in, in_range, list_in, Validate, MAX_DEPTH, MAX_WIDTH};
use tch::nn::{self, Module};
use tch::Tensor;

/// The shape of a UNet; see the presets.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Channels at each resolution level; every level but the last halves the resolution.
    pub block_out_channels: Vec<i64>,
    /// Residual blocks per level on the way down (the way up has one more, for the extra skip).
    pub layers_per_block: usize,
    /// Whether each level has attention after its residual blocks (a transformer if `cross_attention_dim` is set).
    pub attention: Vec<bool>,
    /// Width of one attention head (unless `attention_heads` is set).
    pub head_dim: i64,
    pub dropout: f64,
    /// Width of the context tokens (the text encoder's hidden size) for a conditional UNet: the attention levels and
    /// the mid block then hold a `SpatialTransformer` (self- and cross-attention) instead of self-attention only.
    #[serde(default)]
    pub cross_attention_dim: Option<i64>,
    /// A fixed number of heads at every level, head width = channels / heads (SD's layout: 8); None: heads of width
    /// `head_dim`.
    #[serde(default)]
    pub attention_heads: Option<i64>,
    /// With a context: also add an MLP of the pooled context to the time embedding ([SDXL] sec. 2.1), so the
    /// condition reaches every residual block at every resolution, not only the attention levels. The pooled vector
    /// is the state of the context's last real token, which is what CLIP's pooled output is (the end-of-text token's
    /// state; the text encoder is causal, so that token has read the whole prompt). SD 1.5 does not have it.
    #[serde(default)]
    pub pooled_context_embedding: bool,
}

impl Validate for UNetConfig {
    /// Every level needs an attention flag; heads must divide the channels of every attention level and of the mid
    /// block; sizes are bounded ([`crate::validate::MAX_WIDTH`]).
    fn validate(&self) -> Result<(), String> {
        in_range("in_channels", self.in_channels, 1, MAX_WIDTH)?;
        in_range("out_channels", self.out_channels, 1, MAX_WIDTH)?;
        list_in("block_out_channels", &self.block_out_channels, None, 1, MAX_WIDTH)?;
        let levels = self.block_out_channels.len();
        if self.attention.len() != levels {
            let n = self.attention.len();
            return Err(format!("`attention` has {n} flags for {levels} levels: it needs one per level"));
        }
        in_range("layers_per_block", self.layers_per_block, 1, MAX_DEPTH)?;
        in_range("head_dim", self.head_dim, 1, MAX_WIDTH)?;
        finite_in("dropout", self.dropout, 0.0, 1.0)?;
        if let Some(d) = self.cross_attention_dim {
            in_range("cross_attention_dim", d, 1, MAX_WIDTH)?;
        }
        let last = *self.block_out_channels.last().expect("checked non-empty");
        let with_attention = self.block_out_channels.iter().zip(&self.attention).filter(|(_, a)| **a).map(|(c, _)| *c);
        for c in with_attention.chain([last]) {
            match self.attention_heads {
                Some(h) => divides("block_out_channels", c, "attention_heads", h)?,
                None if self.cross_attention_dim.is_none() => {
                    divides("block_out_channels", c, "head_dim", self.head_dim)?
                }
                None => {}
            }
        }
        Ok(())
    }
}

impl UNetConfig {
    /// A tiny UNet for tests (two levels, attention at the lower one).
    pub fn tiny() -> Self {
        Self {
            in_channels: 1,
            out_channels: 1,
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            attention: vec![false, true],
            head_dim: 8,
            dropout: 0.0,
            cross_attention_dim: None,
            attention_heads: None,
            pooled_context_embedding: false,
        }
    }
    /// `tiny` with cross-attention to a context of width `context_dim`, for tests.
    pub fn tiny_cond(context_dim: i64) -> Self {
        Self { cross_attention_dim: Some(context_dim), ..Self::tiny() }
    }
    /// The lesson 04 MNIST UNet: 28×28 → 14×14 → 7×7 with 16, 32 and 64 channels, self-attention at 7×7. The top
    /// level is the narrowest because it costs the most per channel (784 positions): 16 channels there instead of 32
    /// cut the multiply-adds of a forward pass from 120 M to 73 M, so more steps fit in the same time (chapter 04).
    /// No dropout: a 10-minute run sees each image about once, so there is nothing to overfit yet.
    pub fn mnist() -> Self {
        Self {
            in_channels: 1,
            out_channels: 1,
            block_out_channels: vec![16, 32, 64],
            layers_per_block: 1,
            attention: vec![false, false, true],
            head_dim: 32,
            dropout: 0.0,
            cross_attention_dim: None,
            attention_heads: None,
            pooled_context_embedding: false,
        }
    }
    /// Lesson 08's latent UNet: 4 × 7 × 7 latents → 4 × 4 at the second level, 32 and 64 channels, attention at
    /// both (spatial transformers once a context is set). Twice these widths (64, 128) sampled only 1.6× faster than
    /// lesson 06's pixel UNet: at 49 positions the transformers' per-token work, not the positions, dominates.
    pub fn mnist_latent() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
            attention: vec![true, true],
            head_dim: 32,
            dropout: 0.0,
            cross_attention_dim: None,
            attention_heads: None,
            pooled_context_embedding: false,
        }
    }

    /// [`Self::mnist_latent`] at a quarter of the width, for `--quick` runs.
    pub fn mnist_latent_tiny() -> Self {
        Self { block_out_channels: vec![16, 32], head_dim: 16, ..Self::mnist_latent() }
    }
    /// Stable Diffusion 1.5's UNet (diffusers' UNet2DConditionModel config of runwayml/stable-diffusion-v1-5): 4-channel
    /// latents, levels of 320, 640, 1280, 1280 channels, two resnets per level, transformers with 8 heads
    /// (head width 40, 80, 160, 160) and cross-attention to CLIP ViT-L/14's 768-wide tokens at the first three
    /// levels (CrossAttnDownBlock2D ×3 + DownBlock2D; UpBlock2D + CrossAttnUpBlock2D ×3) and in the mid block.
    pub fn sd15() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            attention: vec![true, true, true, false],
            head_dim: 40,
            dropout: 0.0,
            cross_attention_dim: Some(768),
            attention_heads: Some(8),
            pooled_context_embedding: false,
        }
    }
    /// Width of the time embedding: 4× the first level's channels, as in [DDPM].
    pub fn emb_dim(&self) -> i64 {
        4 * self.block_out_channels[0]
    }
}

#[derive(Debug)]
struct Level {
    resnets: Vec<ResBlock>,
    attentions: Vec<Attention>,
    resample: Option<Resample>,
}

/// The attention block of a level: self-attention only, or a spatial transformer (with its module path, which
/// names its cross-attention maps).
#[derive(Debug)]
enum Attention {
    SelfOnly(Box<SpatialSelfAttention>),
    Transformer(Box<SpatialTransformer>, String),
}

impl AdaptableLayers for Attention {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>) {
        match self {
            Attention::SelfOnly(a) => a.adaptable_layers(out),
            Attention::Transformer(t, _) => t.adaptable_layers(out),
        }
    }
}

impl AdaptableLayers for Level {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>) {
        let mut attentions = self.attentions.iter_mut();
        for resnet in &mut self.resnets {
            resnet.adaptable_layers(out);
            if let Some(a) = attentions.next() {
                a.adaptable_layers(out);
            }
        }
    }
}

/// What the attention blocks read besides the features: the context, its key-padding mask, and, when collecting,
/// the cross-attention maps so far.
struct Cond<'a> {
    context: Option<&'a Tensor>,
    mask: Option<&'a Tensor>,
    maps: Option<Vec<CrossAttentionMap>>,
}

/// The conditioning a UNet's attention blocks read, checked against the config's context width.
fn check_cond<'a>(
    config: &UNetConfig,
    context: Option<&'a Tensor>,
    mask: Option<&'a Tensor>,
    keep_maps: bool,
) -> Cond<'a> {
    if let Some(c) = context {
        let want = config.cross_attention_dim.expect("a context needs a UNet with cross_attention_dim");
        assert_eq!(c.size().last(), Some(&want), "context (B, L, {want}) expected, got {:?}", c.size());
    }
    Cond { context, mask, maps: keep_maps.then(Vec::new) }
}

/// The cross-attention weights of one transformer block in one forward pass, for per-token heat maps.
#[derive(Debug)]
pub struct CrossAttentionMap {
    /// Module path of the block, e.g. "up_blocks.1.attentions.2" or "mid_block.attentions.0".
    pub block: String,
    /// Resolution of the block's feature map: pixel p of the weights is row p / width, column p % width.
    pub height: i64,
    pub width: i64,
    /// (B, heads, height·width, L): how much each pixel's query attends to each context token.
    pub weights: Tensor,
}

impl Attention {
    fn forward(&self, x: &Tensor, cond: &mut Cond) -> Tensor {
        match self {
            Attention::SelfOnly(a) => a.forward(x),
            Attention::Transformer(t, name) => match cond.maps.as_mut() {
                None => t.forward(x, cond.context, cond.mask),
                Some(maps) => {
                    let (out, weights) = t.forward_with_maps(x, cond.context, cond.mask);
                    let (height, width) = (x.size()[2], x.size()[3]);
                    maps.extend(weights.into_iter().map(|weights| CrossAttentionMap {
                        block: name.clone(),
                        height,
                        width,
                        weights,
                    }));
                    out
                }
            },
        }
    }
}

#[derive(Debug)]
enum Resample {
    Down(Downsample),
    Up(Upsample),
}

/// The UNet's way down, everything before the up path: the time embedding (and the pooled-context projection),
/// conv_in, the down levels and the middle block. The UNet holds one; a ControlNet holds a trainable copy of it
/// ([`crate::nn::controlnet`]), under the same module paths.
#[derive(Debug)]
pub struct UNetEncoder {
    pub config: UNetConfig,
    time_linear_1: nn::Linear,
    time_linear_2: nn::Linear,
    /// [SDXL] sec. 2.1: pooled context -> linear_1 -> SiLU -> linear_2, added to the time embedding.
    class_embedding: Option<(nn::Linear, nn::Linear)>,
    conv_in: nn::Conv2D,
    down: Vec<Level>,
    mid_resnets: [ResBlock; 2],
    mid_attention: Attention,
}

/// What the way down hands on: the time embedding, the skips (conv_in's output, each down resnet's, each
/// downsampler's, in order) and the middle block's output.
pub struct Encoded {
    pub emb: Tensor,
    pub skips: Vec<Tensor>,
    pub mid: Tensor,
}

/// The attention block of a level at path `p` with `c` channels: self-attention, or a spatial transformer once the
/// config has a context (named by its path below the model's root, which is `root_depth` components deep).
fn attention_block(p: nn::Path, c: i64, config: &UNetConfig, root_depth: usize) -> Attention {
    match config.cross_attention_dim {
        None => {
            let head_dim = config.attention_heads.map_or(config.head_dim, |h| c / h);
            Attention::SelfOnly(Box::new(SpatialSelfAttention::new(p, c, head_dim)))
        }
        Some(context_dim) => {
            let name = p.components().skip(root_depth).collect::<Vec<_>>().join(".");
            let heads = config.attention_heads.unwrap_or((c / config.head_dim).max(1));
            Attention::Transformer(Box::new(SpatialTransformer::new(p, c, heads, c / heads, context_dim, 1)), name)
        }
    }
}

/// The parts of the way down made first: the down levels and the middle block (see [`UNetEncoder::new`]).
type Trunk = (Vec<Level>, [ResBlock; 2], Attention);

impl UNetEncoder {
    /// Builds the way down on `vs`: the down levels and the middle block first, then the time embedding, the
    /// pooled-context projection and conv_in.
    pub fn new(vs: &nn::Path, config: UNetConfig) -> Self {
        let trunk = Self::trunk(vs, &config);
        Self::finish(vs, config, trunk)
    }

    /// The down levels and the middle block. [`UNet::new`] builds its up path between this and [`Self::finish`]:
    /// the random initialisation draws the variables in creation order, and this keeps the order every run of
    /// lessons 04–08 has used, so a seed still gives the same weights.
    fn trunk(vs: &nn::Path, config: &UNetConfig) -> Trunk {
        let ch = &config.block_out_channels;
        let n = ch.len();
        assert!(n >= 1 && config.attention.len() == n, "one attention flag per level");
        let (c0, emb, drop) = (ch[0], config.emb_dim(), config.dropout);
        let root_depth = vs.components().count();
        // ANCHOR: unet_down
        let mut down = Vec::new();
        let mut c_prev = c0;
        for (i, &c) in ch.iter().enumerate() {
            let p = vs / "down_blocks" / i;
            let resnets = (0..config.layers_per_block)
                .map(|j| ResBlock::new(&p / "resnets" / j, if j == 0 { c_prev } else { c }, c, emb, drop))
                .collect();
            let attentions = if config.attention[i] {
                (0..config.layers_per_block)
                    .map(|j| attention_block(&p / "attentions" / j, c, config, root_depth))
                    .collect()
            } else {
                vec![]
            };
            let resample = (i + 1 < n).then(|| Resample::Down(Downsample::new(&p / "downsamplers" / 0, c)));
            down.push(Level { resnets, attentions, resample });
            c_prev = c;
        }
        // ANCHOR_END: unet_down
        let c_last = ch[n - 1];
        let m = vs / "mid_block";
        let mid_resnets = [
            ResBlock::new(&m / "resnets" / 0, c_last, c_last, emb, drop),
            ResBlock::new(&m / "resnets" / 1, c_last, c_last, emb, drop),
        ];
        let mid_attention = attention_block(&m / "attentions" / 0, c_last, config, root_depth);
        (down, mid_resnets, mid_attention)
    }

    /// The time embedding, the pooled-context projection and conv_in, around a [`Self::trunk`].
    fn finish(vs: &nn::Path, config: UNetConfig, (down, mid_resnets, mid_attention): Trunk) -> Self {
        let (c0, emb) = (config.block_out_channels[0], config.emb_dim());
        let pad = nn::ConvConfig { padding: 1, ..Default::default() };
        Self {
            time_linear_1: nn::linear(vs / "time_embedding" / "linear_1", c0, emb, Default::default()),
            time_linear_2: nn::linear(vs / "time_embedding" / "linear_2", emb, emb, Default::default()),
            class_embedding: match (config.pooled_context_embedding, config.cross_attention_dim) {
                (true, Some(d)) => Some((
                    nn::linear(vs / "class_embedding" / "linear_1", d, emb, Default::default()),
                    nn::linear(vs / "class_embedding" / "linear_2", emb, emb, Default::default()),
                )),
                (true, None) => panic!("pooled_context_embedding needs a context: set cross_attention_dim"),
                (false, _) => None,
            },
            conv_in: nn::conv2d(vs / "conv_in", config.in_channels, c0, 3, pad),
            down,
            mid_resnets,
            mid_attention,
            config,
        }
    }

    /// Channels of each skip [`Self::encode`] returns, in order.
    pub fn skip_channels(&self) -> Vec<i64> {
        let ch = &self.config.block_out_channels;
        let mut out = vec![ch[0]];
        for (i, &c) in ch.iter().enumerate() {
            out.extend(std::iter::repeat(c).take(self.config.layers_per_block));
            if i + 1 < ch.len() {
                out.push(c);
            }
        }
        out
    }

    /// The way down from x (B, C_in, H, W) at timesteps t (B,), with `after_conv_in` (B, c0, H, W) added to conv_in's
    /// output when given (where a ControlNet adds its hint).
    fn encode(&self, x: &Tensor, t: &Tensor, cond: &mut Cond, after_conv_in: Option<&Tensor>, train: bool) -> Encoded {
        let c0 = self.config.block_out_channels[0];
        let temb = timestep_embedding(t, c0, 10_000.0).to_kind(x.kind()); // (B, c0), [DDPM] sinusoidal position of t
        let mut emb = self.time_linear_2.forward(&self.time_linear_1.forward(&temb).silu()); // (B, 4·c0)
        if let (Some((linear_1, linear_2)), Some(context)) = (&self.class_embedding, cond.context) {
            // [SDXL] sec. 2.1: emb += MLP(pooled context)
            emb += linear_2.forward(&linear_1.forward(&pooled_context(context, cond.mask)).silu());
        }
        let mut h = self.conv_in.forward(x); // (B, c0, H, W)
        if let Some(extra) = after_conv_in {
            h += extra;
        }
        let mut skips = vec![h.shallow_clone()];
        for level in &self.down {
            for (j, resnet) in level.resnets.iter().enumerate() {
                h = resnet.forward(&h, &emb, train);
                if let Some(a) = level.attentions.get(j) {
                    h = a.forward(&h, cond);
                }
                skips.push(h.shallow_clone());
            }
            if let Some(Resample::Down(d)) = &level.resample {
                h = d.forward(&h); // (B, c_i, H/2, W/2)
                skips.push(h.shallow_clone());
            }
        }
        h = self.mid_resnets[0].forward(&h, &emb, train);
        h = self.mid_attention.forward(&h, cond);
        let mid = self.mid_resnets[1].forward(&h, &emb, train);
        Encoded { emb, skips, mid }
    }

    /// [`Self::encode`] with a context (B, L, cross_attention_dim) and its mask, for a ControlNet's copy.
    pub fn encode_cond(
        &self,
        x: &Tensor,
        t: &Tensor,
        (context, mask): (Option<&Tensor>, Option<&Tensor>),
        after_conv_in: Option<&Tensor>,
        train: bool,
    ) -> Encoded {
        let mut cond = check_cond(&self.config, context, mask, false);
        self.encode(x, t, &mut cond, after_conv_in, train)
    }
}

impl AdaptableLayers for UNetEncoder {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>) {
        for level in &mut self.down {
            level.adaptable_layers(out);
        }
        let [first, second] = &mut self.mid_resnets;
        first.adaptable_layers(out);
        self.mid_attention.adaptable_layers(out);
        second.adaptable_layers(out);
    }
}

/// What a ControlNet adds to a UNet's way down: one residual per skip (the UNet's skip shapes) and one for the
/// middle block's output ([ControlNet] Fig. 3: the zero convolutions' outputs).
pub struct Residuals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

/// The UNet: ε̂ = UNet(x_t, t), same shape in and out.
#[derive(Debug)]
pub struct UNet {
    pub config: UNetConfig,
    pub encoder: UNetEncoder,
    up: Vec<Level>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl UNet {
    pub fn new(vs: nn::Path, config: UNetConfig) -> Self {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let (c0, emb, drop) = (ch[0], config.emb_dim(), config.dropout);
        let pad = nn::ConvConfig { padding: 1, ..Default::default() };
        let root_depth = vs.components().count();
        let trunk = UNetEncoder::trunk(&vs, &config);
        // ANCHOR: unet_up
        // Up level r mirrors down level i = n−1−r. Its resnet j takes the running features plus one skip: the skip is
        // a resnet output of level i (c_i channels), except the last one, which is the downsampler output of level i−1
        // (or conv_in's output at the top): c_{i−1} channels.
        let mut up = Vec::new();
        let mut c_run = ch[n - 1];
        for r in 0..n {
            let i = n - 1 - r;
            let c = ch[i];
            let c_skip_last = ch[i.saturating_sub(1)];
            let p = &vs / "up_blocks" / r;
            let resnets = (0..=config.layers_per_block)
                .map(|j| {
                    let skip = if j == config.layers_per_block { c_skip_last } else { c };
                    ResBlock::new(&p / "resnets" / j, if j == 0 { c_run } else { c } + skip, c, emb, drop)
                })
                .collect();
            let attentions = if config.attention[i] {
                (0..=config.layers_per_block)
                    .map(|j| attention_block(&p / "attentions" / j, c, &config, root_depth))
                    .collect()
            } else {
                vec![]
            };
            let resample = (r + 1 < n).then(|| Resample::Up(Upsample::new(&p / "upsamplers" / 0, c)));
            up.push(Level { resnets, attentions, resample });
            c_run = c;
        }
        // ANCHOR_END: unet_up
        let encoder = UNetEncoder::finish(&vs, config.clone(), trunk);
        Self {
            encoder,
            up,
            conv_norm_out: nn::group_norm(&vs / "conv_norm_out", groups_for(c0), c0, Default::default()),
            conv_out: nn::conv2d(&vs / "conv_out", c0, config.out_channels, 3, pad),
            config,
        }
    }

    /// x: (B, C_in, H, W) (odd sizes too: 7 × 7 goes down to 4 × 4 and back); t: (B,) timesteps (any numeric kind) -> (B, C_out, H, W).
    pub fn forward(&self, x: &Tensor, t: &Tensor, train: bool) -> Tensor {
        self.forward_cond(x, t, None, None, train)
    }

    /// `forward` with a context (B, L, cross_attention_dim) for the cross-attention, and its key-padding mask
    /// (B, L) bool, true = real token (each row needs one). Without a context a conditional UNet skips its
    /// cross-attention.
    pub fn forward_cond(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: Option<&Tensor>,
        context_mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        self.run(x, t, &mut self.cond(context, context_mask, false), None, train)
    }

    /// `forward_cond` with a ControlNet's residuals added to the skips and the middle block's output ([ControlNet]
    /// Fig. 3; diffusers' `down_block_additional_residuals`, `mid_block_additional_residual`).
    pub fn forward_controlled(
        &self,
        x: &Tensor,
        t: &Tensor,
        (context, context_mask): (Option<&Tensor>, Option<&Tensor>),
        residuals: &Residuals,
        train: bool,
    ) -> Tensor {
        self.run(x, t, &mut self.cond(context, context_mask, false), Some(residuals), train)
    }

    /// `forward_cond` (in eval mode) that also returns every transformer's cross-attention weights, in network order.
    pub fn forward_with_maps(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        context_mask: Option<&Tensor>,
    ) -> (Tensor, Vec<CrossAttentionMap>) {
        let mut cond = self.cond(Some(context), context_mask, true);
        let out = self.run(x, t, &mut cond, None, false);
        (out, cond.maps.unwrap_or_default())
    }

    fn cond<'a>(&self, context: Option<&'a Tensor>, mask: Option<&'a Tensor>, keep_maps: bool) -> Cond<'a> {
        check_cond(&self.config, context, mask, keep_maps)
    }

    fn run(&self, x: &Tensor, t: &Tensor, cond: &mut Cond, control: Option<&Residuals>, train: bool) -> Tensor {
        // ANCHOR: unet_forward
        let Encoded { emb, mut skips, mut mid } = self.encoder.encode(x, t, cond, None, train);
        if let Some(r) = control {
            // [ControlNet] Fig. 3: the zero convolutions' outputs join the skips and the middle block's output
            assert_eq!(r.down.len(), skips.len(), "one ControlNet residual per skip");
            skips = skips.iter().zip(&r.down).map(|(s, d)| s + d).collect();
            mid += &r.mid;
        }
        let mut h = mid;
        for level in &self.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                h = resnet.forward(&Tensor::cat(&[h, skip], 1), &emb, train); // (B, c_run + c_skip, h, w) -> (B, c_i, h, w)
                if let Some(a) = level.attentions.get(j) {
                    h = a.forward(&h, cond);
                }
            }
            if let Some(Resample::Up(u)) = &level.resample {
                // back to the size of the skip it meets: 2h × 2w, or 7 × 7 from 4 × 4 (an odd size halved rounds up)
                let skip = skips.last().expect("a skip per resnet of the next level").size();
                h = u.forward_to(&h, [skip[2], skip[3]]); // (B, c_i, H_skip, W_skip)
            }
        }
        // (B, C_out, H, W)
        self.conv_out.forward(&silu_fresh(self.conv_norm_out.forward(&h)))
        // ANCHOR_END: unet_forward
    }

    /// Parameters per top-level block (time_embedding, conv_in, down_blocks.i, mid_block, up_blocks.i, conv_out …),
    /// in network order, for the architecture summary.
    pub fn parameter_summary(vs: &nn::VarStore) -> Vec<(String, i64)> {
        let mut rows: Vec<(String, i64)> = Vec::new();
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        let order = |name: &str| -> (usize, String) {
            let parts: Vec<&str> = name.split('.').collect();
            let key = match parts[0] {
                "down_blocks" | "up_blocks" => format!("{}.{}", parts[0], parts[1]),
                other => other.to_string(),
            };
            let rank =
                ["time_embedding", "conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"]
                    .iter()
                    .position(|p| key.starts_with(p))
                    .unwrap_or(99);
            (rank * 100 + parts.get(1).and_then(|s| s.parse::<usize>().ok()).unwrap_or(0), key)
        };
        vars.sort_by_key(|(n, _)| order(n));
        for (name, t) in vars {
            let key = order(&name).1;
            match rows.last_mut() {
                Some((k, count)) if *k == key => *count += t.numel() as i64,
                _ => rows.push((key, t.numel() as i64)),
            }
        }
        rows
    }
}

// ANCHOR: pooled_context
/// The state of the last real token of each context row: context (B, L, D), mask (B, L) true = real token (a prefix of
/// each row) -> (B, D). For a CLIP text encoder this is its pooled output, the end-of-text token's state.
pub fn pooled_context(context: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let (b, l, d) = context.size3().expect("context (B, L, D)");
    let last = match mask {
        Some(m) => m.to_kind(tch::Kind::Int64).sum_dim_intlist(1, false, tch::Kind::Int64) - 1, // (B,)
        None => Tensor::full([b], l - 1, (tch::Kind::Int64, context.device())),
    };
    let index = last.clamp_min(0).view([b, 1, 1]).expand([b, 1, d], false); // (B, 1, D)
    context.gather(1, &index, false).squeeze_dim(1) // (B, D)
}
// ANCHOR_END: pooled_context

/// The layers LoRA adapters can attach to ([`crate::nn::lora`]): the way down, the middle block, the way up.
impl AdaptableLayers for UNet {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>) {
        self.encoder.adaptable_layers(out);
        for level in &mut self.up {
            level.adaptable_layers(out);
        }
    }
}

impl crate::model::EpsModel for UNet {
    fn eps(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Tensor {
        self.forward(x_t, t, train)
    }
}

/// A UNet reads its conditioning directly: the context, and the padding mask when there is one.
impl crate::model::CondEpsModel for UNet {
    fn eps_cond(&self, x_t: &Tensor, t: &Tensor, cond: &crate::model::Cond, train: bool) -> Tensor {
        self.forward_cond(x_t, t, Some(&cond.context), cond.mask.as_ref(), train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    #[test]
    fn the_pooled_context_is_the_last_real_token_and_reaches_the_output() {
        let context = Tensor::arange(2 * 3 * 2, (Kind::Float, Device::Cpu)).view([2, 3, 2]); // (B=2, L=3, D=2)
        let mask = Tensor::from_slice(&[true, true, false, true, true, true]).view([2, 3]);
        let pooled = pooled_context(&context, Some(&mask));
        assert_eq!(Vec::<f32>::try_from(pooled.flatten(0, -1)).unwrap(), [2.0, 3.0, 10.0, 11.0]);
        assert!(pooled_context(&context, None).equal(&context.select(1, 2)));
        // the projection is named as diffusers' class_embedding and feeds ε̂: zeroing it changes the output
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), UNetConfig { pooled_context_embedding: true, ..UNetConfig::tiny_cond(2) });
        let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[300i64, 300]);
        let with = tch::no_grad(|| net.forward_cond(&x, &t, Some(&context), Some(&mask), false));
        for name in ["class_embedding.linear_2.weight", "class_embedding.linear_2.bias"] {
            let _ = tch::no_grad(|| vs.variables()[name].shallow_clone().zero_());
        }
        let without = tch::no_grad(|| net.forward_cond(&x, &t, Some(&context), Some(&mask), false));
        assert!((with - without).abs().max().double_value(&[]) > 1e-5);
    }

    #[test]
    fn output_shape_equals_input_shape_for_odd_batches() {
        let vs = VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), UNetConfig::tiny());
        for b in [1i64, 3] {
            let x = Tensor::randn([b, 1, 28, 28], (Kind::Float, Device::Cpu));
            let t = Tensor::randint(1000, [b], (Kind::Int64, Device::Cpu));
            assert_eq!(net.forward(&x, &t, false).size(), [b, 1, 28, 28]);
        }
        let vs = VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), UNetConfig::mnist());
        let x = Tensor::randn([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert_eq!(net.forward(&x, &Tensor::from_slice(&[0i64, 500, 999]), false).size(), [3, 1, 28, 28]);
    }

    #[test]
    fn output_depends_on_the_timestep() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), UNetConfig::tiny());
        let x = Tensor::randn([1, 1, 28, 28], (Kind::Float, Device::Cpu)).repeat([2, 1, 1, 1]);
        let out = net.forward(&x, &Tensor::from_slice(&[10i64, 900]), false);
        assert!((out.get(0) - out.get(1)).abs().max().double_value(&[]) > 1e-4);
    }

    #[test]
    fn a_tiny_unet_overfits_one_batch() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), UNetConfig::tiny());
        let mut opt = nn::OptimizerConfig::build(nn::Adam::default(), &vs, 3e-3).unwrap();
        let x = Tensor::randn([4, 1, 16, 16], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[1i64, 200, 400, 800]);
        let target = Tensor::randn([4, 1, 16, 16], (Kind::Float, Device::Cpu));
        let mut first = 0.0;
        let mut last = 0.0;
        for step in 0..300 {
            let loss = (net.forward(&x, &t, true) - &target).square().mean(Kind::Float);
            if step == 0 {
                first = loss.double_value(&[]);
            }
            last = loss.double_value(&[]);
            opt.backward_step(&loss);
        }
        assert!(last < 0.1 * first, "loss {first} -> {last}");
    }

    #[test]
    fn a_conditional_unet_reads_its_context_and_runs_without_one() {
        tch::manual_seed(2);
        let vs = VarStore::new(Device::Cpu);
        let net = UNet::new(vs.root(), UNetConfig::tiny_cond(12));
        let opts = (Kind::Float, Device::Cpu);
        let (x, t) = (Tensor::randn([2, 1, 16, 16], opts), Tensor::from_slice(&[10i64, 500]));
        let (ctx, other) = (Tensor::randn([2, 5, 12], opts), Tensor::randn([2, 5, 12], opts));
        let out = net.forward_cond(&x, &t, Some(&ctx), None, false);
        assert_eq!(out.size(), [2, 1, 16, 16]);
        let diff = (&out - net.forward_cond(&x, &t, Some(&other), None, false)).abs().max().double_value(&[]);
        assert!(diff > 1e-4, "output ignores the context: {diff}");
        assert_eq!(net.forward(&x, &t, false).size(), [2, 1, 16, 16]);
        // the maps come from the same forward pass: down_blocks.1 (8×8), mid (8×8), up_blocks.0 (two, 8×8)
        let (with_maps, maps) = net.forward_with_maps(&x, &t, &ctx, None);
        // (forward runs libtorch's fused attention kernel, the maps need the formula's weights: round-off apart)
        assert!((with_maps - &out).abs().max().double_value(&[]) < 1e-5);
        let blocks: Vec<&str> = maps.iter().map(|m| m.block.as_str()).collect();
        assert_eq!(
            blocks,
            [
                "down_blocks.1.attentions.0",
                "mid_block.attentions.0",
                "up_blocks.0.attentions.0",
                "up_blocks.0.attentions.1"
            ]
        );
        assert!(maps.iter().all(|m| (m.height, m.width) == (8, 8) && m.weights.size() == [2, 2, 64, 5]));
        // an unconditional config keeps self-attention and its diffusers names
        let vs = VarStore::new(Device::Cpu);
        let _ = UNet::new(vs.root(), UNetConfig::tiny());
        assert!(vs.variables().contains_key("down_blocks.1.attentions.0.group_norm.weight"));
        assert!(!vs.variables().keys().any(|k| k.contains("transformer_blocks")));
    }

    #[test]
    fn an_sd15_shaped_unet_mirrors_unet2dconditionmodel_names() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let config = UNetConfig {
            block_out_channels: vec![32, 64, 64, 64],
            cross_attention_dim: Some(16),
            ..UNetConfig::sd15()
        };
        let net = UNet::new(vs.root() / "unet", config);
        let opts = (Kind::Float, Device::Cpu);
        let (x, ctx) = (Tensor::randn([1, 4, 8, 8], opts), Tensor::randn([1, 3, 16], opts));
        let mask = Tensor::from_slice(&[true, true, false]).view([1, 3]);
        let (out, maps) = net.forward_with_maps(&x, &Tensor::from_slice(&[999i64]), &ctx, Some(&mask));
        assert_eq!(out.size(), [1, 4, 8, 8]);
        // three cross-attention levels × 2 down, the mid block, three levels × 3 up; 8 heads everywhere
        assert_eq!(maps.len(), 3 * 2 + 1 + 3 * 3);
        let last = maps.last().unwrap();
        assert_eq!(
            (last.block.as_str(), last.height, last.weights.size()),
            ("up_blocks.3.attentions.2", 8, vec![1, 8, 64, 3])
        );
        let vars = vs.variables();
        for (name, shape) in [
            ("unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight", vec![32, 16]),
            ("unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", vec![512, 64]),
            ("unet.mid_block.attentions.0.proj_in.weight", vec![64, 64, 1, 1]),
            ("unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.bias", vec![32]),
            ("unet.up_blocks.1.resnets.2.conv_shortcut.weight", vec![64, 128, 1, 1]),
            ("unet.down_blocks.3.resnets.1.conv2.weight", vec![64, 64, 3, 3]),
            ("unet.down_blocks.2.downsamplers.0.conv.weight", vec![64, 64, 3, 3]),
            ("unet.up_blocks.2.upsamplers.0.conv.weight", vec![64, 64, 3, 3]),
        ] {
            assert_eq!(vars.get(name).map(|t| t.size()), Some(shape), "{name}");
        }
        // DownBlock2D and UpBlock2D at the lowest level have no attention; the last levels have no resampler
        for absent in [
            "unet.down_blocks.3.attentions",
            "unet.up_blocks.0.attentions",
            "unet.down_blocks.3.downsamplers",
            "unet.up_blocks.3.upsamplers",
        ] {
            assert!(!vars.keys().any(|k| k.starts_with(absent)), "unexpected {absent}");
        }
    }

    #[test]
    fn a_config_saved_before_conditioning_existed_still_loads() {
        let mut json = serde_json::to_value(UNetConfig::mnist()).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("cross_attention_dim");
        fields.remove("attention_heads");
        assert_eq!(serde_json::from_value::<UNetConfig>(json).unwrap(), UNetConfig::mnist());
    }

    /// SD 1.5's UNet has 859,520,964 parameters. Allocates 3.4 GB: run by hand with `--ignored`.
    #[test]
    #[ignore]
    fn sd15_has_the_parameter_count_of_stable_diffusion_1_5() {
        let vs = VarStore::new(Device::Cpu);
        let _ = UNet::new(vs.root(), UNetConfig::sd15());
        let total: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(total, 859_520_964);
    }

    #[test]
    fn parameter_summary_covers_every_parameter_and_mirrors_diffusers_names() {
        let vs = VarStore::new(Device::Cpu);
        let _ = UNet::new(vs.root(), UNetConfig::mnist());
        let rows = UNet::parameter_summary(&vs);
        let total: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(rows.iter().map(|r| r.1).sum::<i64>(), total);
        let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names.first(), Some(&"time_embedding"));
        assert!(names.contains(&"down_blocks.2") && names.contains(&"mid_block") && names.contains(&"up_blocks.0"));
        let keys: Vec<String> = vs.variables().into_keys().collect();
        for k in [
            "down_blocks.0.resnets.0.conv1.weight",
            "down_blocks.2.attentions.0.to_q.weight",
            "down_blocks.0.downsamplers.0.conv.weight",
            "up_blocks.0.resnets.1.conv_shortcut.weight",
            "mid_block.attentions.0.group_norm.weight",
        ] {
            assert!(keys.iter().any(|x| x == k), "missing {k}");
        }
    }
}
