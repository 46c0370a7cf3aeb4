//! ControlNet: a trainable copy of a frozen UNet's way down that reads a spatial hint (an edge map, a mask) and adds
//! what it computes to the frozen UNet's skips and middle block through zero-initialised 1×1 convolutions, so that
//! training starts from the unchanged model.
//!
//! [ControlNet] Zhang, Rao, Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models",
//! arXiv:2302.05543: eq. 2 (y_c = F(x; Θ) + Z(F(x + Z(c; Θ_z1); Θ_c); Θ_z2), the locked block F, its trainable copy
//! and the zero convolutions Z), sec. 3.2 and Fig. 3 (SD's encoder blocks and middle block copied, a zero
//! convolution per skip; the hint encoder E: four convolutions with ReLU — SiLU in the released code — that bring a
//! 512² hint to the 64² latent size), sec. 3.3 (training), sec. 3.4 and 4.2 (guess mode; the scales are the released
//! code's, diffusers' `torch.logspace(-1, 0, n + 1)`).
//! Module paths follow diffusers' `ControlNetModel`, so SD 1.5 ControlNet files can be loaded by the same code:
//! the copy under `time_embedding`, `conv_in`, `down_blocks`, `mid_block` (the UNet's own names), the hint encoder
//! under `controlnet_cond_embedding.{conv_in, blocks.i, conv_out}`, the zero convolutions under
//! `controlnet_down_blocks.i` and `controlnet_mid_block`.
//! Notation (code -> paper): encoder -> F(·; Θ_c), hint -> c, hint encoder -> E, zero_convs -> Z(·; Θ_z2).
use crate::data::hints::HintKind;
use crate::nn::unet::{Encoded, Residuals, UNetConfig, UNetEncoder};
use crate::validate::{in_range, list_in, Validate, MAX_WIDTH};
use anyhow::{ensure, Result};
use tch::nn::{self, Module};
use tch::Tensor;

/// The ControlNet's shape: the UNet it controls, and its hint encoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ControlNetConfig {
    pub unet: UNetConfig,
    /// Channels of the hint image (1 for an MNIST edge map; 3 for SD's RGB hints).
    pub hint_channels: i64,
    /// Channels of the hint encoder's stages (diffusers' `conditioning_embedding_out_channels`, (16, 32, 96, 256)
    /// in SD 1.5).
    pub hint_embedding_channels: Vec<i64>,
    /// Stride of the convolutions that raise the channels from one stage to the next: 2 where the hint is larger
    /// than the UNet's input (SD: 512² hints, 64² latents, three of them), 1 for a pixel-space UNet.
    pub hint_stride: i64,
}

impl Validate for ControlNetConfig {
    fn validate(&self) -> Result<(), String> {
        self.unet.validate().map_err(|e| format!("unet: {e}"))?;
        in_range("hint_channels", self.hint_channels, 1, MAX_WIDTH)?;
        list_in("hint_embedding_channels", &self.hint_embedding_channels, None, 1, MAX_WIDTH)?;
        in_range("hint_stride", self.hint_stride, 1, 8)
    }
}

impl ControlNetConfig {
    /// A ControlNet for `unet` at its own resolution (stride 1) with a 16 → 32 hint encoder, for MNIST-size hints of
    /// `hint_channels` channels.
    pub fn pixel_space(unet: UNetConfig, hint_channels: i64) -> Self {
        Self { unet, hint_channels, hint_embedding_channels: vec![16, 32], hint_stride: 1 }
    }
}

/// A trained ControlNet as saved: its shape and the kind of hint it reads (the JSON beside its weights).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedControlNet {
    pub network: ControlNetConfig,
    pub hint: HintKind,
}

impl Validate for SavedControlNet {
    fn validate(&self) -> Result<(), String> {
        self.network.validate().map_err(|e| format!("network: {e}"))
    }
}

/// Zero-initialised weights and bias: the convolution outputs exactly 0 until training moves it ([ControlNet] eq. 2).
fn zero_conv(vs: nn::Path, c_in: i64, c_out: i64, k: i64, padding: i64) -> nn::Conv2D {
    let cfg =
        nn::ConvConfig { padding, ws_init: nn::Init::Const(0.0), bs_init: nn::Init::Const(0.0), ..Default::default() };
    nn::conv2d(vs, c_in, c_out, k, cfg)
}

