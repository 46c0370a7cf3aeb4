//! Reading weight files a user hands us, checked before any tensor is built.
//!
//! [safetensors] Hugging Face, "safetensors" format: 8 bytes little-endian N, then N bytes of JSON
//! `{"name": {"dtype": "F16", "shape": [320, 4, 3, 3], "data_offsets": [begin, end]}, ..., "__metadata__": {...}}`,
//! then the data; offsets count from the end of the header, tensors are little-endian and row-major.
//!
//! libtorch's own reader aborts or reports only "invalid header" on a damaged file; this one says what is wrong
//! (header longer than the file, a tensor whose bytes run past the end, a dtype it cannot hold) and names the tensor.
//! It reads one tensor at a time, so loading a 4 GB single-file checkpoint needs the model's memory plus one tensor,
//! not twice the file. `.ckpt`/`.pt`/`.bin` files are Python pickles, which can run arbitrary code when loaded: they
//! are refused with the command that converts them ([`refuse_pickle`]), never opened.
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A header larger than this is not a weights file (SD 1.5's single file has a ~150 kB header).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Byte range in the data section.
    pub begin: u64,
    pub end: u64,
}

/// An open safetensors file with its validated header.
#[derive(Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    file: File,
    data_start: u64,
    entries: BTreeMap<String, Entry>,
    /// The header's `__metadata__` (string to string; LoRA trainers keep their settings there).
    pub metadata: BTreeMap<String, String>,
}

