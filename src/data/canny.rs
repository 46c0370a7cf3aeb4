//! The Canny edge detector on 8-bit images, as OpenCV's `cv2.Canny(image, low, high)` computes it (3×3 Sobel
//! gradients with replicated borders, the L1 magnitude |g_x| + |g_y|, non-maximum suppression along the gradient
//! direction quantised to four sectors, a double threshold and hysteresis with 8-connectivity) — what ControlNet's
//! canny annotator calls with low = 100, high = 200 — with an optional Gaussian blur first (Canny's own first stage;
//! the annotator leaves it out).
//!
//! [Canny] J. Canny 1986, "A Computational Approach to Edge Detection", IEEE TPAMI 8(6), 679–698: smoothing,
//! gradient, non-maximum suppression, hysteresis thresholding (sec. V–VI).
//! [OpenCV] opencv `modules/imgproc/src/canny.cpp` (`Canny`, its `canny` loop and `finalPass`): the sector test
//! tan 22.5° and tan 67.5°, "m > a and m ≥ b" along the horizontal and vertical sectors, strict on the diagonals.
//! [ControlNet] Zhang, Rao, Agrawala 2023, arXiv:2302.05543, sec. 4 (the Canny hints, thresholds 100/200 by default).
//! Notation (code -> paper): gx, gy -> the Sobel derivatives, mag -> |∇I| (L1), low/high -> the two thresholds.

/// How [`canny`] runs: the two thresholds on the L1 gradient magnitude (of Sobel derivatives of 0–255 pixels) and the
/// standard deviation of a Gaussian blur before it (0: none, as OpenCV's `Canny` and ControlNet's annotator).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CannyConfig {
    pub low: f64,
    pub high: f64,
    pub blur_sigma: f64,
}

/// ControlNet's canny annotator: `cv2.Canny(img, 100, 200)`.
pub const ANNOTATOR: CannyConfig = CannyConfig { low: 100.0, high: 200.0, blur_sigma: 0.0 };

/// An 8-bit grey image, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Gray {
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
}

impl Gray {
    /// An all-black image.
    pub fn black(height: usize, width: usize) -> Self {
        Self { height, width, pixels: vec![0; height * width] }
    }

    /// The pixel at (row, column), the borders replicated outside the image.
    fn at(&self, y: isize, x: isize) -> f64 {
        let y = y.clamp(0, self.height as isize - 1) as usize;
        let x = x.clamp(0, self.width as isize - 1) as usize;
        self.pixels[y * self.width + x] as f64
    }
}

/// Edges of `image` as 0 (none) or 255 (edge), the same size ([Canny]; [OpenCV] for the details).
pub fn canny(image: &Gray, config: &CannyConfig) -> Gray {
    let (h, w) = (image.height, image.width);
    let blurred = if config.blur_sigma > 0.0 { gaussian_blur(image, config.blur_sigma) } else { image.clone() };
    // ANCHOR: sobel
    // 3×3 Sobel with replicated borders: g_x = [−1 0 1; −2 0 2; −1 0 1] ∗ I, g_y its transpose
    let mut gx = vec![0.0; h * w];
    let mut gy = vec![0.0; h * w];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let p = |dy: isize, dx: isize| blurred.at(y + dy, x + dx);
            let i = y as usize * w + x as usize;
            gx[i] = (p(-1, 1) + 2.0 * p(0, 1) + p(1, 1)) - (p(-1, -1) + 2.0 * p(0, -1) + p(1, -1));
            gy[i] = (p(1, -1) + 2.0 * p(1, 0) + p(1, 1)) - (p(-1, -1) + 2.0 * p(-1, 0) + p(-1, 1));
        }
    }
    // OpenCV's default (L2gradient = false): |∇I| ≈ |g_x| + |g_y|
    let mag: Vec<f64> = gx.iter().zip(&gy).map(|(a, b)| a.abs() + b.abs()).collect();
    // ANCHOR_END: sobel
    let suppressed = non_maximum_suppression(&mag, &gx, &gy, (h, w));
    hysteresis(&suppressed, (h, w), config.low, config.high)
}

