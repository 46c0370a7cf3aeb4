//! Where a UNet step's arithmetic goes: floating-point operations of each top-level block of a [`UNet`] forward pass,
//! counted from its config (a multiply-add is 2 FLOPs; norms, activations and softmax, a few per element, are left
//! out: they are under 1 % here). Chapter 09 sets these against measured times.
//!
//! [`UNet`]: crate::nn::unet::UNet
use crate::nn::unet::UNetConfig;

/// FLOPs of a k × k convolution from c_in to c_out channels with an output of n positions.
pub fn conv_flops(c_in: i64, c_out: i64, k: i64, n: i64) -> f64 {
    2.0 * (c_in * c_out * k * k) as f64 * n as f64
}

/// FLOPs of a transformer block ([LDM]'s `BasicTransformerBlock`) on n tokens of width c, cross-attending to l
/// context tokens of width d, with the spatial transformer's 1 × 1 proj_in and proj_out around it, split into
/// (projections and feed-forward, attention scores and mixing).
pub fn transformer_flops(c: i64, n: i64, l: i64, d: i64) -> (f64, f64) {
    let (c, n, l, d) = (c as f64, n as f64, l as f64, d as f64);
    // proj_in, proj_out: 2 n c²; attn1 q, k, v, out: 4 n c²; attn2 q, out: 2 n c², k, v: 2 l d c;
    // GEGLU feed-forward: c → 2·4c, then 4c → c: 12 n c²
    let linear = 2.0 * (20.0 * n * c * c + 2.0 * l * d * c);
    // Q Kᵀ and the weighted sum of V: 2 n² c (self), 2 n l c (cross)
    let attention = 2.0 * (2.0 * n * n * c + 2.0 * n * l * c);
    (linear, attention)
}

/// One row: a block's name, its convolution, linear and attention FLOPs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BlockFlops {
    pub block: String,
    pub conv: f64,
    pub linear: f64,
    pub attention: f64,
}

impl BlockFlops {
    pub fn total(&self) -> f64 {
        self.conv + self.linear + self.attention
    }
}

// ANCHOR: unet_flops
/// FLOPs per top-level block of one forward pass of a conditional UNet on a batch of `batch` latents h × w with a
/// context of `l` tokens: conv_in, down_blocks.i, mid_block, up_blocks.i, conv_out (the time embedding's two small
/// linears are left out).
pub fn unet_flops(config: &UNetConfig, batch: i64, h: i64, w: i64, l: i64) -> Vec<BlockFlops> {
    let ch = &config.block_out_channels;
    let (n, lpb, d) = (ch.len(), config.layers_per_block, config.cross_attention_dim.unwrap_or(0));
    let b = batch as f64;
    let mut rows = Vec::new();
    let mut push = |block: String, conv: f64, linear: f64, attention: f64| {
        rows.push(BlockFlops { block, conv: b * conv, linear: b * linear, attention: b * attention })
    };
    // a resnet from c_in to c_out at n positions: two 3 × 3 convs and a 1 × 1 shortcut when the width changes
    let resnet = |c_in: i64, c_out: i64, pos: i64| {
        conv_flops(c_in, c_out, 3, pos)
            + conv_flops(c_out, c_out, 3, pos)
            + if c_in != c_out { conv_flops(c_in, c_out, 1, pos) } else { 0.0 }
    };
    push("conv_in".into(), conv_flops(config.in_channels, ch[0], 3, h * w), 0.0, 0.0);
    let (mut hh, mut ww, mut c_prev) = (h, w, ch[0]);
    let mut skips = vec![ch[0]];
    for (i, &c) in ch.iter().enumerate() {
        let pos = hh * ww;
        let (mut conv, mut linear, mut attention) = (0.0, 0.0, 0.0);
        for j in 0..lpb {
            conv += resnet(if j == 0 { c_prev } else { c }, c, pos);
            if config.attention[i] {
                let (li, at) = transformer_flops(c, pos, l, d);
                (linear, attention) = (linear + li, attention + at);
            }
            skips.push(c);
        }
        if i + 1 < n {
            (hh, ww) = ((hh + 1) / 2, (ww + 1) / 2);
            conv += conv_flops(c, c, 3, hh * ww); // stride-2 conv: output positions
            skips.push(c);
        }
        push(format!("down_blocks.{i}"), conv, linear, attention);
        c_prev = c;
    }
    let c_last = ch[n - 1];
    let (li, at) = transformer_flops(c_last, hh * ww, l, d);
    push("mid_block".into(), 2.0 * resnet(c_last, c_last, hh * ww), li, at);
    let mut c_run = c_last;
    for r in 0..n {
        let i = n - 1 - r;
        let c = ch[i];
        let pos = hh * ww;
        let (mut conv, mut linear, mut attention) = (0.0, 0.0, 0.0);
        for j in 0..=lpb {
            let skip = skips.pop().expect("one skip per up resnet");
            conv += resnet(if j == 0 { c_run } else { c } + skip, c, pos);
            if config.attention[i] {
                let (li, at) = transformer_flops(c, pos, l, d);
                (linear, attention) = (linear + li, attention + at);
            }
        }
        if r + 1 < n {
            (hh, ww) = (hh * 2, ww * 2); // (latent sides that are multiples of 8 halve and double exactly)
            conv += conv_flops(c, c, 3, hh * ww);
        }
        push(format!("up_blocks.{r}"), conv, linear, attention);
        c_run = c;
    }
    push("conv_out".into(), conv_flops(ch[0], config.out_channels, 3, h * w), 0.0, 0.0);
    rows
}
// ANCHOR_END: unet_flops

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conv_and_a_block_count_by_hand() {
        // 3 × 3 conv, 4 -> 320 channels, 64 × 64 outputs: 2 · 4 · 320 · 9 · 4096
        assert_eq!(conv_flops(4, 320, 3, 4096), 2.0 * 4.0 * 320.0 * 9.0 * 4096.0);
        let (linear, attention) = transformer_flops(2, 3, 5, 7);
        assert_eq!(linear, 2.0 * (20.0 * 3.0 * 4.0 + 2.0 * 5.0 * 7.0 * 2.0));
        assert_eq!(attention, 2.0 * (2.0 * 9.0 * 2.0 + 2.0 * 3.0 * 5.0 * 2.0));
    }

    /// SD 1.5's UNet on one 64 × 64 latent (a 512² image): 0.80 TFLOPs per evaluation by this count (conv 0.42, linear
    /// 0.26, attention 0.13), and the self-attention's cost sits at the 64 × 64 levels, where it sees 4096 tokens.
    #[test]
    fn sd15_unet_costs_about_0_8_tflops_per_latent() {
        let rows = unet_flops(&UNetConfig::sd15(), 1, 64, 64, 77);
        assert_eq!(rows.len(), 11);
        let total: f64 = rows.iter().map(BlockFlops::total).sum();
        assert!((0.6e12..1.0e12).contains(&total), "{total:e}");
        let attention: f64 = rows.iter().map(|r| r.attention).sum();
        let top: f64 =
            rows.iter().filter(|r| r.block.ends_with(".0") || r.block.ends_with(".3")).map(|r| r.attention).sum();
        assert!(top / attention > 0.8, "the 64 × 64 levels dominate attention");
    }
}
