//! LoRA files for SD 1.x as people download them: kohya's sd-scripts / the web UIs' layout and diffusers' (PEFT and
//! the older attention-processor layout), merged into the loaded networks' weights.
//!
//! [LoRA] Hu et al. 2021, arXiv:2106.09685, eq. 3: h = W₀x + ΔWx = W₀x + BAx, B ∈ ℝ^{d×r}, A ∈ ℝ^{r×k}, and sec. 4.1:
//! ΔWx is scaled by α/r.
//! kohya stores A as `lora_down.weight` (r, k) and B as `lora_up.weight` (d, r), α as a 0-dim `alpha` (α = r when it is
//! absent); PEFT stores `lora_A.weight` / `lora_B.weight` and α in the file's metadata (`lora_alpha`, per-module
//! `alpha_pattern`). For a convolution (LoCon; kohya's `networks/lora.py` `LoRAModule` with a Conv2d), A is a
//! convolution with the layer's kernel (r, c_in, k, k) and B a 1×1 one (c_out, r, 1, 1), and
//! ΔW[o, i, y, x] = (α/r)·Σ_j B[o, j]·A[j, i, y, x].
//!
//! Modules are found as the web UI finds them (`extensions-builtin/Lora/networks.py`): the underscore name of every
//! module of the loaded model is built (`lora_unet_` + the diffusers path with dots as underscores,
//! `lora_te_` + transformers' path) and the file's names are looked up there — never parsed back into dots, since
//! module names contain underscores themselves (`to_q`, `proj_in`). A file's LoRA for another architecture (SD 2.x,
//! SDXL), LyCORIS types this crate does not implement (LoHa, LoKr, OFT, DoRA, full diffs) and keys that match no module
//! are refused by name, never skipped.
use crate::sd::keymap::{KeyMap, UNET_ORIGINAL};
use crate::sd::safetensors::SafetensorsFile;
use crate::sd::weights::SdModels;
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Which network a LoRA module changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    TextEncoder,
    Unet,
}

/// The layout a file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya sd-scripts and the web UIs: `lora_unet_…` / `lora_te_…` + `.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
    /// diffusers with PEFT: `unet.<path>.lora_A.weight`, `.lora_B.weight` (α in the metadata).
    Peft,
    /// diffusers before PEFT: `unet.<path>.processor.to_q_lora.down.weight`, `<path>.lora.down.weight`.
    DiffusersOld,
}

/// One module's low-rank update.
#[derive(Debug)]
pub struct LoraModule {
    pub component: Component,
    /// The module's path in our model (diffusers' names), e.g. `down_blocks.0.attentions.0.proj_in`.
    pub module: String,
    /// The name the file gave it (for messages).
    pub key: String,
    /// A: (r, k) or (r, c_in, kh, kw).
    pub down: Tensor,
    /// B: (d, r) or (c_out, r, 1, 1).
    pub up: Tensor,
    pub alpha: f64,
}

impl LoraModule {
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    /// ΔW = (α/r)·B·A in the shape of the module's weight `shape` ([LoRA] eq. 3 and sec. 4.1; for a convolution the
    /// kernel is A's): [`crate::nn::lora::low_rank_delta`], the adapters' own.
    pub fn delta(&self, shape: &[i64]) -> Tensor {
        crate::nn::lora::low_rank_delta(&self.up, &self.down, self.alpha / self.rank() as f64, shape)
    }
}

/// A module's keys in a file: (down/A, up/B, α).
type Factors = (Option<String>, Option<String>, Option<f64>);

/// A LoRA file, its modules matched to a model.
#[derive(Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    /// The file's stem: the name the prompt syntax `<lora:NAME:W>` uses.
    pub name: String,
    pub format: LoraFormat,
    pub modules: Vec<LoraModule>,
    /// The first 12 hex digits of the SHA-256 of the file's data (kohya's "addnet hash", written into the PNG's
    /// `Lora hashes` as the web UI does).
    pub short_hash: String,
}

/// How a LoRA is applied: its multipliers for the text encoder and the UNet (the web UI's `<lora:name:te:unet>`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraUse {
    pub path: PathBuf,
    pub te: f64,
    pub unet: f64,
}

