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
pub const IMAGES_MAGIC: u32 = 0x0000_0803; // [MNIST] IDX: u8 data, 3 dimensions
pub const LABELS_MAGIC: u32 = 0x0000_0801; // [MNIST] IDX: u8 data, 1 dimension
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

/// The largest IDX file we accept, decompressed: MNIST's largest, train-images, is 16 + 60000·28·28 = 47 040 016
/// bytes. A header that implies more is not an MNIST file, and we never decompress past it.
const MAX_IDX_BYTES: u64 = 64 << 20;

/// Reads and gunzips one IDX file, naming it in every error. The header is read and checked first (magic number,
/// then the size it implies), and decompression stops one byte past that size, so a gzip bomb (6 GB of zeros in
/// 26 MB) is refused after reading a few bytes, never held in memory.
fn read_gz(path: &Path, magic: u32) -> Result<Vec<u8>> {
    ensure!(path.exists(), "MNIST file {} not found: {HOW_TO_FIX}", path.display());
    let file = std::fs::File::open(path).with_context(|| format!("cannot open MNIST file {}", path.display()))?;
    read_idx(flate2::read::GzDecoder::new(std::io::BufReader::new(file)), path, magic)
}

/// Reads one IDX file (header and data) from its decompressed `stream`, checking the header before the data and
/// reading at most one byte more than the header implies. `magic`'s low byte is the number of dimensions
/// ([MNIST] IDX: 0x08 = u8 data, then the count of big-endian u32 dimensions).
pub fn read_idx(mut stream: impl Read, path: &Path, magic: u32) -> Result<Vec<u8>> {
    let not_gzip =
        || format!("MNIST file {} is not a complete gzip file (truncated or corrupt): {HOW_TO_FIX}", path.display());
    let mut bytes = vec![0u8; 4];
    read_header(&mut stream, &mut bytes, path)?;
    let found = be_u32(&bytes, 0);
    ensure!(
        found == magic,
        "MNIST file {} has magic number {found:#010x}, expected {magic:#010x} (an IDX {} file): {HOW_TO_FIX}",
        path.display(),
        if magic == IMAGES_MAGIC { "image" } else { "label" }
    );
    let ndims = (magic & 0xff) as usize;
    bytes.resize(4 + 4 * ndims, 0);
    read_header(&mut stream, &mut bytes[4..], path)?;
    let dims: Vec<u64> = (1..=ndims).map(|i| be_u32(&bytes, i) as u64).collect();
    // the size the header implies: header + ∏ dims bytes of u8 data (None on overflow: far too large anyway)
    let want = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).and_then(|n| n.checked_add(bytes.len() as u64));
    let shape = dims.iter().map(u64::to_string).collect::<Vec<_>>().join("x");
    let want = match want {
        Some(w) if w <= MAX_IDX_BYTES => w,
        _ => bail!(
            "MNIST file {} has a header that claims {shape} values, more than the {MAX_IDX_BYTES} bytes any MNIST \
             file holds: it is not an MNIST file: {HOW_TO_FIX}",
            path.display()
        ),
    };
    // one byte more than the header implies tells a longer stream from an exact one, without reading the rest
    let mut rest = Vec::with_capacity((want - bytes.len() as u64) as usize);
    stream.take(want + 1 - bytes.len() as u64).read_to_end(&mut rest).with_context(not_gzip)?;
    bytes.extend(rest);
    ensure!(
        bytes.len() as u64 <= want,
        "MNIST file {} decompresses to more than the {want} bytes its header ({shape}) implies: it is padded or \
         not an MNIST file, and was not read further: {HOW_TO_FIX}",
        path.display()
    );
    Ok(bytes)
}

