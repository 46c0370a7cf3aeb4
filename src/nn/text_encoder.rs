//! A CLIP-style text transformer: token + learned position embeddings, pre-LN encoder layers with (by default)
//! causal self-attention, a final LayerNorm. Its last hidden state is the context τ_θ(y) of Stable Diffusion.
//!
//! [CLIP] Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
//! arXiv:2103.00020, sec. 2.4 (the text encoder: a masked (causal) transformer; the [EOS] position's activation
//! is the text's feature).
//! [Transformer] Vaswani et al. 2017, arXiv:1706.03762, sec. 3.2 (attention), 3.3 (feed-forward).
//! [GELU] Hendrycks, Gimpel 2016, arXiv:1606.08415, sec. 2: GELU(x) = x Φ(x) ≈ x σ(1.702 x) ("QuickGELU", CLIP's).
//! Notation (code -> paper): hidden_size -> d_model; num_attention_heads -> h; ids -> token sequence.
//! Names follow transformers' `CLIPTextModel` without its `text_model.` prefix (the caller picks the root path):
//! embeddings.{token,position}_embedding, encoder.layers.i.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
//! mlp.fc1, mlp.fc2}, final_layer_norm.
use crate::nn::attention::fused_attention;
use crate::nn::transformer::key_padding_mask;
use crate::validate::{divides, finite_in, in_range, Validate, MAX_DEPTH, MAX_WIDTH};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// [GELU] sec. 2: the sigmoid approximation's constant, x σ(1.702 x).
const QUICK_GELU_ALPHA: f64 = 1.702;

/// The MLP's activation, spelled as transformers' `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// x σ(1.702 x), what CLIP was trained with.
    QuickGelu,
    /// x Φ(x), exact (erf) GELU.
    Gelu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => x * (x * QUICK_GELU_ALPHA).sigmoid(),
            Activation::Gelu => x.gelu("none"),
        }
    }
}

/// The shape of a text encoder, fields named as transformers' `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextEncoderConfig {
    pub vocab_size: i64,
    /// Longest token sequence (rows of the position embedding).
    pub max_position_embeddings: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub hidden_act: Activation,
    /// Whether position i attends only to positions ≤ i (CLIP: yes).
    pub causal: bool,
    pub layer_norm_eps: f64,
}

impl Validate for TextEncoderConfig {
    /// The heads must divide `hidden_size`; `layer_norm_eps` is a small positive number.
    fn validate(&self) -> Result<(), String> {
        in_range("vocab_size", self.vocab_size, 1, 1 << 20)?;
        in_range("max_position_embeddings", self.max_position_embeddings, 1, 1 << 16)?;
        in_range("hidden_size", self.hidden_size, 1, MAX_WIDTH)?;
        in_range("intermediate_size", self.intermediate_size, 1, MAX_WIDTH)?;
        in_range("num_hidden_layers", self.num_hidden_layers, 1, MAX_DEPTH)?;
        divides("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)?;
        finite_in("layer_norm_eps", self.layer_norm_eps, 1e-12, 1.0)
    }
}

impl TextEncoderConfig {
    /// A tiny encoder for tests.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 32,
            max_position_embeddings: 8,
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            hidden_act: Activation::QuickGelu,
            causal: true,
            layer_norm_eps: 1e-5,
        }
    }
    /// The lesson 06 caption encoder for text-conditioned MNIST: short captions, a small vocabulary.
    pub fn mnist(vocab_size: i64) -> Self {
        Self {
            vocab_size,
            max_position_embeddings: 16,
            hidden_size: 128,
            intermediate_size: 512,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            hidden_act: Activation::QuickGelu,
            causal: true,
            layer_norm_eps: 1e-5,
        }
    }
    /// Stable Diffusion 1.5's text encoder, CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14 config.json).
    pub fn clip_vit_l14() -> Self {
        Self {
            vocab_size: 49_408,
            max_position_embeddings: 77,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            hidden_act: Activation::QuickGelu,
            causal: true,
            layer_norm_eps: 1e-5,
        }
    }
    /// Number of parameters, counted from the shapes (embeddings; per layer 4 projections, 2 LayerNorms, 2 MLP
    /// linears; the final LayerNorm).
    pub fn num_parameters(&self) -> i64 {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let embeddings = (self.vocab_size + self.max_position_embeddings) * d;
        let layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d);
        embeddings + self.num_hidden_layers as i64 * layer + 2 * d
    }
}