/// The networks a LoRA file changes: the text encoder's and the UNet's VarStores, their modules found by the names of
/// their variables (so any network with diffusers' and transformers' module paths will do: SD 1.5's, or lesson 06's
/// pipeline), and for SD 1.x the key map that also gives each UNet module its name in the original checkpoint.
pub struct LoraModels<'a> {
    pub text_vs: &'a VarStore,
    pub unet_vs: &'a VarStore,
    pub keymap: Option<KeyMap>,
    /// What the messages call the model ("this SD 1.x model").
    pub what: &'a str,
}

impl<'a> LoraModels<'a> {
    /// SD 1.x's text encoder and UNet, with the original checkpoint's names.
    pub fn sd(models: &'a SdModels) -> Self {
        let keymap = Some(KeyMap::new(&models.config.unet, &models.config.vae));
        Self { text_vs: &models.text_vs, unet_vs: &models.unet_vs, keymap, what: "this SD 1.x model" }
    }
}

/// LyCORIS and other adapter types, by a key fragment that marks them, with their names.
const UNSUPPORTED: [(&str, &str); 8] = [
    (".hada_w1_a", "LoHa (LyCORIS)"),
    (".hada_", "LoHa (LyCORIS)"),
    (".lokr_", "LoKr (LyCORIS)"),
    (".oft_", "OFT (LyCORIS)"),
    (".dora_scale", "DoRA"),
    (".lora_mid.", "LoCon with a CP-decomposed kernel (lora_mid)"),
    (".diff", "a full-weight difference (LyCORIS 'diff')"),
    (".w_norm", "a norm-layer adapter (LyCORIS)"),
];

/// Every LoRA-able module of `models` (weights of rank 2 or 4 outside the embeddings), under every name a file may
/// give it: kohya's (`lora_unet_down_blocks_0_…`, `lora_te_text_model_…`), the original checkpoint's for the UNet
/// (`lora_unet_input_blocks_1_1_…`, written by trainers on the CompVis layout), and the dotted path.
fn module_names(models: &LoraModels) -> HashMap<String, (Component, String, Vec<i64>)> {
    let mut names = HashMap::new();
    for (component, vs) in [(Component::TextEncoder, &models.text_vs), (Component::Unet, &models.unet_vs)] {
        for (name, w) in vs.variables() {
            let Some(module) = name.strip_suffix(".weight") else { continue };
            if !(w.dim() == 2 || w.dim() == 4) || module.contains("embeddings.") {
                continue;
            }
            let entry = (component, module.to_string(), w.size());
            match component {
                Component::TextEncoder => {
                    names.insert(format!("lora_te_{}", module.replace('.', "_")), entry.clone());
                }
                Component::Unet => {
                    names.insert(format!("lora_unet_{}", module.replace('.', "_")), entry.clone());
                    let original = models.keymap.as_ref().and_then(|map| map.to_original(&format!("unet.{module}")));
                    if let Some(o) = original.as_deref().and_then(|o| o.strip_prefix(&format!("{UNET_ORIGINAL}."))) {
                        names.insert(format!("lora_unet_{}", o.replace('.', "_")), entry.clone());
                    }
                }
            }
            let prefix = if component == Component::Unet { "unet" } else { "text_encoder" };
            if let Some(bare) = module.strip_prefix("text_model.") {
                // transformers 5's CLIPTextModel has no text_model. level, and diffusers saves its LoRAs so
                names.insert(format!("{prefix}.{bare}"), entry.clone());
            }
            names.insert(format!("{prefix}.{module}"), entry);
        }
    }
    names
}

/// The module part and which factor (true = down/A) of a diffusers-layout key, without the component prefix mapping.
fn diffusers_module(key: &str) -> Option<(String, bool, LoraFormat)> {
    const SUFFIXES: [(&str, bool, LoraFormat); 8] = [
        (".lora_A.weight", true, LoraFormat::Peft),
        (".lora_B.weight", false, LoraFormat::Peft),
        (".lora_A.default.weight", true, LoraFormat::Peft),
        (".lora_B.default.weight", false, LoraFormat::Peft),
        (".lora.down.weight", true, LoraFormat::DiffusersOld),
        (".lora.up.weight", false, LoraFormat::DiffusersOld),
        (".lora_linear_layer.down.weight", true, LoraFormat::DiffusersOld),
        (".lora_linear_layer.up.weight", false, LoraFormat::DiffusersOld),
    ];
    for (suffix, down, format) in SUFFIXES {
        if let Some(module) = key.strip_suffix(suffix) {
            return Some((module.to_string(), down, format));
        }
    }
    // the attention-processor layout: `<attn>.processor.to_q_lora.down.weight` -> `<attn>.to_q`
    for (down, suffix) in [(true, ".down.weight"), (false, ".up.weight")] {
        if let Some(rest) = key.strip_suffix(suffix) {
            if let Some((attn, proj)) = rest.rsplit_once(".processor.") {
                let proj = proj.strip_suffix("_lora")?;
                let proj = if proj == "to_out" { "to_out.0" } else { proj };
                return Some((format!("{attn}.{proj}"), down, LoraFormat::DiffusersOld));
            }
        }
    }
    None
}