/// safetensors dtype -> (kind, bytes per element); None for dtypes weights never use.
fn dtype(name: &str) -> Option<(Kind, u64)> {
    Some(match name {
        "F32" => (Kind::Float, 4),
        "F16" => (Kind::Half, 2),
        "BF16" => (Kind::BFloat16, 2),
        "F64" => (Kind::Double, 8),
        "I64" => (Kind::Int64, 8),
        "I32" => (Kind::Int, 4),
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Opens `path` and checks its header against the file's size: every tensor's bytes must lie inside the data
    /// section and match its dtype and shape.
    pub fn open(path: &Path) -> Result<Self> {
        refuse_pickle(path)?;
        let mut file = File::open(path).with_context(|| format!("cannot open weights file {}", path.display()))?;
        let size = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
        let damaged = |what: String| {
            anyhow::anyhow!(
                "{} is not a valid safetensors file ({what}): it is truncated or damaged; download it again",
                path.display()
            )
        };
        ensure!(size >= 8, damaged(format!("{size} bytes, shorter than the 8-byte header length")));
        let mut len = [0u8; 8];
        file.read_exact(&mut len)?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > size {
            return Err(damaged(format!("its header claims {header_len} bytes, the file has {size}")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)?;
        let json: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| damaged(format!("its header is not JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| damaged("its header is not a JSON object".into()))?;
        let data_len = size - 8 - header_len;
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in obj {
            if name == "__metadata__" {
                let pairs = v.as_object().into_iter().flatten();
                metadata.extend(pairs.filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))));
                continue;
            }
            let bad = |what: &str| damaged(format!("tensor '{name}': {what}"));
            let dt = v["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
            let (kind, elem) =
                dtype(dt).ok_or_else(|| bad(&format!("dtype {dt} is not supported (F32, F16, BF16)")))?;
            let shape: Vec<i64> = v["shape"]
                .as_array()
                .and_then(|a| a.iter().map(|d| d.as_i64().filter(|&d| d >= 0)).collect())
                .ok_or_else(|| bad("no valid shape"))?;
            let offsets: Vec<u64> = v["data_offsets"]
                .as_array()
                .and_then(|a| a.iter().map(|d| d.as_u64()).collect())
                .filter(|o: &Vec<u64>| o.len() == 2)
                .ok_or_else(|| bad("no valid data_offsets"))?;
            let (begin, end) = (offsets[0], offsets[1]);
            // checked: 2^62 · 4 elements of 4 bytes would wrap to 0 and pass for an empty tensor
            let want = shape.iter().try_fold(elem, |n, &d| n.checked_mul(d as u64));
            ensure!(
                begin <= end && Some(end - begin) == want,
                bad(&format!("{} bytes for {shape:?} {dt}", end.wrapping_sub(begin) as i64))
            );
            ensure!(end <= data_len, bad(&format!("its bytes end at {end}, past the data's {data_len}")));
            entries.insert(name.clone(), Entry { kind, shape, begin, end });
        }
        // [safetensors] the tensors' byte ranges do not overlap: two names sharing bytes is a damaged header
        let mut ranges: Vec<(&String, &Entry)> = entries.iter().filter(|(_, e)| e.begin < e.end).collect();
        ranges.sort_by_key(|(_, e)| e.begin);
        for pair in ranges.windows(2) {
            let ((a, ea), (b, eb)) = (pair[0], pair[1]);
            ensure!(
                eb.begin >= ea.end,
                damaged(format!(
                    "tensors '{a}' (bytes {}..{}) and '{b}' ({}..{}) overlap",
                    ea.begin, ea.end, eb.begin, eb.end
                ))
            );
        }
        // [safetensors] and as its reference reader checks: the tensors' bytes tile the data section, from 0 to its
        // end, without holes or trailing bytes (with no overlaps, that is: their lengths add up to the data's)
        let covered: u64 = ranges.iter().map(|(_, e)| e.end - e.begin).sum();
        let starts_at_zero = ranges.first().map_or(true, |(_, e)| e.begin == 0);
        ensure!(
            starts_at_zero && covered == data_len,
            damaged(format!(
                "its tensors cover {covered} of the {data_len} data bytes: the header leaves holes or trailing bytes"
            ))
        );
        Ok(Self { path: path.to_path_buf(), file, data_start: 8 + header_len, entries, metadata })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The SHA-256 of the data section (everything after the header), hex: kohya's and the web UI's "addnet hash"
    /// of LoRA files, which does not change when only the metadata does.
    pub fn data_sha256(&mut self) -> Result<String> {
        use sha2::{Digest, Sha256};
        self.file.seek(SeekFrom::Start(self.data_start))?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut self.file, &mut hasher).with_context(|| format!("cannot read {}", self.path.display()))?;
        Ok(format!("{:x}", hasher.finalize()))
    }

    /// Reads tensor `name` (on the CPU, in the file's dtype).
    pub fn tensor(&mut self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).with_context(|| format!("{} has no tensor '{name}'", self.path.display()))?;
        let mut bytes = vec![0u8; (e.end - e.begin) as usize];
        self.file.seek(SeekFrom::Start(self.data_start + e.begin))?;
        self.file
            .read_exact(&mut bytes)
            .with_context(|| format!("cannot read tensor '{name}' of {}", self.path.display()))?;
        Ok(Tensor::from_data_size(&bytes, &e.shape, e.kind))
    }
}

/// Refuses pickled PyTorch files (`.ckpt`, `.pt`, `.pth`, `.bin`, or any file that starts like a zip or a pickle):
/// loading one runs whatever code it holds. The message gives the conversion command.
pub fn refuse_pickle(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_lowercase();
    // a safetensors file has its JSON header's '{' at byte 8; PyTorch's files are zip archives ("PK\3\4") or raw
    // pickles (0x80, then the protocol 2..=5)
    let mut magic = [0u8; 9];
    let starts_like_pickle = File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| {
            magic[8] != b'{' && (magic[..4] == *b"PK\x03\x04" || (magic[0] == 0x80 && (2..=5).contains(&magic[1])))
        })
        .unwrap_or(false);
    if ["ckpt", "pt", "pth", "bin"].contains(&ext.as_str()) || starts_like_pickle {
        bail!(
            "{} is a pickled PyTorch checkpoint, which can run arbitrary code when loaded, so it is never opened here: \
             convert it once with python -c \"import torch; from safetensors.torch import save_file; \
             sd = torch.load('{0}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); \
             save_file({{k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}}, 'model.safetensors')\" \
             (or download the .safetensors version)",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn write(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join(name);
        Tensor::write_safetensors(tensors, &path).unwrap();
        path
    }

    #[test]
    fn reads_what_libtorch_wrote_in_every_float_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let tensors = [("a", a.shallow_clone()), ("h", a.to_kind(Kind::Half)), ("b", a.to_kind(Kind::BFloat16))];
        let mut f = SafetensorsFile::open(&write(dir.path(), "w.safetensors", &tensors)).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(f.entry("h").unwrap().shape, [3, 4]);
        for (name, t) in &tensors {
            let got = f.tensor(name).unwrap();
            assert_eq!(got.kind(), t.kind());
            assert!(got.equal(t), "{name}");
        }
        assert!(format!("{:#}", f.tensor("missing").unwrap_err()).contains("no tensor 'missing'"));
    }

    #[test]
    fn damaged_headers_and_pickles_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good =
            write(dir.path(), "w.safetensors", &[("weight", Tensor::ones([64, 64], (Kind::Float, Device::Cpu)))]);
        let bytes = std::fs::read(&good).unwrap();
        let err = |b: &[u8]| {
            let p = dir.path().join("bad.safetensors");
            std::fs::write(&p, b).unwrap();
            format!("{:#}", SafetensorsFile::open(&p).unwrap_err())
        };
        // truncated inside the data: the tensor whose bytes run past the end is named
        let e = err(&bytes[..bytes.len() - 100]);
        assert!(e.contains("tensor 'weight'") && e.contains("past the data"), "{e}");
        // truncated inside the header
        assert!(err(&bytes[..20]).contains("its header claims"), "{}", err(&bytes[..20]));
        assert!(err(&bytes[..5]).contains("shorter than the 8-byte header length"));
        // a header that is not JSON
        let mut garbled = bytes.clone();
        garbled[8] = b'#';
        assert!(err(&garbled).contains("not JSON"), "{}", err(&garbled));
        // pickles: by extension and by content
        let ckpt = dir.path().join("v1-5-pruned.ckpt");
        std::fs::write(&ckpt, b"PK\x03\x04rest").unwrap();
        let e = format!("{:#}", SafetensorsFile::open(&ckpt).unwrap_err());
        assert!(e.contains("pickled") && e.contains("v1-5-pruned.ckpt") && e.contains("save_file"), "{e}");
        assert!(err(b"\x80\x02}q\x00hello-world-pickle").contains("pickled"));
        // a safetensors file whose header length happens to start with 0x80 0x02 is read, not refused
        let mut header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#.to_vec();
        header.resize(0x0280, b' ');
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(&header);
        file.extend(1.5f32.to_le_bytes());
        let p = dir.path().join("lucky.safetensors");
        std::fs::write(&p, &file).unwrap();
        assert_eq!(SafetensorsFile::open(&p).unwrap().tensor("w").unwrap().double_value(&[0]), 1.5);
    }

    /// A file with one raw header (no data section beyond `data` bytes).
    fn raw_file(dir: &Path, header: &str, data: usize) -> PathBuf {
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        file.extend(vec![0u8; data]);
        let path = dir.join("raw.safetensors");
        std::fs::write(&path, file).unwrap();
        path
    }

    #[test]
    fn a_shape_whose_size_overflows_is_refused() {
        // 2^62 · 4 elements · 4 bytes wraps to 0 bytes in 64 bits: it must not pass for an empty tensor
        let dir = tempfile::tempdir().unwrap();
        for shape in ["[4611686018427387904, 4]", "[4294967296, 4294967296]", "[9223372036854775807, 2]"] {
            let header = format!(r#"{{"w":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}}}"#);
            let e = format!("{:#}", SafetensorsFile::open(&raw_file(dir.path(), &header, 0)).unwrap_err());
            assert!(e.contains("tensor 'w'") && e.contains("raw.safetensors"), "{e}");
        }
    }

    #[test]
    fn overlapping_byte_ranges_are_refused_naming_both_tensors() {
        // issue 17, defect 5: two tensors sharing bytes were accepted
        let dir = tempfile::tempdir().unwrap();
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let e = format!("{:#}", SafetensorsFile::open(&raw_file(dir.path(), header, 12)).unwrap_err());
        assert!(
            e.contains("'a'") && e.contains("'b'") && e.contains("overlap") && e.contains("raw.safetensors"),
            "{e}"
        );
        // adjacent ranges and empty tensors are fine
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},"c":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}"#;
        assert_eq!(SafetensorsFile::open(&raw_file(dir.path(), header, 12)).unwrap().len(), 3);
        // a hole between two tensors, or bytes after the last one, are a damaged header too
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        let e = format!("{:#}", SafetensorsFile::open(&raw_file(dir.path(), gap, 12)).unwrap_err());
        assert!(e.contains("cover 8 of the 12"), "{e}");
        let trailing = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let e = format!("{:#}", SafetensorsFile::open(&raw_file(dir.path(), trailing, 12)).unwrap_err());
        assert!(e.contains("cover 8 of the 12"), "{e}");
    }
}
