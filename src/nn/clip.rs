//! A mini-CLIP: a small CNN image encoder and the CLIP text transformer, trained contrastively on MNIST images and
//! their captions, so that lesson 06 can freeze the text side as Stable Diffusion freezes CLIP's.
//!
//! [CLIP] Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
//! arXiv:2103.00020, Figure 3 (the loss, as numpy-like pseudo-code) and sec. 2.5 (the learnable temperature,
//! initialised to 0.07 and clipped so the logits are scaled by at most 100).
//! [UniCL] Yang et al. 2022, "Unified Contrastive Learning in Image-Text-Label Space", arXiv:2204.03610, sec. 3
//! ("Unified Image-Text-Label Contrast"): every pair that shares a label is a positive, the targets spread over them.
//! Notation (code -> [CLIP] Fig. 3): image_emb -> I_e, text_emb -> T_e, text_projection -> W_t,
//! visual_projection -> W_i, logit_scale -> t (so exp(t) = 1/τ), embed_dim -> d_e.
//! Names follow transformers' `CLIPModel`: text_model (a [`TextEncoder`]), vision_model (here a CNN, not a ViT),
//! text_projection, visual_projection (both Linear without bias), logit_scale (a 0-d parameter).
use crate::nn::layers::groups_for;
use crate::nn::text_encoder::{TextEncoder, TextEncoderConfig};
use crate::text::{ids_tensor, Bpe};
use crate::validate::{in_range, list_in, Validate, MAX_WIDTH};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// [CLIP] sec. 2.5: τ starts at 0.07 (from Wu et al. 2018), so logit_scale = ln(1/0.07) ≈ 2.659.
pub const LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778;
/// [CLIP] sec. 2.5: the logits are scaled by at most 100, logit_scale ≤ ln 100.
pub const LOGIT_SCALE_MAX: f64 = 4.605_170_185_988_092;
/// LayerNorm ε of the pooled image feature, as transformers' CLIP `post_layernorm`.
const LAYER_NORM_EPS: f64 = 1e-5;
/// Images encoded per forward pass in [`zero_shot_accuracy`].
const EVAL_CHUNK: i64 = 1024;

/// The shape of a [`MiniClip`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MiniClipConfig {
    pub text: TextEncoderConfig,
    /// The token whose final hidden state is the text's feature ([CLIP] sec. 2.4). Our [`Bpe`] puts
    /// `<|endoftext|>` last, so the presets use vocab_size − 1.
    pub eos_token_id: i64,
    /// Channels of the input images (1 for MNIST).
    pub in_channels: i64,
    /// Output channels of each conv of the image encoder; the first has stride 1, the others stride 2.
    pub image_channels: Vec<i64>,
    /// d_e, the width of the joint embedding space (transformers' `projection_dim`).
    pub embed_dim: i64,
}

impl Validate for MiniClipConfig {
    fn validate(&self) -> Result<(), String> {
        self.text.validate().map_err(|e| format!("text: {e}"))?;
        in_range("eos_token_id", self.eos_token_id, 0, self.text.vocab_size - 1)?;
        in_range("in_channels", self.in_channels, 1, MAX_WIDTH)?;
        list_in("image_channels", &self.image_channels, None, 1, MAX_WIDTH)?;
        in_range("embed_dim", self.embed_dim, 1, MAX_WIDTH)
    }
}

impl MiniClipConfig {
    /// For MNIST captions: the lesson 06 text encoder, a 28 → 28 → 14 → 7 CNN, a 128-wide joint space.
    pub fn mnist(vocab_size: i64) -> Self {
        Self {
            text: TextEncoderConfig::mnist(vocab_size),
            eos_token_id: vocab_size - 1,
            in_channels: 1,
            image_channels: vec![32, 64, 128],
            embed_dim: 128,
        }
    }
    /// For tests: the tiny text encoder with a real vocabulary size, two narrow convs.
    pub fn tiny(vocab_size: i64) -> Self {
        Self {
            text: TextEncoderConfig { vocab_size, ..TextEncoderConfig::tiny() },
            eos_token_id: vocab_size - 1,
            in_channels: 1,
            image_channels: vec![8, 16],
            embed_dim: 16,
        }
    }
}

/// One conv of the image encoder: 3×3 conv → GroupNorm → SiLU.
#[derive(Debug)]
struct ConvBlock {
    conv: nn::Conv2D,
    norm: nn::GroupNorm,
}

