//! Pictures people look at: the eviction map (which prompt tokens each layer and KV head kept,
//! PNG) and line charts (accuracy vs eviction ratio with 95% error bars: SVG through plotters,
//! and PNG drawn here with a built-in 5×7 pixel font, so no system font is needed: plotters'
//! bitmap backend panics on any text without its `ttf` (system fonts through font-kit) or
//! `ab_glyph` (a font file we would have to ship) feature, and `bitmap_encoder` alone adds 22
//! crates, image 0.24 and a second png among them, measured with `cargo tree`). Files are
//! written by `engine::atomic` (a temporary name and a rename: a crash never leaves half a
//! picture).

use std::path::Path;

use engine::atomic::write_atomically;
use engine::train::StepReport;
use plotters::prelude::*;

/// Pixel height of one (layer, head) row of the eviction map.
const ROW_PX: usize = 4;
/// Gap between layers, in pixels.
const LAYER_GAP_PX: usize = 2;

/// Draws `kept[layer][head]` (retained positions, any order) over `tokens_seen` columns: a dark
/// pixel is a kept token, a light one an evicted token. Wide maps are scaled to at most 2048
/// columns, a column then showing the fraction kept of the tokens it covers.
pub fn eviction_map_png(
    path: &Path,
    tokens_seen: usize,
    kept: &[Vec<Vec<u32>>],
) -> anyhow::Result<()> {
    anyhow::ensure!(tokens_seen > 0, "nothing to draw: no tokens seen");
    let width = tokens_seen.min(2048);
    let heads = kept.first().map_or(0, Vec::len);
    let height = kept.len() * (heads * ROW_PX + LAYER_GAP_PX);
    let mut pixels = vec![255u8; width * height * 3];
    for (l, layer) in kept.iter().enumerate() {
        for (h, positions) in layer.iter().enumerate() {
            let mut kept_per_column = vec![0usize; width];
            for &p in positions {
                kept_per_column[(p as usize).min(tokens_seen - 1) * width / tokens_seen] += 1;
            }
            let y0 = l * (heads * ROW_PX + LAYER_GAP_PX) + h * ROW_PX;
            for (x, &count) in kept_per_column.iter().enumerate() {
                let covered = (x + 1) * tokens_seen / width - x * tokens_seen / width;
                let frac = count as f32 / covered.max(1) as f32;
                // Kept: dark blue; evicted: pale yellow.
                let mix = |a: f32, b: f32| (a + (b - a) * frac) as u8;
                let rgb = [mix(250.0, 20.0), mix(240.0, 50.0), mix(200.0, 120.0)];
                for y in y0..y0 + ROW_PX {
                    let i = (y * width + x) * 3;
                    pixels[i..i + 3].copy_from_slice(&rgb);
                }
            }
        }
    }
    write_rgb_png(path, width, height, &pixels)
}

/// Writes `pixels` (RGB, 8 bits a channel, rows top to bottom) as a `width` × `height` PNG.
fn write_rgb_png(path: &Path, width: usize, height: usize, pixels: &[u8]) -> anyhow::Result<()> {
    write_atomically(path, |file| -> anyhow::Result<()> {
        let mut encoder = png::Encoder::new(file, width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(pixels)?;
        writer.finish()?;
        Ok(())
    })
}

/// Checks an output path before any work: its extension must name one of `formats` (lower
/// case, without the dot), since the format follows the extension (a name without one, such as
/// `/dev/stdout`, is accepted when there is only one format to write), and it must be
/// writable ([`check_writable`]), so that hours of work never end in a file that cannot be
/// written.
pub fn check_output(path: &Path, flag: &str, formats: &[&str]) -> anyhow::Result<()> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase());
    let known = match ext {
        Some(e) => formats.contains(&e.as_str()),
        None => formats.len() == 1,
    };
    if !known {
        let expected: Vec<String> = formats.iter().map(|e| format!(".{e}")).collect();
        anyhow::bail!(
            "{flag} {}: the file name must end in {} (the format follows the extension)",
            path.display(),
            expected.join(" or ")
        )
    }
    check_writable(path, flag)
}

