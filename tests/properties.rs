//! Property tests for every reader a user can hand a file or a string to (issue 17): arbitrary bytes, arbitrary
//! strings and arbitrary JSON never panic — each reader answers Ok or Err — and what a reader accepts is consistent
//! (an IDX file's pixels fill its header's shape, a safetensors tensor reads back with its header's shape, a PNG
//! decodes to its header's size).
//!
//! Each property runs [`CASES`]-scaled counts of cases (the number beside each `cases(..)`), from a fixed seed so a
//! failure reproduces; set PROPTEST_RNG_SEED to explore other cases. Random bytes rarely get past a format's first
//! check, so most properties build structured inputs (a valid header with arbitrary fields, a PNG with valid CRCs
//! and arbitrary IHDR values) and mutate them.
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use scratch_diffusion::data::{mnist, png};
use scratch_diffusion::sd::safetensors::SafetensorsFile;
use scratch_diffusion::text::bpe::Bpe;
use serde_json::Value;
use std::io::Write;
use std::path::Path;

/// A config with `n` cases, a fixed seed (or PROPTEST_RNG_SEED's) and no regression files written into the tree.
fn cases(n: u32) -> Config {
    let seed = std::env::var("PROPTEST_RNG_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(17);
    Config { cases: n, rng_seed: RngSeed::Fixed(seed), failure_persistence: None, ..Config::default() }
}

fn big_endian(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// A dimension: mostly small, sometimes anything a u32 can hold (products that overflow 64 bits included).
fn dim() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..6, 1 => any::<u32>(), 1 => Just(1 << 21), 1 => Just(1 << 22), 1 => Just(u32::MAX)]
}

// ------------------------------------------------------------------------------------------------------------ IDX

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn idx_parsers_never_panic_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..64)) {
        let _ = mnist::parse_idx_images(&bytes, Path::new("x.gz"));
        let _ = mnist::parse_idx_labels(&bytes, Path::new("x.gz"));
        let _ = mnist::read_idx(&bytes[..], Path::new("x.gz"), mnist::IMAGES_MAGIC);
        let _ = mnist::read_idx(&bytes[..], Path::new("x.gz"), mnist::LABELS_MAGIC);
    }

    #[test]
    fn idx_images_accepted_fill_their_header(n in dim(), rows in dim(), cols in dim(), extra in 0usize..80) {
        let mut bytes = big_endian(&[mnist::IMAGES_MAGIC, n, rows, cols]);
        bytes.extend((0..extra).map(|i| i as u8));
        if let Ok((pixels, n2, r2, c2)) = mnist::parse_idx_images(&bytes, Path::new("x.gz")) {
            prop_assert_eq!((n2, r2, c2), (n as usize, rows as usize, cols as usize));
            prop_assert_eq!(pixels.len() as u128, n as u128 * rows as u128 * cols as u128);
        }
        if let Ok(read) = mnist::read_idx(&bytes[..], Path::new("x.gz"), mnist::IMAGES_MAGIC) {
            prop_assert!(read.len() <= bytes.len());
        }
    }

    #[test]
    fn idx_labels_accepted_fill_their_header(n in dim(), data in vec(any::<u8>(), 0..40)) {
        let mut bytes = big_endian(&[mnist::LABELS_MAGIC, n]);
        bytes.extend(&data);
        if let Ok(labels) = mnist::parse_idx_labels(&bytes, Path::new("x.gz")) {
            prop_assert_eq!(labels.len(), n as usize);
            prop_assert!(labels.iter().all(|&l| l <= 9));
        }
    }
}

// ---------------------------------------------------------------------------------------------------- safetensors

/// One header entry, well-formed or not: any dtype name, shapes with huge and negative dimensions, any offsets.
fn entry() -> impl Strategy<Value = Value> {
    let dtype = prop_oneof![
        Just("F32".to_string()),
        Just("F16".to_string()),
        Just("BF16".to_string()),
        Just("I64".to_string()),
        Just("U8".to_string()),
        "[A-Z0-9]{0,4}",
    ];
    let d =
        prop_oneof![4 => 0i64..5, 1 => any::<i64>(), 1 => Just(1i64 << 62), 1 => Just(1i64 << 32), 1 => Just(-1i64)];
    let begin = prop_oneof![4 => 0u64..80, 1 => any::<u64>()];
    let length = prop_oneof![2 => Just(0u64), 4 => 0u64..80, 1 => any::<u64>()];
    let field = prop_oneof![8 => Just(None), 1 => json().prop_map(Some)];
    (dtype, vec(d, 0..4), begin, length, field).prop_map(|(dtype, shape, begin, length, junk)| {
        let end = begin.saturating_add(length);
        let mut e = serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]});
        if let Some(junk) = junk {
            e["shape"] = junk; // sometimes a shape that is not a list of numbers
        }
        e
    })
}

fn safetensors_file(entries: &std::collections::BTreeMap<String, Value>, data: usize, slack: i64) -> Vec<u8> {
    let header = serde_json::to_vec(entries).unwrap();
    let len = (header.len() as i64 + slack).max(0) as u64; // slack ≠ 0: a length that disagrees with the header
    let mut file = len.to_le_bytes().to_vec();
    file.extend(header);
    file.extend((0..data).map(|i| i as u8));
    file
}

