//! Figures, written as PNG with plotters and an embedded font (DejaVu Sans, data/fonts), so no system fonts are
//! needed: loss curves on a log scale, multi-panel 2-D plots (density heat maps, vector fields, scatter, paths),
//! grouped bar charts, and image grids with titles.
use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use tch::{Kind, Tensor};

static FONT: &[u8] = include_bytes!("../data/fonts/DejaVuSans.ttf");
const FONT_NAME: &str = "sans-serif";

fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT)
            .map_err(|_| ())
            .expect("the embedded DejaVu Sans font parses");
    });
}

fn draw_err<E: std::fmt::Debug>(path: &Path) -> impl FnOnce(E) -> anyhow::Error + '_ {
    move |e| anyhow!("cannot draw {}: {e:?}", path.display())
}

/// Colours for series and classes (a colour-blind-friendly palette, Wong 2011, Nature Methods 8:441).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
];

/// The viridis colour map, linearly interpolated between 6 of its stops; `v` in [0, 1].
pub fn viridis(v: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 6] =
        [(68., 1., 84.), (65., 68., 135.), (42., 120., 142.), (34., 168., 132.), (122., 209., 81.), (253., 231., 37.)];
    let v = if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 } * (STOPS.len() - 1) as f64;
    let i = (v.floor() as usize).min(STOPS.len() - 2);
    let f = v - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Something drawn in a 2-D panel.
#[derive(Clone)]
pub enum Layer {
    /// An n×n grid of values over the panel's box (row-major, row 0 at the bottom), coloured with viridis between
    /// `range` (values outside are clamped).
    Heatmap { values: Vec<f64>, n: usize, range: (f64, f64) },
    /// Arrows at `points` along `vectors`. Lengths are scaled per panel so the 90th-percentile arrow spans `spacing`
    /// and longer ones are capped there: directions stay readable where magnitudes differ by orders of magnitude.
    Quiver { points: Vec<[f64; 2]>, vectors: Vec<[f64; 2]>, spacing: f64, color: RGBColor },
    /// Dots.
    Scatter { points: Vec<[f64; 2]>, color: RGBAColor, size: u32 },
    /// Polylines (trajectories).
    Paths { paths: Vec<Vec<[f64; 2]>>, color: RGBAColor },
}

/// One 2-D panel: a title, a square box [lo, hi]² and its layers.
pub struct Panel {
    pub title: String,
    pub bounds: (f64, f64),
    pub layers: Vec<Layer>,
}

