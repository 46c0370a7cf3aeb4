//! Stable Diffusion 1.x's three networks and their weights: a diffusers folder (`unet/`, `vae/`, `text_encoder/`,
//! each a config.json and a safetensors file, fp32 or fp16) or an original single file (`model.diffusion_model.*`,
//! `first_stage_model.*`, `cond_stage_model.transformer.*`, through [`KeyMap`]).
//!
//! Loading is strict: every tensor of our model must be in the file with its shape; a missing tensor, a wrong shape
//! (an SD 2.x or SDXL file, whose context is 1024 or 2048 wide), a damaged file or a pickle each stop with a message
//! that names the file and the tensor. Tensors are converted to the model's dtype one at a time as they are read.
use crate::nn::controlnet::{ControlNet, ControlNetConfig};
use crate::nn::layers::channels_last;
use crate::nn::taesd::{Taesd, TaesdConfig};
use crate::nn::text_encoder::{Activation, TextEncoder, TextEncoderConfig};
use crate::nn::unet::{UNet, UNetConfig};
use crate::nn::vae::{AutoencoderKl, VaeConfig, SD_SCALING_FACTOR};
use crate::sd::keymap::{controlnet_keymap, KeyMap, CONTROL_ORIGINAL};
use crate::sd::safetensors::{refuse_pickle, SafetensorsFile};
use crate::validate::Validate;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The weights' dtype a user names: `f32`, `bf16`, or `auto` (bf16 where the CPU multiplies it natively,
/// [`crate::cli::cpu_has_bf16`]; else f32).
pub fn kind_of_dtype(name: &str) -> Result<Kind> {
    match name {
        "f32" => Ok(Kind::Float),
        "bf16" => Ok(Kind::BFloat16),
        "auto" if crate::cli::cpu_has_bf16() => Ok(Kind::BFloat16),
        "auto" => Ok(Kind::Float),
        other => bail!("--dtype {other}: use auto, f32 or bf16"),
    }
}

/// The shapes of the three networks.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SdConfig {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text: TextEncoderConfig,
}

impl SdConfig {
    /// runwayml/stable-diffusion-v1-5: CLIP ViT-L/14's text tower, the 860 M-parameter UNet, the 84 M VAE.
    pub fn sd15() -> Self {
        Self { unet: UNetConfig::sd15(), vae: VaeConfig::sd15(), text: TextEncoderConfig::clip_vit_l14() }
    }

    /// SD 1.5's layout shrunk for tests and the lesson's tour: the same four UNet levels (cross-attention at the first
    /// three, two resnets each, 8 heads, widths growing then held as 320/640/1280/1280 do; at least 64, where GroupNorm has SD's 32 groups), the same four VAE levels
    /// (8× smaller latents, 4 channels), and a 2-layer CLIP text tower over the real 49 408-token vocabulary and 77
    /// positions. Every UNet and VAE key of SD 1.5 exists in it (a shortcut conv wherever the width changes); only
    /// the widths and the text encoder's depth differ.
    pub fn tiny() -> Self {
        Self {
            unet: UNetConfig {
                block_out_channels: vec![64, 128, 192, 192],
                cross_attention_dim: Some(32),
                ..UNetConfig::sd15()
            },
            vae: VaeConfig { block_out_channels: vec![8, 16, 32, 32], norm_num_groups: 4, ..VaeConfig::sd15() },
            text: TextEncoderConfig {
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                ..TextEncoderConfig::clip_vit_l14()
            },
        }
    }

    /// Checks that the three fit together (the UNet reads the text encoder's width and the VAE's latents).
    pub fn check(&self) -> Result<()> {
        let parts: [(&str, &dyn Validate); 3] =
            [("unet", &self.unet), ("vae", &self.vae), ("text_encoder", &self.text)];
        for (name, part) in parts {
            part.validate().map_err(|e| anyhow::anyhow!("the {name} config: {e}"))?;
        }
        ensure!(
            self.unet.cross_attention_dim == Some(self.text.hidden_size),
            "the UNet cross-attends to width {:?}, the text encoder gives {}: these parts are not one SD 1.x model",
            self.unet.cross_attention_dim,
            self.text.hidden_size
        );
        // the inpainting model reads 2C + 1 channels: the latents, the mask and the masked image's latents
        let c = self.vae.latent_channels;
        ensure!(
            (self.unet.in_channels == c || self.unet.in_channels == 2 * c + 1) && self.unet.out_channels == c,
            "the UNet takes {} channels, the VAE's latents have {}: these parts are not one SD 1.x model",
            self.unet.in_channels,
            self.vae.latent_channels
        );
        Ok(())
    }
}

/// The networks, each on its own VarStore (so each can be loaded and cast alone).
pub struct SdModels {
    pub config: SdConfig,
    pub text_encoder: TextEncoder,
    pub unet: UNet,
    pub vae: AutoencoderKl,
    pub text_vs: VarStore,
    pub unet_vs: VarStore,
    pub vae_vs: VarStore,
    /// What was freed to save memory ([`Self::release_text_encoder`], [`Self::release_vae_decoder`]).
    pub released: Released,
}

/// Parts of [`SdModels`] freed to save memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    pub text_encoder: bool,
    pub vae_decoder: bool,
}

/// Replaces the weights of `vs` whose names `which` picks by empty tensors, handing their memory back.
fn release(vs: &VarStore, which: impl Fn(&str) -> bool) {
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if which(&name) {
                v.set_data(&Tensor::empty([0], (v.kind(), v.device())));
            }
        }
    });
}