/// E of [ControlNet] sec. 3.2 (diffusers' `ControlNetConditioningEmbedding`): conv_in, then per stage a convolution
/// that keeps the channels and one that raises them (with the stride), SiLU after each, and a zero-initialised
/// conv_out to the UNet's first width.
#[derive(Debug)]
struct HintEncoder {
    conv_in: nn::Conv2D,
    blocks: Vec<nn::Conv2D>,
    conv_out: nn::Conv2D,
}

impl HintEncoder {
    fn new(vs: nn::Path, config: &ControlNetConfig) -> Self {
        let ch = &config.hint_embedding_channels;
        let pad = nn::ConvConfig { padding: 1, ..Default::default() };
        let mut blocks = Vec::new();
        for i in 0..ch.len() - 1 {
            blocks.push(nn::conv2d(&vs / "blocks" / (2 * i), ch[i], ch[i], 3, pad));
            let down = nn::ConvConfig { stride: config.hint_stride, ..pad };
            blocks.push(nn::conv2d(&vs / "blocks" / (2 * i + 1), ch[i], ch[i + 1], 3, down));
        }
        let last = *ch.last().expect("validated non-empty");
        Self {
            conv_in: nn::conv2d(&vs / "conv_in", config.hint_channels, ch[0], 3, pad),
            blocks,
            conv_out: zero_conv(&vs / "conv_out", last, config.unet.block_out_channels[0], 3, 1),
        }
    }

    /// hint (B, C_hint, H, W) -> (B, c0, H/stride^k, W/stride^k).
    fn forward(&self, hint: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(hint).silu();
        for b in &self.blocks {
            h = b.forward(&h).silu();
        }
        self.conv_out.forward(&h)
    }
}

/// How strongly, and where, the control acts: the residuals are multiplied by `conditioning_scale` (the UIs'
/// "control weight"); in guess mode, by 10^(−1 + k/n) for skip k of n and 1 for the middle block as well
/// ([`guess_mode_scales`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ControlScale {
    pub conditioning_scale: f64,
    pub guess_mode: bool,
}

// ANCHOR: guess_mode
/// The released code's guess-mode scales (diffusers: `torch.logspace(-1, 0, n + 1)`): 10^(−1 + k/n), k = 0..n, the
/// first n for the skips from the top of the UNet down and the last (1) for the middle block, so the deepest
/// features carry the most control.
pub fn guess_mode_scales(n: usize) -> Vec<f64> {
    (0..=n).map(|k| 10f64.powf(-1.0 + k as f64 / n as f64)).collect()
}
// ANCHOR_END: guess_mode

/// The ControlNet.
#[derive(Debug)]
pub struct ControlNet {
    pub config: ControlNetConfig,
    /// F(·; Θ_c): the trainable copy of the UNet's way down.
    pub encoder: UNetEncoder,
    hint: HintEncoder,
    /// Z(·; Θ_z2): one 1×1 zero convolution per skip of the UNet …
    zero_convs: Vec<nn::Conv2D>,
    /// … and one for its middle block.
    mid_zero: nn::Conv2D,
}

impl ControlNet {
    pub fn new(vs: nn::Path, config: ControlNetConfig) -> Self {
        let encoder = UNetEncoder::new(&vs, config.unet.clone());
        let zero_convs = encoder
            .skip_channels()
            .iter()
            .enumerate()
            .map(|(i, &c)| zero_conv(&vs / "controlnet_down_blocks" / i, c, c, 1, 0))
            .collect();
        let c_last = *config.unet.block_out_channels.last().expect("a UNet has levels");
        Self {
            hint: HintEncoder::new(&vs / "controlnet_cond_embedding", &config),
            mid_zero: zero_conv(&vs / "controlnet_mid_block", c_last, c_last, 1, 0),
            zero_convs,
            encoder,
            config,
        }
    }

