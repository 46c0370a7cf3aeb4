//! Attention: scaled dot-product attention written out, multi-head attention with diffusers' parameter names, and
//! the spatial self-attention block a UNet uses at low resolution.
//!
//! [Transformer] Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762, eq. 1 and sec. 3.2.2.
//! [DDPM] Ho, Jain, Abbeel 2020, arXiv:2006.11239, appendix B: self-attention at the 16×16 resolution.
//! Notation (code -> paper): q, k, v -> Q, K, V; head_dim -> d_k; heads -> h.
use crate::nn::layers::groups_for;
use crate::nn::lora::{Adaptable, AdaptableLayers};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// [Transformer] eq. 1: Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V, for q (…, Lq, d), k and v (…, Lk, d).
/// `mask` (broadcastable to (…, Lq, Lk)), where given, is true for the keys each query may attend to.
// ANCHOR: sdpa
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let d = *q.size().last().expect("q has a feature dimension") as f64;
    let scores = q.matmul(&k.transpose(-2, -1)) / d.sqrt(); // (…, Lq, Lk)
    let scores = match mask {
        Some(m) => scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY),
        None => scores,
    };
    scores.softmax(-1, scores.kind()).matmul(v) // (…, Lq, d)
}
// ANCHOR_END: sdpa

/// The same attention through libtorch's fused kernel (`at::scaled_dot_product_attention`, which picks a
/// flash-attention kernel on the CPU: it never holds the (Lq, Lk) score matrix, and SD's 4096 × 4096 self-attention at
/// 64 × 64 latents is where that matters). The networks call this one; [`scaled_dot_product_attention`] is the formula
/// the book reads, and a test holds the two together.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, false, None, false)
}

/// Multi-head attention, [Transformer] sec. 3.2.2: h heads of width d_k, Q from `x`, K and V from `context` (cross-
/// attention) or from `x` itself (self-attention). Names as diffusers' `Attention`: to_q, to_k, to_v, to_out.0.
#[derive(Debug)]
pub struct MultiHeadAttention {
    to_q: Adaptable,
    to_k: Adaptable,
    to_v: Adaptable,
    to_out: Adaptable,
    heads: i64,
}

impl MultiHeadAttention {
    /// `dim`: width of the queries' sequence; `context_dim`: width of the context (= dim for self-attention).
    pub fn new(vs: nn::Path, dim: i64, context_dim: i64, heads: i64, head_dim: i64) -> Self {
        let inner = heads * head_dim;
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        Self {
            to_q: Adaptable::linear(&vs / "to_q", dim, inner, no_bias),
            to_k: Adaptable::linear(&vs / "to_k", context_dim, inner, no_bias),
            to_v: Adaptable::linear(&vs / "to_v", context_dim, inner, no_bias),
            to_out: Adaptable::linear(&vs / "to_out" / 0, inner, dim, Default::default()),
            heads,
        }
    }

    // ANCHOR: multi_head
    /// x: (B, Lq, dim), context: (B, Lk, context_dim) or None -> (B, Lq, dim).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, mask: Option<&Tensor>) -> Tensor {
        let ctx = context.unwrap_or(x);
        let split = |t: Tensor| {
            let (b, l, inner) = t.size3().expect("(B, L, inner)");
            t.view([b, l, self.heads, inner / self.heads]).transpose(1, 2) // (B, heads, L, d_k)
        };
        let (q, k, v) = (split(self.to_q.forward(x)), split(self.to_k.forward(ctx)), split(self.to_v.forward(ctx)));
        let out = fused_attention(&q, &k, &v, mask); // (B, heads, Lq, d_k)
        let (b, h, l, d) = out.size4().expect("(B, heads, L, d_k)");
        self.to_out.forward(&out.transpose(1, 2).reshape([b, l, h * d])) // (B, Lq, dim)
    }
    // ANCHOR_END: multi_head

    /// As `forward`, also returning the attention weights softmax(Q Kᵀ/√d_k) (masked keys get weight 0), for
    /// attention-map figures: (out (B, Lq, dim), weights (B, heads, Lq, Lk)).
    pub fn forward_with_weights(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let ctx = context.unwrap_or(x);
        let split = |t: Tensor| {
            let (b, l, inner) = t.size3().expect("(B, L, inner)");
            t.view([b, l, self.heads, inner / self.heads]).transpose(1, 2) // (B, heads, L, d_k)
        };
        let (q, k, v) = (split(self.to_q.forward(x)), split(self.to_k.forward(ctx)), split(self.to_v.forward(ctx)));
        let d = *q.size().last().expect("q has a feature dimension") as f64;
        let scores = q.matmul(&k.transpose(-2, -1)) / d.sqrt(); // (B, heads, Lq, Lk)
        let scores = match mask {
            Some(m) => scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY),
            None => scores,
        };
        let weights = scores.softmax(-1, scores.kind()); // (B, heads, Lq, Lk)
        let out = weights.matmul(&v); // (B, heads, Lq, d_k)
        let (b, h, l, d) = out.size4().expect("(B, heads, L, d_k)");
        let out = self.to_out.forward(&out.transpose(1, 2).reshape([b, l, h * d])); // (B, Lq, dim)
        (out, weights)
    }
}

impl AdaptableLayers for MultiHeadAttention {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>) {
        out.extend([&mut self.to_q, &mut self.to_k, &mut self.to_v, &mut self.to_out]);
    }
}