impl SdModels {
    /// Networks with libtorch's default random initialisation (the tiny tour; benchmarks of the full size), in f32.
    pub fn new(config: SdConfig, device: Device) -> Result<Self> {
        Self::new_in(config, device, Kind::Float)
    }

    /// [`Self::new`] with the weights created in `kind` (bf16: never an f32 copy of the 1 B parameters in memory).
    pub fn new_in(config: SdConfig, device: Device, kind: Kind) -> Result<Self> {
        config.check()?;
        let (mut text_vs, mut unet_vs, mut vae_vs) =
            (VarStore::new(device), VarStore::new(device), VarStore::new(device));
        for vs in [&mut text_vs, &mut unet_vs, &mut vae_vs] {
            vs.set_kind(kind); // the kind new variables are created in
        }
        let text_encoder = TextEncoder::new(text_vs.root() / "text_model", config.text.clone());
        let unet = UNet::new(unet_vs.root(), config.unet.clone());
        let vae = AutoencoderKl::new(vae_vs.root(), config.vae.clone());
        for vs in [&mut text_vs, &mut unet_vs, &mut vae_vs] {
            vs.freeze();
        }
        // the convolutions' weights channels-last, as the pipeline feeds its latents (nn::layers::channels_last)
        tch::no_grad(|| {
            for vs in [&unet_vs, &vae_vs] {
                for (_, mut w) in vs.variables().into_iter().filter(|(_, w)| w.dim() == 4) {
                    w.set_data(&channels_last(&w));
                }
            }
        });
        crate::cli::return_freed_memory(); // the contiguous copies the conversion freed
        Ok(Self { config, text_encoder, unet, vae, text_vs, unet_vs, vae_vs, released: Released::default() })
    }

    /// (component prefix, VarStore) of the three, as in [`KeyMap`]'s names.
    fn stores(&mut self) -> [(&'static str, &mut VarStore); 3] {
        [("text_encoder", &mut self.text_vs), ("unet", &mut self.unet_vs), ("vae", &mut self.vae_vs)]
    }

    /// Casts every weight to `kind` (f32 or bf16; the samplers keep f32 latents and cast at the UNet's door).
    pub fn set_kind(&mut self, kind: Kind) {
        for (_, vs) in self.stores() {
            vs.set_kind(kind);
        }
    }

    pub fn kind(&self) -> Kind {
        self.unet_vs.variables().values().next().map_or(Kind::Float, |t| t.kind())
    }

    /// Frees the VAE's decoder (`decoder.*`, `post_quant_conv.*`: 49 M of its 84 M parameters) when TAESD decodes in
    /// its place; its encoder stays for img2img. Decoding with the VAE afterwards is refused.
    pub fn release_vae_decoder(&mut self) {
        release(&self.vae_vs, |name| name.starts_with("decoder.") || name.starts_with("post_quant_conv."));
        self.released.vae_decoder = true;
        crate::cli::return_freed_memory();
    }

    /// Frees the text encoder (123 M parameters) once the prompts are encoded; encoding afterwards is refused.
    pub fn release_text_encoder(&mut self) {
        release(&self.text_vs, |_| true);
        self.released.text_encoder = true;
        crate::cli::return_freed_memory();
    }

    pub fn num_parameters(&self) -> [i64; 3] {
        let count = |vs: &VarStore| vs.variables().values().map(|t| t.numel() as i64).sum();
        [count(&self.text_vs), count(&self.unet_vs), count(&self.vae_vs)]
    }

    /// Loads SD 1.x weights from `path`: a diffusers folder (its configs decide the shapes) or a single
    /// `.safetensors` file (SD 1.5's shapes). f16 and bf16 files are converted to f32.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        Self::load_in(path, device, Kind::Float)
    }

    /// [`Self::load`] into weights of `kind` (each tensor converted as it is read).
    pub fn load_in(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        if path.is_dir() {
            return Self::load_diffusers_in(path, device, kind);
        }
        ensure!(
            path.exists(),
            "weights {} not found: pass a diffusers folder (with unet/, vae/, text_encoder/) or a .safetensors file",
            path.display()
        );
        let file = open_single_file(path)?; // its header, read before 4 GB of networks are built for it
        let mut config = SdConfig::sd15();
        // the inpainting model (sd-v1-5-inpainting) reads 9 channels: its conv_in says so
        let conv_in = format!("{}.input_blocks.0.0.weight", crate::sd::keymap::UNET_ORIGINAL);
        if let Some(c) = file.entry(&conv_in).and_then(|e| e.shape.get(1).copied()) {
            config.unet.in_channels = c;
        }
        let mut models = Self::new_in(config, device, kind)?;
        models.load_from(file)?;
        Ok(models)
    }

    /// A diffusers folder: `unet/config.json` + `unet/diffusion_pytorch_model[.fp16].safetensors`, the same for `vae/`,
    /// and `text_encoder/config.json` + `text_encoder/model[.fp16].safetensors`.
    pub fn load_diffusers(dir: &Path, device: Device) -> Result<Self> {
        Self::load_diffusers_in(dir, device, Kind::Float)
    }

