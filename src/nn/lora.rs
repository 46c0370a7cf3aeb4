//! LoRA adapters on a network's layers, trained from scratch (lesson 12): a frozen layer W₀ gains a low-rank path
//! whose output is added to its own, and only that path trains.
//!
//! [LoRA] Hu et al. 2021, arXiv:2106.09685, eq. 3: h = W₀x + ΔWx = W₀x + BAx with B ∈ ℝ^{d×r}, A ∈ ℝ^{r×k}, r ≪ min(d, k);
//! sec. 4.1: A random Gaussian-like, B = 0 (so ΔW = 0 at the start) and ΔWx scaled by α/r.
//! [LoCon] kohya sd-scripts `networks/lora.py` (LoRAModule on a Conv2d) and LyCORIS: for a convolution A is a
//! convolution with the layer's kernel, stride and padding (r output channels) and B a 1×1 convolution.
//! Notation (code -> paper): down -> A, up -> B, alpha -> α, rank -> r, multiplier -> the UIs' LoRA weight m, so that
//! h = W₀x + m·(α/r)·B(A x).
//!
//! The adapters are attached after the network is built, by name (the file or the recipe decides which layers get
//! one), the way PEFT injects `lora.Linear` into a built model. Their tensors live on their own VarStore under
//! kohya's names (`lora_unet_<path with dots as underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`), so
//! that the optimiser sees only them and saving that VarStore writes the file the web UIs load.
use tch::nn::{self, Module};
use tch::Tensor;

/// One low-rank update of a layer: A (`down`), B (`up`), α and the multiplier it is applied with.
#[derive(Debug)]
pub struct LoraAdapter {
    /// A: (r, k) for a Linear, (r, c_in, kh, kw) for a convolution.
    pub down: Tensor,
    /// B: (d, r) or (c_out, r, 1, 1).
    pub up: Tensor,
    pub alpha: f64,
    /// The LoRA weight m of the UIs (`<lora:name:m>`): 0 is the base model, 1 the update as trained.
    pub multiplier: f64,
}

impl LoraAdapter {
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    /// m·α/r, the factor of B·A.
    pub fn scale(&self) -> f64 {
        self.multiplier * self.alpha / self.rank() as f64
    }

    /// ΔW = m·(α/r)·B·A in the layer's weight shape `shape` (for a convolution the kernel is A's).
    pub fn delta(&self, shape: &[i64]) -> Tensor {
        low_rank_delta(&self.up, &self.down, self.scale(), shape)
    }
}

// ANCHOR: lora_delta
/// scale·B·A in f32, in the weight's shape `shape`: B `up` (d, r) or (c_out, r, 1, 1), A `down` (r, k) or
/// (r, c_in, kh, kw) ([LoRA] eq. 3; for a convolution the kernel is A's: ΔW[o, i, y, x] = scale·Σ_j B[o, j]·A[j, i, y, x]).
/// What merging adds to a weight, here and for the LoRA files of `sd::lora`.
pub fn low_rank_delta(up: &Tensor, down: &Tensor, scale: f64, shape: &[i64]) -> Tensor {
    let b = up.to_kind(tch::Kind::Float).flatten(1, -1); // (d, r)
    let a = down.to_kind(tch::Kind::Float).flatten(1, -1); // (r, k) or (r, c_in·kh·kw)
    (b.matmul(&a) * scale).reshape(shape) // (d, k) or (c_out, c_in, kh, kw)
}
// ANCHOR_END: lora_delta

/// The frozen layer an adapter wraps.
#[derive(Debug)]
enum Base {
    Linear(nn::Linear),
    /// A convolution, with the stride and padding its adapter's A must share.
    Conv {
        conv: nn::Conv2D,
        stride: i64,
        padding: i64,
    },
}

/// A Linear or Conv2d that can take LoRA adapters: without any it is the plain layer (same variables, same names,
/// same output). Its `name` is its module path (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`).
#[derive(Debug)]
pub struct Adaptable {
    pub name: String,
    base: Base,
    adapters: Vec<LoraAdapter>,
    /// W₀, saved when the adapters were merged into the weight (then the forward pass skips them).
    merged_from: Option<Tensor>,
}

