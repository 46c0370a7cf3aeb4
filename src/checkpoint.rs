//! Checkpoints: a VarStore as safetensors, written atomically, with the resolved config as JSON beside it
//! (`model.safetensors` + `model.json`). Loading is strict: every tensor must be present with the expected shape,
//! and a mismatch names the tensor, both shapes and the fix.
use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::Tensor;

/// `model.safetensors` -> `model.json`: where the config of a checkpoint lives.
pub fn config_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// Saves the variables of `vs` to `path` (safetensors) and `config` beside it, each through a temporary file and
/// a rename, so an interrupted save never leaves a truncated checkpoint.
pub fn save(vs: &VarStore, path: &Path, config: &impl Serialize) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    // tch picks the format from the extension, so the temporary name must end in .safetensors too
    let tmp = dir.join(format!(".{name}.tmp{}.safetensors", std::process::id()));
    vs.save(&tmp).with_context(|| format!("cannot write checkpoint {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    crate::cli::write_atomic(&config_path(path), serde_json::to_string_pretty(config)?.as_bytes())
}

/// Reads the config saved beside a checkpoint.
pub fn load_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let cpath = config_path(path);
    let text = std::fs::read_to_string(&cpath).with_context(|| {
        format!(
            "checkpoint config {} not found: it is written beside {} by the lesson that trains it",
            cpath.display(),
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| {
        format!("checkpoint config {} does not match this model's config: retrain or delete it", cpath.display())
    })
}

/// Number of scalars in all the variables of `vs`.
pub fn num_parameters(vs: &VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

/// Loads `path` into `vs`. Unlike `VarStore::load` (whose copy broadcasts silently), every variable of `vs` must be
/// in the file with exactly its shape; values are converted to the variable's dtype and device.
pub fn load(vs: &mut VarStore, path: &Path) -> Result<()> {
    if !path.exists() {
        bail!("checkpoint {} not found: train it first or pass the right path", path.display());
    }
    let named = Tensor::read_safetensors(path).map_err(|e| anyhow::anyhow!("{e}")).with_context(|| {
        format!(
            "checkpoint {} is not a readable safetensors file (truncated or corrupt?): delete it and retrain",
            path.display()
        )
    })?;
    let file: std::collections::HashMap<String, Tensor> = named.into_iter().collect();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        let Some(src) = file.get(name) else {
            bail!(
                "checkpoint {} has no tensor '{name}': it was saved from a different model or config",
                path.display()
            );
        };
        if src.size() != var.size() {
            bail!(
                "checkpoint {}: tensor '{name}' has shape {:?}, the model expects {:?}: the checkpoint was made with another config; use the matching config or retrain",
                path.display(), src.size(), var.size()
            );
        }
    }
    tch::no_grad(|| {
        for (name, var) in &mut vars {
            var.copy_(&file[name.as_str()].to_kind(var.kind()).to_device(var.device()));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    #[test]
    fn save_load_round_trip_and_shape_mismatch_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let vs = VarStore::new(Device::Cpu);
        let _ = nn::linear(vs.root() / "fc", 3, 4, Default::default());
        save(&vs, &path, &serde_json::json!({"width": 4})).unwrap();
        assert_eq!(load_config::<serde_json::Value>(&path).unwrap()["width"], 4);
        let leftovers: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(leftovers.len(), 2, "only the checkpoint and its config remain: {leftovers:?}");

        let mut same = VarStore::new(Device::Cpu);
        let _ = nn::linear(same.root() / "fc", 3, 4, Default::default());
        load(&mut same, &path).unwrap();
        let (a, b) = (&vs.variables()["fc.weight"], &same.variables()["fc.weight"]);
        assert_eq!(a.kind(), Kind::Float);
        assert!(a.equal(b));

        let mut other = VarStore::new(Device::Cpu);
        let _ = nn::linear(other.root() / "fc", 3, 5, Default::default());
        let e = format!("{:#}", load(&mut other, &path).unwrap_err());
        assert!(e.contains("'fc.bias'") && e.contains("[4]") && e.contains("[5]"), "{e}");
    }

    #[test]
    fn truncated_and_missing_files_give_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let vs = VarStore::new(Device::Cpu);
        let _ = nn::linear(vs.root() / "fc", 3, 4, Default::default());
        let mut vs2 = VarStore::new(Device::Cpu);
        let _ = nn::linear(vs2.root() / "fc", 3, 4, Default::default());
        assert!(format!("{:#}", load(&mut vs2, &path).unwrap_err()).contains("not found"));
        save(&vs, &path, &serde_json::json!({})).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(format!("{:#}", load(&mut vs2, &path).unwrap_err()).contains("not a readable safetensors"));
    }
}