/// A 0-dim (or one-element) α, finite.
fn read_alpha(file: &mut SafetensorsFile, key: &str) -> Result<f64> {
    let t = file.tensor(key)?;
    let shown = file.path.display();
    ensure!(
        t.numel() == 1,
        "{shown}: '{key}' holds {} values, a LoRA's alpha is one number: the file is damaged",
        t.numel()
    );
    let alpha = t.to_kind(Kind::Double).flatten(0, -1).double_value(&[0]);
    ensure!(alpha.is_finite(), "{shown}: '{key}' is {alpha}, not a number: the file is damaged; download it again");
    Ok(alpha)
}

/// PEFT's α of `module` in `component` from diffusers' `lora_adapter_metadata` (`unet.lora_alpha`,
/// `unet.alpha_pattern`), or None (then α = r).
fn peft_alpha(metadata: &BTreeMap<String, String>, component: Component, module: &str) -> Option<f64> {
    let json: serde_json::Value = serde_json::from_str(metadata.get("lora_adapter_metadata")?).ok()?;
    let prefix = if component == Component::Unet { "unet" } else { "text_encoder" };
    if let Some(patterns) = json[format!("{prefix}.alpha_pattern")].as_object() {
        // PEFT matches a pattern against the end of the module's path
        let found = patterns.iter().find(|(p, _)| module == p.as_str() || module.ends_with(&format!(".{p}")));
        if let Some(alpha) = found.and_then(|(_, a)| a.as_f64()) {
            return Some(alpha);
        }
    }
    json[format!("{prefix}.lora_alpha")].as_f64()
}

impl LoraFile {
    /// Reads `path` and matches every module to `models`; anything it cannot use is an error naming the file and the
    /// key.
    pub fn open(path: &Path, models: &SdModels) -> Result<Self> {
        Self::open_for(path, &LoraModels::sd(models))
    }

