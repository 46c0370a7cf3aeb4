//! The folder a pipeline saves itself into, written and read the same way by every pipeline of lessons 06 and 08:
//! `pipeline.json` (the pipeline's own settings), one `NAME.safetensors` per network with its config in `NAME.json`
//! beside it ([`checkpoint::save`]), `attribute_bins.json` when the captions were binned, and with `--ship` a README
//! that says how the bundle was made.
use crate::checkpoint;
use crate::data::captions::AttributeBins;
use crate::pipelines::prompt_encoder::PromptEncoder;
use crate::validate::{checked, Validate};
use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;
use tch::nn::{self, VarStore};
use tch::Device;

/// The settings file of every bundle.
pub const PIPELINE_JSON: &str = "pipeline.json";
const BINS_JSON: &str = "attribute_bins.json";

/// Creates `dir` and writes `config` into its `pipeline.json` (atomically).
pub fn save_config(dir: &Path, config: &impl Serialize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(config)?;
    crate::cli::write_atomic(&dir.join(PIPELINE_JSON), json.as_bytes())
}

/// Reads `dir/pipeline.json` as a `what` (named in the error when it is something else) and checks its fields.
pub fn load_config<T: DeserializeOwned + Validate>(dir: &Path, what: &str) -> Result<T> {
    let path = dir.join(PIPELINE_JSON);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let config = serde_json::from_str(&text).with_context(|| format!("{} is not a {what} config", path.display()))?;
    checked(config, &path)
}

/// Writes the network on `vs` as `dir/NAME.safetensors` with its `config` in `dir/NAME.json`.
pub fn save_network(dir: &Path, name: &str, vs: &VarStore, config: &impl Serialize) -> Result<()> {
    checkpoint::save(vs, &dir.join(format!("{name}.safetensors")), config)
}

/// Rebuilds the network `dir/NAME.safetensors` on `device`: reads its config and checks it ([`Validate`]) before
/// anything is allocated, builds it with `build` on a fresh VarStore, and loads the weights (strictly: every variable,
/// with its shape).
pub fn load_network<C: DeserializeOwned + Validate, M>(
    dir: &Path,
    name: &str,
    device: Device,
    build: impl FnOnce(nn::Path, C) -> M,
) -> Result<(VarStore, M)> {
    let path = dir.join(format!("{name}.safetensors"));
    let mut vs = VarStore::new(device);
    let net = build(vs.root(), checkpoint::load_valid_config::<C>(&path)?);
    checkpoint::load(&mut vs, &path)?;
    Ok((vs, net))
}

/// The prompt side of a saved text pipeline (lesson 06's or 08's): its tokenizer and frozen text encoder, with the
/// context length and the training captions' tokens from `pipeline.json`.
pub fn load_prompt_encoder(dir: &Path, device: Device) -> Result<PromptEncoder> {
    #[derive(serde::Deserialize)]
    struct PromptSide {
        context_len: usize,
        seen_tokens: Vec<i64>,
    }
    impl Validate for PromptSide {
        fn validate(&self) -> std::result::Result<(), String> {
            crate::validate::in_range("context_len", self.context_len, 2, 1024)
        }
    }
    let side: PromptSide = load_config(dir, "text pipeline")?;
    PromptEncoder::load(dir, side.context_len, &side.seen_tokens, device)
}

/// Writes the captions' attribute bins, when there are any.
pub fn save_bins(dir: &Path, bins: Option<&AttributeBins>) -> Result<()> {
    bins.map_or(Ok(()), |b| b.save(&dir.join(BINS_JSON)))
}

/// The captions' attribute bins, if the bundle has them.
pub fn load_bins(dir: &Path) -> Result<Option<AttributeBins>> {
    let path = dir.join(BINS_JSON);
    path.exists().then(|| AttributeBins::load(&path)).transpose()
}

/// `--ship`: saves a bundle with `save` into `dir` (data/lessonNN/ under the crate root), then writes `readme` (how it
/// was made) beside it.
pub fn ship(dir: &Path, readme: &str, save: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    save(dir)?;
    crate::cli::write_atomic(&dir.join("README.md"), readme.as_bytes())?;
    println!("shipped the pipeline to {}", dir.display());
    Ok(())
}

/// The error context when `dir` holds no usable bundle of `lesson` (say "06"): how to make one or pass another.
pub fn no_bundle(dir: &Path, lesson: &str, what: &str) -> String {
    format!(
        "no usable {what} weights in {}: make them with `./run.sh lesson {lesson} --ship`, or pass --weights DIR (the \
         weights/ folder of a lesson {lesson} run)",
        dir.display()
    )
}

/// Writes `images` (N, 1, S, S) in [0, 1] as `dir/sample_000.png`, … and a grid of them titled `title`.
pub fn write_samples(dir: &Path, images: &tch::Tensor, title: &str) -> Result<()> {
    crate::cli::ensure_writable_dir(dir)?;
    for i in 0..images.size()[0] {
        crate::data::png::write_png_gray(&dir.join(format!("sample_{i:03}.png")), &images.get(i))?;
    }
    crate::plot::image_grid(&dir.join("grid.png"), title, images, 8, 3, &[])?;
    println!("{} images and grid.png in {}", images.size()[0], dir.display());
    Ok(())
}
