//! Original Stable Diffusion single-file checkpoints <-> diffusers names, as one table.
//!
//! [LDM] Rombach et al. 2022, arXiv:2112.10752: the CompVis `ldm` code whose module names the original checkpoints
//! (`v1-5-pruned-emaonly.safetensors`) keep: `model.diffusion_model.*` (the UNet: `input_blocks`, `middle_block`,
//! `output_blocks`), `first_stage_model.*` (the VAE: `encoder.down.N.block.M`, `decoder.up.N`, `mid.attn_1`) and
//! `cond_stage_model.transformer.*` (transformers' CLIPTextModel). Our modules use diffusers' names (diffusers
//! `UNet2DConditionModel`, `AutoencoderKL`), so a diffusers folder needs no map; a single file goes through this one.
//!
//! The table pairs module paths, original ↔ ours, prefixed by component (`unet.`, `vae.`, `text_encoder.`); a key
//! maps through its longest listed ancestor (`…input_blocks.1.1` ↔ `unet.down_blocks.0.attentions.0` carries the
//! whole transformer, whose inner names agree). It is built from the configs, so it covers any layout of the same
//! family, and a test maps every key of our models there and back.
use crate::nn::unet::UNetConfig;
use crate::nn::vae::VaeConfig;
use std::collections::{HashMap, HashSet};

/// Prefixes of the three components in a single file, and ours.
pub const UNET_ORIGINAL: &str = "model.diffusion_model";
pub const VAE_ORIGINAL: &str = "first_stage_model";
pub const TEXT_ORIGINAL: &str = "cond_stage_model.transformer";

/// The key map of one SD 1.x layout.
#[derive(Debug, Clone)]
pub struct KeyMap {
    to_ours: HashMap<String, String>,
    to_original: HashMap<String, String>,
    /// Our modules that are 1×1 convolutions in the original (the VAE's attention projections: (C, C, 1, 1) there,
    /// (C, C) linear weights here).
    conv_as_linear: HashSet<String>,
}

/// Longest ancestor of `key` (itself included) in `table`, and the key rewritten through it.
fn through(table: &HashMap<String, String>, key: &str) -> Option<String> {
    let mut end = key.len();
    loop {
        if let Some(to) = table.get(&key[..end]) {
            return Some(format!("{to}{}", &key[end..]));
        }
        end = key[..end].rfind('.')?;
    }
}

impl KeyMap {
    pub fn new(unet: &UNetConfig, vae: &VaeConfig) -> Self {
        let mut pairs: Vec<(String, String)> =
            vec![(format!("{TEXT_ORIGINAL}.text_model"), "text_encoder.text_model".into())];
        let mut conv_as_linear = HashSet::new();
        unet_pairs(unet, &mut pairs);
        vae_pairs(vae, &mut pairs, &mut conv_as_linear);
        let to_ours: HashMap<String, String> = pairs.iter().cloned().collect();
        let to_original: HashMap<String, String> = pairs.into_iter().map(|(o, d)| (d, o)).collect();
        assert_eq!(to_ours.len(), to_original.len(), "the table is one-to-one");
        Self { to_ours, to_original, conv_as_linear }
    }

    /// The SD 1.5 layout.
    pub fn sd15() -> Self {
        Self::new(&UNetConfig::sd15(), &VaeConfig::sd15())
    }

    /// Our name (`unet.down_blocks.0.resnets.0.norm1.weight`) of an original key; None for keys outside the three
    /// models (`model_ema.*`, `alphas_cumprod`, …). Text encoders saved by transformers < 4.x lack the `text_model.`
    /// level; both forms map.
    pub fn to_ours(&self, key: &str) -> Option<String> {
        through(&self.to_ours, key).or_else(|| {
            let rest = key.strip_prefix(TEXT_ORIGINAL)?.strip_prefix('.')?;
            (!rest.starts_with("text_model.")).then(|| format!("text_encoder.text_model.{rest}"))
        })
    }