proptest! {
    #![proptest_config(cases(1500))]

    #[test]
    fn safetensors_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..200), as_header in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let file = if as_header { [(bytes.len() as u64).to_le_bytes().to_vec(), bytes].concat() } else { bytes };
        std::fs::write(&path, file).unwrap();
        if let Ok(mut f) = SafetensorsFile::open(&path) {
            let names: Vec<String> = f.names().map(str::to_string).collect();
            for name in names {
                let _ = f.tensor(&name);
            }
        }
    }

    #[test]
    fn safetensors_tensors_accepted_read_back_with_their_shape(
        entries in btree_map("[a-c]{1,2}", entry(), 0..4),
        data in 0usize..120,
        slack in prop_oneof![8 => Just(0i64), 1 => -3i64..3],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        std::fs::write(&path, safetensors_file(&entries, data, slack)).unwrap();
        if let Ok(mut f) = SafetensorsFile::open(&path) {
            let names: Vec<String> = f.names().map(str::to_string).collect();
            for name in names {
                let e = f.entry(&name).unwrap().clone();
                let numel: u128 = e.shape.iter().map(|&d| d as u128).product();
                prop_assert_eq!(numel * e.kind.elt_size_in_bytes() as u128, (e.end - e.begin) as u128, "{}", name);
                let t = f.tensor(&name);
                prop_assert!(t.is_ok(), "{:#}", t.unwrap_err());
                prop_assert_eq!(t.unwrap().size(), e.shape);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------------------ PNG

/// [PNG] 5.3: length, type, data, CRC-32 of type and data.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    [&(data.len() as u32).to_be_bytes()[..], kind, data, &crc.sum().to_be_bytes()].concat()
}

fn zlib(raw: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(raw).unwrap();
    z.finish().unwrap()
}

/// A PNG with valid CRCs and arbitrary IHDR fields, palette, transparency and image data.
fn png_file() -> impl Strategy<Value = Vec<u8>> {
    let side = prop_oneof![6 => 1u32..9, 1 => Just(0u32), 1 => any::<u32>(), 1 => Just(1 << 31)];
    let depth = prop_oneof![Just(1u8), Just(2), Just(4), Just(8), Just(16), any::<u8>()];
    let colour = prop_oneof![Just(0u8), Just(2), Just(3), Just(4), Just(6), any::<u8>()];
    let optional = || prop_oneof![Just(None), vec(any::<u8>(), 0..40).prop_map(Some)];
    (side.clone(), side, depth, colour, 0u8..3, optional(), optional(), vec(any::<u8>(), 0..700), any::<bool>())
        .prop_map(|(w, h, depth, colour, interlace, plte, trns, raw, compress)| {
            let mut ihdr = [&w.to_be_bytes()[..], &h.to_be_bytes()[..]].concat();
            ihdr.extend([depth, colour, 0, 0, interlace]);
            let mut file = b"\x89PNG\r\n\x1a\n".to_vec();
            file.extend(chunk(b"IHDR", &ihdr));
            if let Some(p) = plte {
                file.extend(chunk(b"PLTE", &p));
            }
            if let Some(t) = trns {
                file.extend(chunk(b"tRNS", &t));
            }
            file.extend(chunk(b"IDAT", &if compress { zlib(&raw) } else { raw }));
            file.extend(chunk(b"IEND", &[]));
            file
        })
}

proptest! {
    #![proptest_config(cases(1500))]

    #[test]
    fn png_reader_never_panics_and_reads_its_header_size(file in png_file(), flip in any::<Option<(usize, u8)>>()) {
        let mut file = file;
        if let Some((at, byte)) = flip {
            let at = at % file.len();
            file[at] = byte; // one damaged byte anywhere (usually caught by a CRC)
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        std::fs::write(&path, &file).unwrap();
        if let Ok(rgb) = png::read_png_rgb(&path) {
            let (w, h) = (u32::from_be_bytes(file[16..20].try_into().unwrap()), u32::from_be_bytes(file[20..24].try_into().unwrap()));
            prop_assert_eq!(rgb.size(), [1, 3, h as i64, w as i64]);
        }
        let _ = png::read_png_gray(&path);
        let _ = png::read_png_text(&path, "parameters");
    }

    #[test]
    fn png_reader_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..100), signed in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let file = if signed { [&b"\x89PNG\r\n\x1a\n"[..], &bytes].concat() } else { bytes };
        std::fs::write(&path, file).unwrap();
        let _ = png::read_png_rgb(&path);
    }
}

// ------------------------------------------------------------------------------------------------------------ BPE

fn small_bpe() -> &'static Bpe {
    static BPE: std::sync::OnceLock<Bpe> = std::sync::OnceLock::new();
    BPE.get_or_init(|| {
        let corpus = ["a photo of a cat", "the digit 7 in red", "ein Kätzchen 猫 🐈", "it's 42!"];
        Bpe::train(&corpus.iter().map(|s| s.repeat(3)).collect::<Vec<_>>(), 60)
    })
}