    /// A ControlNet saved by lesson 13 (its [`SavedControlNet`] beside the weights), on `device`, frozen, with the
    /// kind of hint it reads; the error says how to make one when there is none.
    pub fn load(path: &std::path::Path, device: tch::Device) -> anyhow::Result<(nn::VarStore, Self, HintKind)> {
        use anyhow::Context;
        anyhow::ensure!(
            path.exists(),
            "no ControlNet at {}: make it with ./run.sh lesson 13 --ship, or pass --controlnet FILE",
            path.display()
        );
        let saved: SavedControlNet = crate::checkpoint::load_valid_config(path)
            .with_context(|| format!("the ControlNet at {}", path.display()))?;
        let mut vs = nn::VarStore::new(device);
        let control = Self::new(vs.root(), saved.network);
        crate::checkpoint::load(&mut vs, path)?;
        vs.freeze();
        Ok((vs, control, saved.hint))
    }

    // ANCHOR: residuals
    /// The residuals for the frozen UNet at x_t (B, C, H, W), timesteps t (B,), its conditioning (context, mask) and
    /// the hint (B, C_hint, H·s^k, W·s^k), scaled as `scale` says: [ControlNet] eq. 2,
    /// Z(F(x + Z(c; Θ_z1); Θ_c); Θ_z2), with E in place of the first zero convolution as in sec. 3.2.
    pub fn residuals(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        cond: (Option<&Tensor>, Option<&Tensor>),
        hint: &Tensor,
        scale: ControlScale,
        train: bool,
    ) -> Residuals {
        let hint_features = self.hint.forward(hint); // (B, c0, H, W): E(c), added after conv_in
        let Encoded { skips, mid, .. } = self.encoder.encode_cond(x_t, t, cond, Some(&hint_features), train);
        let n = skips.len();
        let weights = match scale.guess_mode {
            true => guess_mode_scales(n),
            false => vec![1.0; n + 1],
        };
        let down = skips
            .iter()
            .zip(&self.zero_convs)
            .zip(&weights)
            .map(|((s, z), w)| z.forward(s) * (w * scale.conditioning_scale)) // (B, c_k, h_k, w_k)
            .collect();
        let mid = self.mid_zero.forward(&mid) * (weights[n] * scale.conditioning_scale); // (B, c_last, h, w)
        Residuals { down, mid }
    }
    // ANCHOR_END: residuals
}