    /// The original key of one of our names.
    pub fn to_original(&self, ours: &str) -> Option<String> {
        through(&self.to_original, ours)
    }

    /// Whether our tensor `ours` is stored as a 1×1 convolution in the original file.
    pub fn is_conv_as_linear(&self, ours: &str) -> bool {
        ours.rsplit_once('.').is_some_and(|(module, _)| self.conv_as_linear.contains(module))
    }
}

fn pair(pairs: &mut Vec<(String, String)>, original: String, ours: String) {
    pairs.push((original, ours));
}

/// A UNet resnet: ldm `ResBlock` (in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, linear],
/// out_layers = [GroupNorm, SiLU, dropout, conv], skip_connection) ↔ diffusers `ResnetBlock2D`.
fn unet_resnet(pairs: &mut Vec<(String, String)>, o: &str, d: &str) {
    for (leaf_o, leaf_d) in [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("skip_connection", "conv_shortcut"),
    ] {
        pair(pairs, format!("{o}.{leaf_o}"), format!("{d}.{leaf_d}"));
    }
}

// ANCHOR: unet_keys
/// ldm's UNetModel numbers its blocks in one flat list per direction: input_blocks[0] is conv_in, then per level
/// L (resnet, attention) blocks and a downsampler; output_blocks has L + 1 blocks per level, the last one ending in
/// the upsampler (after the attention, if the level has one).
fn unet_pairs(config: &UNetConfig, pairs: &mut Vec<(String, String)>) {
    unet_pairs_under(config, UNET_ORIGINAL, "unet", pairs);
}

/// [`unet_pairs`] with the prefixes `o` (original) and `d` (ours).
fn unet_pairs_under(config: &UNetConfig, o: &str, d: &str, pairs: &mut Vec<(String, String)>) {
    let (n, l) = (config.block_out_channels.len(), config.layers_per_block);
    for (a, b) in [
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
        ("middle_block.1", "mid_block.attentions.0"),
    ] {
        pair(pairs, format!("{o}.{a}"), format!("{d}.{b}"));
    }
    unet_resnet(pairs, &format!("{o}.middle_block.0"), &format!("{d}.mid_block.resnets.0"));
    unet_resnet(pairs, &format!("{o}.middle_block.2"), &format!("{d}.mid_block.resnets.1"));
    for i in 0..n {
        for j in 0..l {
            let block = format!("{o}.input_blocks.{}", 1 + i * (l + 1) + j);
            unet_resnet(pairs, &format!("{block}.0"), &format!("{d}.down_blocks.{i}.resnets.{j}"));
            if config.attention[i] {
                pair(pairs, format!("{block}.1"), format!("{d}.down_blocks.{i}.attentions.{j}"));
            }
        }
        if i + 1 < n {
            let block = format!("{o}.input_blocks.{}", (i + 1) * (l + 1));
            pair(pairs, format!("{block}.0.op"), format!("{d}.down_blocks.{i}.downsamplers.0.conv"));
        }
    }
    for r in 0..n {
        let has_attention = config.attention[n - 1 - r];
        for j in 0..=l {
            let block = format!("{o}.output_blocks.{}", r * (l + 1) + j);
            unet_resnet(pairs, &format!("{block}.0"), &format!("{d}.up_blocks.{r}.resnets.{j}"));
            if has_attention {
                pair(pairs, format!("{block}.1"), format!("{d}.up_blocks.{r}.attentions.{j}"));
            }
            if j == l && r + 1 < n {
                let at = if has_attention { 2 } else { 1 };
                pair(pairs, format!("{block}.{at}.conv"), format!("{d}.up_blocks.{r}.upsamplers.0.conv"));
            }
        }
    }
}
// ANCHOR_END: unet_keys

