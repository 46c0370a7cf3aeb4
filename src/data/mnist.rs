//! MNIST from the four canonical IDX files (gzip), verified before use.
//!
//! [MNIST] LeCun, Cortes, Burges, "The MNIST database of handwritten digits". IDX format: a big-endian header
//! (magic 0x00000803 for images, 0x00000801 for labels, then the dimensions) followed by raw u8 data.
//!
//! We read the files ourselves rather than through the `mnist` crate: that crate wants uncompressed files and panics
//! on anything but the exact canonical ones, while a user who points `--data-dir` at the wrong folder deserves an
//! error that names the file, what is wrong with it, and how to get a good copy.
use anyhow::{bail, ensure, Context, Result};
use md5::{Digest, Md5};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Digits 0–9.
pub const MNIST_CLASSES: i64 = 10;

/// The four files with the MD5 of their uncompressed contents (the canonical values; see data/mnist/README.md).
pub const FILES: [(&str, &str); 4] = [
    (crate::cli::MNIST_TRAIN_IMAGES, "6bbc9ace898e44ae57da46a324031adb"),
    ("train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624"),
    ("t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea"),
    ("t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637"),
];
const IMAGES_MAGIC: u32 = 0x0000_0803; // [MNIST] IDX: u8 data, 3 dimensions
const LABELS_MAGIC: u32 = 0x0000_0801; // [MNIST] IDX: u8 data, 1 dimension
const HOW_TO_FIX: &str = "copy the four MNIST .gz files from ../shared/data/mnist into data/mnist \
     (or run ./run.sh fetch-mnist), or point --data-dir / SCRATCH_DIFFUSION_MNIST at a folder that has them";

/// MNIST as tensors: images (N, 1, 28, 28) f32 in [0, 1], labels (N,) i64.
pub struct Mnist {
    pub train_images: Tensor,
    pub train_labels: Tensor,
    pub test_images: Tensor,
    pub test_labels: Tensor,
}

impl Mnist {
    /// The first `n` test images (n, 1, 28, 28) and their labels (n,).
    pub fn test(&self, n: i64) -> (Tensor, Tensor) {
        (self.test_images.narrow(0, 0, n), self.test_labels.narrow(0, 0, n))
    }
}

/// The directory to read MNIST from: the flag or environment variable if given, else `data/mnist` under the working
/// directory, else the crate's own `data/mnist` (so a lesson run from anywhere inside the clone finds it).
pub fn resolve_dir(explicit: Option<&Path>) -> PathBuf {
    match explicit {
        Some(p) => p.to_path_buf(),
        None => crate::cli::shipped_path(crate::cli::MNIST_DIR, FILES[0].0),
    }
}

/// Reads and gunzips one file, naming it in every error.
fn read_gz(path: &Path) -> Result<Vec<u8>> {
    ensure!(path.exists(), "MNIST file {} not found: {HOW_TO_FIX}", path.display());
    let file = std::fs::File::open(path).with_context(|| format!("cannot open MNIST file {}", path.display()))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file).read_to_end(&mut bytes).with_context(|| {
        format!("MNIST file {} is not a complete gzip file (truncated or corrupt): {HOW_TO_FIX}", path.display())
    })?;
    Ok(bytes)
}

fn be_u32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

/// Parses an IDX image file: returns (pixels, n, rows, cols). Checks the magic number and that the data length
/// matches the header exactly.
pub fn parse_idx_images(bytes: &[u8], path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    ensure!(
        bytes.len() >= 16,
        "MNIST file {} is truncated: {} bytes, shorter than an IDX image header: {HOW_TO_FIX}",
        path.display(),
        bytes.len()
    );
    let magic = be_u32(bytes, 0);
    ensure!(
        magic == IMAGES_MAGIC,
        "MNIST file {} has magic number {magic:#010x}, expected {IMAGES_MAGIC:#010x} (an IDX image file): {HOW_TO_FIX}",
        path.display()
    );
    let (n, rows, cols) = (be_u32(bytes, 1) as usize, be_u32(bytes, 2) as usize, be_u32(bytes, 3) as usize);
    let want = 16 + n * rows * cols;
    ensure!(
        bytes.len() == want,
        "MNIST file {} is truncated or padded: header says {n}x{rows}x{cols} ({want} bytes), file has {}: {HOW_TO_FIX}",
        path.display(),
        bytes.len()
    );
    Ok((bytes[16..].to_vec(), n, rows, cols))
}