    /// [`Self::load_diffusers`] into weights of `kind`.
    pub fn load_diffusers_in(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = SdConfig {
            unet: unet_config(&read_config(dir, "unet")?)
                .with_context(|| format!("{}/unet/config.json", dir.display()))?,
            vae: vae_config(&read_config(dir, "vae")?).with_context(|| format!("{}/vae/config.json", dir.display()))?,
            text: text_config(&read_config(dir, "text_encoder")?)
                .with_context(|| format!("{}/text_encoder/config.json", dir.display()))?,
        };
        let mut models = Self::new_in(config, device, kind)?;
        for (component, vs) in models.stores() {
            let stem = if component == "text_encoder" { "model" } else { "diffusion_pytorch_model" };
            let mut file = SafetensorsFile::open(&weights_file(dir, component, stem)?)?;
            // transformers 5 saves CLIPTextModel without the text_model. level
            load_strict(
                vs,
                &mut file,
                &|name| vec![name.to_string(), name.trim_start_matches("text_model.").to_string()],
                &|_| false,
                &SD_CHECKPOINT,
            )?;
        }
        Ok(models)
    }

    /// An original single file, mapped through [`KeyMap`] built from this model's configs.
    pub fn load_single_file(&mut self, path: &Path) -> Result<()> {
        self.load_from(open_single_file(path)?)
    }

    /// [`Self::load_single_file`] from a file whose header [`open_single_file`] has read.
    fn load_from(&mut self, mut file: SafetensorsFile) -> Result<()> {
        let map = KeyMap::new(&self.config.unet, &self.config.vae);
        for (component, vs) in self.stores() {
            let original = |name: &str| {
                let ours = format!("{component}.{name}");
                let key = map.to_original(&ours).unwrap_or_else(|| panic!("the key map covers {ours}"));
                // the pre-4.x transformers layout has no text_model. level
                let old = key.replacen("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.", 1);
                vec![key, old]
            };
            let conv_as_linear = |name: &str| map.is_conv_as_linear(&format!("{component}.{name}"));
            load_strict(vs, &mut file, &original, &conv_as_linear, &SD_CHECKPOINT)?;
        }
        Ok(())
    }

