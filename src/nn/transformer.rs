//! Stable Diffusion's spatial transformer: the feature map's pixels become tokens, which attend to each other
//! (self-attention) and to a text encoding (cross-attention), then pass a GEGLU feed-forward; a residual wraps it all.
//!
//! [Transformer] Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762, sec. 3.2 (attention), sec. 3.3
//! (position-wise feed-forward).
//! [LDM] Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752,
//! sec. 3.3: Attention(Q, K, V) = softmax(Q Kᵀ/√d) V with Q = W_Q φ(z_t), K = W_K τ_θ(y), V = W_V τ_θ(y); the
//! appendix spells out the block (1×1 conv in, LayerNorm → self-attention, LayerNorm → cross-attention, LayerNorm →
//! feed-forward, each with a residual, 1×1 conv out).
//! [GLU] Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202, eq. 6 (GEGLU).
//! Notation (code -> paper): tokens -> φ(z_t) flattened to (HW, d_ε); context -> τ_θ(y) of width d_τ (context_dim);
//! inner -> d_ε = heads · head_dim; heads -> h; head_dim -> d.
//! Names follow diffusers' `Transformer2DModel` for SD 1.x (use_linear_projection = false): norm, proj_in,
//! transformer_blocks.i.{norm1, attn1, norm2, attn2, norm3, ff.net.0.proj, ff.net.2}, proj_out.
use crate::nn::attention::MultiHeadAttention;
use crate::nn::layers::groups_for;
use crate::nn::lora::{Adaptable, AdaptableLayers};
use tch::nn::{self, Module};
use tch::Tensor;

/// Width multiplier of the feed-forward's hidden layer, diffusers' `FeedForward(mult=4)` as [Transformer] sec. 3.3.
pub const FF_MULT: i64 = 4;
/// GroupNorm ε of diffusers' `Transformer2DModel`.
const NORM_EPS: f64 = 1e-6;

/// A key-padding mask (B, L), true for real tokens, as an attention mask broadcastable to (B, heads, Lq, L).
pub fn key_padding_mask(mask: &Tensor) -> Tensor {
    let (b, l) = mask.size2().expect("key-padding mask (B, L)");
    mask.view([b, 1, 1, l]) // (B, 1, 1, L)
}

/// [GLU] eq. 6 GEGLU(x) = (x V) ⊗ GELU(x W): one Linear `proj` computes both, value first and gate second
/// (diffusers' `GEGLU`: `hidden_states, gate = proj(x).chunk(2, -1)`).
#[derive(Debug)]
pub struct GeGlu {
    proj: Adaptable,
}

impl GeGlu {
    pub fn new(vs: nn::Path, dim: i64, inner: i64) -> Self {
        Self { proj: Adaptable::linear(vs / "proj", dim, 2 * inner, Default::default()) }
    }

    // ANCHOR: geglu
    /// x: (…, dim) -> (…, inner).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut halves = self.proj.forward(x).chunk(2, -1); // 2 × (…, inner), views of one (…, 2·inner)
        if halves[1].requires_grad() {
            return &halves[0] * halves[1].gelu("none");
        }
        // inference: the same values, written over the projection's own memory (no new (…, inner) tensors; the
        // next Linear reads the strided half directly)
        let (mut value, mut gate) = (halves.remove(0), halves.remove(0));
        let _ = gate.gelu_("none");
        value *= &gate;
        value
    }
    // ANCHOR_END: geglu
}

/// Position-wise feed-forward with GEGLU: net.0 = GEGLU(dim → 4·dim), net.2 = Linear(4·dim → dim); diffusers'
/// net.1 is a dropout without parameters (SD uses p = 0), left out.
#[derive(Debug)]
pub struct FeedForward {
    geglu: GeGlu,
    out: Adaptable,
}

impl FeedForward {
    pub fn new(vs: nn::Path, dim: i64) -> Self {
        let inner = FF_MULT * dim;
        Self {
            geglu: GeGlu::new(&vs / "net" / 0, dim, inner),
            out: Adaptable::linear(&vs / "net" / 2, inner, dim, Default::default()),
        }
    }

    /// x: (…, dim) -> (…, dim).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.out.forward(&self.geglu.forward(x))
    }
}

