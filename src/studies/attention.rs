//! Lesson 05's attention figures: our scaled dot-product attention ([`crate::nn::attention`]) checked against
//! libtorch's fused kernel on a toy sequence, with its weight matrices drawn, and where the class-conditional UNet's
//! cross-attention looks along a guided reverse chain.
//!
//! [Attention] Vaswani et al. 2017, arXiv:1706.03762, eq. 1: Attention(Q, K, V) = softmax(QKᵀ/√d) V.
//! [CFG] Ho & Salimans 2022, arXiv:2207.12598 (the guided model sampled for the cross-attention figure).
use crate::data::to_unit;
use crate::diffusion::schedule::NoiseSchedule;
use crate::nn::attention::scaled_dot_product_attention;
use crate::nn::class_cond::LabelConditioned;
use crate::nn::layers::timestep_embedding;
use crate::nn::unet::UNet;
use crate::plot;
use crate::sampling::ddpm::{sample, AncestralSampling, PosteriorVariance};
use crate::sampling::wrappers::Threshold;
use anyhow::Result;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The largest |difference| between our attention and libtorch's `scaled_dot_product_attention` on the toy sequence
/// of [`attention_check`], per mask.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttentionCheck {
    pub max_abs_diff_no_mask: f64,
    pub max_abs_diff_causal: f64,
    pub max_abs_diff_padding: f64,
}

/// Our attention against libtorch's fused kernel on a toy sequence (12 positions, d = 16, values from libtorch's
/// generator), with no mask, a causal mask and a key-padding mask; draws the three weight matrices to `path`
/// (attention_toy.png).
pub fn attention_check(path: &Path) -> Result<AttentionCheck> {
    // ANCHOR: attention_check
    let (n, d) = (12, 16);
    let positions = Tensor::arange(n, (Kind::Float, Device::Cpu));
    let q = (timestep_embedding(&positions, d, 10_000.0) * 2.0).view([1, 1, n, d]); // (B, heads, L, d): sinusoids
    let k = q.copy(); // queries and keys from the same positions: similar positions, large dot products
    let v = Tensor::randn([1, 1, n, d], (Kind::Float, Device::Cpu));
    let max_diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    let theirs = |mask: Option<&Tensor>, causal| {
        Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, None, false)
    };
    let causal = Tensor::ones([n, n], (Kind::Bool, Device::Cpu)).tril(0); // query i sees keys 0..=i
    let padding = Tensor::arange(n, (Kind::Int64, Device::Cpu)).lt(n - 4).view([1, 1, 1, n]); // last 4 keys hidden
    let diffs = [
        max_diff(&scaled_dot_product_attention(&q, &k, &v, None), &theirs(None, false)),
        max_diff(&scaled_dot_product_attention(&q, &k, &v, Some(&causal)), &theirs(None, true)),
        max_diff(&scaled_dot_product_attention(&q, &k, &v, Some(&padding)), &theirs(Some(&padding), false)),
    ];
    // with V = I the output of attention is the weight matrix softmax(QKᵀ/√d) itself
    let eye = Tensor::eye(n, (Kind::Float, Device::Cpu)).view([1, 1, n, n]);
    let weights =
        [None, Some(&causal), Some(&padding)].map(|m| scaled_dot_product_attention(&q, &k, &eye, m).view([n, n]));
    // ANCHOR_END: attention_check
    let top = Tensor::stack(&weights, 0).max().double_value(&[]);
    let names = ["no mask", "causal mask", "last 4 keys padded"].map(String::from);
    let title = "Weights softmax(QKᵀ/√d): rows = queries, cols = keys";
    // (3, 1, n, n), scaled so the largest weight is white
    plot::image_grid(path, title, &(Tensor::stack(&weights, 0).unsqueeze(1) / top), 3, 16, &names)?;
    Ok(AttentionCheck { max_abs_diff_no_mask: diffs[0], max_abs_diff_causal: diffs[1], max_abs_diff_padding: diffs[2] })
}

/// cross_attention.png: for two digits sampled at w = 3 with `steps` reverse steps (noise seeded from `seed`), rows =
/// four timesteps of the chain, columns = x_t, x̂₀ and the weight each pixel of the lowest-resolution feature maps
/// gives to each label token (mean over heads and blocks, [`LabelConditioned::label_attention_maps`]).
pub fn plot_cross_attention(
    path: &Path,
    model: &LabelConditioned<UNet>,
    sched: &NoiseSchedule,
    steps: usize,
    (seed, device): (u64, Device),
) -> Result<()> {
    let (mut tiles, mut labels) = (Vec::new(), Vec::new());
    for digit in [3i64, 7] {
        tch::manual_seed(1000 * (seed as i64 + 1) + 100 + digit);
        let keep = [steps - 1, (steps - 1) * 2 / 3, (steps - 1) / 3, 0];
        let mut chain = Vec::new();
        let _ = sample(
            &model.guided(digit, 3.0),
            sched,
            &[1, 1, 28, 28],
            &AncestralSampling { steps, variance: PosteriorVariance::Beta, threshold: Threshold::Static, batch: 1 },
            device,
            &mut |_, st| {
                if keep.contains(&st.i) {
                    chain.push((st.t, st.x_t.copy(), st.x0_hat.copy()));
                }
            },
        );
        for (t, x_t, x0_hat) in chain {
            // (tokens, 1, 28, 28)
            let token_maps = model.label_attention_maps(&x_t, t as i64, digit).upsample_nearest2d([28, 28], None, None);
            tiles.extend([to_unit(&x_t), to_unit(&x0_hat), token_maps].map(|x| x.to_device(Device::Cpu)));
            labels.extend([format!("{digit}: x_t t={t}"), "x̂₀".into()]);
            labels.extend((0..model.labels.tokens).map(|j| format!("token {j}")));
        }
    }
    let cols = 2 + model.labels.tokens as usize;
    plot::image_grid(
        path,
        "Cross-attention to the label tokens, w = 3 (white: weight 1)",
        &Tensor::cat(&tiles, 0),
        cols,
        3,
        &labels,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::class_cond::ClassCondConfig;

    #[test]
    fn our_attention_matches_libtorch_and_the_figures_render() {
        tch::manual_seed(0);
        let dir = tempfile::tempdir().unwrap();
        let check = attention_check(&dir.path().join("attention_toy.png")).unwrap();
        for diff in [check.max_abs_diff_no_mask, check.max_abs_diff_causal, check.max_abs_diff_padding] {
            assert!(diff < 1e-5, "{check:?}");
        }
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let model = ClassCondConfig::tiny().build(vs.root());
        let sched = NoiseSchedule::ddpm(1000);
        plot_cross_attention(&dir.path().join("cross.png"), &model, &sched, 4, (0, Device::Cpu)).unwrap();
        for name in ["attention_toy.png", "cross.png"] {
            assert_eq!(&std::fs::read(dir.path().join(name)).unwrap()[1..4], b"PNG", "{name} is a PNG");
        }
    }
}
