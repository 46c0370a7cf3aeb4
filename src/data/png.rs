//! Reading a PNG a user gives (img2img and inpainting inputs) as one grayscale image in [0, 1]. Any colour type and
//! bit depth the `png` crate decodes is accepted: palette, low and 16-bit depths are expanded to 8 bits; colour is
//! turned to luma with ITU-R BT.601's weights (0.299 R + 0.587 G + 0.114 B); transparency is composited over black,
//! MNIST's background. Writing is [`crate::train::text_to_image::write_png_gray`].
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::Tensor;

/// The image at `path` as (1, 1, H, W) f32 in [0, 1]; errors name the file and what is wrong with it.
pub fn read_png_gray(path: &Path) -> Result<Tensor> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}: check the path", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().with_context(|| format!("{} is not a readable PNG file", path.display()))?;
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
    let mut gray = Vec::with_capacity(w * h);
    for row in 0..h {
        let line = &bytes[row * stride..row * stride + w * channels];
        for px in line.chunks_exact(channels) {
            let f = |i: usize| px[i] as f32 / 255.0;
            let (luma, alpha) = match channels {
                1 => (f(0), 1.0),
                2 => (f(0), f(1)),
                3 => (0.299 * f(0) + 0.587 * f(1) + 0.114 * f(2), 1.0),
                _ => (0.299 * f(0) + 0.587 * f(1) + 0.114 * f(2), f(3)),
            };
            gray.push(luma * alpha);
        }
    }
    Ok(Tensor::from_slice(&gray).view([1, 1, h as i64, w as i64]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::text_to_image::write_png_gray;

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
        std::fs::write(dir.path().join("bad.png"), b"not a png").unwrap();
        let bad = format!("{:#}", read_png_gray(&dir.path().join("bad.png")).unwrap_err());
        assert!(bad.contains("bad.png") && bad.contains("not a readable PNG"), "{bad}");
    }
}
