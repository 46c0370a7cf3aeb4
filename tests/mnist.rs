//! The MNIST loader on the real files, and on broken copies of them.
use scratch_diffusion::data::mnist;
use std::io::Write;
use std::path::Path;
use tch::Kind;

fn data_dir() -> std::path::PathBuf {
    mnist::resolve_dir(None)
}

#[test]
fn reads_the_real_files_with_the_known_label_histogram() {
    let m = mnist::load(&data_dir()).unwrap();
    assert_eq!(m.train_images.size(), [60_000, 1, 28, 28]);
    assert_eq!(m.test_images.size(), [10_000, 1, 28, 28]);
    let hist = |t: &tch::Tensor| Vec::<i64>::try_from(t.bincount::<tch::Tensor>(None, 10)).unwrap();
    // the canonical per-digit counts of the MNIST training and test sets
    assert_eq!(hist(&m.train_labels), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]);
    assert_eq!(hist(&m.test_labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]);
    let (lo, hi) = (m.train_images.min().double_value(&[]), m.train_images.max().double_value(&[]));
    assert!(lo == 0.0 && hi == 1.0 && m.train_images.kind() == Kind::Float);
}

fn copy_dir(to: &Path) {
    for (f, _) in mnist::FILES {
        std::fs::copy(data_dir().join(f), to.join(f)).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match mnist::load(dir) {
        Ok(_) => panic!("loading a broken copy succeeded"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_truncated_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(dir.path());
    let f = dir.path().join("t10k-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 3]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("t10k-images-idx3-ubyte.gz") && e.contains("truncated"), "{e}");
}

#[test]
fn a_wrong_magic_number_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(dir.path());
    // a well-formed gzip whose IDX header says "labels" where images should be
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&[0, 0, 8, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4]).unwrap(); // 1 image of 2×2, magic 0x801
    std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), enc.finish().unwrap()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("train-images-idx3-ubyte.gz") && e.contains("magic number 0x00000801"), "{e}");
}

#[test]
fn a_changed_pixel_fails_the_md5_check_and_a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(dir.path());
    let f = dir.path().join("t10k-labels-idx1-ubyte.gz");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(std::fs::File::open(&f).unwrap()), &mut raw).unwrap();
    raw[100] = (raw[100] + 1) % 10;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&raw).unwrap();
    std::fs::write(&f, enc.finish().unwrap()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("t10k-labels-idx1-ubyte.gz") && e.contains("MD5"), "{e}");
    std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte.gz")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("train-labels-idx1-ubyte.gz not found") && e.contains("--data-dir"), "{e}");
}