    /// [`Self::open`] for any pair of networks.
    pub fn open_for(path: &Path, models: &LoraModels) -> Result<Self> {
        let mut file = SafetensorsFile::open(path)?;
        let shown = path.display().to_string();
        let keys: Vec<String> = file.names().map(String::from).collect();
        ensure!(
            keys.iter().any(|k| k.contains("lora") || k.contains("hada_") || k.contains("lokr_") || k.contains("oft_")),
            "{shown} has no LoRA tensors (lora_down/lora_up, lora_A/lora_B): it is not a LoRA file{}",
            if keys.iter().any(|k| k.contains("input_hint_block")) {
                " (it is a ControlNet: pass it with --controlnet)"
            } else {
                ""
            }
        );
        for (fragment, kind) in UNSUPPORTED {
            if let Some(k) = keys.iter().find(|k| k.contains(fragment)) {
                bail!("{shown} is a {kind} file (key '{k}'): this crate loads LoRA and LoCon only; use a LoRA, or merge it with the tool that made it");
            }
        }
        if let Some(k) = keys.iter().find(|k| k.starts_with("lora_te1_") || k.starts_with("lora_te2_")) {
            bail!(
                "{shown} is a LoRA for SDXL (key '{k}', SDXL's two text encoders), not for {}: use a LoRA made for it",
                models.what
            );
        }
        let names = module_names(models);
        let format = if keys.iter().any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te_")) {
            LoraFormat::Kohya
        } else if keys.iter().any(|k| k.contains(".lora_A.") || k.contains(".lora_B.")) {
            LoraFormat::Peft
        } else {
            LoraFormat::DiffusersOld
        };
        // module name -> (down key, up key, alpha)
        let mut found: BTreeMap<String, Factors> = BTreeMap::new();
        let mut unmatched = Vec::new();
        for key in &keys {
            if format == LoraFormat::Kohya {
                let Some((module, leaf)) = key.split_once('.') else {
                    unmatched.push(key.clone());
                    continue;
                };
                let slot = found.entry(module.to_string()).or_default();
                match leaf {
                    "lora_down.weight" => slot.0 = Some(key.clone()),
                    "lora_up.weight" => slot.1 = Some(key.clone()),
                    "alpha" => slot.2 = Some(read_alpha(&mut file, key)?),
                    _ => unmatched.push(key.clone()),
                }
            } else {
                let stripped = key.strip_prefix("base_model.model.").unwrap_or(key);
                if let Some(module) = stripped.strip_suffix(".alpha") {
                    let slot = found.entry(module.to_string()).or_default();
                    slot.2 = Some(read_alpha(&mut file, key)?);
                    continue;
                }
                let Some((module, down, _)) = diffusers_module(stripped) else {
                    unmatched.push(key.clone());
                    continue;
                };
                let slot = found.entry(module).or_default();
                if down {
                    slot.0 = Some(key.clone());
                } else {
                    slot.1 = Some(key.clone());
                }
            }
        }
        let mut modules = Vec::new();
        for (name, (down, up, alpha)) in found {
            // a PEFT file without the component prefix names the module by its path alone
            let target = names.get(&name).or_else(|| {
                (format != LoraFormat::Kohya)
                    .then(|| names.get(&format!("unet.{name}")).or_else(|| names.get(&format!("text_encoder.{name}"))))
                    .flatten()
            });
            let (Some(down), Some(up)) = (down, up) else {
                bail!("{shown}: module '{name}' has only one of its two LoRA matrices (down/A and up/B): the file is damaged or not a LoRA");
            };
            let Some((component, module, shape)) = target.cloned() else {
                unmatched.push(down);
                continue;
            };
            let (a, b) = (file.tensor(&down)?, file.tensor(&up)?);
            let (sa, sb) = (a.size(), b.size());
            let r = sa.first().copied().unwrap_or(0);
            let rank_ok = sa.len() == shape.len() && sb.len() == shape.len() && sb[1] == r && r > 0;
            let shapes_ok = rank_ok
                && sb[0] == shape[0]
                && sa[1] == shape[1]
                && (shape.len() == 2 || (sa[2..] == shape[2..] && sb[2..] == [1, 1]));
            ensure!(
                shapes_ok,
                "{shown}: '{down}' is {sa:?} and '{up}' {sb:?}, which do not make a rank-r update of '{module}' \
                 {shape:?} (wrong rank or a LoRA for another model: SD 2.x's context is 1024 wide, SDXL's 2048)"
            );
            let alpha = match format {
                LoraFormat::Peft => alpha.or_else(|| peft_alpha(&file.metadata, component, &module)),
                _ => alpha,
            }
            .unwrap_or(r as f64); // kohya and PEFT: no α means α = r (scale 1)
            ensure!(
                alpha.is_finite(),
                "{shown}: the alpha of '{module}' is {alpha}, not a number: the file is damaged"
            );
            for (key, t) in [(&down, &a), (&up, &b)] {
                crate::cli::ensure_finite(
                    t,
                    &format!("{shown}: tensor '{key}'"),
                    "the file is damaged; download it again",
                )?;
            }
            modules.push(LoraModule { component, module, key: down, down: a, up: b, alpha });
        }
        if !unmatched.is_empty() {
            unmatched.sort();
            bail!(
                "{shown}: {} LoRA key(s) match no module of {} (first: '{}'): is it a LoRA for another model (SD 2.x, \
                 SDXL, another run's network) or another adapter type?",
                unmatched.len(),
                models.what,
                unmatched[0]
            );
        }
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("lora").to_string();
        let short_hash = file.data_sha256()?[..12].to_string();
        Ok(Self { path: path.to_path_buf(), name, format, modules, short_hash })
    }

    /// Modules per component.
    pub fn count(&self, component: Component) -> usize {
        self.modules.iter().filter(|m| m.component == component).count()
    }
}

/// The original weights of the modules LoRAs changed, to put them back bit for bit (the web UI keeps such a backup to
/// switch LoRAs without reloading the model).
#[derive(Debug, Default)]
pub struct WeightBackup(HashMap<(Component, String), Tensor>);

impl WeightBackup {
    /// Restores every saved weight and forgets them.
    pub fn restore(&mut self, models: &SdModels) {
        self.restore_in(&LoraModels::sd(models))
    }