/// The vision tower: a small CNN, (B, C, H, W) in [−1, 1] -> (B, width) with width the last conv's channels
/// (global mean pool, then LayerNorm as CLIP's `post_layernorm`). `visual_projection` maps it to the joint space.
#[derive(Debug)]
pub struct ImageEncoder {
    blocks: Vec<ConvBlock>,
    post_layernorm: nn::LayerNorm,
    pub width: i64,
}

impl ImageEncoder {
    pub fn new(vs: nn::Path, in_channels: i64, channels: &[i64]) -> Self {
        assert!(!channels.is_empty(), "the image encoder needs at least one conv");
        let mut c_in = in_channels;
        let mut blocks = Vec::new();
        for (i, &c) in channels.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            let cfg = nn::ConvConfig { stride, padding: 1, ..Default::default() };
            let p = &vs / "blocks" / i;
            blocks.push(ConvBlock {
                conv: nn::conv2d(&p / "conv", c_in, c, 3, cfg),
                norm: nn::group_norm(&p / "norm", groups_for(c), c, Default::default()),
            });
            c_in = c;
        }
        let ln = nn::LayerNormConfig { eps: LAYER_NORM_EPS, ..Default::default() };
        Self { blocks, post_layernorm: nn::layer_norm(&vs / "post_layernorm", vec![c_in], ln), width: c_in }
    }

    /// x: (B, C, H, W) -> (B, width).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for b in &self.blocks {
            h = b.norm.forward(&b.conv.forward(&h)).silu(); // (B, c_i, H_i, W_i)
        }
        let pooled = h.mean_dim([2i64, 3].as_slice(), false, h.kind()); // (B, width)
        self.post_layernorm.forward(&pooled)
    }
}

/// Image and text towers, their projections into one embedding space, and the temperature.
#[derive(Debug)]
pub struct MiniClip {
    pub config: MiniClipConfig,
    /// `vision_model`.
    pub image_encoder: ImageEncoder,
    /// `text_model`: what lesson 06 freezes and reads the last hidden state of.
    pub text_encoder: TextEncoder,
    pub text_projection: nn::Linear,
    pub visual_projection: nn::Linear,
    /// t of [CLIP] Fig. 3, unclamped; read it through [`MiniClip::logit_scale`].
    logit_scale: Tensor,
}

impl MiniClip {
    pub fn new(vs: nn::Path, config: MiniClipConfig) -> Self {
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        let image_encoder = ImageEncoder::new(&vs / "vision_model", config.in_channels, &config.image_channels);
        let text_encoder = TextEncoder::new(&vs / "text_model", config.text.clone());
        Self {
            text_projection: nn::linear(&vs / "text_projection", config.text.hidden_size, config.embed_dim, no_bias),
            visual_projection: nn::linear(&vs / "visual_projection", image_encoder.width, config.embed_dim, no_bias),
            logit_scale: vs.var("logit_scale", &[], nn::Init::Const(LOGIT_SCALE_INIT)),
            image_encoder,
            text_encoder,
            config,
        }
    }

    /// [CLIP] sec. 2.5: t clipped to ln 100. OpenAI clamps the parameter in place after each step; clamping on read
    /// gives the same logits and a zero gradient above the bound, with no hook in the shared trainer.
    pub fn logit_scale(&self) -> Tensor {
        self.logit_scale.clamp_max(LOGIT_SCALE_MAX)
    }

    /// ids (B, L), mask (B, L) bool or None -> (B, d_e): the hidden state at the first EOS, projected by W_t,
    /// L2-normalised ([CLIP] Fig. 3, `T_e`).
    pub fn encode_text(&self, ids: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let hidden = self.text_encoder.forward(ids, mask); // (B, L, D)
        let pooled = TextEncoder::pooled(&hidden, ids, self.config.eos_token_id); // (B, D)
        l2_normalize(&self.text_projection.forward(&pooled)) // (B, d_e)
    }

    /// images (B, C, H, W) in [−1, 1] -> (B, d_e), projected by W_i, L2-normalised ([CLIP] Fig. 3, `I_e`).
    pub fn encode_image(&self, images: &Tensor) -> Tensor {
        let features = self.image_encoder.forward(images); // (B, width)
        l2_normalize(&self.visual_projection.forward(&features)) // (B, d_e)
    }

    /// The contrastive loss of a batch of matched (image, caption) pairs with the given targets.
    pub fn loss(&self, images: &Tensor, ids: &Tensor, mask: Option<&Tensor>, targets: ClipTargets) -> Tensor {
        let (image_emb, text_emb) = (self.encode_image(images), self.encode_text(ids, mask));
        match targets {
            ClipTargets::Pairs => clip_loss(&image_emb, &text_emb, &self.logit_scale()),
            ClipTargets::SameCaption => clip_loss_soft(&image_emb, &text_emb, &self.logit_scale(), &same_caption(ids)),
        }
    }
}