    /// Writes the three networks as one original-layout single file (the VAE's attention projections as 1×1
    /// convolutions), f32: what [`Self::load_single_file`] reads.
    pub fn save_single_file(&mut self, path: &Path) -> Result<()> {
        let map = KeyMap::new(&self.config.unet, &self.config.vae);
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (component, vs) in self.stores() {
            for (name, t) in vs.variables() {
                let ours = format!("{component}.{name}");
                let key = map.to_original(&ours).with_context(|| format!("no original key for {ours}"))?;
                let t = t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
                let t = if map.is_conv_as_linear(&ours) && t.dim() == 2 { t.view([t.size()[0], -1, 1, 1]) } else { t };
                named.push((key, t));
            }
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Tensor::write_safetensors(&named, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

fn read_config(dir: &Path, component: &str) -> Result<Value> {
    let path = dir.join(component).join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} not found: a diffusers folder has unet/, vae/ and text_encoder/, each with its config.json",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// `dir/component/stem.safetensors`, else its `.fp16` variant; a pickled `.bin` is refused with the fix.
fn weights_file(dir: &Path, component: &str, stem: &str) -> Result<PathBuf> {
    let base = dir.join(component);
    for name in [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")] {
        if base.join(&name).exists() {
            return Ok(base.join(name));
        }
    }
    for name in [format!("{stem}.bin"), format!("{stem}.fp16.bin")] {
        if base.join(&name).exists() {
            refuse_pickle(&base.join(name))?;
        }
    }
    bail!("{} has no {stem}.safetensors: download the safetensors weights of this model", base.display())
}

/// What a strictly loaded file should be, for its error messages: the kind of file, and what to say when a tensor has
/// another shape.
struct Expected {
    what: &'static str,
    other_shape: &'static str,
}

const SD_CHECKPOINT: Expected =
    Expected { what: "Stable Diffusion 1.x checkpoint", other_shape: "SD 2.x and SDXL are not supported by lesson 09" };
const SD_CONTROLNET: Expected =
    Expected { what: "SD 1.x ControlNet", other_shape: "SD 2.x and SDXL are not supported by lesson 09" };
const TAESD_FILE: Expected = Expected { what: "TAESD", other_shape: "use madebyollin/taesd, SD 1.x's" };

// ANCHOR: load_strict
/// Fills every variable of `vs` from `file`: `names(ours)` lists the keys it may have there (first found wins);
/// `conv_as_linear(ours)` allows a (C, C, 1, 1) tensor for a (C, C) weight. Missing tensors and wrong shapes stop the
/// load, naming the file, the key and both shapes (`expected` words the message).
fn load_strict(
    vs: &mut VarStore,
    file: &mut SafetensorsFile,
    names: &dyn Fn(&str) -> Vec<String>,
    conv_as_linear: &dyn Fn(&str) -> bool,
    expected: &Expected,
) -> Result<()> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let path = file.path.display().to_string();
    for (name, var) in &mut vars {
        let keys = names(name);
        let Some(key) = keys.iter().find(|k| file.entry(k).is_some()) else {
            bail!(
                "{path} has no tensor '{}' ({} tensors in the file): it is not a complete {}; \
                 download it again or pass an SD 1.x model",
                keys[0],
                file.len(),
                expected.what
            );
        };
        let entry = file.entry(key).expect("just found");
        let (found, kind) = (entry.shape.clone(), entry.kind);
        ensure!(
            matches!(kind, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double),
            "{path}: tensor '{key}' holds {kind:?} values where the network has float weights: the file is damaged or \
             not an SD checkpoint"
        );
        let want = var.size();
        let squeezed = conv_as_linear(name) && found.len() == 4 && found[2..] == [1, 1] && found[..2] == want[..];
        if found != want && !squeezed {
            bail!(
                "{path}: tensor '{key}' is {found:?}, Stable Diffusion 1.x expects {want:?}: this checkpoint has another \
                 architecture ({})",
                expected.other_shape
            );
        }
        let t = file.tensor(key)?.reshape(&want);
        let fix = "the file is damaged (download it again) or was saved from a diverged training run";
        crate::cli::ensure_finite(&t, &format!("{path}: tensor '{key}'"), fix)?;
        let t = t.to_kind(var.kind()).to_device(var.device());
        tch::no_grad(|| var.copy_(&t));
    }
    Ok(())
}
// ANCHOR_END: load_strict

/// Opens a single file and reads its header, before any network is built: a safetensors file with SD 1.x's UNet in
/// it (the file is then read tensor by tensor).
fn open_single_file(path: &Path) -> Result<SafetensorsFile> {
    let file = SafetensorsFile::open(path)?;
    let has = |prefix: &str| file.names().any(|n| n.starts_with(prefix));
    if !has(crate::sd::keymap::UNET_ORIGINAL) && has("down_blocks.") {
        bail!(
            "{} holds a diffusers UNet alone, not a whole single-file checkpoint: pass the diffusers folder that \
             contains it",
            path.display()
        );
    }
    ensure!(
        has(crate::sd::keymap::UNET_ORIGINAL),
        "{} has no `model.diffusion_model.*` tensors: it is not an SD 1.x single-file checkpoint (pass the whole \
         model as one .safetensors file, or a diffusers folder)",
        path.display()
    );
    Ok(file)
}

/// A count (layers, blocks) from a config: a non-negative integer.
fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v[key].as_u64().map(|n| n as usize).with_context(|| format!("\"{key}\" must be a non-negative integer"))
}

fn get_i64(v: &Value, key: &str) -> Result<i64> {
    v[key].as_i64().with_context(|| format!("no integer \"{key}\""))
}

fn get_list(v: &Value, key: &str) -> Result<Vec<i64>> {
    v[key].as_array().and_then(|a| a.iter().map(Value::as_i64).collect()).with_context(|| format!("no list \"{key}\""))
}

/// diffusers' UNet2DConditionModel config -> ours; SD 2.x / SDXL features are refused.
fn unet_config(v: &Value) -> Result<UNetConfig> {
    ensure!(
        !v["use_linear_projection"].as_bool().unwrap_or(false),
        "use_linear_projection is true: this is an SD 2.x/SDXL UNet; lesson 09 loads SD 1.x"
    );
    ensure!(v["addition_embed_type"].is_null(), "addition_embed_type is set: an SDXL UNet; lesson 09 loads SD 1.x");
    // a distilled LCM (LCM_Dreamshaper) embeds the guidance scale into the time embedding: not built here
    ensure!(
        v["time_cond_proj_dim"].is_null(),
        "time_cond_proj_dim is set: a distilled latent consistency model, whose guidance embedding this crate does not \
         build; use SD 1.5 with the LCM-LoRA (README) and --sampler LCM"
    );
    ensure!(v["norm_num_groups"].as_i64().unwrap_or(32) == 32, "norm_num_groups must be 32 (SD 1.x)");
    let types: Vec<&str> =
        v["down_block_types"].as_array().context("no down_block_types")?.iter().filter_map(Value::as_str).collect();
    let heads = match &v["attention_head_dim"] {
        Value::Number(n) => n.as_i64().context("attention_head_dim")?,
        other => bail!("attention_head_dim {other} differs per level (SD 2.x); lesson 09 loads SD 1.x"),
    };
    Ok(UNetConfig {
        in_channels: get_i64(v, "in_channels")?,
        out_channels: get_i64(v, "out_channels")?,
        block_out_channels: get_list(v, "block_out_channels")?,
        layers_per_block: get_usize(v, "layers_per_block")?,
        attention: types.iter().map(|t| t.starts_with("CrossAttn")).collect(),
        cross_attention_dim: Some(get_i64(v, "cross_attention_dim")?),
        // SD 1.x configs misname the number of heads "attention_head_dim" (diffusers keeps it for compatibility)
        attention_heads: Some(heads),
        ..UNetConfig::sd15()
    })
}

/// diffusers' ControlNetModel config -> ours: the UNet fields it shares with UNet2DConditionModel (its way down and
/// middle block), the hint's channels and its encoder's widths; the encoder's stride is diffusers' fixed 2.
fn controlnet_config(v: &Value) -> Result<ControlNetConfig> {
    ensure!(
        v["controlnet_conditioning_channel_order"].as_str().unwrap_or("rgb") == "rgb",
        "controlnet_conditioning_channel_order is not \"rgb\": give the hint in the order the file expects"
    );
    let mut unet_fields = v.clone();
    unet_fields["out_channels"] = v["in_channels"].clone(); // a ControlNet has no output convolution
    let channels = match &v["conditioning_embedding_out_channels"] {
        Value::Null => vec![16, 32, 96, 256], // diffusers' default
        _ => get_list(v, "conditioning_embedding_out_channels")?,
    };
    let config = ControlNetConfig {
        unet: unet_config(&unet_fields)?,
        hint_channels: v["conditioning_channels"].as_i64().unwrap_or(3),
        hint_embedding_channels: channels,
        hint_stride: 2,
    };
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(config)
}

/// A diffusers `ControlNetModel` folder (`config.json` + `diffusion_pytorch_model[.fp16].safetensors`, as
/// `save_pretrained` writes it and as ControlNets for SD 1.5 are published), strictly: every tensor under its own name
/// and shape. Returns the frozen VarStore and the network.
pub fn load_controlnet_diffusers(dir: &Path, device: Device) -> Result<(VarStore, ControlNet)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} not found: a diffusers ControlNet folder has config.json", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let config = controlnet_config(&v).with_context(|| format!("{}", path.display()))?;
    let mut vs = VarStore::new(device);
    let control = ControlNet::new(vs.root(), config);
    let mut file = SafetensorsFile::open(&weights_file(dir, "", "diffusion_pytorch_model")?)?;
    load_strict(&mut vs, &mut file, &|name| vec![name.to_string()], &|_| false, &SD_CHECKPOINT)?;
    vs.freeze();
    Ok((vs, control))
}