/// Checks before any work that `path` can be written (see `engine::atomic::check_writable`);
/// the error names the flag.
pub fn check_writable(path: &Path, flag: &str) -> anyhow::Result<()> {
    engine::atomic::check_writable(path).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

/// One line of a chart.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points (x, y), drawn in order.
    pub points: Vec<(f64, f64)>,
    /// Per point, a vertical error bar `(y_lo, y_hi)` (e.g. a 95% interval); empty: none.
    pub errors: Vec<(f64, f64)>,
}

/// Half the width of an error bar's caps in the PNG chart, in pixels.
const CAP_PX: i32 = 4;

/// Draws line series as an SVG chart with axes, labels and a legend.
pub fn line_chart_svg(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let ((x0, x1), (y0, y1)) = chart_ranges(series)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            // Error bars: a vertical line with caps (cap half-width: 1% of the x range).
            let cap = (x1 - x0) * 0.01;
            let bars = s
                .points
                .iter()
                .zip(&s.errors)
                .flat_map(|(&(x, _), &(lo, hi))| {
                    [
                        vec![(x, lo), (x, hi)],
                        vec![(x - cap, lo), (x + cap, lo)],
                        vec![(x - cap, hi), (x + cap, hi)],
                    ]
                });
            chart
                .draw_series(bars.map(|path| PathElement::new(path, color.stroke_width(1))))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    write_atomically(path, |file| file.write_all(svg.as_bytes()))?;
    Ok(())
}

/// The axis ranges of [`line_chart_svg`]: every point and error bar, y from 0 or below, 5%
/// headroom above; a range of one value is widened to a unit around it.
fn chart_ranges(series: &[Series]) -> anyhow::Result<((f64, f64), (f64, f64))> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in series.iter().flat_map(|s| s.points.iter()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    for &(lo, hi) in series.iter().flat_map(|s| s.errors.iter()) {
        y0 = y0.min(lo);
        y1 = y1.max(hi);
    }
    anyhow::ensure!(x0 <= x1, "nothing to draw: no points");
    let pad = |a: f64, b: f64| {
        if (b - a).abs() < 1e-12 {
            (a - 0.5, b + 0.5)
        } else {
            (a, b + (b - a) * 0.05)
        }
    };
    Ok((pad(x0, x1), pad(y0.min(0.0), y1)))
}

/// Chart size of [`line_chart_png`], in pixels.
const PNG_W: usize = 900;
const PNG_H: usize = 520;
/// Plot area of [`line_chart_png`]: left, top, right, bottom.
const AREA: (usize, usize, usize, usize) = (70, 30, 660, 460);
/// Series with more points than this are drawn as lines without markers.
const MARKER_MAX_POINTS: usize = 50;
/// Line colours, cycled.
const COLORS: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// Draws series with x in `x_range` and y in `[0, 1]` as a PNG: axes with ten tick intervals,
/// grid lines, one coloured line per series (with point markers when it has at most
/// [`MARKER_MAX_POINTS`] points), axis labels and a legend. Points outside the ranges are
/// clamped to the frame.
pub fn line_chart_png(
    path: &Path,
    x_label: &str,
    y_label: &str,
    x_range: (f64, f64),
    series: &[Series],
) -> anyhow::Result<()> {
    anyhow::ensure!(
        series.iter().any(|s| !s.points.is_empty()),
        "nothing to draw: no points"
    );
    let (x0, x1) = x_range;
    anyhow::ensure!(
        x0.is_finite() && x1.is_finite() && x1 > x0,
        "bad x range {x0}..{x1}"
    );
    let mut c = Canvas::new(PNG_W, PNG_H);
    let frame = Frame { x0, x1 };
    draw_axes(&mut c, &frame, x_label, y_label);
    let (px, py) = (|x| frame.px(x), |y| frame.py(y));
    let (t, r) = (AREA.1, AREA.2);
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        for w in s.points.windows(2) {
            c.line((px(w[0].0), py(w[0].1)), (px(w[1].0), py(w[1].1)), color, 2);
        }
        if s.points.len() <= MARKER_MAX_POINTS {
            for &(x, y) in &s.points {
                c.dot(px(x), py(y), 4, color);
            }
        }
        for (&(x, _), &(lo, hi)) in s.points.iter().zip(&s.errors) {
            let (x, cap) = (px(x), f64::from(CAP_PX));
            c.line((x, py(lo)), (x, py(hi)), color, 1);
            for y in [py(lo), py(hi)] {
                c.line((x - cap, y), (x + cap, y), color, 1);
            }
        }
        let ly = t + 10 + i * 22;
        c.line(
            (r as f64 + 20.0, ly as f64 + 6.0),
            (r as f64 + 50.0, ly as f64 + 6.0),
            color,
            3,
        );
        c.dot(r as f64 + 35.0, ly as f64 + 6.0, 4, color);
        c.text(r + 58, ly, &s.label, [0, 0, 0]);
    }
    write_rgb_png(path, PNG_W, PNG_H, &c.pixels)
}