/// x (B, d) -> x / ‖x‖₂ per row.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [-1i64].as_slice(), true).clamp_min(1e-12) // (B, d)
}

/// Which pairs of a batch count as positives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum ClipTargets {
    /// [CLIP] Fig. 3: only image i with text i ([`clip_loss`]).
    Pairs,
    /// [UniCL]: image i with every text of the batch whose caption is identical to caption i ([`clip_loss_soft`]).
    #[default]
    SameCaption,
}

/// (B, L) ids -> (B, B) bool, true where rows i and j are the same token sequence. The tokenizer is deterministic
/// and pads alike, so equal ids mean equal caption text.
pub fn same_caption(ids: &Tensor) -> Tensor {
    ids.unsqueeze(1).eq_tensor(&ids.unsqueeze(0)).all_dim(-1, false) // (B, B)
}

// ANCHOR: clip_loss
/// [CLIP] Fig. 3: logits = exp(t) · I_e T_eᵀ (B, B); the mean of the cross-entropies over rows (image -> text) and
/// columns (text -> image) with labels arange(B). image_emb, text_emb: (B, d_e), normalised; logit_scale: t, 0-d.
///
/// MNIST captions repeat ("7", "seven", "a thick 3" ...): when captions i and j are the same text, text j is a
/// correct description of image i, yet this loss counts it as a negative. See [`clip_loss_soft`].
pub fn clip_loss(image_emb: &Tensor, text_emb: &Tensor, logit_scale: &Tensor) -> Tensor {
    let logits = clip_logits(image_emb, text_emb, logit_scale); // (B, B)
    let labels = Tensor::arange(logits.size()[0], (Kind::Int64, logits.device())); // (B,)
    (logits.cross_entropy_for_logits(&labels) + logits.tr().cross_entropy_for_logits(&labels)) / 2.0
}
// ANCHOR_END: clip_loss

/// exp(t) · I_e T_eᵀ in f32: (B, d_e), (B, d_e), 0-d -> (B, B), rows images, columns texts.
fn clip_logits(image_emb: &Tensor, text_emb: &Tensor, logit_scale: &Tensor) -> Tensor {
    (image_emb.matmul(&text_emb.tr()) * logit_scale.exp()).to_kind(Kind::Float) // (B, B)
}

// ANCHOR: clip_loss_soft
/// [UniCL] sec. 3: as [`clip_loss`], but image i's target is spread uniformly over every text j with `same[i, j]`
/// (and text j's over every such image): L = ½ (−(1/B) Σ_i Σ_j q_ij log softmax_j(logits_i·)
/// − (1/B) Σ_j Σ_i q_ji log softmax_i(logits_·j)), q_ij = same_ij / Σ_k same_ik. `same`: (B, B) bool, e.g.
/// [`same_caption`]; the diagonal is always a positive. With `same` = I it is [`clip_loss`].
///
/// Why it is the default: identical captions have identical text embeddings, so their rows of the text -> image
/// softmax are equal and cannot each put all mass on "their own" image. The hard labels then ask for the impossible
/// and, through the false negatives, push images of the same digit and style apart; spreading the target over the
/// duplicates asks only for what the captions can tell apart (an MNIST batch of 256 holds many repeats of "7").
pub fn clip_loss_soft(image_emb: &Tensor, text_emb: &Tensor, logit_scale: &Tensor, same: &Tensor) -> Tensor {
    let logits = clip_logits(image_emb, text_emb, logit_scale); // (B, B)
    let b = logits.size()[0];
    let positive = same.logical_or(&Tensor::eye(b, (Kind::Bool, logits.device()))).to_kind(Kind::Float); // (B, B)
    let soft_ce = |logits: &Tensor, positive: &Tensor| {
        let q = positive / positive.sum_dim_intlist([-1i64].as_slice(), true, Kind::Float); // (B, B), rows sum to 1
        -(q * logits.log_softmax(-1, Kind::Float)).sum(Kind::Float) / b as f64
    };
    (soft_ce(&logits, &positive) + soft_ce(&logits.tr(), &positive.tr())) / 2.0
}
// ANCHOR_END: clip_loss_soft