/// A ControlNet for the SD 1.x UNet `unet`, from a diffusers folder or an original single file (keys with or without
/// `control_model.`, through [`controlnet_keymap`]; the hint encoder's widths read from the file). A ControlNet made for
/// another UNet (SD 2.x: context 1024; SDXL) is refused, naming the file and the first tensor that differs.
pub fn load_controlnet(path: &Path, unet: &UNetConfig, device: Device) -> Result<(VarStore, ControlNet)> {
    let shown = path.display().to_string();
    if path.is_dir() {
        let (vs, control) = load_controlnet_diffusers(path, device)?;
        let theirs = &control.config.unet;
        ensure!(
            theirs.block_out_channels == unet.block_out_channels
                && theirs.cross_attention_dim == unet.cross_attention_dim
                && theirs.layers_per_block == unet.layers_per_block,
            "the ControlNet {shown} controls a UNet of widths {:?} and context {:?}; this model's are {:?} and {:?}:              use a ControlNet made for this model (SD 1.5's are named control_…_sd15_…)",
            theirs.block_out_channels,
            theirs.cross_attention_dim,
            unet.block_out_channels,
            unet.cross_attention_dim
        );
        return Ok((vs, control));
    }
    ensure!(path.exists(), "ControlNet {shown} not found: pass a diffusers ControlNet folder or a .safetensors file");
    let mut file = SafetensorsFile::open(path)?;
    let strip = |n: &str| n.strip_prefix(&format!("{CONTROL_ORIGINAL}.")).unwrap_or(n).to_string();
    let hint_convs: std::collections::BTreeMap<usize, Vec<i64>> = file
        .names()
        .filter_map(|n| {
            let rest = strip(n);
            let i = rest.strip_prefix("input_hint_block.")?.strip_suffix(".weight")?.parse().ok()?;
            Some((i, file.entry(n)?.shape.clone()))
        })
        .collect();
    if hint_convs.is_empty() {
        let diffusers = file.names().any(|n| n.starts_with("controlnet_cond_embedding."));
        bail!(
            "{shown} has no `input_hint_block` tensors: it is not an original ControlNet file{}",
            if diffusers { " (it holds a diffusers ControlNet: pass the folder with its config.json)" } else { "" }
        );
    }
    ensure!(
        hint_convs.len() >= 2 && hint_convs.values().all(|s| s.len() == 4),
        "{shown}: its `input_hint_block` has {} convolution weights, not all of them 4-D: the file is damaged",
        hint_convs.len()
    );
    // the convolutions' output widths in order: conv_in, the middle blocks, conv_out
    let outs: Vec<i64> = hint_convs.values().map(|s| s[0]).collect();
    let hint_blocks = outs.len() - 2;
    ensure!(
        hint_blocks % 2 == 0,
        "{shown}: the hint encoder has {} convolutions, an odd number of middle ones",
        outs.len()
    );
    let mut widths = vec![outs[0]];
    widths.extend((0..hint_blocks / 2).map(|i| outs[1 + 2 * i + 1]));
    let config = ControlNetConfig {
        unet: UNetConfig { out_channels: unet.in_channels, ..unet.clone() },
        hint_channels: hint_convs.values().next().map_or(3, |s| s[1]),
        hint_embedding_channels: widths,
        hint_stride: 2,
    };
    config.validate().map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    let map = controlnet_keymap(&config.unet, hint_blocks);
    let mut vs = VarStore::new(device);
    let control = ControlNet::new(vs.root(), config);
    let original = |name: &str| {
        let key = map.to_original(&format!("controlnet.{name}")).unwrap_or_else(|| panic!("the key map covers {name}"));
        vec![key.clone(), strip(&key)]
    };
    load_strict(&mut vs, &mut file, &original, &|_| false, &SD_CONTROLNET)?;
    vs.freeze();
    Ok((vs, control))
}

/// Writes a ControlNet as an original single file (`control_model.*`, f32): what [`load_controlnet`] reads.
pub fn save_controlnet_single_file(vs: &VarStore, control: &ControlNet, path: &Path) -> Result<()> {
    let hint_blocks = 2 * (control.config.hint_embedding_channels.len() - 1);
    let map = controlnet_keymap(&control.config.unet, hint_blocks);
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in vs.variables() {
        let key =
            map.to_original(&format!("controlnet.{name}")).with_context(|| format!("no original key for {name}"))?;
        named.push((key, t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous()));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, path).with_context(|| format!("cannot write {}", path.display()))
}