/// Where chart values land in [`AREA`] of [`line_chart_png`] (x over `x0..x1`, y over
/// `[0, 1]`), clamped to the frame.
struct Frame {
    x0: f64,
    x1: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        let (l, _, r, _) = AREA;
        l as f64 + ((x - self.x0) / (self.x1 - self.x0)).clamp(0.0, 1.0) * (r - l) as f64
    }

    fn py(&self, y: f64) -> f64 {
        let (_, t, _, b) = AREA;
        b as f64 - y.clamp(0.0, 1.0) * (b - t) as f64
    }
}

/// The grid (ten intervals each way), tick labels, axes and axis labels of [`line_chart_png`].
fn draw_axes(c: &mut Canvas, frame: &Frame, x_label: &str, y_label: &str) {
    let (l, t, r, b) = AREA;
    let (px, py) = (|x| frame.px(x), |y| frame.py(y));
    let (x0, x1) = (frame.x0, frame.x1);
    for i in 0..=10 {
        let (xv, yv) = (x0 + (x1 - x0) * i as f64 / 10.0, i as f64 / 10.0);
        let (x, y) = (px(xv) as usize, py(yv) as usize);
        c.line(
            (x as f64, t as f64),
            (x as f64, b as f64),
            [225, 225, 225],
            1,
        );
        c.line(
            (l as f64, y as f64),
            (r as f64, y as f64),
            [225, 225, 225],
            1,
        );
        let x_tick = if x1 - x0 >= 10.0 {
            format!("{xv:.0}")
        } else {
            format!("{xv:.1}")
        };
        c.text(
            x.saturating_sub(text_width(&x_tick) / 2),
            b + 8,
            &x_tick,
            [0, 0, 0],
        );
        let y_tick = format!("{yv:.1}");
        c.text(
            l.saturating_sub(text_width(&y_tick) + 8),
            y.saturating_sub(7),
            &y_tick,
            [0, 0, 0],
        );
    }
    c.line((l as f64, t as f64), (l as f64, b as f64), [0, 0, 0], 2);
    c.line((l as f64, b as f64), (r as f64, b as f64), [0, 0, 0], 2);
    c.text(
        (l + r).saturating_sub(text_width(x_label)) / 2,
        b + 32,
        x_label,
        [0, 0, 0],
    );
    c.text(8, 8, y_label, [0, 0, 0]);
}

/// An RGB raster.
struct Canvas {
    w: usize,
    h: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            pixels: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&rgb);
        }
    }

    /// A straight line `width` pixels thick.
    fn line(&mut self, a: (f64, f64), b: (f64, f64), rgb: [u8; 3], width: usize) {
        let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as usize;
        let half = (width as i64 - 1) / 2;
        for s in 0..=steps {
            let f = s as f64 / steps as f64;
            let x = (a.0 + (b.0 - a.0) * f).round() as i64;
            let y = (a.1 + (b.1 - a.1) * f).round() as i64;
            for dx in -half..=(width as i64 - 1 - half) {
                for dy in -half..=(width as i64 - 1 - half) {
                    self.set(x + dx, y + dy, rgb);
                }
            }
        }
    }

    /// A filled disc.
    fn dot(&mut self, x: f64, y: f64, radius: i64, rgb: [u8; 3]) {
        let (cx, cy) = (x.round() as i64, y.round() as i64);
        for dx in -radius..=radius {
            for dy in -radius..=radius {
                if dx * dx + dy * dy <= radius * radius {
                    self.set(cx + dx, cy + dy, rgb);
                }
            }
        }
    }

    /// Text in the built-in font at 2× scale, top-left at (x, y); unknown characters draw as
    /// a box.
    fn text(&mut self, x: usize, y: usize, text: &str, rgb: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            let rows = glyph(ch);
            let x0 = (x + i * GLYPH_ADVANCE) as i64;
            for (ry, row) in rows.iter().enumerate() {
                for rx in 0..5 {
                    if row & (0x10 >> rx) != 0 {
                        for (sx, sy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x0 + rx * 2 + sx, y as i64 + ry as i64 * 2 + sy, rgb);
                        }
                    }
                }
            }
        }
    }
}