/// `read_exact` of header bytes: a stream that ends early is a truncated file, any other failure a damaged gzip.
fn read_header(stream: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<()> {
    match stream.read_exact(buf) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            bail!("MNIST file {} is truncated: it ends inside its IDX header: {HOW_TO_FIX}", path.display())
        }
        Err(e) => Err(e).with_context(|| {
            format!("MNIST file {} is not a complete gzip file (truncated or corrupt): {HOW_TO_FIX}", path.display())
        }),
        Ok(()) => Ok(()),
    }
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
    // checked: a header of 2^22 x 2^21 x 2^21 would wrap to 0 bytes and pass for an empty file
    let want = n.checked_mul(rows).and_then(|p| p.checked_mul(cols)).and_then(|p| p.checked_add(16));
    ensure!(
        want == Some(bytes.len()),
        "MNIST file {} is truncated or padded: header says {n}x{rows}x{cols} ({} bytes), file has {}: {HOW_TO_FIX}",
        path.display(),
        want.map_or("more than 2^64".to_string(), |w| w.to_string()),
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
    let ibytes = read_gz(&ipath, IMAGES_MAGIC)?;
    let (pixels, n, rows, cols) = parse_idx_images(&ibytes, &ipath)?;
    verify_md5(&ibytes, images.1, &ipath)?;
    let lbytes = read_gz(&lpath, LABELS_MAGIC)?;
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

    #[test]
    fn a_header_whose_size_overflows_is_not_an_empty_file() {
        // found by tests/properties.rs: 2^22 · 2^21 · 2^21 = 2^64 wrapped to 0 bytes, and the empty data was accepted
        let b = header(IMAGES_MAGIC, &[1 << 22, 1 << 21, 1 << 21]);
        let e = parse_idx_images(&b, Path::new("imgs.gz")).unwrap_err().to_string();
        assert!(e.contains("imgs.gz") && e.contains("4194304x2097152x2097152 (more than 2^64 bytes)"), "{e}");
    }

    /// Counts the bytes a reader hands out: how much of a decompressed stream was read.
    struct Counting<R> {
        inner: R,
        read: u64,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }

    fn gzip(parts: &[&[u8]], zeros: usize) -> Vec<u8> {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for p in parts {
            enc.write_all(p).unwrap();
        }
        let block = vec![0u8; 1 << 20];
        for _ in 0..zeros / block.len() {
            enc.write_all(&block).unwrap();
        }
        enc.finish().unwrap()
    }

    #[test]
    fn a_gzip_bomb_of_zeros_is_refused_by_its_magic_number_after_four_bytes() {
        // 64 MB of zeros in ~280 kB of gzip, in an MNIST folder: the old reader decompressed all of it first
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::cli::MNIST_TRAIN_IMAGES);
        std::fs::write(&path, gzip(&[], 64 << 20)).unwrap();
        let e = format!("{:#}", read_gz(&path, IMAGES_MAGIC).unwrap_err());
        assert!(e.contains(crate::cli::MNIST_TRAIN_IMAGES) && e.contains("magic number 0x00000000"), "{e}");
        assert!(!e.contains("truncated"), "{e}");
        let mut stream = Counting { inner: flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap()), read: 0 };
        assert!(read_idx(&mut stream, &path, IMAGES_MAGIC).is_err());
        assert_eq!(stream.read, 4, "only the magic number is decompressed");
    }

    #[test]
    fn a_stream_longer_than_its_header_says_is_refused_one_byte_past_it() {
        // a valid header for 60000 images of 28x28, then zeros forever: the reader must stop by itself
        let want = 16 + 60_000 * 28 * 28;
        let head = header(IMAGES_MAGIC, &[60_000, 28, 28]);
        let mut stream = Counting { inner: head.as_slice().chain(std::io::repeat(0)), read: 0 };
        let e = format!("{:#}", read_idx(&mut stream, Path::new("imgs.gz"), IMAGES_MAGIC).unwrap_err());
        assert!(e.contains("imgs.gz") && e.contains(&format!("more than the {want} bytes")), "{e}");
        assert_eq!(stream.read, want as u64 + 1, "decompression is bounded by the header's size plus one byte");
        // the same as a gzip file: one 2x2 image, then 4 MB of zeros
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("padded.gz");
        std::fs::write(&path, gzip(&[&header(IMAGES_MAGIC, &[1, 2, 2]), &[1, 2, 3, 4]], 4 << 20)).unwrap();
        let e = format!("{:#}", read_gz(&path, IMAGES_MAGIC).unwrap_err());
        assert!(e.contains("padded.gz") && e.contains("more than the 20 bytes its header (1x2x2)"), "{e}");
        // an exact stream reads whole, and a header claiming more than any MNIST file is refused unread
        std::fs::write(&path, gzip(&[&header(IMAGES_MAGIC, &[1, 2, 2]), &[1, 2, 3, 4]], 0)).unwrap();
        assert_eq!(read_gz(&path, IMAGES_MAGIC).unwrap().len(), 20);
        let huge = header(IMAGES_MAGIC, &[u32::MAX, u32::MAX, u32::MAX]);
        let mut stream = Counting { inner: huge.as_slice().chain(std::io::repeat(0)), read: 0 };
        let e = format!("{:#}", read_idx(&mut stream, Path::new("h.gz"), IMAGES_MAGIC).unwrap_err());
        assert!(e.contains("h.gz") && e.contains("not an MNIST file"), "{e}");
        assert_eq!(stream.read, 16);
        // a stream that ends inside the header is truncated; labels have a one-dimensional header
        let e = format!("{:#}", read_idx(&header(LABELS_MAGIC, &[])[..], Path::new("l.gz"), LABELS_MAGIC).unwrap_err());
        assert!(e.contains("l.gz") && e.contains("truncated"), "{e}");
        let labels = [header(LABELS_MAGIC, &[3]), vec![1, 2, 3]].concat();
        assert_eq!(read_idx(&labels[..], Path::new("l.gz"), LABELS_MAGIC).unwrap(), labels);
    }
}