/// CLIP's attention: multi-head attention with biased q/k/v/out projections.
#[derive(Debug)]
struct SelfAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
}

impl SelfAttention {
    fn new(vs: nn::Path, dim: i64, heads: i64) -> Self {
        let lin = |name: &str| nn::linear(&vs / name, dim, dim, Default::default());
        Self { q_proj: lin("q_proj"), k_proj: lin("k_proj"), v_proj: lin("v_proj"), out_proj: lin("out_proj"), heads }
    }

    /// x: (B, L, D), mask broadcastable to (B, heads, L, L) -> (B, L, D).
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, l, d) = x.size3().expect("(B, L, D)");
        let split = |t: Tensor| t.view([b, l, self.heads, d / self.heads]).transpose(1, 2); // (B, heads, L, d_k)
        let (q, k, v) = (split(self.q_proj.forward(x)), split(self.k_proj.forward(x)), split(self.v_proj.forward(x)));
        let out = fused_attention(&q, &k, &v, mask); // (B, heads, L, d_k)
        self.out_proj.forward(&out.transpose(1, 2).reshape([b, l, d])) // (B, L, D)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: nn::LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vs: nn::Path, cfg: &TextEncoderConfig) -> Self {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let ln = nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() };
        Self {
            layer_norm1: nn::layer_norm(&vs / "layer_norm1", vec![d], ln),
            self_attn: SelfAttention::new(&vs / "self_attn", d, cfg.num_attention_heads),
            layer_norm2: nn::layer_norm(&vs / "layer_norm2", vec![d], ln),
            fc1: nn::linear(&vs / "mlp" / "fc1", d, f, Default::default()),
            fc2: nn::linear(&vs / "mlp" / "fc2", f, d, Default::default()),
            act: cfg.hidden_act,
        }
    }

    // ANCHOR: clip_layer
    /// Pre-LN: x ← Attn(LN₁(x)) + x; x ← fc2(act(fc1(LN₂(x)))) + x.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let x = self.self_attn.forward(&self.layer_norm1.forward(x), mask) + x; // (B, L, D)
        let h = self.act.apply(&self.fc1.forward(&self.layer_norm2.forward(&x))); // (B, L, intermediate)
        self.fc2.forward(&h) + x // (B, L, D)
    }
    // ANCHOR_END: clip_layer
}

/// The text encoder: ids (B, L) -> last hidden state (B, L, D).
#[derive(Debug)]
pub struct TextEncoder {
    pub config: TextEncoderConfig,
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: nn::LayerNorm,
}

impl TextEncoder {
    pub fn new(vs: nn::Path, config: TextEncoderConfig) -> Self {
        assert!(config.hidden_size % config.num_attention_heads == 0, "heads must divide hidden_size");
        let (d, e) = (config.hidden_size, &vs / "embeddings");
        let ln = nn::LayerNormConfig { eps: config.layer_norm_eps, ..Default::default() };
        Self {
            token_embedding: nn::embedding(&e / "token_embedding", config.vocab_size, d, Default::default()),
            position_embedding: nn::embedding(
                &e / "position_embedding",
                config.max_position_embeddings,
                d,
                Default::default(),
            ),
            layers: (0..config.num_hidden_layers)
                .map(|i| EncoderLayer::new(&vs / "encoder" / "layers" / i, &config))
                .collect(),
            final_layer_norm: nn::layer_norm(&vs / "final_layer_norm", vec![d], ln),
            config,
        }
    }