impl AdaptableLayers for FeedForward {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>) {
        out.extend([&mut self.geglu.proj, &mut self.out]);
    }
}

/// One pre-LN transformer block, [LDM] sec. 3.3 and appendix:
/// x ← Attn₁(LN₁(x)) + x; x ← Attn₂(LN₂(x), τ_θ(y)) + x; x ← FF(LN₃(x)) + x.
/// Without a context the cross-attention step is skipped (diffusers would run attn2 as self-attention, which only
/// works when context_dim = dim), so a conditional network can still run unconditionally.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: MultiHeadAttention,
    norm2: nn::LayerNorm,
    attn2: MultiHeadAttention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    /// `dim`: token width (= heads · head_dim in SD); `context_dim`: width of the context tokens.
    pub fn new(vs: nn::Path, dim: i64, context_dim: i64, heads: i64, head_dim: i64) -> Self {
        let ln = |name: &str| nn::layer_norm(&vs / name, vec![dim], Default::default()); // ε = 1e-5 as diffusers
        Self {
            norm1: ln("norm1"),
            attn1: MultiHeadAttention::new(&vs / "attn1", dim, dim, heads, head_dim),
            norm2: ln("norm2"),
            attn2: MultiHeadAttention::new(&vs / "attn2", dim, context_dim, heads, head_dim),
            norm3: ln("norm3"),
            ff: FeedForward::new(&vs / "ff", dim),
        }
    }

    /// x: (B, N, dim), context: (B, L, context_dim), context_mask: (B, L) bool, true = real token -> (B, N, dim).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, context_mask: Option<&Tensor>) -> Tensor {
        self.run(x, context, context_mask, false).0
    }

    // ANCHOR: transformer_block
    fn run(&self, x: &Tensor, context: Option<&Tensor>, mask: Option<&Tensor>, keep: bool) -> (Tensor, Option<Tensor>) {
        // each residual sum is added into the fresh left-hand side (see `layers::silu_fresh`)
        let mut h = self.attn1.forward(&self.norm1.forward(x), None, None);
        h += x; // (B, N, dim)
        let x = h;
        let mask = mask.map(key_padding_mask); // (B, 1, 1, L)
        let (x, map) = match context {
            Some(ctx) => {
                let (mut h, w) = if keep {
                    let (h, w) = self.attn2.forward_with_weights(&self.norm2.forward(&x), Some(ctx), mask.as_ref());
                    (h, Some(w))
                } else {
                    (self.attn2.forward(&self.norm2.forward(&x), Some(ctx), mask.as_ref()), None)
                };
                h += &x;
                (h, w)
            }
            None => (x, None),
        };
        let mut h = self.ff.forward(&self.norm3.forward(&x));
        h += &x;
        (h, map)
    }
    // ANCHOR_END: transformer_block
}

impl AdaptableLayers for BasicTransformerBlock {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>) {
        self.attn1.adaptable_layers(out);
        self.attn2.adaptable_layers(out);
        self.ff.adaptable_layers(out);
    }
}

/// diffusers' `Transformer2DModel` (SD 1.x): GroupNorm → 1×1 conv C → inner → `depth` transformer blocks over the
/// HW tokens → 1×1 conv inner → C, plus the input.
#[derive(Debug)]
pub struct SpatialTransformer {
    norm: nn::GroupNorm,
    proj_in: Adaptable,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Adaptable,
}

impl SpatialTransformer {
    pub fn new(vs: nn::Path, channels: i64, heads: i64, head_dim: i64, context_dim: i64, depth: usize) -> Self {
        let inner = heads * head_dim;
        let norm = nn::GroupNormConfig { eps: NORM_EPS, ..Default::default() };
        Self {
            norm: nn::group_norm(&vs / "norm", groups_for(channels), channels, norm),
            proj_in: Adaptable::conv2d(&vs / "proj_in", channels, inner, 1, Default::default()),
            transformer_blocks: (0..depth)
                .map(|i| {
                    BasicTransformerBlock::new(&vs / "transformer_blocks" / i, inner, context_dim, heads, head_dim)
                })
                .collect(),
            proj_out: Adaptable::conv2d(&vs / "proj_out", inner, channels, 1, Default::default()),
        }
    }

