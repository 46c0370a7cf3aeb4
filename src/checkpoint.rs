//! Checkpoints: a VarStore as one safetensors file whose header's `__metadata__` holds the resolved config as JSON
//! (key [`CONFIG_KEY`]), so weights and config are one unit, written by one rename. [`save`] also writes the config
//! beside the weights (`model.safetensors` + `model.json`) for people to read; loading takes the copy inside the file
//! and falls back to the JSON beside it only for files written before the config moved inside (the shipped weights in
//! data/). Loading is strict: every tensor must be present with the expected shape, and a mismatch names the
//! tensor, both shapes and the fix.
//!
//! An atomic write ([`write_tensors`]): the tensors go to a temporary file in the same directory, which is fsynced,
//! renamed over the target, and the directory fsynced; on any error the temporary file is removed, and a save first
//! removes the temporary files of the same checkpoint that a killed process left ([`remove_stale_temps`]).
use crate::validate::Validate;
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, View};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::Tensor;

/// The `__metadata__` key that holds a checkpoint's config (JSON text).
pub const CONFIG_KEY: &str = "config";
/// A safetensors header larger than this is refused before it is read (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// `model.safetensors` -> `model.json`: where the readable copy of a checkpoint's config lives (and, in checkpoints
/// written before the config moved into the file, the only copy).
pub fn config_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// Saves the variables of `vs` to `path` with `config` inside the file ([`write_tensors`]: one atomic unit), then a
/// readable copy of the config beside it ([`config_path`], also atomic). A kill between the two leaves a complete
/// checkpoint, whose config [`load_config`] reads from the file itself.
pub fn save(vs: &VarStore, path: &Path, config: &impl Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(config)?;
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    write_tensors(path, &tensors, &BTreeMap::from([(CONFIG_KEY.to_string(), json.clone())]))?;
    crate::cli::write_atomic(&config_path(path), json.as_bytes())
}

/// A tensor as the `safetensors` crate writes it: dtype, shape and its bytes (from a contiguous CPU copy).
struct TensorBytes {
    dtype: Dtype,
    shape: Vec<usize>,
    tensor: Tensor,
}

impl TensorBytes {
    fn new(name: &str, t: &Tensor) -> Result<Self> {
        let dtype = Dtype::try_from(t.kind()).map_err(|e| anyhow::anyhow!("tensor '{name}': {e}"))?;
        let tensor = t.detach().to_device(tch::Device::Cpu).contiguous();
        Ok(Self { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), tensor })
    }
}

impl View for &TensorBytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut bytes = vec![0u8; self.data_len()];
        self.tensor.copy_data_u8(&mut bytes, self.tensor.numel());
        bytes.into()
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

fn dir_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Removes the temporary files of a save of `path` (`.NAME.tmpPID.safetensors` beside it, written by
/// [`crate::cli::replace_atomically`]) that a killed or failed process left behind (any process id);
/// returns how many. Call it when nothing else writes `path`: at the start of a run, and before each save.
pub fn remove_stale_temps(path: &Path) -> Result<usize> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return Ok(0) };
    let (prefix, dir) = (format!(".{name}.tmp"), dir_of(path));
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) }; // no directory yet: nothing left over
    let mut removed = 0;
    for entry in entries.filter_map(|e| e.ok()) {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        let pid = file.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".safetensors"));
        if pid.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove the stale temporary file {}", entry.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Writes `tensors` and `metadata` (the header's `__metadata__`) to `path` as one safetensors file, atomically: a
/// temporary file beside it, fsynced, renamed over `path`, then the directory fsynced, so after a crash `path` is
/// either the old checkpoint or the new one, never a mix or a truncation. The temporary file is removed on every
/// error (a full disk included); stale ones of earlier processes are removed first.
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let dir = dir_of(path);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    remove_stale_temps(path)?;
    let views = tensors.iter().map(|(n, t)| Ok((n.clone(), TensorBytes::new(n, t)?))).collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    crate::cli::replace_atomically(path, ".safetensors", |tmp| {
        safetensors::tensor::serialize_to_file(views.iter().map(|(n, v)| (n.as_str(), v)), &Some(meta), tmp)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(std::fs::File::open(tmp)?.sync_all()?)
    })
}

/// The `__metadata__` of the safetensors file at `path` (empty when it has none), read from the header alone.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let unreadable = || {
        format!(
            "checkpoint {} is not a readable safetensors file (truncated or corrupt?): delete it and retrain",
            path.display()
        )
    };
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open checkpoint {}", path.display()))?;
    let file_len = file.metadata().with_context(unreadable)?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(unreadable)?;
    let n = u64::from_le_bytes(len);
    ensure!(n <= MAX_HEADER.min(file_len.saturating_sub(8)), "{}: its header length {n} is impossible", unreadable());
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).with_context(unreadable)?;
    let header: serde_json::Value = serde_json::from_slice(&header).with_context(unreadable)?;
    let Some(meta) = header.get("__metadata__") else { return Ok(BTreeMap::new()) };
    serde_json::from_value(meta.clone()).with_context(|| format!("{}: its __metadata__ is not text", unreadable()))
}