    /// ids: (B, L) int64 with L ≤ max_position_embeddings; mask: optional (B, L) bool key-padding mask, true = real
    /// token (a query must keep at least one visible key: with the causal mask, position 0 must be real)
    /// -> (B, L, D), the last hidden state after final_layer_norm.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Tensor {
        self.forward_with_extra_tokens(ids, mask, None)
    }

    /// [`Self::forward`] where ids ≥ vocab_size read row (id − vocab_size) of `extra` (E, D): new tokens, such as a
    /// textual-inversion embedding's vectors, without touching the table.
    pub fn forward_with_extra_tokens(&self, ids: &Tensor, mask: Option<&Tensor>, extra: Option<&Tensor>) -> Tensor {
        // ANCHOR: text_encoder_forward
        let (_, l) = ids.size2().expect("ids (B, L)");
        assert!(l <= self.config.max_position_embeddings, "{l} tokens > {}", self.config.max_position_embeddings);
        let positions = Tensor::arange(l, (Kind::Int64, ids.device())); // (L,)
        let tokens = match extra {
            None => self.token_embedding.forward(ids),
            Some(extra) => {
                let table = Tensor::cat(&[&self.token_embedding.ws, &extra.to_kind(self.token_embedding.ws.kind())], 0);
                Tensor::embedding(&table, ids, -1, false, false) // (B, L, D)
            }
        };
        let mut h = tokens + self.position_embedding.forward(&positions); // (B, L, D)
        let causal = self.config.causal.then(|| causal_mask(l, ids.device())); // (1, 1, L, L)
        let padding = mask.map(key_padding_mask); // (B, 1, 1, L)
        let attn_mask = match (causal, padding) {
            (Some(c), Some(p)) => Some(c.logical_and(&p)), // (B, 1, L, L)
            (c, p) => c.or(p),
        };
        for layer in &self.layers {
            h = layer.forward(&h, attn_mask.as_ref());
        }
        self.final_layer_norm.forward(&h)
        // ANCHOR_END: text_encoder_forward
    }

    /// Copies of the token-embedding rows of `ids`: (E, D), e.g. the start of a textual-inversion vector.
    pub fn token_embedding_rows(&self, ids: &[i64]) -> Tensor {
        let index = Tensor::from_slice(ids).to_device(self.token_embedding.ws.device());
        self.token_embedding.ws.index_select(0, &index).detach().copy() // (E, D)
    }

    /// [CLIP] sec. 2.4: the pooled feature is the hidden state at the [EOS] token: hidden (B, L, D), ids (B, L) ->
    /// (B, D), taken at the first position where ids == eos_id (position 0 if a row has none), as transformers does.
    pub fn pooled(hidden: &Tensor, ids: &Tensor, eos_id: i64) -> Tensor {
        let first_eos = ids.eq(eos_id).to_kind(Kind::Int64).argmax(-1, false); // (B,) first maximum
        let rows = Tensor::arange(ids.size()[0], (Kind::Int64, ids.device())); // (B,)
        hidden.index(&[Some(rows), Some(first_eos)]) // (B, D)
    }
}