// ANCHOR: nms
/// Keeps the magnitude of pixels that are a maximum along their gradient direction, quantised to four sectors
/// ([OpenCV]): |g_y| < tan 22.5° |g_x| compares left and right, |g_y| > tan 67.5° |g_x| up and down, otherwise the
/// diagonal that the signs of g_x, g_y give. "m > first and m ≥ second" on the axes (so a step whose two sides have
/// the same magnitude keeps one pixel, not two), strict on the diagonals. Others get 0.
pub fn non_maximum_suppression(mag: &[f64], gx: &[f64], gy: &[f64], (h, w): (usize, usize)) -> Vec<f64> {
    let tan22 = std::f64::consts::FRAC_PI_8.tan(); // tan 22.5° = √2 − 1
    let tan67 = 1.0 / tan22;
    let m_at = |y: isize, x: isize| {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            0.0 // outside the image nothing competes
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    let mut out = vec![0.0; h * w];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            let (m, ax, ay) = (mag[i], gx[i].abs(), gy[i].abs());
            if m == 0.0 {
                continue;
            }
            let keep = if ay < tan22 * ax {
                m > m_at(y, x - 1) && m >= m_at(y, x + 1) // gradient along x: compare left, right
            } else if ay > tan67 * ax {
                m > m_at(y - 1, x) && m >= m_at(y + 1, x) // gradient along y: compare up, down
            } else {
                // the diagonal of the gradient: down-right when g_x and g_y have the same sign (y grows downwards)
                let s = if (gx[i] < 0.0) != (gy[i] < 0.0) { -1 } else { 1 };
                m > m_at(y - 1, x - s) && m > m_at(y + 1, x + s)
            };
            if keep {
                out[i] = m;
            }
        }
    }
    out
}
// ANCHOR_END: nms

// ANCHOR: hysteresis
/// The double threshold and hysteresis of [Canny] sec. VI: a pixel whose (suppressed) magnitude is above `high` is
/// an edge; one above `low` is an edge only if a chain of such pixels (8-connected) links it to one above `high`.
/// Returns 255 for edges, 0 elsewhere.
pub fn hysteresis(suppressed: &[f64], (h, w): (usize, usize), low: f64, high: f64) -> Gray {
    let mut edges = Gray::black(h, w);
    let mut stack: Vec<usize> = (0..h * w).filter(|&i| suppressed[i] > high).collect();
    for &i in &stack {
        edges.pixels[i] = 255;
    }
    while let Some(i) = stack.pop() {
        let (y, x) = ((i / w) as isize, (i % w) as isize);
        for (dy, dx) in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)] {
            let (ny, nx) = (y + dy, x + dx);
            if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if edges.pixels[j] == 0 && suppressed[j] > low {
                edges.pixels[j] = 255; // a weak pixel reached from a strong one
                stack.push(j);
            }
        }
    }
    edges
}
// ANCHOR_END: hysteresis

