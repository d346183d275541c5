//! Overlay pictures for looking at results: a few axial slices of the image in grey, with the
//! ground-truth contour in green and the predicted contour in red (yellow where they coincide),
//! side by side in one PNG per case. Rows run along Y, columns along X.

use std::path::Path;

use anyhow::{Context, Result, ensure};

use crate::data::{Image, Mask};

pub const GT_COLOUR: [u8; 3] = [40, 220, 60];
pub const PRED_COLOUR: [u8; 3] = [235, 40, 40];
pub const BOTH_COLOUR: [u8; 3] = [250, 230, 40];

#[derive(Clone, Debug)]
pub struct OverlayOptions {
    /// Number of axial slices, spread over the foreground's Z extent.
    pub slices: usize,
    /// Pixels per voxel.
    pub zoom: usize,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        Self { slices: 3, zoom: 3 }
    }
}

/// Grey levels: the 1st and 99th intensity percentiles map to black and white.
fn window(image: &Image) -> (f32, f32) {
    let mut v: Vec<f32> = image.data().iter().copied().filter(|v| v.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    v.sort_by(f32::total_cmp);
    let lo = v[(v.len() - 1) / 100];
    let hi = v[(v.len() - 1) * 99 / 100];
    if hi > lo { (lo, hi) } else { (lo, lo + 1.0) }
}

/// Z positions: evenly inside the Z extent of the ground truth (else the prediction, else the
/// whole volume).
pub fn pick_slices(dims: [usize; 3], gt: Option<&Mask>, pred: Option<&Mask>, n: usize) -> Vec<usize> {
    let extent = [gt, pred]
        .into_iter()
        .flatten()
        .find_map(|m| m.bounding_box())
        .map_or((0, dims[2] - 1), |(lo, hi)| (lo[2], hi[2]));
    let n = n.max(1);
    let (a, b) = extent;
    let mut z: Vec<usize> =
        (0..n).map(|i| a + ((b - a) as f64 * (i as f64 + 1.0) / (n as f64 + 1.0)).round() as usize).collect();
    z.dedup();
    z
}

/// In-slice contour: foreground pixels with a 4-neighbour that is background or outside.
fn contour(m: &Mask, z: usize) -> Vec<bool> {
    let [nx, ny, _] = m.dims();
    let fg = |x: i64, y: i64| {
        x >= 0 && y >= 0 && x < nx as i64 && y < ny as i64 && m.get(x as usize, y as usize, z) != 0
    };
    let mut out = vec![false; nx * ny];
    for x in 0..nx as i64 {
        for y in 0..ny as i64 {
            if fg(x, y) && !(fg(x - 1, y) && fg(x + 1, y) && fg(x, y - 1) && fg(x, y + 1)) {
                out[(x as usize) * ny + y as usize] = true;
            }
        }
    }
    out
}

/// The RGB picture (width, height, pixels).
pub fn render(
    image: &Image,
    gt: Option<&Mask>,
    pred: Option<&Mask>,
    opts: &OverlayOptions,
) -> Result<(usize, usize, Vec<u8>)> {
    let dims = image.dims();
    for m in [gt, pred].into_iter().flatten() {
        ensure!(m.dims() == dims, "mask {:?} does not match the image {:?}", m.dims(), dims);
    }
    ensure!(opts.zoom > 0, "zoom must be at least 1");
    let [nx, ny, _] = dims;
    let zs = pick_slices(dims, gt, pred, opts.slices);
    let (lo, hi) = window(image);
    let gap = 4;
    let zoom = opts.zoom;
    let width = zs.len() * nx * zoom + (zs.len() - 1) * gap;
    let height = ny * zoom;
    let mut px = vec![0u8; width * height * 3];
    for (k, &z) in zs.iter().enumerate() {
        let cg = gt.map(|m| contour(m, z));
        let cp = pred.map(|m| contour(m, z));
        let x_off = k * (nx * zoom + gap);
        for x in 0..nx {
            for y in 0..ny {
                let v = image.get(x, y, z);
                let g = (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0) as u8;
                let i = x * ny + y;
                let on_g = cg.as_ref().is_some_and(|c| c[i]);
                let on_p = cp.as_ref().is_some_and(|c| c[i]);
                let rgb = match (on_g, on_p) {
                    (true, true) => BOTH_COLOUR,
                    (true, false) => GT_COLOUR,
                    (false, true) => PRED_COLOUR,
                    _ => [g, g, g],
                };
                for dy in 0..zoom {
                    for dx in 0..zoom {
                        let r = y * zoom + dy;
                        let c = x_off + x * zoom + dx;
                        let o = (r * width + c) * 3;
                        px[o..o + 3].copy_from_slice(&rgb);
                    }
                }
            }
        }
    }
    Ok((width, height, px))
}

/// Writes the overlay of one case as a PNG.
pub fn write_overlay(
    path: impl AsRef<Path>,
    image: &Image,
    gt: Option<&Mask>,
    pred: Option<&Mask>,
    opts: &OverlayOptions,
) -> Result<()> {
    let path = path.as_ref();
    let (w, h, px) = render(image, gt, pred, opts)?;
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header()?;
        wr.write_image_data(&px)?;
        wr.finish()?;
    }
    crate::fsutil::write_atomic(path, &buf).with_context(|| format!("writing overlay {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Volume;

    #[test]
    fn contours_are_drawn_in_their_colours() {
        let img = Volume::from_fn([10, 8, 6], |x, _, _| x as f32);
        let gt = Volume::from_fn([10, 8, 6], |x, y, z| {
            ((2..6).contains(&x) && (2..6).contains(&y) && z == 3) as u8
        });
        let pred = Volume::from_fn([10, 8, 6], |x, y, z| {
            ((4..8).contains(&x) && (2..6).contains(&y) && z == 3) as u8
        });
        let opts = OverlayOptions { slices: 1, zoom: 1 };
        assert_eq!(pick_slices([10, 8, 6], Some(&gt), Some(&pred), 1), vec![3]);
        let (w, h, px) = render(&img, Some(&gt), Some(&pred), &opts).unwrap();
        assert_eq!((w, h), (10, 8));
        let at = |x: usize, y: usize| {
            let o = (y * w + x) * 3;
            [px[o], px[o + 1], px[o + 2]]
        };
        assert_eq!(at(2, 3), GT_COLOUR); // left edge of the truth only
        assert_eq!(at(7, 3), PRED_COLOUR); // right edge of the prediction only
        assert_eq!(at(4, 2), BOTH_COLOUR); // top edge shared
        assert_eq!(at(3, 3), [px[(3 * w + 3) * 3]; 3]); // interior stays grey
        assert!(at(0, 0)[0] < at(9, 0)[0]); // intensity ramps with x

        let dir = tempfile::Builder::new().prefix("caml-overlay-").tempdir().unwrap();
        let p = dir.path().join("case.png");
        write_overlay(&p, &img, Some(&gt), None, &OverlayOptions::default()).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(render(&img, Some(&Mask::filled([3, 3, 3], 0)), None, &opts).is_err());
    }
}