    /// x: (B, C, H, W), context: (B, L, context_dim), context_mask: (B, L) bool, true = real token -> (B, C, H, W).
    /// Every row of the mask needs at least one real token (an all-masked row has no keys to attend to).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, context_mask: Option<&Tensor>) -> Tensor {
        self.run(x, context, context_mask, false).0
    }

    /// As `forward`, plus each block's cross-attention weights (B, heads, HW, L) (pixel index = row · W + column);
    /// empty without a context.
    pub fn forward_with_maps(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        context_mask: Option<&Tensor>,
    ) -> (Tensor, Vec<Tensor>) {
        self.run(x, context, context_mask, true)
    }

    // ANCHOR: spatial_transformer_forward
    fn run(&self, x: &Tensor, context: Option<&Tensor>, mask: Option<&Tensor>, keep: bool) -> (Tensor, Vec<Tensor>) {
        let (b, _, h, w) = x.size4().expect("(B, C, H, W)");
        let hidden = self.proj_in.forward(&self.norm.forward(x)); // (B, inner, H, W)
        let inner = hidden.size()[1];
        // (B, inner, H, W) -> (B, H, W, inner) -> (B, HW, inner): free when x is channels-last, one copy otherwise
        let mut tokens = hidden.permute([0, 2, 3, 1]).reshape([b, h * w, inner]);
        let mut maps = Vec::new();
        for block in &self.transformer_blocks {
            let (out, map) = block.run(&tokens, context, mask, keep);
            tokens = out;
            maps.extend(map);
        }
        let hidden = tokens.reshape([b, h, w, inner]).permute([0, 3, 1, 2]); // (B, inner, H, W), channels-last strides
        let mut out = self.proj_out.forward(&hidden);
        out += x;
        (out, maps)
    }
    // ANCHOR_END: spatial_transformer_forward
}

impl AdaptableLayers for SpatialTransformer {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>) {
        out.push(&mut self.proj_in);
        for block in &mut self.transformer_blocks {
            block.adaptable_layers(out);
        }
        out.push(&mut self.proj_out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn geglu_matches_its_formula() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let g = GeGlu::new(vs.root() / "g", 3, 2);
        let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        let (w, bias) =
            (vs.variables()["g.proj.weight"].shallow_clone(), vs.variables()["g.proj.bias"].shallow_clone());
        let y = x.matmul(&w.tr()) + bias; // (4, 4): value columns 0..2, gate columns 2..4
        let (a, gate) = (y.narrow(1, 0, 2), y.narrow(1, 2, 2));
        // GELU(z) = z · Φ(z) = z · (1 + erf(z/√2)) / 2
        let want = &a * &gate * ((&gate / 2f64.sqrt()).erf() + 1.0) * 0.5;
        assert!(max_diff(&g.forward(&x), &want) < 1e-6);
        // inference writes over the projection's memory and hands the next layer a strided half: same values
        let y = tch::no_grad(|| g.forward(&x));
        assert!(!y.requires_grad() && max_diff(&y, &want) < 1e-6);
    }

