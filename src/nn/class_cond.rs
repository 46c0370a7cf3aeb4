//! The class-conditional UNet of lesson 05: lesson 04's UNet with spatial transformers that cross-attend to a
//! learned sequence per digit label ([`LabelContext`]), the null label ∅ included for classifier-free guidance.
//! Module paths mirror diffusers' `UNet2DConditionModel`, the label table sits beside it as `label_context`.
//!
//! [LDM] Rombach et al. 2022, arXiv:2112.10752, sec. 3.3 (conditioning through cross-attention to τ_θ(y)).
//! [CFG] Ho & Salimans 2022, arXiv:2207.12598, sec. 3.2 (the null token ∅).
use crate::data::mnist::MNIST_CLASSES;
use crate::model::{Cond, CondEpsModel};
use crate::nn::label_context::LabelContext;
use crate::nn::unet::{UNet, UNetConfig};
use tch::nn;
use tch::{Kind, Tensor};

/// A conditional ε-model and the label table it reads: what trains together and is saved together.
#[derive(Debug)]
pub struct LabelConditioned<M> {
    pub net: M,
    pub labels: LabelContext,
}

impl<M: CondEpsModel> LabelConditioned<M> {
    /// ε_θ(x_t, t, τ_θ(y)) for labels y (B,) i64 (the null label gives the unconditional prediction).
    pub fn eps_labels(&self, x_t: &Tensor, t: &Tensor, labels: &Tensor, train: bool) -> Tensor {
        self.net.eps_cond(x_t, t, &Cond::new(self.labels.forward(labels)), train)
    }
}

impl LabelConditioned<UNet> {
    /// How the pixels of the lowest-resolution feature maps share their cross-attention among the label tokens of
    /// `label`, for x_t (1, C, H, W) at timestep t: (tokens, 1, h, w), the weights averaged over heads and over the
    /// blocks at that resolution (the tokens' weights at each pixel sum to 1).
    pub fn label_attention_maps(&self, x_t: &Tensor, t: i64, label: i64) -> Tensor {
        // ANCHOR: maps
        let context = self.labels.forward(&Tensor::from_slice(&[label])); // (1, tokens, dim)
        let t = Tensor::from_slice(&[t]).to_device(x_t.device());
        let (_, maps) = tch::no_grad(|| self.net.forward_with_maps(x_t, &t, &context, None));
        let lowest = maps.iter().map(|m| m.height).min().expect("a class-conditional UNet has cross-attention");
        let at_lowest: Vec<Tensor> = maps
            .iter()
            .filter(|m| m.height == lowest)
            .map(|m| m.weights.get(0).mean_dim(0, false, Kind::Float)) // (h·w, tokens): mean over heads
            .collect();
        let weights = Tensor::stack(&at_lowest, 0).mean_dim(0, false, Kind::Float); // (h·w, tokens)
        let width = maps.iter().find(|m| m.height == lowest).map_or(lowest, |m| m.width);
        // (tokens, 1, h, w)
        weights.tr().reshape([-1, 1, lowest, width])
        // ANCHOR_END: maps
    }
}

/// The class-conditional UNet: the UNet's config (with `cross_attention_dim` = the context width) and the shape of
/// the label sequence. Saved in metrics.json as the resolved network.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassCondConfig {
    pub unet: UNetConfig,
    pub num_classes: i64,
    /// Context tokens per label (M of τ_θ(y) ∈ ℝ^{M×d_τ}).
    pub tokens: i64,
}

impl ClassCondConfig {
    /// Lesson 04's MNIST UNet whose four 7×7 attention blocks become spatial transformers cross-attending to 4
    /// label tokens of width 64 (the channel count at 7×7), with the pooled context also added to the time
    /// embedding (`UNetConfig::pooled_context_embedding`, chapter 05 measures what it buys).
    pub fn mnist() -> Self {
        Self {
            unet: UNetConfig { cross_attention_dim: Some(64), pooled_context_embedding: true, ..UNetConfig::mnist() },
            num_classes: MNIST_CLASSES,
            tokens: 4,
        }
    }

    /// The tiny UNet with cross-attention to 4 tokens of width 16, for tests and `--quick`.
    pub fn tiny() -> Self {
        let unet = UNetConfig { pooled_context_embedding: true, ..UNetConfig::tiny_cond(16) };
        Self { unet, num_classes: MNIST_CLASSES, tokens: 4 }
    }

    /// Builds the UNet on `vs` (its names those of diffusers' UNet2DConditionModel) and the label table on
    /// `vs / "label_context"`.
    pub fn build(&self, vs: nn::Path) -> LabelConditioned<UNet> {
        let dim = self.unet.cross_attention_dim.expect("a class-conditional UNet needs cross_attention_dim");
        LabelConditioned {
            labels: LabelContext::new(&vs / "label_context", self.num_classes, self.tokens, dim),
            net: UNet::new(vs, self.unet.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::Device;

    #[test]
    fn the_class_conditional_unet_reads_its_label_and_names_mirror_diffusers() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let model = ClassCondConfig::tiny().build(vs.root());
        let (x, t) = (Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu)), Tensor::from_slice(&[300i64, 300]));
        let x = x.get(0).unsqueeze(0).repeat([2, 1, 1, 1]); // the same image twice
        let out = tch::no_grad(|| model.eps_labels(&x, &t, &Tensor::from_slice(&[3i64, 8]), false));
        assert!((out.get(0) - out.get(1)).abs().max().double_value(&[]) > 1e-5, "the label changes ε̂");
        let vars = vs.variables();
        assert!(vars.contains_key("label_context.label_embedding.weight"));
        assert!(vars.contains_key("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"));
        let mnist = ClassCondConfig::mnist();
        assert_eq!(
            (mnist.unet.block_out_channels.clone(), mnist.unet.cross_attention_dim),
            (vec![16, 32, 64], Some(64))
        );
    }

    #[test]
    fn label_attention_maps_cover_the_lowest_resolution_and_sum_to_one_over_tokens() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let model = ClassCondConfig::tiny().build(vs.root());
        let x = Tensor::randn([1, 1, 28, 28], (Kind::Float, Device::Cpu));
        let maps = model.label_attention_maps(&x, 500, 4);
        assert_eq!(maps.size(), [4, 1, 14, 14]); // tiny: attention at 14×14 only
        let sums = maps.sum_dim_intlist(0, false, Kind::Float); // (1, 14, 14)
        assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-5);
        assert!(!maps.equal(&model.label_attention_maps(&x, 500, 9)), "another label, other maps");
    }
}
