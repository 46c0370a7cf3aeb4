//! Reading a PNG a user gives (img2img and inpainting inputs) as one grayscale image in [0, 1]. Any colour type and
//! bit depth the `png` crate decodes is accepted: palette, low and 16-bit depths are expanded to 8 bits; colour is
//! turned to luma with ITU-R BT.601's weights (0.299 R + 0.587 G + 0.114 B); transparency is composited over black,
//! MNIST's background. Writing grayscale is [`crate::data::png::write_png_gray`]; RGB with a text chunk
//! (Stable Diffusion's `parameters`) is [`write_png_rgb_with_text`].
use anyhow::{bail, ensure, Context, Result};
use std::io::Write;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The image at `path` as (1, 1, H, W) f32 in [0, 1]; errors name the file and what is wrong with it.
pub fn read_png_gray(path: &Path) -> Result<Tensor> {
    Ok(luma(&read_png_rgb(path)?))
}

/// RGB images (B, 3, H, W) -> their luma (B, 1, H, W), ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B (OpenCV's RGB2GRAY).
pub fn luma(rgb: &Tensor) -> Tensor {
    let weights = Tensor::from_slice(&[0.299f32, 0.587, 0.114]).view([1, 3, 1, 1]).to_device(rgb.device());
    (rgb.to_kind(tch::Kind::Float) * weights).sum_dim_intlist([1i64].as_slice(), true, tch::Kind::Float)
}

/// The largest PNG read, per side: SD 1.5 draws 512x512; an 8192x8192 image is 768 MiB as f32 RGB.
const MAX_SIDE: u64 = 8192;
const MAX_PIXELS: u64 = MAX_SIDE * MAX_SIDE;

/// The image at `path` as (1, 3, H, W) f32 RGB in [0, 1] (grayscale repeated; alpha composited over black).
pub fn read_png_rgb(path: &Path) -> Result<Tensor> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}: check the path", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().with_context(|| format!("{} is not a readable PNG file", path.display()))?;
    let (width, height) = reader.info().size();
    // checked before the decode buffer is allocated: a 20-byte header may claim 2^31 x 2^31 pixels
    ensure!(
        width as u64 * height as u64 <= MAX_PIXELS,
        "{} is {width}x{height} pixels, more than the {MAX_SIDE}x{MAX_SIDE} this reader accepts: resize it first",
        path.display()
    );
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).with_context(|| format!("{} is a damaged PNG file", path.display()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let bytes = &buf[..info.buffer_size()];
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => bail!("{}: unsupported PNG colour type {other:?}", path.display()),
    };
    let stride = info.line_size;
    let mut rgb = Vec::with_capacity(3 * w * h);
    for row in 0..h {
        let line = &bytes[row * stride..row * stride + w * channels];
        for px in line.chunks_exact(channels) {
            let f = |i: usize| px[i] as f32 / 255.0;
            let (colour, alpha) = match channels {
                1 => ([f(0); 3], 1.0),
                2 => ([f(0); 3], f(1)),
                3 => ([f(0), f(1), f(2)], 1.0),
                _ => ([f(0), f(1), f(2)], f(3)),
            };
            rgb.extend(colour.map(|c| c * alpha));
        }
    }
    // (H, W, 3) -> (1, 3, H, W)
    Ok(Tensor::from_slice(&rgb).view([h as i64, w as i64, 3]).permute([2, 0, 1]).unsqueeze(0).contiguous())
}