/// Prefix of an original ControlNet file's tensors (lllyasviel's `cldm`; files are also shared without it).
pub const CONTROL_ORIGINAL: &str = "control_model";

// ANCHOR: controlnet_keys
/// An original ControlNet single file (lllyasviel's `cldm.ControlNet`, `control_v11p_sd15_canny.safetensors`) ↔ our
/// ControlNet's names (diffusers' `ControlNetModel`) under `controlnet.`: the copied UNet trunk (`time_embed`,
/// `input_blocks`, `middle_block`) through the UNet's table, the zero convolutions `zero_convs.i.0` ↔
/// `controlnet_down_blocks.i` and `middle_block_out.0` ↔ `controlnet_mid_block`, and the hint encoder
/// `input_hint_block` (a Sequential of convolutions and SiLUs: the convolutions at the even indices) ↔
/// `controlnet_cond_embedding.{conv_in, blocks.i, conv_out}`. `hint_blocks` is the number of middle convolutions
/// (6 in SD 1.5's: 16→16, 16→32, 32→32, 32→96, 96→96, 96→256).
pub fn controlnet_keymap(unet: &UNetConfig, hint_blocks: usize) -> KeyMap {
    let (o, d) = (CONTROL_ORIGINAL, "controlnet");
    let mut pairs = Vec::new();
    unet_pairs_under(unet, o, d, &mut pairs);
    let n_skips = 1 + unet.block_out_channels.len() * (unet.layers_per_block + 1) - 1;
    for i in 0..n_skips {
        pair(&mut pairs, format!("{o}.zero_convs.{i}.0"), format!("{d}.controlnet_down_blocks.{i}"));
    }
    pair(&mut pairs, format!("{o}.middle_block_out.0"), format!("{d}.controlnet_mid_block"));
    let hint = format!("{d}.controlnet_cond_embedding");
    pair(&mut pairs, format!("{o}.input_hint_block.0"), format!("{hint}.conv_in"));
    for i in 0..hint_blocks {
        pair(&mut pairs, format!("{o}.input_hint_block.{}", 2 * (i + 1)), format!("{hint}.blocks.{i}"));
    }
    pair(&mut pairs, format!("{o}.input_hint_block.{}", 2 * (hint_blocks + 1)), format!("{hint}.conv_out"));
    let to_ours: HashMap<String, String> = pairs.iter().cloned().collect();
    let to_original: HashMap<String, String> = pairs.into_iter().map(|(o, d)| (d, o)).collect();
    KeyMap { to_ours, to_original, conv_as_linear: HashSet::new() }
}
// ANCHOR_END: controlnet_keys

/// A VAE resnet: the names agree but for the shortcut (ldm `nin_shortcut`).
fn vae_resnet(pairs: &mut Vec<(String, String)>, o: &str, d: &str) {
    for leaf in ["norm1", "conv1", "norm2", "conv2"] {
        pair(pairs, format!("{o}.{leaf}"), format!("{d}.{leaf}"));
    }
    pair(pairs, format!("{o}.nin_shortcut"), format!("{d}.conv_shortcut"));
}