/// TAESD (diffusers' `AutoencoderTiny`): a diffusers folder (config.json + diffusion_pytorch_model.safetensors, as
/// madebyollin/taesd publishes it) or one safetensors file under diffusers' names (TAESD's SD preset), strictly.
pub fn load_taesd(path: &Path, device: Device) -> Result<(VarStore, Taesd)> {
    let shown = path.display().to_string();
    ensure!(path.exists(), "TAESD {shown} not found: pass the madebyollin/taesd folder or its safetensors file");
    let (config, file) = if path.is_dir() {
        let text = std::fs::read_to_string(path.join("config.json"))
            .with_context(|| format!("{shown}/config.json not found: a diffusers AutoencoderTiny folder has one"))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{shown}/config.json is not JSON"))?;
        (
            taesd_config(&v).with_context(|| format!("{shown}/config.json"))?,
            weights_file(path, "", "diffusion_pytorch_model")?,
        )
    } else {
        (TaesdConfig::sd(), path.to_path_buf())
    };
    let mut file = SafetensorsFile::open(&file)?;
    ensure!(
        file.names().any(|n| n.starts_with("decoder.layers.")),
        "{shown} has no `decoder.layers.*` tensors: it is not a TAESD (diffusers AutoencoderTiny) file; madebyollin's \
         taesd_decoder.pth is a pickle: use the diffusers folder madebyollin/taesd"
    );
    let mut vs = VarStore::new(device);
    let taesd = Taesd::new(vs.root(), config);
    load_strict(&mut vs, &mut file, &|name| vec![name.to_string()], &|_| false, &TAESD_FILE)?;
    vs.freeze();
    Ok((vs, taesd))
}

/// diffusers' AutoencoderTiny config -> ours.
fn taesd_config(v: &Value) -> Result<TaesdConfig> {
    let d = TaesdConfig::sd();
    let list = |key: &str, default: Vec<i64>| if v[key].is_null() { Ok(default) } else { get_list(v, key) };
    let config = TaesdConfig {
        in_channels: v["in_channels"].as_i64().unwrap_or(3),
        out_channels: v["out_channels"].as_i64().unwrap_or(3),
        latent_channels: v["latent_channels"].as_i64().unwrap_or(4),
        encoder_block_out_channels: list("encoder_block_out_channels", d.encoder_block_out_channels)?,
        decoder_block_out_channels: list("decoder_block_out_channels", d.decoder_block_out_channels)?,
        num_encoder_blocks: list("num_encoder_blocks", d.num_encoder_blocks)?,
        num_decoder_blocks: list("num_decoder_blocks", d.num_decoder_blocks)?,
    };
    ensure!(
        v["scaling_factor"].as_f64().unwrap_or(1.0) == 1.0 && v["act_fn"].as_str().unwrap_or("relu") == "relu",
        "this AutoencoderTiny has another scaling_factor or activation than TAESD for SD 1.x (1.0, relu)"
    );
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(
        config.latent_channels == 4 && config.in_channels == 3 && config.out_channels == 3,
        "this AutoencoderTiny reads {} latent channels and writes {} image channels; SD 1.x's TAESD has 4 and 3 \
         (madebyollin/taesd)",
        config.latent_channels,
        config.out_channels
    );
    Ok(config)
}

fn vae_config(v: &Value) -> Result<VaeConfig> {
    Ok(VaeConfig {
        in_channels: get_i64(v, "in_channels")?,
        out_channels: get_i64(v, "out_channels")?,
        block_out_channels: get_list(v, "block_out_channels")?,
        layers_per_block: get_usize(v, "layers_per_block")?,
        latent_channels: get_i64(v, "latent_channels")?,
        norm_num_groups: get_i64(v, "norm_num_groups")?,
        scaling_factor: v["scaling_factor"].as_f64().unwrap_or(SD_SCALING_FACTOR),
    })
}