/// A separable Gaussian blur of standard deviation `sigma` (kernel radius ⌈3σ⌉, replicated borders), rounded back to
/// 8 bits.
pub fn gaussian_blur(image: &Gray, sigma: f64) -> Gray {
    let r = (3.0 * sigma).ceil() as isize;
    let kernel: Vec<f64> = (-r..=r).map(|k| (-((k * k) as f64) / (2.0 * sigma * sigma)).exp()).collect();
    let total: f64 = kernel.iter().sum();
    let (h, w) = (image.height, image.width);
    let pass = |src: &dyn Fn(isize, isize) -> f64, along_x: bool| -> Vec<f64> {
        let mut out = vec![0.0; h * w];
        for y in 0..h as isize {
            for x in 0..w as isize {
                let s: f64 =
                    (-r..=r).zip(&kernel).map(|(k, c)| c * if along_x { src(y, x + k) } else { src(y + k, x) }).sum();
                out[y as usize * w + x as usize] = s / total;
            }
        }
        out
    };
    let rows = pass(&|y, x| image.at(y, x), true);
    let at_rows =
        |y: isize, x: isize| rows[y.clamp(0, h as isize - 1) as usize * w + x.clamp(0, w as isize - 1) as usize];
    let both = pass(&at_rows, false);
    Gray { height: h, width: w, pixels: both.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(h: usize, w: usize, inside: impl Fn(usize, usize) -> u8) -> Gray {
        let pixels = (0..h * w).map(|i| inside(i / w, i % w)).collect();
        Gray { height: h, width: w, pixels }
    }

    fn edge_cols(e: &Gray, y: usize) -> Vec<usize> {
        (0..e.width).filter(|&x| e.pixels[y * e.width + x] == 255).collect()
    }

    fn edge_rows(e: &Gray, x: usize) -> Vec<usize> {
        (0..e.height).filter(|&y| e.pixels[y * e.width + x] == 255).collect()
    }

    /// A white square on black: a ring one pixel wide, on the dark side of the left and top steps and the bright
    /// side of the right and bottom ones (the "m > first, m ≥ second" tie-break keeps the first pixel of a tie).
    #[test]
    fn a_square_gives_a_one_pixel_ring() {
        let square = draw(20, 20, |y, x| if (5..15).contains(&y) && (5..15).contains(&x) { 255 } else { 0 });
        let e = canny(&square, &ANNOTATOR);
        for k in 6..=12 {
            assert_eq!(edge_cols(&e, k), [4, 14], "row {k}");
            assert_eq!(edge_rows(&e, k), [4, 14], "column {k}");
        }
        let n = e.pixels.iter().filter(|&&p| p == 255).count();
        assert!((36..=40).contains(&n), "{n} edge pixels for a ring of 40");
    }

    /// A disc of radius 8: every edge pixel within 1.5 px of the circle, the circle covered all round, and about
    /// one pixel per unit of circumference (2π·8 ≈ 50).
    #[test]
    fn a_disc_gives_a_thin_circle() {
        let (c, r) = (13.5, 8.0);
        let disc =
            draw(28, 28, |y, x| if ((y as f64 - c).powi(2) + (x as f64 - c).powi(2)).sqrt() <= r { 255 } else { 0 });
        let e = canny(&disc, &ANNOTATOR);
        let pts: Vec<(f64, f64)> =
            (0..28 * 28).filter(|&i| e.pixels[i] == 255).map(|i| ((i / 28) as f64, (i % 28) as f64)).collect();
        for &(y, x) in &pts {
            let d = ((y - c).powi(2) + (x - c).powi(2)).sqrt();
            assert!((d - r).abs() <= 1.5, "edge at ({y}, {x}) is {d:.2} from the centre");
        }
        for k in 0..72 {
            let a = k as f64 * std::f64::consts::TAU / 72.0;
            let (py, px) = (c + r * a.sin(), c + r * a.cos());
            let near = pts.iter().any(|&(y, x)| ((y - py).powi(2) + (x - px).powi(2)).sqrt() <= 1.5);
            assert!(near, "no edge near the circle at angle {a:.2}");
        }
        assert!((40..=70).contains(&pts.len()), "{} edge pixels", pts.len());
    }

    /// A one-pixel line has two edges, one on each side.
    #[test]
    fn a_line_gives_an_edge_on_each_side() {
        let line = draw(20, 28, |y, x| if y == 10 && (3..25).contains(&x) { 255 } else { 0 });
        let e = canny(&line, &ANNOTATOR);
        for x in 6..=21 {
            assert_eq!(edge_rows(&e, x), [9, 11], "column {x}");
        }
    }

    /// Hysteresis as OpenCV's: a step of contrast 30 (magnitude 120, 180 at a corner: between 100 and 200) survives
    /// where it continues a step of contrast 255 (magnitude 1020) and vanishes where it stands alone; raising `low`
    /// above 120 removes the continuation too, and `high` above the strong step's 1530 (its corners) removes
    /// everything.
    #[test]
    fn weak_edges_survive_only_when_linked_to_strong_ones() {
        // columns 10–15: a block of 255 in rows 2..9 continued by one of 30 in rows 9..18; columns 20–25: a lone 30
        let img = draw(20, 28, |y, x| match (y, x) {
            (2..=8, 10..=15) => 255,
            (9..=17, 10..=15) => 30,
            (2..=17, 20..=25) => 30,
            _ => 0,
        });
        let e = canny(&img, &ANNOTATOR);
        for y in 11..=15 {
            assert_eq!(
                edge_cols(&e, y),
                [9, 15],
                "row {y}: the weak steps linked to strong ones, not the lone block's"
            );
        }
        let stricter = canny(&img, &CannyConfig { low: 130.0, ..ANNOTATOR });
        for y in 11..=15 {
            assert!(edge_cols(&stricter, y).is_empty(), "row {y}: low = 130 drops the weak continuation");
        }
        assert!(canny(&img, &CannyConfig { high: 1600.0, ..ANNOTATOR }).pixels.iter().all(|&p| p == 0));
    }

    #[test]
    fn the_blur_keeps_a_constant_image_and_smooths_a_step() {
        let flat = draw(9, 9, |_, _| 77);
        assert_eq!(gaussian_blur(&flat, 1.0), flat);
        let step = draw(9, 9, |_, x| if x >= 4 { 255 } else { 0 });
        let b = gaussian_blur(&step, 1.0);
        let row: Vec<u8> = b.pixels[36..45].to_vec();
        assert!(row.windows(2).all(|p| p[0] <= p[1]) && row[0] == 0 && row[8] == 255 && row[3] > 0 && row[4] < 255);
    }
}