    /// [`Self::restore`] for any pair of networks.
    pub fn restore_in(&mut self, models: &LoraModels) {
        let vars =
            [(Component::TextEncoder, models.text_vs.variables()), (Component::Unet, models.unet_vs.variables())];
        for ((component, name), saved) in self.0.drain() {
            let (_, v) = vars.iter().find(|(c, _)| *c == component).expect("both components");
            let mut w = v[&name].shallow_clone();
            tch::no_grad(|| w.copy_(&saved));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Merges every LoRA of `uses` into `models`' weights: W ← W + m·ΔW with m the component's multiplier (the web UI's and
/// diffusers' `fuse_lora`), all files read and checked before any weight changes. A multiplier of 0 leaves the
/// component's weights untouched (bit for bit). With `backup`,
/// each weight is saved before its first change. Returns the files, for the PNG's parameters.
pub fn merge_loras(
    models: &LoraModels,
    uses: &[LoraUse],
    mut backup: Option<&mut WeightBackup>,
) -> Result<Vec<LoraFile>> {
    // every file is read and checked against the model before any weight changes
    let mut files = Vec::new();
    for u in uses {
        ensure!(
            u.te.is_finite() && u.unet.is_finite(),
            "the LoRA {}'s multipliers must be numbers (1 is full strength)",
            u.path.display()
        );
        files.push(LoraFile::open_for(&u.path, models)?);
    }
    for (u, lora) in uses.iter().zip(&files) {
        merge(models, lora, u.te, u.unet, backup.as_deref_mut());
    }
    Ok(files)
}

/// W ← W + m·ΔW for every module of `lora` (m = `te` or `unet` by component), in f32, cast back to the weights' dtype.
pub fn merge(models: &LoraModels, lora: &LoraFile, te: f64, unet: f64, mut backup: Option<&mut WeightBackup>) {
    let mut text = models.text_vs.variables();
    let mut unet_vars = models.unet_vs.variables();
    for m in &lora.modules {
        let (vars, multiplier) = match m.component {
            Component::TextEncoder => (&mut text, te),
            Component::Unet => (&mut unet_vars, unet),
        };
        if multiplier == 0.0 {
            continue;
        }
        let name = format!("{}.weight", m.module);
        let w = vars.get_mut(&name).expect("matched when the file was opened");
        if let Some(b) = backup.as_deref_mut() {
            b.0.entry((m.component, name.clone())).or_insert_with(|| w.copy());
        }
        let merged = w.to_kind(Kind::Float) + m.delta(&w.size()).to_device(w.device()) * multiplier;
        tch::no_grad(|| w.copy_(&merged.to_kind(w.kind())));
    }
}

/// `<lora:NAME:W>` and `<lora:NAME:TE:UNET>` in a prompt (AUTOMATIC1111's extra-networks syntax): the prompt without
/// them, as the text encoder reads it, and the LoRAs it names, resolved against `dir` (`NAME.safetensors`).
pub fn parse_prompt_loras(prompt: &str, dir: Option<&Path>) -> Result<(String, Vec<LoraUse>)> {
    let mut text = String::new();
    let mut uses = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        text.push_str(&rest[..start]);
        let tag = &rest[start..];
        let end = tag.find('>').with_context(|| format!("the prompt's '{}' has no closing '>'", first_line(tag)))?;
        let fields: Vec<&str> = tag[6..end].split(':').map(str::trim).collect();
        let number = |s: &str| {
            s.parse::<f64>().ok().filter(|v| v.is_finite()).with_context(|| {
                format!("in the prompt's '{}': '{s}' is not a multiplier (write <lora:name:0.8>)", &tag[..=end])
            })
        };
        let (name, te, unet) = match fields.as_slice() {
            [name] => (*name, 1.0, 1.0),
            [name, w] => (*name, number(w)?, number(w)?),
            [name, te, unet] => (*name, number(te)?, number(unet)?),
            _ => bail!(
                "the prompt's '{}' has too many fields: write <lora:name:0.8> or <lora:name:te:unet>",
                &tag[..=end]
            ),
        };
        ensure!(!name.is_empty(), "the prompt's '{}' names no LoRA", &tag[..=end]);
        let dir = dir.with_context(|| {
            format!("the prompt names LoRA '{name}': pass --lora-dir DIR (the folder holding {name}.safetensors)")
        })?;
        let path = dir.join(format!("{name}.safetensors"));
        ensure!(
            path.exists(),
            "the prompt names LoRA '{name}', but {} does not exist: check the name, or --lora-dir",
            path.display()
        );
        uses.push(LoraUse { path, te, unet });
        rest = &tag[end + 1..];
    }
    text.push_str(rest);
    Ok((text, uses))
}

/// `prompt` without its `<lora:…>` tags (what the text encoder reads; a tag without its '>' is left as text).
pub fn strip_lora_tags(prompt: &str) -> String {
    let mut text = String::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(end) = rest[start..].find('>') else { break };
        text.push_str(&rest[..start]);
        rest = &rest[start + end + 1..];
    }
    text.push_str(rest);
    text
}

/// The start of `s` up to its first space or newline, at most 40 characters (for messages).
fn first_line(s: &str) -> String {
    s.split([' ', '\n']).next().unwrap_or("").chars().take(40).collect()
}

/// `FILE` or `FILE:W` (both multipliers W) of `--lora`.
pub fn parse_lora_flag(flag: &str) -> Result<LoraUse> {
    let (path, weight) = match flag.rsplit_once(':') {
        Some((p, w)) if !p.is_empty() && w.parse::<f64>().is_ok() => (p, w.parse::<f64>().unwrap_or(1.0)),
        _ => (flag, 1.0),
    };
    ensure!(weight.is_finite(), "--lora {flag}: the multiplier must be a number (write FILE:0.8)");
    Ok(LoraUse { path: PathBuf::from(path), te: weight, unet: weight })
}

/// The web UI's `Lora hashes: "name: hash, …"` entry of a PNG's parameters.
pub fn lora_hashes(files: &[LoraFile]) -> Option<String> {
    (!files.is_empty()).then(|| {
        let pairs: Vec<String> = files.iter().map(|f| format!("{}: {}", f.name, f.short_hash)).collect();
        format!("Lora hashes: \"{}\"", pairs.join(", "))
    })
}

/// Writes a LoRA for `models` in kohya's layout: `modules` are (component, module path, rank, α), the factors drawn
/// N(0, std²) from the global generator (B too, so the update is not zero): what the tour and the tests load.
pub fn write_random_kohya(
    models: &SdModels,
    modules: &[(Component, &str, i64, f64)],
    std: f64,
    path: &Path,
) -> Result<()> {
    let vars = [(Component::TextEncoder, models.text_vs.variables()), (Component::Unet, models.unet_vs.variables())];
    let mut named = Vec::new();
    for &(component, module, rank, alpha) in modules {
        let shape = vars
            .iter()
            .find(|(c, _)| *c == component)
            .and_then(|(_, v)| v.get(&format!("{module}.weight")))
            .with_context(|| format!("the model has no module '{module}'"))?
            .size();
        let prefix = if component == Component::Unet { "lora_unet_" } else { "lora_te_" };
        let name = format!("{prefix}{}", module.replace('.', "_"));
        let mut down_shape = vec![rank, shape[1]];
        let mut up_shape = vec![shape[0], rank];
        if shape.len() == 4 {
            down_shape.extend(&shape[2..]);
            up_shape.extend([1, 1]);
        }
        let f = |s: &[i64]| Tensor::randn(s, (Kind::Float, tch::Device::Cpu)) * std;
        named.push((format!("{name}.lora_down.weight"), f(&down_shape)));
        named.push((format!("{name}.lora_up.weight"), f(&up_shape)));
        named.push((format!("{name}.alpha"), Tensor::from(alpha as f32)));
    }
    Tensor::write_safetensors(&named, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sd::SdConfig;
    use tch::Device;

    fn tiny() -> SdModels {
        tch::manual_seed(0);
        SdModels::new(SdConfig::tiny(), Device::Cpu).unwrap()
    }

    /// kohya's names are the module paths with dots as underscores, for every LoRA-able module (built from the
    /// model, as the web UI does), and the CompVis spelling of the UNet's maps to the same module.
    #[test]
    fn kohya_names_are_built_from_the_models_module_paths() {
        let models = tiny();
        let names = module_names(&LoraModels::sd(&models));
        let (c, m, shape) = &names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"];
        assert_eq!((*c, m.as_str()), (Component::Unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"));
        assert_eq!(shape.len(), 2);
        assert_eq!(names["lora_unet_input_blocks_1_1_proj_in"].1, "down_blocks.0.attentions.0.proj_in");
        assert_eq!(names["lora_unet_down_blocks_0_resnets_0_conv1"].2.len(), 4);
        assert_eq!(
            names["lora_te_text_model_encoder_layers_1_self_attn_q_proj"].1,
            "text_model.encoder.layers.1.self_attn.q_proj"
        );
        assert_eq!(names["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"].0, Component::Unet);
        // every 2-D/4-D weight of both networks has its kohya name, and no embedding or norm does
        for (component, vs, prefix) in
            [(Component::Unet, &models.unet_vs, "lora_unet_"), (Component::TextEncoder, &models.text_vs, "lora_te_")]
        {
            for (name, w) in vs.variables() {
                let module = name.trim_end_matches(".weight");
                let kohya = format!("{prefix}{}", module.replace('.', "_"));
                let lora_able =
                    name.ends_with(".weight") && (w.dim() == 2 || w.dim() == 4) && !name.contains("embeddings.");
                assert_eq!(
                    names.get(&kohya).map(|e| (e.0, e.1.as_str())),
                    lora_able.then_some((component, module)),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn diffusers_keys_name_their_module() {
        let d = diffusers_module;
        assert_eq!(
            d("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"),
            Some(("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".into(), true, LoraFormat::Peft))
        );
        assert_eq!(
            d("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight"),
            Some((
                "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0".into(),
                false,
                LoraFormat::DiffusersOld
            ))
        );
        assert_eq!(
            d("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight").map(|x| x.0),
            Some("text_encoder.text_model.encoder.layers.0.mlp.fc1".into())
        );
        assert_eq!(d("unet.conv_in.weight"), None);
    }

    #[test]
    fn prompt_syntax_is_stripped_and_resolved() {
        let dir = std::env::temp_dir().join(format!("lora-syntax-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("style.safetensors"), b"").unwrap();
        let (text, uses) = parse_prompt_loras("a cat <lora:style:0.8>, <lora:style:0.5:1>", Some(&dir)).unwrap();
        assert_eq!(text, "a cat , ");
        assert_eq!((uses[0].te, uses[0].unet, uses[1].te, uses[1].unet), (0.8, 0.8, 0.5, 1.0));
        assert_eq!(uses[0].path, dir.join("style.safetensors"));
        let e = |p: &str, d: Option<&Path>| format!("{:#}", parse_prompt_loras(p, d).unwrap_err());
        assert!(e("<lora:style:0.8>", None).contains("--lora-dir"));
        assert!(e("<lora:nope:1>", Some(&dir)).contains("nope.safetensors"));
        assert!(e("<lora:style:x>", Some(&dir)).contains("'x' is not a multiplier"));
        assert!(e("a <lora:style", Some(&dir)).contains("no closing"));
        assert!(e("<lora:日本語日本語日本語日本語日本語日本語日本語日本語日本語日本語日本語日本語日本語日本語", None)
            .contains("no closing"));
        assert_eq!(parse_prompt_loras("plain", None).unwrap().0, "plain");
        assert_eq!(parse_lora_flag("a/b.safetensors:0.5").unwrap().unet, 0.5);
        assert_eq!(parse_lora_flag("C:/x.safetensors").unwrap().path, PathBuf::from("C:/x.safetensors"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Merging a kohya file changes exactly its modules by (α/r)·B·A; multiplier 0 leaves every weight bit-identical.
    #[test]
    fn merge_adds_the_low_rank_update_and_multiplier_zero_changes_nothing() {
        let models = tiny();
        let dir = std::env::temp_dir().join(format!("lora-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.safetensors");
        let conv = "down_blocks.0.resnets.0.conv1";
        let q = "text_model.encoder.layers.0.self_attn.q_proj";
        write_random_kohya(
            &models,
            &[(Component::Unet, conv, 4, 2.0), (Component::TextEncoder, q, 2, 2.0)],
            0.1,
            &path,
        )
        .unwrap();
        let before: HashMap<String, Tensor> =
            models.unet_vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
        let text_before = models.text_vs.variables()[&format!("{q}.weight")].copy();
        merge_loras(&LoraModels::sd(&models), &[LoraUse { path: path.clone(), te: 0.0, unet: 0.0 }], None).unwrap();
        for (k, v) in models.unet_vs.variables() {
            assert!(v.equal(&before[&k]), "{k} changed at multiplier 0");
        }
        let lora = LoraFile::open(&path, &models).unwrap();
        assert_eq!(
            (lora.format, lora.count(Component::Unet), lora.count(Component::TextEncoder)),
            (LoraFormat::Kohya, 1, 1)
        );
        merge(&LoraModels::sd(&models), &lora, 0.0, 0.5, None);
        let m = &lora.modules.iter().find(|m| m.module == conv).unwrap();
        let (a, b) = (m.down.flatten(1, -1), m.up.flatten(1, -1)); // (4, C·9), (C', 4)
        let want = &before[&format!("{conv}.weight")]
            + b.matmul(&a).reshape(before[&format!("{conv}.weight")].size()) * (0.5 * 2.0 / 4.0);
        let got = &models.unet_vs.variables()[&format!("{conv}.weight")];
        assert!((got - want).abs().max().double_value(&[]) < 1e-6);
        assert!(models.text_vs.variables()[&format!("{q}.weight")].equal(&text_before), "te multiplier 0");
        for (k, v) in models.unet_vs.variables() {
            assert_eq!(k == format!("{conv}.weight"), !v.equal(&before[&k]), "{k}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Files that are not SD 1.x LoRAs are refused with the file, the key and the reason.
    #[test]
    fn foreign_and_damaged_files_are_refused_by_name() {
        let models = tiny();
        let dir = std::env::temp_dir().join(format!("lora-refuse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, tensors: &[(&str, &[i64])]| {
            let path = dir.join(name);
            let named: Vec<(String, Tensor)> =
                tensors.iter().map(|(k, s)| (k.to_string(), Tensor::ones(*s, (Kind::Float, Device::Cpu)))).collect();
            Tensor::write_safetensors(&named, &path).unwrap();
            format!("{:#}", LoraFile::open(&path, &models).unwrap_err())
        };
        let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        let e = write("loha.safetensors", &[(&format!("{q}.hada_w1_a"), &[4, 4])]);
        assert!(e.contains("LoHa") && e.contains("hada_w1_a"), "{e}");
        let e = write("lokr.safetensors", &[(&format!("{q}.lokr_w1"), &[4, 4])]);
        assert!(e.contains("LoKr"), "{e}");
        let e = write("xl.safetensors", &[("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", &[4, 4])]);
        assert!(e.contains("SDXL"), "{e}");
        let e = write(
            "rank.safetensors",
            &[(&format!("{q}.lora_down.weight"), &[4, 64]), (&format!("{q}.lora_up.weight"), &[64, 8])],
        );
        assert!(e.contains("wrong rank") && e.contains("rank.safetensors") && e.contains(q), "{e}");
        let e = write(
            "other.safetensors",
            &[("lora_unet_foo_bar.lora_down.weight", &[4, 4]), ("lora_unet_foo_bar.lora_up.weight", &[4, 4])],
        );
        assert!(e.contains("match no module") && e.contains("lora_unet_foo_bar"), "{e}");
        let e = write("half.safetensors", &[(&format!("{q}.lora_down.weight"), &[4, 64])]);
        assert!(e.contains("only one of its two"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two LoRAs merged with a backup, then restored: every weight of both networks is bit for bit what it was.
    #[test]
    fn restoring_the_backup_undoes_every_merge_exactly() {
        let models = tiny();
        let dir = std::env::temp_dir().join(format!("lora-restore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conv = "down_blocks.0.resnets.0.conv1";
        let q = "text_model.encoder.layers.0.self_attn.q_proj";
        let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
        write_random_kohya(&models, &[(Component::Unet, conv, 4, 2.0), (Component::TextEncoder, q, 2, 2.0)], 0.1, &a)
            .unwrap();
        write_random_kohya(&models, &[(Component::Unet, conv, 2, 1.0)], 0.1, &b).unwrap();
        let snapshot = |m: &SdModels| -> Vec<(String, Tensor)> {
            let mut v: Vec<(String, Tensor)> =
                m.unet_vs.variables().into_iter().chain(m.text_vs.variables()).map(|(k, t)| (k, t.copy())).collect();
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v
        };
        let before = snapshot(&models);
        let mut backup = WeightBackup::default();
        let uses = [LoraUse { path: a, te: 0.7, unet: 0.9 }, LoraUse { path: b, te: 1.0, unet: -0.4 }];
        merge_loras(&LoraModels::sd(&models), &uses, Some(&mut backup)).unwrap();
        assert_eq!(backup.0.len(), 2, "one copy per changed weight, the first time only");
        assert!(snapshot(&models).iter().zip(&before).any(|(x, y)| !x.1.equal(&y.1)));
        backup.restore(&models);
        assert!(backup.is_empty());
        for (x, y) in snapshot(&models).iter().zip(&before) {
            assert!(x.1.equal(&y.1), "{} is not restored", x.0);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