/// The module path of `p`, components joined by dots (the VarStore key of its weight without `.weight`).
fn path_name(p: &nn::Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

impl Adaptable {
    /// `nn::linear` at `p`, adaptable.
    pub fn linear(p: nn::Path, c_in: i64, c_out: i64, config: nn::LinearConfig) -> Self {
        let name = path_name(&p);
        Self::wrap(name, Base::Linear(nn::linear(p, c_in, c_out, config)))
    }

    /// `nn::conv2d` at `p`, adaptable.
    pub fn conv2d(p: nn::Path, c_in: i64, c_out: i64, k: i64, config: nn::ConvConfig) -> Self {
        let (name, stride, padding) = (path_name(&p), config.stride, config.padding);
        Self::wrap(name, Base::Conv { conv: nn::conv2d(p, c_in, c_out, k, config), stride, padding })
    }

    fn wrap(name: String, base: Base) -> Self {
        Self { name, base, adapters: Vec::new(), merged_from: None }
    }

    /// The frozen weight W₀ (W₀ + the merged ΔW while merged).
    pub fn weight(&self) -> &Tensor {
        match &self.base {
            Base::Linear(l) => &l.ws,
            Base::Conv { conv, .. } => &conv.ws,
        }
    }

    pub fn is_conv(&self) -> bool {
        matches!(self.base, Base::Conv { .. })
    }

    pub fn adapters(&self) -> &[LoraAdapter] {
        &self.adapters
    }

    // ANCHOR: attach
    /// Creates a rank-`rank` adapter with scale α = `alpha` on `lora` (the adapters' VarStore) under kohya's name for
    /// this layer (`prefix` + its path with dots as underscores, e.g. `lora_unet_…`), and attaches it with
    /// multiplier 1. [LoRA] sec. 4.1: A random (PEFT's Kaiming-uniform, a = √5, as a Linear's default init), B = 0,
    /// so the model's output is unchanged until B trains.
    pub fn attach_new(&mut self, lora: &nn::Path, prefix: &str, rank: i64, alpha: f64) {
        assert!(self.merged_from.is_none(), "attach adapters to an unmerged layer");
        let p = lora / format!("{prefix}{}", self.name.replace('.', "_"));
        let shape = self.weight().size(); // (d, k) or (c_out, c_in, kh, kw)
        let (down_shape, up_shape) = match shape.len() {
            2 => (vec![rank, shape[1]], vec![shape[0], rank]),
            _ => (vec![rank, shape[1], shape[2], shape[3]], vec![shape[0], rank, 1, 1]),
        };
        let fan_in: i64 = down_shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt(); // Kaiming uniform with a = √5: U(−1/√fan_in, 1/√fan_in)
        let down = (&p / "lora_down").var("weight", &down_shape, nn::Init::Uniform { lo: -bound, up: bound });
        let up = (&p / "lora_up").var("weight", &up_shape, nn::Init::Const(0.0));
        let _ = p.zeros_no_train("alpha", &[]).fill_(alpha); // kohya's 0-dim alpha, saved with the file
        self.adapters.push(LoraAdapter { down, up, alpha, multiplier: 1.0 });
    }
    // ANCHOR_END: attach

    /// Attaches an adapter made elsewhere (one loaded from a file).
    pub fn attach(&mut self, adapter: LoraAdapter) {
        assert!(self.merged_from.is_none(), "attach adapters to an unmerged layer");
        self.adapters.push(adapter);
    }

    /// Sets every adapter's multiplier m (0: the base layer's output, bit for bit).
    pub fn set_multiplier(&mut self, multiplier: f64) {
        assert!(self.merged_from.is_none(), "unmerge before changing the multiplier");
        for a in &mut self.adapters {
            a.multiplier = multiplier;
        }
    }

    /// Removes the adapters (unmerging first if merged).
    pub fn detach(&mut self) -> Vec<LoraAdapter> {
        self.unmerge();
        std::mem::take(&mut self.adapters)
    }

    // ANCHOR: merge
    /// W ← W₀ + Σ m·(α/r)·B·A: the adapters folded into the weight (no extra cost per forward pass, as the UIs run a
    /// LoRA); W₀ is kept so that [`Self::unmerge`] restores it exactly (adding and then subtracting ΔW would leave
    /// rounding errors).
    pub fn merge(&mut self) {
        if self.merged_from.is_some() || self.adapters.is_empty() {
            return;
        }
        let mut w = self.weight().shallow_clone();
        let original = w.copy();
        let shape = w.size();
        // in f32, cast back to the weight's dtype, as sd::lora merges downloaded files
        let merged = self.adapters.iter().fold(original.to_kind(tch::Kind::Float), |acc, a| acc + a.delta(&shape));
        tch::no_grad(|| w.copy_(&merged.to_kind(w.kind())));
        self.merged_from = Some(original);
    }

    /// Puts W₀ back bit for bit; the adapters run beside the layer again.
    pub fn unmerge(&mut self) {
        if let Some(original) = self.merged_from.take() {
            let mut w = self.weight().shallow_clone();
            tch::no_grad(|| w.copy_(&original));
        }
    }
    // ANCHOR_END: merge

    pub fn is_merged(&self) -> bool {
        self.merged_from.is_some()
    }
}

impl Module for Adaptable {
    // ANCHOR: lora_forward
    /// [LoRA] eq. 3: h = W₀x + Σ m·(α/r)·B(A x), each adapter as two small layers (never forming ΔW).
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = match &self.base {
            Base::Linear(l) => l.forward(x),
            Base::Conv { conv, .. } => conv.forward(x),
        };
        if self.merged_from.is_some() {
            return h;
        }
        for a in self.adapters.iter().filter(|a| a.multiplier != 0.0) {
            let low = match &self.base {
                Base::Linear(_) => x.linear::<&Tensor>(&a.down, None).linear::<&Tensor>(&a.up, None), // (…, r) -> (…, d)
                Base::Conv { stride, padding, .. } => {
                    let r = x.conv2d::<&Tensor>(&a.down, None, [*stride], [*padding], [1], 1); // (B, r, H', W')
                    r.conv2d::<&Tensor>(&a.up, None, [1], [0], [1], 1) // (B, c_out, H', W')
                }
            };
            h += low * a.scale(); // into the fresh output (see `layers::silu_fresh`)
        }
        h
    }
    // ANCHOR_END: lora_forward
}