/// Top-1 accuracy in [0, 1] of picking, for each image embedding (N, d_e), the text embedding (K, d_e) of highest
/// cosine similarity, against the true candidate index `labels` (N,) int64.
pub fn top1_accuracy(image_emb: &Tensor, text_emb: &Tensor, labels: &Tensor) -> f64 {
    let predicted = image_emb.matmul(&text_emb.tr()).argmax(-1, false); // (N,)
    predicted
        .eq_tensor(&labels.to_device(predicted.device()))
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

/// Zero-shot classification ([CLIP] sec. 3.1.1): each image (N, C, H, W) gets the candidate text (K, L) it is most
/// similar to; returns the fraction whose pick equals `labels` (N,). Runs without gradients, in chunks.
pub fn zero_shot_accuracy(
    model: &MiniClip,
    images: &Tensor,
    candidate_ids: &Tensor,
    candidate_mask: Option<&Tensor>,
    labels: &Tensor,
) -> f64 {
    tch::no_grad(|| {
        let device = model.logit_scale.device();
        let mask = candidate_mask.map(|m| m.to_device(device));
        let text_emb = model.encode_text(&candidate_ids.to_device(device), mask.as_ref()); // (K, d_e)
        let n = images.size()[0];
        let chunks: Vec<Tensor> = (0..n)
            .step_by(EVAL_CHUNK as usize)
            .map(|s| model.encode_image(&images.narrow(0, s, EVAL_CHUNK.min(n - s)).to_device(device)))
            .collect();
        top1_accuracy(&Tensor::cat(&chunks, 0), &text_emb, labels) // images (N, d_e)
    })
}

/// The zero-shot prompt of each digit, "a handwritten zero" … "a handwritten nine" (one of the captions' phrasings).
pub fn digit_prompts() -> Vec<String> {
    crate::data::captions::DIGIT_WORDS.iter().map(|w| format!("a handwritten {w}")).collect()
}

/// Tokenises `texts` to ids (N, context_len) int64 and the key-padding mask (N, context_len) bool (true: a real
/// token, start and end included).
pub fn tokenize(bpe: &Bpe, texts: &[String], context_len: usize) -> (Tensor, Tensor) {
    let encoded: Vec<_> = texts.iter().map(|t| bpe.encode_padded(t, context_len)).collect();
    let lens: Vec<i64> = encoded.iter().map(|e| e.len as i64).collect();
    let positions = Tensor::arange(context_len as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0); // (1, L)
    let mask = positions.lt_tensor(&Tensor::from_slice(&lens).unsqueeze(1)); // (N, L)
    (ids_tensor(&encoded), mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn f32s(v: &[f32], shape: [i64; 2]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    #[test]
    fn clip_loss_equals_the_hand_computation_of_figure_3() {
        let i_e = f32s(&[1.0, 0.0, 0.0, 1.0], [2, 2]);
        let t_e = f32s(&[0.6, 0.8, 1.0, 0.0], [2, 2]);
        // exp(s) = 2
        let s = Tensor::from(2f64.ln()).to_kind(Kind::Float);
        // logits = 2 · I Tᵀ = [[1.2, 2.0], [1.6, 0.0]]
        let lse = |a: f64, b: f64| (a.exp() + b.exp()).ln();
        let rows = ((lse(1.2, 2.0) - 1.2) + (lse(1.6, 0.0) - 0.0)) / 2.0; // image -> text
        let cols = ((lse(1.2, 1.6) - 1.2) + (lse(2.0, 0.0) - 0.0)) / 2.0; // text -> image
        let loss = clip_loss(&i_e, &t_e, &s).double_value(&[]);
        assert!((loss - (rows + cols) / 2.0).abs() < 1e-6, "{loss} vs {}", (rows + cols) / 2.0);
    }

    #[test]
    fn soft_loss_is_the_hard_one_without_duplicates_and_uniclis_formula_with_them() {
        tch::manual_seed(0);
        let (i_e, t_e) =
            (l2_normalize(&Tensor::randn([4, 3], tch::kind::FLOAT_CPU)), Tensor::randn([4, 3], tch::kind::FLOAT_CPU));
        let t_e = l2_normalize(&t_e);
        let s = Tensor::from(1.5f64).to_kind(Kind::Float);
        let ids = Tensor::from_slice(&[1i64, 5, 2, 1, 6, 2, 1, 5, 2, 1, 7, 2]).view([4, 3]); // captions 0 and 2 equal
        let same = same_caption(&ids);
        let expected = Tensor::from_slice(&[
            true, false, true, false, false, true, false, false, true, false, true, false, false, false, false, true,
        ])
        .view([4, 4]);
        assert!(same.equal(&expected));
        let eye = Tensor::eye(4, (Kind::Bool, Device::Cpu));
        assert!(max_diff(&clip_loss_soft(&i_e, &t_e, &s, &eye), &clip_loss(&i_e, &t_e, &s)) < 1e-6);
        // a naive f64 loop over [UniCL]'s positives P(i): −1/|P(i)| Σ_{k∈P(i)} log softmax, both directions
        let logits: Vec<Vec<f64>> = (0..4)
            .map(|i| (0..4).map(|j| 1.5f64.exp() * i_e.get(i).dot(&t_e.get(j)).double_value(&[])).collect())
            .collect();
        let pos = |i: usize, j: usize| i == j || (i % 2 == 0 && j % 2 == 0);
        let direction = |l: &dyn Fn(usize, usize) -> f64| {
            (0..4)
                .map(|i| {
                    let lse = (0..4).map(|j| l(i, j).exp()).sum::<f64>().ln();
                    let p: Vec<usize> = (0..4).filter(|&j| pos(i, j)).collect();
                    -p.iter().map(|&j| l(i, j) - lse).sum::<f64>() / p.len() as f64
                })
                .sum::<f64>()
                / 4.0
        };
        let naive = (direction(&|i, j| logits[i][j]) + direction(&|i, j| logits[j][i])) / 2.0;
        let soft = clip_loss_soft(&i_e, &t_e, &s, &same).double_value(&[]);
        assert!((soft - naive).abs() < 1e-5, "{soft} vs {naive}");
    }

    fn tiny_model(vocab: i64) -> (VarStore, MiniClip) {
        let vs = VarStore::new(Device::Cpu);
        let model = MiniClip::new(vs.root(), MiniClipConfig::tiny(vocab));
        (vs, model)
    }

    #[test]
    fn embeddings_are_unit_norm_and_names_mirror_transformers() {
        tch::manual_seed(1);
        let (vs, model) = tiny_model(600);
        let image_emb = model.encode_image(&Tensor::rand([3, 1, 28, 28], tch::kind::FLOAT_CPU));
        let ids = Tensor::from_slice(&[598i64, 5, 9, 599, 599, 599, 598, 7, 599, 599, 599, 599]).view([2, 6]);
        let text_emb = model.encode_text(&ids, None);
        assert_eq!((image_emb.size(), text_emb.size()), (vec![3, 16], vec![2, 16]));
        for e in [image_emb, text_emb] {
            let norms = e.norm_scalaropt_dim(2.0, [-1i64].as_slice(), false);
            assert!(max_diff(&norms, &norms.ones_like()) < 1e-5);
        }
        let vars = vs.variables();
        for (name, shape) in [
            ("text_model.encoder.layers.0.self_attn.q_proj.weight", vec![16, 16]),
            ("text_model.embeddings.token_embedding.weight", vec![600, 16]),
            ("text_projection.weight", vec![16, 16]),
            ("visual_projection.weight", vec![16, 16]),
            ("vision_model.blocks.1.conv.weight", vec![16, 8, 3, 3]),
            ("vision_model.post_layernorm.weight", vec![16]),
            ("logit_scale", vec![]),
        ] {
            assert_eq!(vars.get(name).map(|t| t.size()), Some(shape), "{name}");
        }
        assert!(!vars.contains_key("text_projection.bias") && !vars.contains_key("visual_projection.bias"));
    }

    #[test]
    fn logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100() {
        let (vs, model) = tiny_model(600);
        assert!((model.logit_scale().exp().double_value(&[]) - 1.0 / 0.07).abs() < 1e-3);
        let _ = tch::no_grad(|| vs.variables()["logit_scale"].shallow_clone().fill_(10.0));
        assert!((model.logit_scale().exp().double_value(&[]) - 100.0).abs() < 1e-3);
    }

    #[test]
    fn top1_accuracy_counts_the_nearest_candidate() {
        let text = f32s(&[1.0, 0.0, 0.0, 1.0], [2, 2]);
        let images = f32s(&[0.9, 0.1, 0.2, 0.8, 0.7, 0.3], [3, 2]); // nearest: 0, 1, 0
        let acc = top1_accuracy(&images, &text, &Tensor::from_slice(&[0i64, 1, 1]));
        assert!((acc - 2.0 / 3.0).abs() < 1e-9);
        // the zero-shot prompts are one of the captions' evaluation phrasings
        assert!((0..10).all(|d| crate::data::captions::eval_prompts(d).contains(&digit_prompts()[d as usize])));
    }
}