/// Draws panels in a grid of `cols` columns, each `size` pixels square, under a figure title.
pub fn panels(path: &Path, title: &str, cols: usize, size: u32, panels: &[Panel]) -> Result<()> {
    ensure_font();
    let rows = panels.len().div_ceil(cols.max(1));
    let (w, h) = (cols as u32 * size, rows as u32 * size + 40);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let (top, body) = root.split_vertically(40);
    top.titled(title, (FONT_NAME, 22)).map_err(draw_err(path))?;
    for (area, panel) in body.split_evenly((rows, cols)).iter().zip(panels) {
        draw_panel(area, panel).map_err(draw_err(path))?;
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}

fn draw_panel(area: &DrawingArea<BitMapBackend, Shift>, p: &Panel) -> Result<(), Box<dyn std::error::Error>> {
    let (lo, hi) = p.bounds;
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT_NAME, 16))
        .margin(6)
        .x_label_area_size(22)
        .y_label_area_size(30)
        .build_cartesian_2d(lo..hi, lo..hi)?;
    chart.configure_mesh().disable_mesh().x_labels(5).y_labels(5).label_style((FONT_NAME, 11)).draw()?;
    for layer in &p.layers {
        match layer {
            Layer::Heatmap { values, n, range } => {
                let cell = (hi - lo) / *n as f64;
                let span = (range.1 - range.0).max(1e-300);
                chart.draw_series(values.iter().enumerate().map(|(k, v)| {
                    let (i, j) = ((k % n) as f64, (k / n) as f64);
                    let c = viridis((v - range.0) / span);
                    Rectangle::new(
                        [(lo + i * cell, lo + j * cell), (lo + (i + 1.0) * cell, lo + (j + 1.0) * cell)],
                        c.filled(),
                    )
                }))?;
            }
            Layer::Quiver { points, vectors, spacing, color } => {
                let mut mags: Vec<f64> = vectors.iter().map(|v| v[0].hypot(v[1])).filter(|m| m.is_finite()).collect();
                mags.sort_by(|a, b| a.total_cmp(b));
                let q90 = mags.get(mags.len() * 9 / 10).copied().unwrap_or(1.0).max(1e-12);
                for (pt, v) in points.iter().zip(vectors) {
                    let m = v[0].hypot(v[1]);
                    if !m.is_finite() || m < 1e-12 {
                        continue;
                    }
                    let len = spacing * (m / q90).min(1.0);
                    let (dx, dy) = (v[0] / m * len, v[1] / m * len);
                    let tip = (pt[0] + dx, pt[1] + dy);
                    // arrow head: two short strokes at ±25° from the reversed direction
                    let head = |ang: f64| {
                        let (c, s) = (ang.cos(), ang.sin());
                        (tip.0 - 0.35 * (dx * c - dy * s), tip.1 - 0.35 * (dx * s + dy * c))
                    };
                    let style = ShapeStyle::from(color).stroke_width(1);
                    chart.draw_series(std::iter::once(PathElement::new(vec![(pt[0], pt[1]), tip], style)))?;
                    chart.draw_series(std::iter::once(PathElement::new(vec![head(0.44), tip, head(-0.44)], style)))?;
                }
            }
            Layer::Scatter { points, color, size } => {
                chart.draw_series(
                    points
                        .iter()
                        .filter(|p| p[0] >= lo && p[0] <= hi && p[1] >= lo && p[1] <= hi)
                        .map(|p| Circle::new((p[0], p[1]), *size, color.filled())),
                )?;
            }
            Layer::Paths { paths, color } => {
                for path in paths {
                    let pts = path.iter().map(|p| (p[0].clamp(lo, hi), p[1].clamp(lo, hi)));
                    chart.draw_series(std::iter::once(PathElement::new(
                        pts.collect::<Vec<_>>(),
                        color.stroke_width(1),
                    )))?;
                }
            }
        }
    }
    Ok(())
}