/// A network whose layers can take adapters: it hands out every [`Adaptable`] it holds, in a fixed order.
pub trait AdaptableLayers {
    fn adaptable_layers<'a>(&'a mut self, out: &mut Vec<&'a mut Adaptable>);

    /// Every adaptable layer, in the network's order.
    fn layers(&mut self) -> Vec<&mut Adaptable> {
        let mut out = Vec::new();
        self.adaptable_layers(&mut out);
        out
    }
}

/// Which layers of a UNet get adapters (kohya's network types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum LoraTargets {
    /// The attention projections only: to_q, to_k, to_v, to_out.0 ([LoRA] sec. 4.2 adapts W_q and W_v).
    Attention,
    /// Every Linear and 1×1 conv of the spatial transformers: proj_in, the attention projections, the feed-forward
    /// (ff.net.0.proj, ff.net.2) and proj_out — kohya's default LoRA ("LierLa").
    Transformer,
    /// The transformers' layers and the ResBlocks' 3×3 convolutions (conv1, conv2): LoCon (a subset of kohya's "C3Lier",
    /// which also adapts the skip convolutions, time_emb_proj and the resampling convolutions).
    TransformerAndConvs,
}

impl LoraTargets {
    /// Whether the layer at `name` gets an adapter.
    pub fn includes(self, name: &str) -> bool {
        let attention = [".to_q", ".to_k", ".to_v", ".to_out.0"].iter().any(|s| name.ends_with(s));
        let in_transformer = name.contains(".attentions.")
            && (attention || name.contains(".ff.net.") || name.ends_with(".proj_in") || name.ends_with(".proj_out"));
        let resnet_conv = name.contains(".resnets.") && (name.ends_with(".conv1") || name.ends_with(".conv2"));
        match self {
            LoraTargets::Attention => attention && name.contains(".attentions."),
            LoraTargets::Transformer => in_transformer,
            LoraTargets::TransformerAndConvs => in_transformer || resnet_conv,
        }
    }
}