fn text_config(v: &Value) -> Result<TextEncoderConfig> {
    let act = v["hidden_act"].as_str().unwrap_or("quick_gelu");
    Ok(TextEncoderConfig {
        vocab_size: get_i64(v, "vocab_size")?,
        max_position_embeddings: get_i64(v, "max_position_embeddings")?,
        hidden_size: get_i64(v, "hidden_size")?,
        intermediate_size: get_i64(v, "intermediate_size")?,
        num_hidden_layers: get_usize(v, "num_hidden_layers")?,
        num_attention_heads: get_i64(v, "num_attention_heads")?,
        hidden_act: match act {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => bail!("hidden_act \"{other}\" is not CLIP's (quick_gelu or gelu)"),
        },
        causal: true,
        layer_norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-5),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tensor of the tiny SD (which has every module of SD 1.5) maps to an original key and back, no two to the
    /// same key; the counts are SD 1.5's (686 UNet and 248 VAE tensors in v1-5-pruned-emaonly.safetensors; the text
    /// encoder's 196 are 4 + 16 per layer, and tiny has 2 layers of 12).
    #[test]
    fn key_map_round_trips_every_key_of_the_sd15_layout() {
        let mut models = SdModels::new(SdConfig::tiny(), Device::Cpu).unwrap();
        let map = KeyMap::new(&models.config.unet, &models.config.vae);
        let mut originals = std::collections::HashSet::new();
        let mut counts = vec![];
        for (component, vs) in models.stores() {
            let vars = vs.variables();
            counts.push(vars.len());
            for name in vars.keys() {
                let ours = format!("{component}.{name}");
                let original = map.to_original(&ours).unwrap_or_else(|| panic!("{ours} has an original key"));
                assert_eq!(map.to_ours(&original).as_deref(), Some(ours.as_str()), "{original}");
                assert!(originals.insert(original.clone()), "two names map to {original}");
            }
        }
        assert_eq!(counts, [4 + 16 * 2, 686, 248]);
    }

    /// SD 1.5's ControlNet config (lllyasviel/control_v11p_sd15_canny's config.json, the fields that matter) reads as
    /// SD 1.5's UNet trunk with the (16, 32, 96, 256) hint encoder; a BGR one and a missing folder are refused by name.
    #[test]
    fn sd15_controlnet_configs_read_and_bad_ones_are_refused() {
        let v: Value = serde_json::json!({
            "_class_name": "ControlNetModel", "in_channels": 4, "conditioning_channels": 3,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
            "attention_head_dim": 8, "norm_num_groups": 32, "controlnet_conditioning_channel_order": "rgb",
            "conditioning_embedding_out_channels": [16, 32, 96, 256],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        });
        let c = controlnet_config(&v).unwrap();
        assert_eq!(c.unet, UNetConfig::sd15());
        assert_eq!((c.hint_channels, c.hint_embedding_channels.clone(), c.hint_stride), (3, vec![16, 32, 96, 256], 2));
        let mut bgr = v.clone();
        bgr["controlnet_conditioning_channel_order"] = "bgr".into();
        assert!(controlnet_config(&bgr).unwrap_err().to_string().contains("channel_order"));
        let err = load_controlnet_diffusers(Path::new("/nonexistent/cn"), Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("config.json"), "{err}");
    }

    /// A ControlNet written as an original single file loads back with the same residuals, with or without the
    /// `control_model.` prefix; one for a UNet of another context width (SD 2.x's 1024) is refused, naming the tensor.
    #[test]
    fn controlnet_single_files_load_with_or_without_the_prefix_and_others_are_refused() {
        use crate::nn::controlnet::ControlScale;
        let dir = std::env::temp_dir().join(format!("cn-single-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        tch::manual_seed(3);
        let unet = SdConfig::tiny().unet;
        let hint = vec![16, 32, 96, 256];
        let make = |unet: &UNetConfig| {
            let vs = VarStore::new(Device::Cpu);
            let config = ControlNetConfig {
                unet: unet.clone(),
                hint_channels: 3,
                hint_embedding_channels: hint.clone(),
                hint_stride: 2,
            };
            let net = ControlNet::new(vs.root(), config);
            tch::no_grad(|| {
                for (_, mut v) in vs.variables() {
                    v.copy_(&(v.randn_like() * 0.05));
                }
            });
            (vs, net)
        };
        let (vs, net) = make(&unet);
        let path = dir.join("control_sd15_test.safetensors");
        save_controlnet_single_file(&vs, &net, &path).unwrap();
        let bare = dir.join("bare.safetensors");
        let stripped: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("control_model.").to_string(), v))
            .collect();
        Tensor::write_safetensors(&stripped, &bare).unwrap();
        let opts = (Kind::Float, Device::Cpu);
        let (x, t, ctx) =
            (Tensor::randn([1, 4, 8, 8], opts), Tensor::from_slice(&[500i64]), Tensor::randn([1, 77, 32], opts));
        let h = Tensor::rand([1, 3, 64, 64], opts);
        let scale = ControlScale { conditioning_scale: 1.0, guess_mode: false };
        let want = tch::no_grad(|| net.residuals(&x, &t, (Some(&ctx), None), &h, scale, false));
        for file in [&path, &bare] {
            let (_, loaded) = load_controlnet(file, &unet, Device::Cpu).unwrap();
            let got = tch::no_grad(|| loaded.residuals(&x, &t, (Some(&ctx), None), &h, scale, false));
            assert!(got.mid.equal(&want.mid) && got.down.iter().zip(&want.down).all(|(a, b)| a.equal(b)));
        }
        let (vs2, net2) = make(&UNetConfig { cross_attention_dim: Some(64), ..unet.clone() });
        let sd2 = dir.join("control_sd21_test.safetensors");
        save_controlnet_single_file(&vs2, &net2, &sd2).unwrap();
        let err = format!("{:#}", load_controlnet(&sd2, &unet, Device::Cpu).err().unwrap());
        assert!(
            err.contains("control_sd21_test") && err.contains("attn2.to_k.weight") && err.contains("[64, 64]"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn single_file_round_trip_and_errors_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny-sd.safetensors");
        let mut a = SdModels::new(SdConfig::tiny(), Device::Cpu).unwrap();
        a.save_single_file(&path).unwrap();
        let mut b = SdModels::new(SdConfig::tiny(), Device::Cpu).unwrap();
        b.load_single_file(&path).unwrap();
        for (x, y) in [(&a.unet_vs, &b.unet_vs), (&a.vae_vs, &b.vae_vs), (&a.text_vs, &b.text_vs)] {
            for (name, t) in x.variables() {
                assert!(t.equal(&y.variables()[&name]), "{name}");
            }
        }
        // a file without one tensor, and one with a wrong shape
        let mut named: Vec<(String, Tensor)> = Tensor::read_safetensors(&path).unwrap();
        let gone = "model.diffusion_model.middle_block.1.proj_out.weight";
        let without: Vec<_> =
            named.iter().filter(|(k, _)| k != gone).map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        Tensor::write_safetensors(&without, &path).unwrap();
        let e = format!("{:#}", b.load_single_file(&path).unwrap_err());
        assert!(e.contains(gone) && e.contains("tiny-sd.safetensors"), "{e}");
        let key = "first_stage_model.decoder.conv_in.weight";
        for (k, t) in named.iter_mut() {
            if k == key {
                *t = Tensor::zeros([3, 3], (Kind::Float, Device::Cpu));
            }
        }
        Tensor::write_safetensors(&named, &path).unwrap();
        let e = format!("{:#}", b.load_single_file(&path).unwrap_err());
        assert!(e.contains(key) && e.contains("[3, 3]"), "{e}");
    }

    /// Issue 17, defects 1 and 3: a file that is no SD checkpoint is refused from its header, before the networks
    /// are built; a diffusers config with a field out of range names the file and the field instead of panicking.
    #[test]
    fn bad_weight_files_and_configs_are_refused_before_anything_is_built() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.safetensors");
        std::fs::write(&empty, b"").unwrap();
        let e = format!("{:#}", SdModels::load(&empty, Device::Cpu).err().unwrap());
        assert!(e.contains("empty.safetensors"), "{e}");
        let other = dir.path().join("lora.safetensors");
        Tensor::write_safetensors(&[("lora_unet_down.alpha", Tensor::from(1.0f32))], &other).unwrap();
        let e = format!("{:#}", SdModels::load(&other, Device::Cpu).err().unwrap());
        assert!(e.contains("model.diffusion_model") && e.contains("lora.safetensors"), "{e}");
        // a diffusers folder whose configs hold out-of-range numbers
        let write = |component: &str, json: serde_json::Value| {
            std::fs::create_dir_all(dir.path().join(component)).unwrap();
            std::fs::write(dir.path().join(component).join("config.json"), json.to_string()).unwrap();
        };
        let unet = serde_json::json!({"in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
            "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "cross_attention_dim": 32, "attention_head_dim": 8});
        write(
            "vae",
            serde_json::json!({"in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64],
            "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32}),
        );
        write(
            "text_encoder",
            serde_json::json!({"vocab_size": 100, "max_position_embeddings": 77,
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}),
        );
        let cases: [(&str, serde_json::Value, &str); 6] = [
            ("attention_head_dim", serde_json::json!(0), "attention_heads"),
            ("block_out_channels", serde_json::json!([]), "block_out_channels"),
            ("layers_per_block", serde_json::json!(-1), "layers_per_block"),
            ("layers_per_block", serde_json::json!(1e12), "layers_per_block"),
            ("in_channels", serde_json::json!(1_000_000), "in_channels"),
            ("down_block_types", serde_json::json!(["DownBlock2D"]), "attention"),
        ];
        for (key, value, field) in cases {
            let mut bad = unet.clone();
            bad[key] = value;
            write("unet", bad);
            let e = format!("{:#}", SdModels::load(dir.path(), Device::Cpu).err().unwrap());
            assert!(e.contains(field) && e.contains("unet"), "{key}: {e}");
        }
        write("unet", unet);
        let mut text = serde_json::json!({"vocab_size": 100, "max_position_embeddings": 77, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 3});
        write("text_encoder", text.clone());
        let e = format!("{:#}", SdModels::load(dir.path(), Device::Cpu).err().unwrap());
        assert!(e.contains("num_attention_heads"), "{e}");
        text["num_attention_heads"] = serde_json::json!(4);
        write("text_encoder", text);
        write(
            "vae",
            serde_json::json!({"in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64],
            "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 3}),
        );
        let e = format!("{:#}", SdModels::load(dir.path(), Device::Cpu).err().unwrap());
        assert!(e.contains("norm_num_groups"), "{e}");
    }

    /// Issue 17, defect 5: a NaN in a weight, or integer values where float weights belong, are refused naming the
    /// tensor (instead of a black image and exit 0).
    #[test]
    fn non_finite_and_integer_tensors_are_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny-sd.safetensors");
        SdModels::new(SdConfig::tiny(), Device::Cpu).unwrap().save_single_file(&path).unwrap();
        let named: Vec<(String, Tensor)> = Tensor::read_safetensors(&path).unwrap();
        let key = "model.diffusion_model.out.2.weight";
        let with = |f: &dyn Fn(&Tensor) -> Tensor| -> Vec<(String, Tensor)> {
            named.iter().map(|(k, t)| (k.clone(), if k == key { f(t) } else { t.shallow_clone() })).collect()
        };
        let mut m = SdModels::new(SdConfig::tiny(), Device::Cpu).unwrap();
        Tensor::write_safetensors(&with(&|t| t.fill(f64::NAN)), &path).unwrap();
        let e = format!("{:#}", m.load_single_file(&path).unwrap_err());
        assert!(e.contains(key) && e.contains("NaN"), "{e}");
        Tensor::write_safetensors(&with(&|t| t.to_kind(Kind::Int)), &path).unwrap();
        let e = format!("{:#}", m.load_single_file(&path).unwrap_err());
        assert!(e.contains(key) && e.contains("Int"), "{e}");
    }
}