/// A token for a merges file: byte symbols, word ends, specials, or anything.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        "[abcĠ]{1,3}(</w>)?",
        Just("</w>".to_string()),
        Just("<|endoftext|>".to_string()),
        Just("<|startoftext|>".to_string()),
        "\\PC{1,4}",
    ]
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn bpe_encodes_and_decodes_any_string(text in any::<String>(), ids in vec(any::<i64>(), 0..8)) {
        let bpe = small_bpe();
        let encoded = bpe.encode(&text);
        prop_assert!(encoded.iter().all(|&id| bpe.token(id).is_some()));
        let _ = bpe.decode(&encoded);
        let _ = bpe.decode(&ids);
        let padded = bpe.encode_padded(&text, 77);
        prop_assert_eq!(padded.ids.len(), 77);
        let _ = bpe.coverage(&text, &Default::default());
    }

    #[test]
    fn bpe_merges_files_load_or_fail_cleanly(text in any::<String>(), limit in any::<Option<u8>>()) {
        let _ = Bpe::from_merges_text(&text, limit.map(usize::from));
    }

    #[test]
    fn bpe_from_arbitrary_merges_encodes_any_string(
        merges in vec((token(), token(), prop_oneof![Just(" "), Just("  "), Just("\t"), Just("")]), 0..12),
        text in "[abc !'<|>/w猫]{0,24}",
    ) {
        let lines: Vec<String> = merges.iter().map(|(a, b, sep)| format!("{a}{sep}{b}")).collect();
        let file = format!("#version: 0.2\n{}\n", lines.join("\n"));
        if let Ok(bpe) = Bpe::from_merges_text(&file, None) {
            let ids = bpe.encode(&text);
            prop_assert!(ids.iter().all(|&id| bpe.token(id).is_some()));
            let _ = bpe.decode(&ids);
            let _ = bpe.encode_padded(&text, 2);
        }
    }
}

// -------------------------------------------------------------------------------------------------------- configs

/// Arbitrary JSON: scalars of every kind, nested arrays and objects.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN and infinities become null
        "\\PC{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map("[a-z_]{1,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `valid` with each chosen field replaced by arbitrary JSON (or removed), serialised to bytes.
fn mutated(valid: Value) -> impl Strategy<Value = Vec<u8>> {
    let keys: Vec<String> = valid.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let n = keys.len().max(1);
    vec((0..n, prop_oneof![1 => Just(None), 6 => json().prop_map(Some)]), 1..4).prop_map(move |changes| {
        let mut v = valid.clone();
        for (i, new) in changes {
            if let (Some(obj), Some(key)) = (v.as_object_mut(), keys.get(i)) {
                match new {
                    Some(new) => obj.insert(key.clone(), new),
                    None => obj.remove(key),
                };
            }
        }
        serde_json::to_vec(&v).unwrap()
    })
}

/// Parses `bytes` as every config type the crate reads from a file; none may panic.
fn parse_all(bytes: &[u8]) {
    use scratch_diffusion::{nn, pipelines, sd, train};
    let _ = serde_json::from_slice::<nn::unet::UNetConfig>(bytes);
    let _ = serde_json::from_slice::<nn::vae::VaeConfig>(bytes);
    let _ = serde_json::from_slice::<nn::text_encoder::TextEncoderConfig>(bytes);
    let _ = serde_json::from_slice::<nn::clip::MiniClipConfig>(bytes);
    let _ = serde_json::from_slice::<nn::classifier::ClassifierConfig>(bytes);
    let _ = serde_json::from_slice::<sd::weights::SdConfig>(bytes);
    let _ = serde_json::from_slice::<train::trainer::TrainerConfig>(bytes);
    let _ = serde_json::from_slice::<pipelines::text_to_image::PipelineConfig>(bytes);
    let _ = serde_json::from_slice::<pipelines::latent_diffusion::LatentPipelineConfig>(bytes);
}

fn valid_configs() -> Vec<Value> {
    use scratch_diffusion::{nn, sd, train};
    vec![
        serde_json::to_value(nn::unet::UNetConfig::mnist()).unwrap(),
        serde_json::to_value(nn::vae::VaeConfig::mnist()).unwrap(),
        serde_json::to_value(nn::text_encoder::TextEncoderConfig::tiny()).unwrap(),
        serde_json::to_value(sd::weights::SdConfig::tiny()).unwrap(),
        serde_json::to_value(train::trainer::TrainerConfig::default()).unwrap(),
    ]
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn configs_parse_arbitrary_bytes_without_panic(bytes in vec(any::<u8>(), 0..120)) {
        parse_all(&bytes);
    }

    #[test]
    fn configs_parse_arbitrary_json_without_panic(v in json()) {
        parse_all(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn configs_parse_mutated_valid_configs_without_panic(
        bytes in proptest::sample::select(valid_configs()).prop_flat_map(mutated)
    ) {
        parse_all(&bytes);
    }
}