/// Loss curves on a log y-axis: each series drawn raw (faint) and as an exponential moving average (solid).
pub fn loss_curve(path: &Path, title: &str, series: &[(&str, &[f64])]) -> Result<()> {
    ensure_font();
    let n = series.iter().map(|s| s.1.len()).max().unwrap_or(1).max(2);
    let finite = series.iter().flat_map(|s| s.1.iter().copied()).filter(|v| v.is_finite() && *v > 0.0);
    let (mut lo, mut hi) = finite.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        (lo, hi) = (1e-3, 1.0);
    }
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_NAME, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..(n - 1) as f64, (lo * 0.9..hi * 1.1).log_scale())
        .map_err(draw_err(path))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("loss (log scale)")
        .label_style((FONT_NAME, 13))
        .draw()
        .map_err(draw_err(path))?;
    for (k, (name, ys)) in series.iter().enumerate() {
        let c = PALETTE[k % PALETTE.len()];
        let raw = ys.iter().enumerate().filter(|(_, v)| v.is_finite() && **v > 0.0).map(|(i, v)| (i as f64, *v));
        chart.draw_series(LineSeries::new(raw, c.mix(0.25))).map_err(draw_err(path))?;
        let smooth = moving_average(ys, (ys.len() / 100).max(1));
        chart
            .draw_series(LineSeries::new(smooth, c.stroke_width(2)))
            .map_err(draw_err(path))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font((FONT_NAME, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err(path))?;
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// Trailing moving average over `window` finite, positive points: (index, mean) pairs.
fn moving_average(ys: &[f64], window: usize) -> Vec<(f64, f64)> {
    let pts: Vec<(f64, f64)> =
        ys.iter().enumerate().filter(|(_, v)| v.is_finite() && **v > 0.0).map(|(i, v)| (i as f64, *v)).collect();
    let mut sum = 0.0;
    let mut out = Vec::with_capacity(pts.len());
    for (k, &(x, y)) in pts.iter().enumerate() {
        sum += y;
        if k >= window {
            sum -= pts[k - window].1;
        }
        out.push((x, sum / (k + 1).min(window) as f64));
    }
    out
}

/// Grouped bar chart: one group of bars per category, one bar per series (with a legend).
pub fn bars(path: &Path, title: &str, y_desc: &str, categories: &[String], series: &[(&str, Vec<f64>)]) -> Result<()> {
    ensure_font();
    let top = series.iter().flat_map(|s| s.1.iter().copied()).fold(0.0, f64::max).max(1e-9) * 1.15;
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let n = categories.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_NAME, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..top)
        .map_err(draw_err(path))?;
    let cats = categories.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&move |x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < cats.len() {
                cats[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .label_style((FONT_NAME, 13))
        .draw()
        .map_err(draw_err(path))?;
    let width = 0.8 / series.len().max(1) as f64;
    for (k, (name, vals)) in series.iter().enumerate() {
        let c = PALETTE[k % PALETTE.len()];
        let x0 = -0.4 + k as f64 * width;
        chart
            .draw_series(
                vals.iter().enumerate().map(|(i, v)| {
                    Rectangle::new([(i as f64 + x0, 0.0), (i as f64 + x0 + width * 0.9, *v)], c.filled())
                }),
            )
            .map_err(draw_err(path))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT_NAME, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err(path))?;
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// A grid of grayscale images (N, 1, H, W) with values in [0, 1], `ncol` per row, each pixel drawn as a
/// `scale`×`scale` block, under a title; `labels` (empty, or one per image) are written under the images.
pub fn image_grid(path: &Path, title: &str, images: &Tensor, ncol: usize, scale: u32, labels: &[String]) -> Result<()> {
    ensure_font();
    let size = images.size();
    anyhow::ensure!(size.len() == 4 && size[1] == 1, "image_grid wants (N, 1, H, W), got {size:?}");
    let (n, h, w) = (size[0] as usize, size[2] as u32, size[3] as u32);
    let ncol = ncol.clamp(1, n.max(1));
    let nrow = n.div_ceil(ncol);
    let label_h = if labels.is_empty() { 0 } else { 18 };
    let (cw, ch) = (w * scale + 4, h * scale + 4 + label_h);
    let title_h = 36;
    let width = (ncol as u32 * cw).max(260);
    let root = BitMapBackend::new(path, (width, title_h + nrow as u32 * ch)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let title_size = title_font_size(title, width - 12);
    root.draw_text(title, &(FONT_NAME, title_size).into_font().color(&BLACK), (6, 8)).map_err(draw_err(path))?;
    let pixels: Vec<f32> =
        Vec::<f32>::try_from(images.to_kind(Kind::Float).clamp(0.0, 1.0).flatten(0, -1)).context("image tensor")?;
    for idx in 0..n {
        let (ox, oy) = ((idx % ncol) as u32 * cw + 2, title_h + (idx / ncol) as u32 * ch + 2);
        for y in 0..h {
            for x in 0..w {
                let v = (pixels[idx * (h * w) as usize + (y * w + x) as usize] * 255.0).round() as u8;
                let c = RGBColor(v, v, v);
                root.draw(&Rectangle::new(
                    [
                        ((ox + x * scale) as i32, (oy + y * scale) as i32),
                        ((ox + (x + 1) * scale) as i32, (oy + (y + 1) * scale) as i32),
                    ],
                    c.filled(),
                ))
                .map_err(draw_err(path))?;
            }
        }
        if let Some(l) = labels.get(idx) {
            root.draw_text(l, &(FONT_NAME, 13).into_font().color(&BLACK), (ox as i32, (oy + h * scale + 2) as i32))
                .map_err(draw_err(path))?;
        }
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// The largest font size from 18 down to 10 px at which `title` fits in `width` pixels (10 if none does): a grid
/// is as wide as its images, and a long title at a fixed size was cut at the figure's right edge.
fn title_font_size(title: &str, width: u32) -> f64 {
    ensure_font();
    let fits = |size: f64| {
        let font = (FONT_NAME, size).into_font();
        font.box_size(title).map_or(true, |(w, _)| w <= width)
    };
    (10..=18).rev().map(f64::from).find(|&s| fits(s)).unwrap_or(10.0)
}

/// The usual sample figure: the first 64 of `samples` (N, 1, H, W) in [0, 1], 8 per row, each pixel 3×3, no labels.
pub fn sample_grid(path: &Path, title: &str, samples: &Tensor) -> Result<()> {
    image_grid(path, title, &samples.narrow(0, 0, samples.size()[0].min(64)), 8, 3, &[])
}

/// One chart of lines: `series` are (name, points); `log_y` puts the y-axis on a log scale (non-positive points are
/// dropped there).
pub struct LinePanel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub log_y: bool,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Line charts side by side, each `w`×`h` pixels, under a figure title.
pub fn line_panels(path: &Path, title: &str, w: u32, h: u32, panels: &[LinePanel]) -> Result<()> {
    panels_figure(path, title, w, h, panels, false)
}

/// [`line_panels`] with a log x-axis and the points marked (for error or quality against steps or NFE; non-positive x
/// are dropped). With `log_y` the panel is log–log, so a convergence order is a slope.
pub fn line_panels_log_x(path: &Path, title: &str, w: u32, h: u32, panels: &[LinePanel]) -> Result<()> {
    panels_figure(path, title, w, h, panels, true)
}

/// The panels side by side under a title, with linear or log x-axes.
fn panels_figure(path: &Path, title: &str, w: u32, h: u32, panels: &[LinePanel], log_x: bool) -> Result<()> {
    ensure_font();
    let root = BitMapBackend::new(path, (w * panels.len().max(1) as u32, h + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err(path))?;
    let (top, body) = root.split_vertically(40);
    top.titled(title, (FONT_NAME, 22)).map_err(draw_err(path))?;
    for (area, p) in body.split_evenly((1, panels.len().max(1))).iter().zip(panels) {
        draw_lines(area, p, log_x).map_err(draw_err(path))?;
    }
    root.present().map_err(draw_err(path))?;
    Ok(())
}

/// A short tick label: integers as integers, very large or small values in scientific notation.
fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        format!("{v:.0e}")
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn draw_lines(
    area: &DrawingArea<BitMapBackend, Shift>,
    p: &LinePanel,
    log_x: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let keep_x = |x: f64| x.is_finite() && (!log_x || x > 0.0);
    let keep = |(x, y): (f64, f64)| keep_x(x) && y.is_finite() && (!p.log_y || y > 0.0);
    let pts = || p.series.iter().flat_map(|s| s.1.iter().copied()).filter(|&pt| keep(pt));
    let (x0, x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(x), b.max(x)));
    let (y0, y1) = pts().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| (a.min(y), b.max(y)));
    let (x0, x1) = match (x0 < x1, log_x) {
        (true, _) => (x0, x1),
        (false, false) => (0.0, 1.0),
        (false, true) if x0.is_finite() && x0 > 0.0 => (x0 / 2.0, x0 * 2.0),
        (false, true) => (1.0, 10.0),
    };
    let (y0, y1) = if y0 < y1 { (y0, y1) } else { (y0 - 1.0, y0 + 1.0) };
    let mut builder = ChartBuilder::on(area);
    builder.caption(&p.title, (FONT_NAME, 16)).margin(10).x_label_area_size(36).y_label_area_size(64);
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(p.x_desc.as_str())
                .y_desc(p.y_desc.as_str())
                // a log axis over less than two decades labels its 2×, 3×, … points only when asked for ≥ 12
                .x_labels(if log_x { 12 } else { 6 })
                .y_labels(if log_x && p.log_y { 12 } else { 10 })
                .x_label_formatter(&|x| format_tick(*x))
                .y_label_formatter(&|y| format_tick(*y))
                .label_style((FONT_NAME, 12))
                .draw()?;
            for (k, (name, series)) in p.series.iter().enumerate() {
                let c = PALETTE[k % PALETTE.len()];
                let line = series.iter().copied().filter(|&pt| keep(pt));
                if log_x {
                    // measured points (a study over a few steps or NFE): marked, so a single point shows too
                    chart.draw_series(line.clone().map(|pt| Circle::new(pt, 3, c.filled())))?;
                }
                chart
                    .draw_series(LineSeries::new(line, c.stroke_width(2)))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .label_font((FONT_NAME, 12))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    let pad = (y1 - y0) * 0.05;
    match (log_x, p.log_y) {
        (false, true) => finish!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale())?),
        (false, false) => finish!(builder.build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?),
        (true, true) => finish!(builder.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?),
        (true, false) => finish!(builder.build_cartesian_2d((x0..x1).log_scale(), (y0 - pad)..(y1 + pad))?),
    }
    Ok(())
}

/// Points on an n×n grid over [lo, hi]², row-major from the bottom-left (the order [`Layer::Heatmap`] expects):
/// (n², 2) f32.
pub fn grid_points(lo: f64, hi: f64, n: usize) -> Tensor {
    let g = Tensor::linspace(
        lo + (hi - lo) / (2 * n) as f64,
        hi - (hi - lo) / (2 * n) as f64,
        n as i64,
        (Kind::Float, tch::Device::Cpu),
    );
    Tensor::stack(&[g.repeat([n as i64]), g.repeat_interleave_self_int(n as i64, None, None)], 1)
    // (n², 2)
}

/// A (N, 2) tensor as points.
pub fn to_points(x: &Tensor) -> Vec<[f64; 2]> {
    let v: Vec<f64> = Vec::<f64>::try_from(x.to_kind(Kind::Double).flatten(0, -1)).expect("(N, 2) tensor");
    v.chunks(2).map(|c| [c[0], c[1]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_title_shrinks_to_the_grid_width() {
        let long = "Image variations: each test digit (left), then the decoder's samples from its CLIP image embedding";
        assert_eq!(title_font_size("Samples", 260), 18.0);
        let size = title_font_size(long, 528);
        assert!(size < 18.0, "{size}");
        let width = |s: f64| (FONT_NAME, s).into_font().box_size(long).unwrap().0;
        assert!(width(size) <= 528 && width(size + 1.0) > 528, "{} at {size}", width(size));
    }

    #[test]
    fn every_figure_kind_renders_with_the_embedded_font() {
        let dir = tempfile::tempdir().unwrap();
        let pts = grid_points(-2.0, 2.0, 5);
        let p = to_points(&pts);
        assert_eq!(p.len(), 25);
        assert!((p[1][0] - p[0][0] - 0.8).abs() < 1e-6 && p[0][1] == p[1][1]);
        let panel = Panel {
            title: "σ = 0.1".into(),
            bounds: (-2.0, 2.0),
            layers: vec![
                Layer::Heatmap { values: (0..25).map(|i| i as f64).collect(), n: 5, range: (0.0, 24.0) },
                Layer::Quiver {
                    points: p.clone(),
                    vectors: p.iter().map(|q| [-q[0], -q[1]]).collect(),
                    spacing: 0.7,
                    color: BLACK,
                },
                Layer::Scatter { points: p.clone(), color: RED.mix(0.5), size: 2 },
                Layer::Paths { paths: vec![p.clone()], color: BLUE.mix(0.5) },
            ],
        };
        let f = dir.path().join("panels.png");
        panels(&f, "test", 2, 200, &[panel]).unwrap();
        loss_curve(&dir.path().join("loss.png"), "loss", &[("a", &[3.0, 2.0, 1.0, 0.5])]).unwrap();
        bars(&dir.path().join("bars.png"), "bars", "weight", &["a".into(), "b".into()], &[("x", vec![0.2, 0.8])])
            .unwrap();
        let imgs = Tensor::rand([3, 1, 8, 8], (Kind::Float, tch::Device::Cpu));
        image_grid(&dir.path().join("grid.png"), "grid", &imgs, 2, 2, &["0".into(), "1".into(), "2".into()]).unwrap();
        sample_grid(&dir.path().join("samples.png"), "samples", &imgs).unwrap();
        let lp = |log_y| LinePanel {
            title: "lines".into(),
            x_desc: "t".into(),
            y_desc: "y".into(),
            log_y,
            series: vec![("a".into(), vec![(0.0, 1.0), (1.0, 0.1)]), ("b".into(), vec![(0.0, 0.5), (1.0, -1.0)])],
        };
        line_panels(&dir.path().join("lines.png"), "lines", 300, 250, &[lp(true), lp(false)]).unwrap();
        let mut steps = lp(true);
        steps.series =
            vec![("a".into(), vec![(10.0, 1.0), (100.0, 0.01)]), ("b".into(), vec![(0.0, 0.5), (20.0, 0.2)])];
        line_panels_log_x(&dir.path().join("loglog.png"), "log x", 300, 250, &[steps, lp(false)]).unwrap();
        for name in ["panels.png", "loss.png", "bars.png", "grid.png", "samples.png", "lines.png", "loglog.png"] {
            let bytes = std::fs::read(dir.path().join(name)).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{name} is a PNG");
        }
    }
}