/// Writes `image` (3, H, W) in [0, 1] as an 8-bit RGB PNG with one text chunk `key` = `text` (tEXt when the text is
/// Latin-1, as PNG requires, else iTXt in UTF-8 — what PIL's `PngInfo.add_text` does), atomically.
pub fn write_png_rgb_with_text(path: &Path, image: &Tensor, key: &str, text: &str) -> Result<()> {
    let (c, h, w) = image.size3().context("an RGB image (3, H, W)")?;
    anyhow::ensure!(c == 3, "an RGB image has 3 channels, not {c}");
    // (3, H, W) -> (H, W, 3) bytes
    let bytes = (image.clamp(0.0, 1.0) * 255.0).round().to_kind(tch::Kind::Uint8).permute([1, 2, 0]).contiguous();
    let data = Vec::<u8>::try_from(bytes.flatten(0, -1))?;
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, w as u32, h as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if text.chars().all(|ch| (ch as u32) < 256) {
            encoder.add_text_chunk(key.to_string(), text.to_string())?;
        } else {
            encoder.add_itxt_chunk(key.to_string(), text.to_string())?;
        }
        encoder.write_header()?.write_image_data(&data)?;
    }
    crate::cli::write_atomic(path, &out)
}

/// The text of chunk `key` (tEXt, zTXt or iTXt) of the PNG at `path`, if it has one.
pub fn read_png_text(path: &Path, key: &str) -> Result<Option<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}: check the path", path.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{} is not a readable PNG file", path.display()))?;
    let info = reader.info();
    let latin1 = info.uncompressed_latin1_text.iter().find(|t| t.keyword == key).map(|t| t.text.clone());
    let utf8 = info.utf8_text.iter().find(|t| t.keyword == key).and_then(|t| t.get_text().ok());
    Ok(latin1.or(utf8))
}

