//! Pictures people look at: the eviction map (which prompt tokens each layer and KV head kept,
//! PNG). Files are written to a
//! temporary name and renamed, so a crash never leaves half a picture.

use std::path::Path;

use anyhow::Context;

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
    write_atomically(path, |file| {
        let mut encoder = png::Encoder::new(file, width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
        writer.finish()?;
        Ok(())
    })
}

/// Writes through `write` into `path.tmp`, then renames it to `path`.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut buffered = std::io::BufWriter::new(file);
    let result = write(&mut buffered).and_then(|_| {
        use std::io::Write;
        buffered.flush()?;
        Ok(())
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