/// How to make a LoRA: rank r, α and which layers. α = r gives scale 1 (kohya writes α = r when none is asked for).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: i64,
    pub alpha: f64,
    pub targets: LoraTargets,
}

/// Attaches a fresh adapter of `config` to every layer of `model` its targets include, on `lora` (the adapters'
/// VarStore root) with kohya's `prefix` (`lora_unet_`). Returns how many layers got one.
pub fn attach_lora(model: &mut impl AdaptableLayers, lora: &nn::Path, prefix: &str, config: &LoraConfig) -> usize {
    let mut n = 0;
    for layer in model.layers() {
        if config.targets.includes(&layer.name) {
            layer.attach_new(lora, prefix, config.rank, config.alpha);
            n += 1;
        }
    }
    n
}

/// Sets the multiplier of every adapter of `model`.
pub fn set_multiplier(model: &mut impl AdaptableLayers, multiplier: f64) {
    model.layers().into_iter().for_each(|l| l.set_multiplier(multiplier));
}

/// Merges (true) or unmerges (false) every adapter of `model` into its weights.
pub fn set_merged(model: &mut impl AdaptableLayers, merged: bool) {
    for l in model.layers() {
        if merged {
            l.merge()
        } else {
            l.unmerge()
        }
    }
}

/// Removes every adapter of `model` (unmerged first), leaving W₀.
pub fn detach_all(model: &mut impl AdaptableLayers) {
    model.layers().into_iter().for_each(|l| drop(l.detach()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    #[test]
    fn an_adapter_adds_scaled_b_a_x_and_merging_agrees() {
        tch::manual_seed(0);
        let (vs, lora) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let mut lin = Adaptable::linear(vs.root() / "blk" / "to_q", 6, 5, Default::default());
        let mut conv = Adaptable::conv2d(
            vs.root() / "blk" / "conv1",
            3,
            4,
            3,
            nn::ConvConfig { padding: 1, stride: 2, ..Default::default() },
        );
        let (x, img) = (Tensor::randn([2, 6], tch::kind::FLOAT_CPU), Tensor::randn([2, 3, 7, 7], tch::kind::FLOAT_CPU));
        let (h0, c0) = (lin.forward(&x), conv.forward(&img));
        lin.attach_new(&lora.root(), "lora_unet_", 2, 4.0);
        conv.attach_new(&lora.root(), "lora_unet_", 3, 3.0);
        // B = 0: the output is bit-identical
        assert!(lin.forward(&x).equal(&h0) && conv.forward(&img).equal(&c0));
        let names: std::collections::BTreeSet<String> = lora.variables().into_keys().collect();
        for k in
            ["lora_unet_blk_to_q.lora_down.weight", "lora_unet_blk_to_q.lora_up.weight", "lora_unet_blk_to_q.alpha"]
        {
            assert!(names.contains(k), "{k} missing from {names:?}");
        }
        assert_eq!(lora.variables()["lora_unet_blk_conv1.lora_down.weight"].size(), [3, 3, 3, 3]);
        // A ~ U(−1/√fan_in, 1/√fan_in): fan_in 6 for the Linear, 3·3·3 for the conv
        let bound = |k: &str| lora.variables()[k].abs().max().double_value(&[]);
        assert!(bound("lora_unet_blk_to_q.lora_down.weight") <= 1.0 / 6f64.sqrt());
        assert!(bound("lora_unet_blk_conv1.lora_down.weight") <= 1.0 / 27f64.sqrt());
        tch::no_grad(|| {
            for (_, mut v) in lora.variables() {
                if v.dim() > 0 {
                    let _ = v.normal_(0.0, 0.5);
                }
            }
        });
        // [LoRA] eq. 3 with sec. 4.1's α/r: h = W₀x + (α/r)·B A x
        let a = &lin.adapters()[0];
        let want = &h0 + x.matmul(&a.down.tr()).matmul(&a.up.tr()) * (4.0 / 2.0);
        let got = lin.forward(&x);
        assert!((&got - &want).abs().max().double_value(&[]) < 1e-5);
        // merged and unmerged agree; unmerge restores W₀ exactly; multiplier 0 is the base layer
        let (w0, cw0) = (lin.weight().copy(), conv.weight().copy());
        let conv_unmerged = conv.forward(&img);
        lin.merge();
        conv.merge();
        assert!((lin.forward(&x) - &got).abs().max().double_value(&[]) < 1e-5);
        assert!((conv.forward(&img) - &conv_unmerged).abs().max().double_value(&[]) < 1e-5);
        assert!(!lin.weight().equal(&w0));
        lin.unmerge();
        conv.unmerge();
        assert!(lin.weight().equal(&w0) && conv.weight().equal(&cw0));
        lin.set_multiplier(0.0);
        assert!(lin.forward(&x).equal(&h0));
        lin.set_multiplier(0.5);
        assert!((lin.forward(&x) - (&h0 + (&got - &h0) * 0.5)).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn targets_pick_layers_by_their_path() {
        let t = |name: &str| {
            [LoraTargets::Attention, LoraTargets::Transformer, LoraTargets::TransformerAndConvs]
                .map(|x| x.includes(name))
        };
        let q = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q";
        assert_eq!(t(q), [true, true, true]);
        assert_eq!(t("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"), [false, true, true]);
        assert_eq!(t("up_blocks.0.attentions.1.proj_out"), [false, true, true]);
        assert_eq!(t("mid_block.resnets.1.conv2"), [false, false, true]);
        assert_eq!(t("conv_in"), [false, false, false]);
    }

    /// On a whole UNet: fresh adapters (B = 0) change nothing, bit for bit; trained ones (random B) give the same
    /// output merged and unmerged (to 1e-5), two LoRAs at once add up, and unmerging restores every weight exactly.
    #[test]
    fn on_a_unet_adapters_merge_unmerge_and_stack() {
        use crate::nn::unet::{UNet, UNetConfig};
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let mut unet = UNet::new(vs.root(), UNetConfig::tiny_cond(8));
        let (x, t) = (Tensor::randn([2, 1, 8, 8], tch::kind::FLOAT_CPU), Tensor::from_slice(&[10i64, 700]));
        let ctx = Tensor::randn([2, 3, 8], tch::kind::FLOAT_CPU);
        let run = |u: &UNet| tch::no_grad(|| u.forward_cond(&x, &t, Some(&ctx), None, false));
        let base = run(&unet);
        let weights: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
        let (one, two) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let config = LoraConfig { rank: 2, alpha: 1.0, targets: LoraTargets::TransformerAndConvs };
        let n = attach_lora(&mut unet, &one.root(), "lora_unet_", &config);
        assert!(n > 10, "{n} layers adapted");
        assert!(run(&unet).equal(&base), "B = 0 leaves the output bit-identical");
        let randomize = |vs: &VarStore| {
            tch::no_grad(|| {
                vs.variables().into_iter().filter(|(k, _)| k.ends_with("lora_up.weight")).for_each(|(_, mut v)| {
                    let _ = v.normal_(0.0, 0.05);
                })
            })
        };
        randomize(&one);
        let with_one = run(&unet);
        assert!((&with_one - &base).abs().max().double_value(&[]) > 1e-4, "a trained LoRA changes the output");
        attach_lora(&mut unet, &two.root(), "lora_unet_", &LoraConfig { targets: LoraTargets::Attention, ..config });
        randomize(&two);
        let with_both = run(&unet);
        set_merged(&mut unet, true);
        assert!((run(&unet) - &with_both).abs().max().double_value(&[]) < 1e-5, "merged = unmerged");
        set_merged(&mut unet, false);
        let now = vs.variables();
        assert!(weights.iter().all(|(k, w)| now[k].equal(w)), "unmerge restores W₀ exactly");
        set_multiplier(&mut unet, 0.0);
        assert!(run(&unet).equal(&base), "multiplier 0 is the base model");
        detach_all(&mut unet);
        assert!(run(&unet).equal(&base));
    }
}