// ANCHOR: png
/// Writes `image` ((H, W), (1, H, W) or (1, 1, H, W), values in [0, 1]) as an 8-bit grayscale PNG, atomically.
pub fn write_png_gray(path: &Path, image: &Tensor) -> Result<()> {
    let size = image.size();
    ensure!(size.len() >= 2 && size[..size.len() - 2].iter().all(|&d| d == 1), "one image (H, W), got {size:?}");
    let (h, w) = (size[size.len() - 2] as usize, size[size.len() - 1] as usize);
    let scaled = (image.to_kind(Kind::Float).clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8);
    let pixels = Vec::<u8>::try_from(scaled.to_device(Device::Cpu).flatten(0, -1)).context("image to bytes")?;
    // [PNG] 9.2: each scanline starts with its filter type, 0 = None
    let raw: Vec<u8> = pixels.chunks(w).flat_map(|row| std::iter::once(0).chain(row.iter().copied())).collect();
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw)?;
    // [PNG] 11.2.2 IHDR: width, height, bit depth 8, colour type 0 (greyscale), compression, filter, interlace 0
    let mut ihdr = Vec::from((w as u32).to_be_bytes());
    ihdr.extend((h as u32).to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec(); // [PNG] 5.2 signature
    for (kind, data) in [(b"IHDR", ihdr), (b"IDAT", z.finish()?), (b"IEND", vec![])] {
        // [PNG] 5.3: length, type, data, CRC-32 of type and data
        png.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(&data);
        png.extend(kind.iter().chain(&data));
        png.extend(crc.sum().to_be_bytes());
    }
    crate::cli::write_atomic(path, &png)
}
// ANCHOR_END: png

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_written_png_reads_back_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let image = Tensor::from_slice(&[0.0f32, 0.5, 1.0, 0.25, 0.75, 0.1]).view([1, 1, 2, 3]);
        write_png_gray(&path, &image).unwrap();
        let back = read_png_gray(&path).unwrap();
        assert_eq!(back.size(), [1, 1, 2, 3]);
        assert!((back - image).abs().max().double_value(&[]) <= 0.5 / 255.0 + 1e-6, "8-bit rounding only");
        let missing = format!("{:#}", read_png_gray(&dir.path().join("nope.png")).unwrap_err());
        assert!(missing.contains("nope.png") && missing.contains("cannot open"), "{missing}");
        // an RGBA file: luma with BT.601's weights, composited over black
        let rgba = dir.path().join("rgba.png");
        let mut encoder = png::Encoder::new(std::fs::File::create(&rgba).unwrap(), 2, 1);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header().unwrap().write_image_data(&[255, 0, 0, 255, 255, 255, 255, 51]).unwrap();
        let v = Vec::<f32>::try_from(read_png_gray(&rgba).unwrap().flatten(0, -1)).unwrap();
        assert!((v[0] - 0.299).abs() < 1e-6 && (v[1] - 0.2).abs() < 1e-6, "{v:?}");
        // RGB with the generation parameters in a text chunk, Latin-1 and not
        let rgb = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.5, 0.0, 1.0]).view([3, 1, 2]);
        for text in ["a cat\nSteps: 20, Seed: 1", "ein Kätzchen 猫\nSteps: 4"] {
            let p = dir.path().join("rgb.png");
            write_png_rgb_with_text(&p, &rgb, "parameters", text).unwrap();
            assert_eq!(read_png_text(&p, "parameters").unwrap().as_deref(), Some(text));
            assert_eq!(read_png_text(&p, "other").unwrap(), None);
            assert!(
                (read_png_rgb(&p).unwrap().squeeze_dim(0) - &rgb).abs().max().double_value(&[]) < 0.5 / 255.0 + 1e-6
            );
        }
        std::fs::write(dir.path().join("bad.png"), b"not a png").unwrap();
        let bad = format!("{:#}", read_png_gray(&dir.path().join("bad.png")).unwrap_err());
        assert!(bad.contains("bad.png") && bad.contains("not a readable PNG"), "{bad}");
    }

    #[test]
    fn a_header_claiming_a_huge_image_is_refused_before_allocating() {
        // tests/properties.rs found a small PNG whose IHDR claimed about 2^32 pixels that aborted the process
        // ("memory allocation of 51539607552 bytes failed", 48 GiB: 2^32 pixels as f32 RGB). The png crate's own
        // limits are per row, so a tall image passes them; the size is now checked before any buffer is allocated.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        let chunk = |kind: &[u8], data: &[u8]| {
            let mut crc = flate2::Crc::new();
            crc.update(kind);
            crc.update(data);
            [&(data.len() as u32).to_be_bytes()[..], kind, data, &crc.sum().to_be_bytes()].concat()
        };
        // IHDR: 65536 x 65536, 1-bit greyscale (each row 8 kB, under the png crate's limits); one empty IDAT, IEND
        let ihdr = [&(1u32 << 16).to_be_bytes()[..], &(1u32 << 16).to_be_bytes(), &[1, 0, 0, 0, 0]].concat();
        let file =
            [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &ihdr), &chunk(b"IDAT", &[]), &chunk(b"IEND", &[])].concat();
        std::fs::write(&path, file).unwrap();
        let e = format!("{:#}", read_png_rgb(&path).unwrap_err());
        assert!(e.contains("huge.png") && e.contains("65536x65536 pixels") && e.contains("resize"), "{e}");
    }

    #[test]
    fn png_files_hold_the_pixels_with_valid_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let image = Tensor::from_slice(&[0.0f32, 0.5, 1.0, 2.0, 0.25, -1.0]).view([1, 1, 2, 3]);
        write_png_gray(&path, &image).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(
            (&png[16..20], &png[20..24], &png[24..29]),
            (&[0, 0, 0, 3][..], &[0, 0, 0, 2][..], &[8, 0, 0, 0, 0][..])
        );
        // IEND is the last chunk, with its well-known CRC AE 42 60 82
        assert_eq!(&png[png.len() - 12..], &[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]);
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&png[41..41 + idat_len]).read_to_end(&mut raw).unwrap();
        assert_eq!(raw, [0, 0, 128, 255, 0, 255, 64, 0]); // per row: filter 0, then the clamped, rounded pixels
        assert!(write_png_gray(&path, &Tensor::zeros([2, 1, 2, 2], tch::kind::FLOAT_CPU)).is_err());
    }
}