/// Copies the UNet's weights into the ControlNet's copy of its way down (diffusers' `ControlNetModel.from_unet`):
/// every variable of `control` whose name `unet` also has (time_embedding, conv_in, down_blocks, mid_block, and
/// class_embedding when there is one); the hint encoder and zero convolutions keep their initialisation. Returns how
/// many tensors were copied; fails if a shared name has another shape, or if the copy found nothing.
pub fn copy_unet_encoder(control: &nn::VarStore, unet: &nn::VarStore) -> Result<usize> {
    let from = unet.variables();
    let mut copied = 0;
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in control.variables() {
            if let Some(src) = from.get(&name) {
                ensure!(
                    src.size() == var.size(),
                    "{name}: the UNet has {:?}, the ControlNet {:?}",
                    src.size(),
                    var.size()
                );
                var.copy_(src);
                copied += 1;
            }
        }
        Ok(())
    })?;
    ensure!(copied > 0, "no variable of the ControlNet is named as one of the UNet's: is it the UNet it controls?");
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::unet::UNet;
    use tch::{nn::VarStore, Device, Kind};

    fn tiny() -> (VarStore, UNet, VarStore, ControlNet) {
        tch::manual_seed(0);
        let unet_vs = VarStore::new(Device::Cpu);
        let unet = UNet::new(unet_vs.root(), UNetConfig::tiny_cond(6));
        let control_vs = VarStore::new(Device::Cpu);
        let control = ControlNet::new(control_vs.root(), ControlNetConfig::pixel_space(UNetConfig::tiny_cond(6), 1));
        copy_unet_encoder(&control_vs, &unet_vs).unwrap();
        (unet_vs, unet, control_vs, control)
    }

    /// [ControlNet] sec. 3.1: with the zero convolutions at zero, the controlled UNet is the frozen one, bit for
    /// bit, whatever the hint; yet the zero convolutions' weights get a gradient, so the first step moves them.
    #[test]
    fn at_initialisation_the_controlled_unet_is_the_frozen_one_and_the_zero_convs_still_learn() {
        let (_uvs, unet, cvs, control) = tiny();
        let opts = (Kind::Float, Device::Cpu);
        let (x, t) = (Tensor::randn([2, 1, 16, 16], opts), Tensor::from_slice(&[10i64, 700]));
        let context = Tensor::randn([2, 3, 6], opts);
        let frozen = unet.forward_cond(&x, &t, Some(&context), None, false);
        for hint in [Tensor::randn([2, 1, 16, 16], opts), Tensor::ones([2, 1, 16, 16], opts) * 255.0] {
            let scale = ControlScale { conditioning_scale: 1.0, guess_mode: false };
            let r = control.residuals(&x, &t, (Some(&context), None), &hint, scale, false);
            let controlled = unet.forward_controlled(&x, &t, (Some(&context), None), &r, false);
            assert!(controlled.equal(&frozen), "the zero-initialised ControlNet changed the output");
        }
        let hint = Tensor::randn([2, 1, 16, 16], opts);
        let scale = ControlScale { conditioning_scale: 1.0, guess_mode: false };
        let r = control.residuals(&x, &t, (Some(&context), None), &hint, scale, true);
        let loss = unet.forward_controlled(&x, &t, (Some(&context), None), &r, true).square().sum(Kind::Float);
        loss.backward();
        let vars = cvs.variables();
        for name in
            ["controlnet_down_blocks.0.weight", "controlnet_down_blocks.3.weight", "controlnet_mid_block.weight"]
        {
            let g = vars[name].grad();
            assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name} has no gradient");
        }
    }

    /// Conditioning scale 0 gives the frozen model whatever the ControlNet's weights; guess mode's scales follow the
    /// formula and the middle block gets the full weight.
    #[test]
    fn scale_zero_is_the_frozen_model_and_guess_mode_scales_rise_with_depth() {
        let (_uvs, unet, cvs, control) = tiny();
        tch::no_grad(|| {
            for (_, mut v) in cvs.variables() {
                v.copy_(&(v.randn_like() * 0.1)); // a "trained" ControlNet: every weight non-zero
            }
        });
        let opts = (Kind::Float, Device::Cpu);
        let (x, t, hint) =
            (Tensor::randn([1, 1, 16, 16], opts), Tensor::from_slice(&[300i64]), Tensor::randn([1, 1, 16, 16], opts));
        let frozen = unet.forward_cond(&x, &t, None, None, false);
        let off = ControlScale { conditioning_scale: 0.0, guess_mode: false };
        let r = control.residuals(&x, &t, (None, None), &hint, off, false);
        assert!(unet.forward_controlled(&x, &t, (None, None), &r, false).equal(&frozen));
        let on = ControlScale { conditioning_scale: 1.0, guess_mode: false };
        let r = control.residuals(&x, &t, (None, None), &hint, on, false);
        assert!(!unet.forward_controlled(&x, &t, (None, None), &r, false).equal(&frozen), "a trained ControlNet acts");
        let s = guess_mode_scales(4);
        let want = [0.1, 0.1f64.powf(0.75), 0.1f64.powf(0.5), 0.1f64.powf(0.25), 1.0];
        assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{s:?}");
        let guess = ControlScale { conditioning_scale: 0.5, guess_mode: true };
        let g = control.residuals(&x, &t, (None, None), &hint, guess, false);
        let k = g.down.len();
        let w = guess_mode_scales(k);
        assert!((&g.down[0] - &r.down[0] * (0.5 * w[0])).abs().max().double_value(&[]) < 1e-6);
        assert!((&g.mid - &r.mid * 0.5).abs().max().double_value(&[]) < 1e-6);
    }

    /// After the copy, the ControlNet's way down with a zero hint computes exactly the UNet's.
    #[test]
    fn the_copy_starts_as_the_unets_encoder() {
        let (_uvs, unet, _cvs, control) = tiny();
        let opts = (Kind::Float, Device::Cpu);
        let (x, t) = (Tensor::randn([2, 1, 16, 16], opts), Tensor::from_slice(&[1i64, 999]));
        let a = control.encoder.encode_cond(&x, &t, (None, None), None, false);
        let b = unet.encoder.encode_cond(&x, &t, (None, None), None, false);
        assert!(a.mid.equal(&b.mid) && a.skips.len() == b.skips.len());
        assert_eq!(control.encoder.skip_channels(), [8, 8, 8, 16]);
        assert!(copy_unet_encoder(&VarStore::new(Device::Cpu), &VarStore::new(Device::Cpu)).is_err());
    }
}