/// Parses an IDX label file: returns the labels, each checked to be a digit.
pub fn parse_idx_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    ensure!(
        bytes.len() >= 8,
        "MNIST file {} is truncated: {} bytes, shorter than an IDX label header: {HOW_TO_FIX}",
        path.display(),
        bytes.len()
    );
    let magic = be_u32(bytes, 0);
    ensure!(
        magic == LABELS_MAGIC,
        "MNIST file {} has magic number {magic:#010x}, expected {LABELS_MAGIC:#010x} (an IDX label file): {HOW_TO_FIX}",
        path.display()
    );
    let n = be_u32(bytes, 1) as usize;
    ensure!(
        bytes.len() == 8 + n,
        "MNIST file {} is truncated or padded: header says {n} labels, file has {} bytes of data: {HOW_TO_FIX}",
        path.display(),
        bytes.len() - 8
    );
    let labels = bytes[8..].to_vec();
    if let Some(bad) = labels.iter().find(|&&l| l > 9) {
        bail!("MNIST file {} holds label {bad}, not a digit: {HOW_TO_FIX}", path.display());
    }
    Ok(labels)
}

fn verify_md5(bytes: &[u8], expected: &str, path: &Path) -> Result<()> {
    let got: String = Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    ensure!(
        got == expected,
        "MNIST file {} is corrupt: MD5 of its contents is {got}, the canonical file's is {expected}: {HOW_TO_FIX}",
        path.display()
    );
    Ok(())
}

fn load_pair(dir: &Path, images: (&str, &str), labels_file: (&str, &str)) -> Result<(Tensor, Tensor)> {
    let (ipath, lpath) = (dir.join(images.0), dir.join(labels_file.0));
    let ibytes = read_gz(&ipath)?;
    let (pixels, n, rows, cols) = parse_idx_images(&ibytes, &ipath)?;
    verify_md5(&ibytes, images.1, &ipath)?;
    let lbytes = read_gz(&lpath)?;
    let labels = parse_idx_labels(&lbytes, &lpath)?;
    verify_md5(&lbytes, labels_file.1, &lpath)?;
    ensure!(
        labels.len() == n,
        "{} has {} labels for {n} images in {}: {HOW_TO_FIX}",
        lpath.display(),
        labels.len(),
        ipath.display()
    );
    let x = Tensor::from_slice(&pixels).view([n as i64, 1, rows as i64, cols as i64]).to_kind(Kind::Float) / 255.0;
    let y = Tensor::from_slice(&labels).to_kind(Kind::Int64);
    Ok((x, y))
}

/// Loads and verifies (structure and MD5) all four files from `dir`.
pub fn load(dir: &Path) -> Result<Mnist> {
    let (train_images, train_labels) = load_pair(dir, FILES[0], FILES[1])?;
    let (test_images, test_labels) = load_pair(dir, FILES[2], FILES[3])?;
    Ok(Mnist { train_images, train_labels, test_images, test_labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u32, dims: &[u32]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v
    }

    #[test]
    fn parses_a_small_idx_image_file() {
        let mut b = header(IMAGES_MAGIC, &[2, 2, 3]);
        b.extend(0u8..12);
        let (px, n, r, c) = parse_idx_images(&b, Path::new("x")).unwrap();
        assert_eq!((n, r, c), (2, 2, 3));
        assert_eq!(px, (0u8..12).collect::<Vec<_>>());
    }

    #[test]
    fn rejects_wrong_magic_and_truncation_with_the_file_name() {
        let mut b = header(LABELS_MAGIC, &[2, 2, 3]);
        b.extend(0u8..12);
        let e = parse_idx_images(&b, Path::new("imgs.gz")).unwrap_err().to_string();
        assert!(e.contains("imgs.gz") && e.contains("magic number"), "{e}");
        let mut b = header(IMAGES_MAGIC, &[2, 2, 3]);
        b.extend(0u8..11);
        let e = parse_idx_images(&b, Path::new("imgs.gz")).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = parse_idx_labels(&header(LABELS_MAGIC, &[3])[..6], Path::new("l.gz")).unwrap_err().to_string();
        assert!(e.contains("l.gz") && e.contains("truncated"), "{e}");
        let mut l = header(LABELS_MAGIC, &[2]);
        l.extend([3u8, 12]);
        assert!(parse_idx_labels(&l, Path::new("l.gz")).unwrap_err().to_string().contains("not a digit"));
    }
}