/// Self-attention over the pixels of a feature map, with a residual: x + Attn(GroupNorm(x)), every pixel a token.
/// Names as diffusers' UNet2DModel attention (group_norm + Attention with a residual connection).
#[derive(Debug)]
pub struct SpatialSelfAttention {
    group_norm: nn::GroupNorm,
    attn: MultiHeadAttention,
}

impl SpatialSelfAttention {
    pub fn new(vs: nn::Path, channels: i64, head_dim: i64) -> Self {
        let heads = (channels / head_dim).max(1);
        Self {
            group_norm: nn::group_norm(&vs / "group_norm", groups_for(channels), channels, Default::default()),
            attn: MultiHeadAttention::new(vs, channels, channels, heads, channels / heads),
        }
    }

    // ANCHOR: spatial_attention_forward
    /// x: (B, C, H, W) -> (B, C, H, W).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("(B, C, H, W)");
        let tokens = self.group_norm.forward(x).view([b, c, h * w]).transpose(1, 2); // (B, HW, C)
        let out = self.attn.forward(&tokens, None, None); // (B, HW, C)
        x + out.transpose(1, 2).reshape([b, c, h, w]) // (B, C, H, W)
    }
    // ANCHOR_END: spatial_attention_forward
}

/// The attention weights themselves, softmax(Q Kᵀ/√d_k): (…, Lq, Lk), for attention-map figures.
pub fn attention_weights(q: &Tensor, k: &Tensor) -> Tensor {
    let d = *q.size().last().unwrap() as f64;
    (q.matmul(&k.transpose(-2, -1)) / d.sqrt()).softmax(-1, Kind::Float)
}

impl AdaptableLayers for SpatialSelfAttention {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>) {
        self.attn.adaptable_layers(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    #[test]
    fn our_attention_equals_libtorch_sdpa() {
        tch::manual_seed(0);
        let opts = (Kind::Float, Device::Cpu);
        let (q, k, v) =
            (Tensor::randn([2, 3, 5, 8], opts), Tensor::randn([2, 3, 7, 8], opts), Tensor::randn([2, 3, 7, 8], opts));
        let ours = scaled_dot_product_attention(&q, &k, &v, None);
        let theirs = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        assert!((ours - theirs).abs().max().double_value(&[]) < 1e-5);
        // a mask that hides the last 3 keys equals attention over the first 4 keys only
        let mask = Tensor::arange(7, (Kind::Int64, Device::Cpu)).lt(4).view([1, 1, 1, 7]);
        let masked = scaled_dot_product_attention(&q, &k, &v, Some(&mask));
        let short = scaled_dot_product_attention(&q, &k.narrow(2, 0, 4), &v.narrow(2, 0, 4), None);
        assert!((masked - short).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn our_attention_equals_libtorch_sdpa_with_a_boolean_mask() {
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        let (q, k, v) =
            (Tensor::randn([2, 3, 5, 8], opts), Tensor::randn([2, 3, 7, 8], opts), Tensor::randn([2, 3, 7, 8], opts));
        // a random (Lq, Lk) mask with key 0 always allowed, so no row is empty
        let mask = Tensor::rand([5, 7], opts).gt(0.5).index_fill(1, &Tensor::from_slice(&[0i64]), 1);
        let ours = scaled_dot_product_attention(&q, &k, &v, Some(&mask));
        let theirs = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, None, false);
        assert!((ours - theirs).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn forward_with_weights_equals_forward_and_masked_keys_get_zero_weight() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let mha = MultiHeadAttention::new(vs.root(), 16, 12, 2, 8);
        let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 4, 12], (Kind::Float, Device::Cpu));
        // key-padding mask (B, 1, 1, Lk): batch 0 keeps 3 keys, batch 1 keeps 2
        let mask = Tensor::from_slice(&[true, true, true, false, true, true, false, false]).view([2, 1, 1, 4]);
        let (out, w) = mha.forward_with_weights(&x, Some(&ctx), Some(&mask));
        assert_eq!(w.size(), [2, 2, 5, 4]);
        assert!((out - mha.forward(&x, Some(&ctx), Some(&mask))).abs().max().double_value(&[]) < 1e-6);
        assert!((w.sum_dim_intlist(-1, false, Kind::Float) - 1.0).abs().max().double_value(&[]) < 1e-6);
        let masked_weight = w.masked_select(&mask.logical_not().expand_as(&w)).abs().max();
        assert_eq!(masked_weight.double_value(&[]), 0.0);
    }

    #[test]
    fn spatial_attention_keeps_shape_and_names_mirror_diffusers() {
        let vs = VarStore::new(Device::Cpu);
        let a = SpatialSelfAttention::new(vs.root() / "attn", 16, 8);
        let x = Tensor::randn([3, 16, 7, 7], (Kind::Float, Device::Cpu));
        assert_eq!(a.forward(&x).size(), [3, 16, 7, 7]);
        let names: Vec<String> = vs.variables().into_keys().collect();
        for n in
            ["attn.group_norm.weight", "attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight", "attn.to_out.0.bias"]
        {
            assert!(names.iter().any(|k| k == n), "missing {n}: {names:?}");
        }
    }

    #[test]
    fn attention_weights_rows_sum_to_one() {
        let q = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
        let w = attention_weights(&q, &q);
        assert!((w.sum_dim_intlist(-1, false, Kind::Float) - 1.0).abs().max().double_value(&[]) < 1e-6);
    }
}