/// ldm's VAE: encoder.down.i / decoder.up.i count levels from the top in both directions (so decoder.up.0 is the
/// last level diffusers runs: up_blocks.{n−1}); the mid attention's q, k, v, proj_out are 1×1 convolutions.
fn vae_pairs(config: &VaeConfig, pairs: &mut Vec<(String, String)>, conv_as_linear: &mut HashSet<String>) {
    let (o, d) = (VAE_ORIGINAL, "vae");
    let n = config.block_out_channels.len();
    for (a, b) in [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")] {
        pair(pairs, format!("{o}.{a}"), format!("{d}.{b}"));
    }
    for part in ["encoder", "decoder"] {
        let (po, pd) = (format!("{o}.{part}"), format!("{d}.{part}"));
        for (a, b) in [("conv_in", "conv_in"), ("conv_out", "conv_out"), ("norm_out", "conv_norm_out")] {
            pair(pairs, format!("{po}.{a}"), format!("{pd}.{b}"));
        }
        vae_resnet(pairs, &format!("{po}.mid.block_1"), &format!("{pd}.mid_block.resnets.0"));
        vae_resnet(pairs, &format!("{po}.mid.block_2"), &format!("{pd}.mid_block.resnets.1"));
        let attn = format!("{pd}.mid_block.attentions.0");
        pair(pairs, format!("{po}.mid.attn_1.norm"), format!("{attn}.group_norm"));
        for (a, b) in [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")] {
            pair(pairs, format!("{po}.mid.attn_1.{a}"), format!("{attn}.{b}"));
            conv_as_linear.insert(format!("{attn}.{b}"));
        }
    }
    for i in 0..n {
        for j in 0..config.layers_per_block {
            let (a, b) =
                (format!("{o}.encoder.down.{i}.block.{j}"), format!("{d}.encoder.down_blocks.{i}.resnets.{j}"));
            vae_resnet(pairs, &a, &b);
        }
        if i + 1 < n {
            let (a, b) = (
                format!("{o}.encoder.down.{i}.downsample.conv"),
                format!("{d}.encoder.down_blocks.{i}.downsamplers.0.conv"),
            );
            pair(pairs, a, b);
        }
    }
    for r in 0..n {
        let level = n - 1 - r;
        for j in 0..=config.layers_per_block {
            vae_resnet(
                pairs,
                &format!("{o}.decoder.up.{level}.block.{j}"),
                &format!("{d}.decoder.up_blocks.{r}.resnets.{j}"),
            );
        }
        if r + 1 < n {
            pair(
                pairs,
                format!("{o}.decoder.up.{level}.upsample.conv"),
                format!("{d}.decoder.up_blocks.{r}.upsamplers.0.conv"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sd15_keys_map_both_ways() {
        let map = KeyMap::sd15();
        // keys as they appear in runwayml's v1-5-pruned-emaonly.safetensors and in the diffusers folder
        for (original, ours) in [
            ("model.diffusion_model.input_blocks.0.0.weight", "unet.conv_in.weight"),
            ("model.diffusion_model.time_embed.2.bias", "unet.time_embedding.linear_2.bias"),
            ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "unet.down_blocks.0.resnets.0.norm1.weight"),
            (
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("model.diffusion_model.input_blocks.9.0.op.bias", "unet.down_blocks.2.downsamplers.0.conv.bias"),
            (
                "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight",
                "unet.down_blocks.3.resnets.1.time_emb_proj.weight",
            ),
            ("model.diffusion_model.middle_block.1.proj_in.weight", "unet.mid_block.attentions.0.proj_in.weight"),
            ("model.diffusion_model.middle_block.2.out_layers.3.weight", "unet.mid_block.resnets.1.conv2.weight"),
            ("model.diffusion_model.output_blocks.2.1.conv.weight", "unet.up_blocks.0.upsamplers.0.conv.weight"),
            (
                "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
                "unet.up_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            ("model.diffusion_model.output_blocks.5.2.conv.bias", "unet.up_blocks.1.upsamplers.0.conv.bias"),
            ("model.diffusion_model.output_blocks.11.1.norm.weight", "unet.up_blocks.3.attentions.2.norm.weight"),
            ("model.diffusion_model.out.2.weight", "unet.conv_out.weight"),
            (
                "first_stage_model.encoder.down.0.downsample.conv.weight",
                "vae.encoder.down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
                "vae.encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            ("first_stage_model.decoder.up.0.block.2.conv2.bias", "vae.decoder.up_blocks.3.resnets.2.conv2.bias"),
            ("first_stage_model.decoder.up.3.upsample.conv.weight", "vae.decoder.up_blocks.0.upsamplers.0.conv.weight"),
            (
                "first_stage_model.decoder.mid.attn_1.proj_out.weight",
                "vae.decoder.mid_block.attentions.0.to_out.0.weight",
            ),
            ("first_stage_model.encoder.norm_out.bias", "vae.encoder.conv_norm_out.bias"),
            ("first_stage_model.post_quant_conv.weight", "vae.post_quant_conv.weight"),
            (
                "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                "text_encoder.text_model.encoder.layers.11.mlp.fc2.weight",
            ),
        ] {
            assert_eq!(map.to_ours(original).as_deref(), Some(ours), "{original}");
            assert_eq!(map.to_original(ours).as_deref(), Some(original), "{ours}");
        }
        assert!(map.is_conv_as_linear("vae.encoder.mid_block.attentions.0.to_q.weight"));
        assert!(!map.is_conv_as_linear("vae.encoder.mid_block.attentions.0.group_norm.weight"));
        // the old text encoder layout without text_model., and keys outside the models
        assert_eq!(
            map.to_ours("cond_stage_model.transformer.embeddings.token_embedding.weight").as_deref(),
            Some("text_encoder.text_model.embeddings.token_embedding.weight")
        );
        for other in ["model_ema.decay", "alphas_cumprod", "model.diffusion_model_extra.weight"] {
            assert_eq!(map.to_ours(other), None, "{other}");
        }
    }
}

#[cfg(test)]
mod controlnet_tests {
    use super::*;
    use crate::nn::controlnet::{ControlNet, ControlNetConfig};
    use tch::nn::VarStore;

    /// Every tensor of SD 1.5's ControlNet maps to an original key and back, no two to the same key; the names of
    /// `control_v11p_sd15_canny.safetensors` come out.
    #[test]
    fn controlnet_keys_round_trip() {
        let unet =
            UNetConfig { block_out_channels: vec![32, 32, 64, 64], cross_attention_dim: Some(8), ..UNetConfig::sd15() };
        let vs = VarStore::new(tch::Device::Cpu);
        let config = ControlNetConfig {
            unet: unet.clone(),
            hint_channels: 3,
            hint_embedding_channels: vec![16, 32, 96, 256],
            hint_stride: 2,
        };
        let _net = ControlNet::new(vs.root(), config);
        let map = controlnet_keymap(&unet, 6);
        let mut seen = HashSet::new();
        for name in vs.variables().keys() {
            let ours = format!("controlnet.{name}");
            let original = map.to_original(&ours).unwrap_or_else(|| panic!("no original key for {name}"));
            assert!(original.starts_with("control_model."), "{original}");
            assert_eq!(map.to_ours(&original).as_deref(), Some(ours.as_str()), "{original}");
            assert!(seen.insert(original.clone()), "two tensors map to {original}");
        }
        for (original, ours) in [
            ("control_model.input_hint_block.0.weight", "controlnet.controlnet_cond_embedding.conv_in.weight"),
            ("control_model.input_hint_block.12.bias", "controlnet.controlnet_cond_embedding.blocks.5.bias"),
            ("control_model.input_hint_block.14.weight", "controlnet.controlnet_cond_embedding.conv_out.weight"),
            ("control_model.zero_convs.11.0.weight", "controlnet.controlnet_down_blocks.11.weight"),
            ("control_model.middle_block_out.0.bias", "controlnet.controlnet_mid_block.bias"),
            ("control_model.input_blocks.4.1.proj_in.weight", "controlnet.down_blocks.1.attentions.0.proj_in.weight"),
            ("control_model.middle_block.2.emb_layers.1.weight", "controlnet.mid_block.resnets.1.time_emb_proj.weight"),
            ("control_model.time_embed.0.weight", "controlnet.time_embedding.linear_1.weight"),
        ] {
            assert!(seen.contains(original), "{original} is not among the ControlNet's keys");
            assert_eq!(map.to_ours(original).as_deref(), Some(ours), "{original}");
        }
    }
}