/// Reads the config of a checkpoint: from inside the file, or, for checkpoints written before it moved there, from
/// the JSON beside it.
pub fn load_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    Ok(read_config(path)?.0)
}

/// [`load_config`], then the config's own range checks ([`Validate`]): an error names the file the config came from,
/// the field, its value and what is allowed, before anything is built from it.
pub fn load_valid_config<T: DeserializeOwned + Validate>(path: &Path) -> Result<T> {
    let (config, from) = read_config(path)?;
    crate::validate::checked(config, &from)
}

/// The config and the file it was read from.
fn read_config<T: DeserializeOwned>(path: &Path) -> Result<(T, PathBuf)> {
    let inside = if path.exists() { read_metadata(path)?.remove(CONFIG_KEY) } else { None };
    let (text, from) = match inside {
        Some(text) => (text, path.to_path_buf()),
        None => {
            let cpath = config_path(path);
            let text = std::fs::read_to_string(&cpath).with_context(|| {
                format!(
                    "checkpoint config {} not found (nor inside {}): it is written by the lesson that trains it",
                    cpath.display(),
                    path.display()
                )
            })?;
            (text, cpath)
        }
    };
    let config = serde_json::from_str(&text).with_context(|| {
        format!("checkpoint config in {} does not match this model's config: retrain or delete it", from.display())
    })?;
    Ok((config, from))
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
        let float =
            |k: tch::Kind| matches!(k, tch::Kind::Half | tch::Kind::BFloat16 | tch::Kind::Float | tch::Kind::Double);
        if float(var.kind()) && !float(src.kind()) {
            bail!(
                "checkpoint {}: tensor '{name}' holds {:?} values where the model has float weights: the file is \
                 damaged or not this model's; retrain it",
                path.display(),
                src.kind()
            );
        }
        let what = format!("checkpoint {}: tensor '{name}'", path.display());
        crate::cli::ensure_finite(
            src,
            &what,
            "the file is damaged or was saved from a diverged run; delete it and retrain",
        )?;
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

    fn linear_store(out: i64) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let _ = nn::linear(vs.root() / "fc", 3, out, Default::default());
        vs
    }

    #[test]
    fn the_config_inside_the_file_is_enough_to_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let vs = linear_store(4);
        save(&vs, &path, &serde_json::json!({"width": 4})).unwrap();
        // a kill after the weights' rename but before the JSON's: the checkpoint is still whole
        std::fs::remove_file(config_path(&path)).unwrap();
        assert_eq!(load_config::<serde_json::Value>(&path).unwrap()["width"], 4);
        assert_eq!(read_metadata(&path).unwrap()[CONFIG_KEY], "{\n  \"width\": 4\n}");
        // a stale JSON beside it (from an earlier save) does not override the one inside
        std::fs::write(config_path(&path), r#"{"width": 5}"#).unwrap();
        assert_eq!(load_config::<serde_json::Value>(&path).unwrap()["width"], 4);
        let mut same = linear_store(4);
        load(&mut same, &path).unwrap();
        assert!(vs.variables()["fc.weight"].equal(&same.variables()["fc.weight"]));
    }

    #[test]
    fn checkpoints_with_only_the_json_beside_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let vs = linear_store(4);
        vs.save(&path).unwrap(); // the old format: no __metadata__
        std::fs::write(config_path(&path), r#"{"width": 4}"#).unwrap();
        assert!(read_metadata(&path).unwrap().is_empty());
        assert_eq!(load_config::<serde_json::Value>(&path).unwrap()["width"], 4);
        // the shipped weights are of that format
        let shipped = crate::cli::crate_root().join("data/lesson04/unet.safetensors");
        let config: serde_json::Value = load_config(&shipped).unwrap();
        assert!(config.is_object(), "{config}");
    }

    #[test]
    fn a_save_removes_stale_temp_files_and_a_failed_one_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let vs = linear_store(4);
        save(&vs, &path, &serde_json::json!({"width": 4})).unwrap();
        let before = std::fs::read(&path).unwrap();
        // a save killed before its rename: only its temporary file, half written; the checkpoint is the old one
        let stale = dir.path().join(".m.safetensors.tmp99999999.safetensors");
        std::fs::write(&stale, &before[..before.len() / 2]).unwrap();
        let mut same = linear_store(4);
        load(&mut same, &path).unwrap();
        assert_eq!(remove_stale_temps(&path).unwrap(), 1);
        assert!(!stale.exists());
        std::fs::write(&stale, b"junk").unwrap();
        save(&vs, &path, &serde_json::json!({"width": 4})).unwrap();
        assert!(!stale.exists(), "the next save removes it");

        // a save that fails (here the rename: the target is a directory) removes its temporary file
        let blocked = dir.path().join("blocked.safetensors");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("keep"), b"x").unwrap();
        assert!(save(&vs, &blocked, &serde_json::json!({})).is_err());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "a temporary file was left: {names:?}");
    }
}