    #[test]
    fn inference_in_place_gives_the_training_values_and_training_still_back_propagates() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let st = SpatialTransformer::new(vs.root(), 8, 2, 4, 6, 2);
        let x = Tensor::randn([2, 8, 4, 4], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 5, 6], (Kind::Float, Device::Cpu));
        let train = st.forward(&x, Some(&ctx), None); // requires grad: GELU copies
        let infer = tch::no_grad(|| st.forward(&x, Some(&ctx), None)); // GEGLU and residual sums in place
        assert!(train.requires_grad() && !infer.requires_grad());
        assert!(max_diff(&train, &infer) < 1e-6);
        train.sum(Kind::Float).backward();
        for (name, var) in vs.variables() {
            assert!(var.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "no gradient for {name}");
        }
    }

    #[test]
    fn shapes_and_parameter_names_mirror_diffusers() {
        let vs = VarStore::new(Device::Cpu);
        let (c, heads, head_dim, ctx_dim) = (16, 2, 8, 12);
        let st = SpatialTransformer::new(vs.root(), c, heads, head_dim, ctx_dim, 1);
        let x = Tensor::randn([2, c, 5, 3], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 7, ctx_dim], (Kind::Float, Device::Cpu));
        let (out, maps) = st.forward_with_maps(&x, Some(&ctx), None);
        assert_eq!(out.size(), [2, c, 5, 3]);
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].size(), [2, heads, 15, 7]);
        let inner = heads * head_dim;
        let vars = vs.variables();
        for (name, shape) in [
            ("norm.weight", vec![c]),
            ("proj_in.weight", vec![inner, c, 1, 1]),
            ("transformer_blocks.0.norm1.weight", vec![inner]),
            ("transformer_blocks.0.attn1.to_q.weight", vec![inner, inner]),
            ("transformer_blocks.0.attn2.to_k.weight", vec![inner, ctx_dim]),
            ("transformer_blocks.0.attn2.to_v.weight", vec![inner, ctx_dim]),
            ("transformer_blocks.0.attn2.to_out.0.bias", vec![inner]),
            ("transformer_blocks.0.norm3.bias", vec![inner]),
            ("transformer_blocks.0.ff.net.0.proj.weight", vec![2 * FF_MULT * inner, inner]),
            ("transformer_blocks.0.ff.net.2.weight", vec![inner, FF_MULT * inner]),
            ("proj_out.weight", vec![c, inner, 1, 1]),
        ] {
            assert_eq!(vars.get(name).map(|t| t.size()), Some(shape), "{name}");
        }
        // to_q/k/v have no bias in diffusers' SD attention
        assert!(!vars.contains_key("transformer_blocks.0.attn2.to_k.bias"));
    }

    #[test]
    fn without_a_context_only_self_attention_and_feed_forward_act() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let st = SpatialTransformer::new(vs.root(), 8, 2, 4, 6, 1);
        let x = Tensor::randn([2, 8, 4, 4], (Kind::Float, Device::Cpu));
        let before = st.forward(&x, None, None);
        // changing every cross-attention parameter leaves the unconditional output unchanged
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                if name.contains("attn2") || name.contains("norm2") {
                    let _ = t.g_add_scalar_(1.0);
                }
            }
        });
        assert!(max_diff(&before, &st.forward(&x, None, None)) < 1e-6);
        let (_, maps) = st.forward_with_maps(&x, None, None);
        assert!(maps.is_empty());
    }

    #[test]
    fn cross_attention_reads_real_context_tokens_and_ignores_padding() {
        tch::manual_seed(2);
        let vs = VarStore::new(Device::Cpu);
        let st = SpatialTransformer::new(vs.root(), 8, 2, 4, 6, 1);
        let x = Tensor::randn([2, 8, 4, 4], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 5, 6], (Kind::Float, Device::Cpu));
        // row 0 has 3 real tokens, row 1 has 5
        let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 1, 1, 1, 1, 1]).view([2, 5]).to_kind(Kind::Bool);
        let (out, maps) = st.forward_with_maps(&x, Some(&ctx), Some(&mask));
        // a different context changes the output
        let other = Tensor::randn([2, 5, 6], (Kind::Float, Device::Cpu));
        assert!(max_diff(&out, &st.forward(&x, Some(&other), Some(&mask))) > 1e-3);
        // changing a padding token of row 0 changes nothing; changing its real token 1 does
        let padded = ctx.copy();
        let _ = padded.get(0).get(4).fill_(7.0);
        let fused = st.forward(&x, Some(&ctx), Some(&mask)); // forward uses the fused kernel, the maps the formula
        assert!(max_diff(&out, &fused) < 1e-5);
        assert!(max_diff(&fused, &st.forward(&x, Some(&padded), Some(&mask))) < 1e-6);
        let changed = ctx.copy();
        let _ = changed.get(0).get(1).fill_(7.0);
        assert!(max_diff(&out.get(0), &st.forward(&x, Some(&changed), Some(&mask)).get(0)) > 1e-3);
        // padding keys get zero weight and each pixel's weights over the tokens sum to 1
        assert_eq!(maps[0].get(0).narrow(-1, 3, 2).abs().max().double_value(&[]), 0.0);
        let sums = maps[0].sum_dim_intlist(-1, false, Kind::Float);
        assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-5);
    }
}