/// (1, 1, L, L) bool, true where key j ≤ query i.
pub fn causal_mask(l: i64, device: Device) -> Tensor {
    Tensor::ones([l, l], (Kind::Bool, device)).tril(0).view([1, 1, l, l])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn tiny() -> (VarStore, TextEncoder) {
        let vs = VarStore::new(Device::Cpu);
        let enc = TextEncoder::new(vs.root(), TextEncoderConfig::tiny());
        (vs, enc)
    }

    #[test]
    fn shapes_and_parameter_names_mirror_transformers() {
        tch::manual_seed(0);
        let (vs, enc) = tiny();
        let ids = Tensor::from_slice(&[1i64, 5, 9, 2, 0, 0, 1, 7, 2, 0, 0, 0]).view([2, 6]);
        assert_eq!(enc.forward(&ids, None).size(), [2, 6, 16]);
        let vars = vs.variables();
        for (name, shape) in [
            ("embeddings.token_embedding.weight", vec![32, 16]),
            ("embeddings.position_embedding.weight", vec![8, 16]),
            ("encoder.layers.1.layer_norm1.weight", vec![16]),
            ("encoder.layers.1.self_attn.q_proj.weight", vec![16, 16]),
            ("encoder.layers.1.self_attn.k_proj.bias", vec![16]),
            ("encoder.layers.1.self_attn.out_proj.bias", vec![16]),
            ("encoder.layers.0.layer_norm2.bias", vec![16]),
            ("encoder.layers.0.mlp.fc1.weight", vec![32, 16]),
            ("encoder.layers.0.mlp.fc2.weight", vec![16, 32]),
            ("final_layer_norm.weight", vec![16]),
        ] {
            assert_eq!(vars.get(name).map(|t| t.size()), Some(shape), "{name}");
        }
        let total: i64 = vars.values().map(|t| t.numel() as i64).sum();
        assert_eq!(total, TextEncoderConfig::tiny().num_parameters());
        // SD 1.5's CLIP ViT-L/14 text model has 123,060,480 parameters
        assert_eq!(TextEncoderConfig::clip_vit_l14().num_parameters(), 123_060_480);
    }

    #[test]
    fn causal_attention_never_looks_ahead() {
        tch::manual_seed(1);
        let (_vs, enc) = tiny();
        let ids = Tensor::from_slice(&[1i64, 5, 9, 4, 2, 3]).view([1, 6]);
        let out = enc.forward(&ids, None);
        let changed = ids.copy();
        let _ = changed.get(0).get(3).fill_(11);
        let out2 = enc.forward(&changed, None);
        assert!(max_diff(&out.narrow(1, 0, 3), &out2.narrow(1, 0, 3)) < 1e-6);
        assert!(max_diff(&out.narrow(1, 3, 1), &out2.narrow(1, 3, 1)) > 1e-3);
        // without the causal mask, earlier positions do see the change
        let vs = VarStore::new(Device::Cpu);
        let bidirectional =
            TextEncoder::new(vs.root(), TextEncoderConfig { causal: false, ..TextEncoderConfig::tiny() });
        let (a, b) = (bidirectional.forward(&ids, None), bidirectional.forward(&changed, None));
        assert!(max_diff(&a.narrow(1, 0, 1), &b.narrow(1, 0, 1)) > 1e-3);
    }

    #[test]
    fn padding_mask_hides_padded_tokens() {
        tch::manual_seed(2);
        let vs = VarStore::new(Device::Cpu);
        let cfg = TextEncoderConfig { causal: false, hidden_act: Activation::Gelu, ..TextEncoderConfig::tiny() };
        let enc = TextEncoder::new(vs.root(), cfg);
        let ids = Tensor::from_slice(&[1i64, 5, 2, 0, 0]).view([1, 5]);
        let mask = Tensor::from_slice(&[true, true, true, false, false]).view([1, 5]);
        let out = enc.forward(&ids, Some(&mask));
        let changed = ids.copy();
        let _ = changed.get(0).get(4).fill_(17);
        let out2 = enc.forward(&changed, Some(&mask));
        // the real tokens do not see a change in a padded one, and equal the encoding of the unpadded sequence
        assert!(max_diff(&out.narrow(1, 0, 3), &out2.narrow(1, 0, 3)) < 1e-6);
        assert!(max_diff(&out.narrow(1, 0, 3), &enc.forward(&ids.narrow(1, 0, 3), None)) < 1e-5);
    }

    #[test]
    fn pooled_takes_the_first_eos_position_and_activations_match_their_formulas() {
        let hidden = Tensor::arange(2 * 4 * 3, (Kind::Float, Device::Cpu)).view([2, 4, 3]);
        let ids = Tensor::from_slice(&[1i64, 7, 2, 2, 1, 2, 0, 0]).view([2, 4]);
        let pooled = TextEncoder::pooled(&hidden, &ids, 2);
        assert!(max_diff(&pooled, &Tensor::stack(&[hidden.get(0).get(2), hidden.get(1).get(1)], 0)) == 0.0);
        let x = Tensor::from_slice(&[-1.0f32, 0.5, 2.0]);
        let quick: Vec<f64> = [-1.0f64, 0.5, 2.0].iter().map(|v| v / (1.0 + (-1.702 * v).exp())).collect();
        assert!(max_diff(&Activation::QuickGelu.apply(&x), &Tensor::from_slice(&quick).to_kind(Kind::Float)) < 1e-6);
        // the two GELUs agree to about 0.02
        assert!(max_diff(&Activation::QuickGelu.apply(&x), &Activation::Gelu.apply(&x)) < 0.03);
    }
}