/// Horizontal pixels per character at 2× scale.
const GLYPH_ADVANCE: usize = 12;

fn text_width(text: &str) -> usize {
    text.chars().count() * GLYPH_ADVANCE
}

/// The 5×7 bitmap of `ch` (rows top to bottom, bit 4 = leftmost column). Letters are drawn
/// lower-case.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_lowercase() {
        ' ' => [0; 7],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '@' => [0x0E, 0x11, 0x17, 0x15, 0x17, 0x10, 0x0F],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0, 0, 0x0F, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0, 0, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0, 0, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

/// Steps of the running CE mean drawn in the PNG curve.
const CE_MEAN_STEPS: usize = 10;

/// Draws a gate-training run's curves (`agate train-gates --plot`).
pub fn training_curves(path: &Path, h: &[StepReport]) -> anyhow::Result<()> {
    let series = |label: &str, f: &dyn Fn(&StepReport) -> f64| Series {
        label: label.to_string(),
        points: h.iter().map(|r| (r.step as f64, f(r))).collect(),
        errors: Vec::new(),
    };
    if path.extension().is_some_and(|e| e == "png") {
        // Per-step CE is noisy (each step is another text): its running mean over the last
        // CE_MEAN_STEPS steps, relative to that mean's maximum, shares the [0, 1] axis.
        let ce_mean: Vec<f64> = (0..h.len())
            .map(|i| {
                let w = &h[i.saturating_sub(CE_MEAN_STEPS - 1)..=i];
                w.iter().map(|r| r.ce).sum::<f64>() / w.len() as f64
            })
            .collect();
        let ce_max = ce_mean.iter().copied().fold(1e-9, f64::max);
        let ce = Series {
            label: format!("CE ({CE_MEAN_STEPS}-step mean) / max"),
            points: h
                .iter()
                .zip(&ce_mean)
                .map(|(r, m)| (r.step as f64, m / ce_max))
                .collect(),
            errors: Vec::new(),
        };
        let last = h.last().map_or(1, |r| r.step.max(1)) as f64;
        line_chart_png(
            path,
            "step",
            "CE (relative) / eviction ratio",
            (0.0, last),
            &[
                ce,
                series("soft eviction", &|r| r.soft_evict),
                series("hard eviction", &|r| r.hard_evict),
            ],
        )
    } else {
        line_chart_svg(
            path,
            "Attention-Gate training",
            "step",
            "loss / eviction ratio",
            &[
                series("loss", &|r| r.loss),
                series("CE", &|r| r.ce),
                series("soft eviction", &|r| r.soft_evict),
                series("hard eviction", &|r| r.hard_evict),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_written_as_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![
            Series {
                label: "full".into(),
                points: vec![(0.0, 1.0)],
                errors: vec![(0.9, 1.0)],
            },
            Series {
                label: "h2o".into(),
                points: vec![(0.25, 0.9), (0.5, 0.6), (0.75, 0.2)],
                errors: Vec::new(),
            },
        ];
        let png_path = dir.path().join("a.png");
        line_chart_png(&png_path, "eviction", "accuracy", (0.0, 1.0), &series).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(&png_path).unwrap(),
        ));
        let info = decoder.read_info().unwrap().info().clone();
        assert_eq!((info.width, info.height), (PNG_W as u32, PNG_H as u32));
        let svg_path = dir.path().join("a.svg");
        line_chart_svg(&svg_path, "t", "x", "y", &series).unwrap();
        let svg = std::fs::read_to_string(&svg_path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("h2o"));
        assert!(line_chart_png(&dir.path().join("b.png"), "x", "y", (0.0, 1.0), &[]).is_err());
        assert!(line_chart_png(&dir.path().join("c.png"), "x", "y", (1.0, 1.0), &series).is_err());
    }
}
