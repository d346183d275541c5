//! Segmentation metrics as medpy.metric.binary (0.5.x) computes them, and largest-component
//! post-processing.
//!
//! A = prediction, B = ground truth, both binarised as `!= 0`.
//! - `dice = 2|A∩B| / (|A| + |B|)`, `jaccard = |A∩B| / |A∪B|`.
//! - `surface(M)` = M minus its erosion by the 6-neighbour cross (one iteration, outside the
//!   array = background, so voxels on the array border are surface).
//! - `sd(A→B)` = for each surface voxel of A, the exact Euclidean distance (scaled by the voxel
//!   spacing) to the nearest surface voxel of B: a squared Euclidean distance transform
//!   (Felzenszwalb-Huttenlocher, separable, exact) of surface(B), sampled on surface(A).
//! - `hd95` = numpy.percentile(concat(sd(A→B), sd(B→A)), 95) with linear interpolation.
//! - `asd` = mean(sd(A→B)) (medpy's asd is one-sided).
//!
//! The reference evaluation scores an empty prediction as 0 for all four (medpy itself would
//! raise); [`Metrics::empty_prediction`] flags it.

use anyhow::{Result, bail, ensure};
use serde::Serialize;

use crate::data::Mask;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Metrics {
    pub dice: f64,
    pub jaccard: f64,
    pub hd95: f64,
    pub asd: f64,
    /// The prediction had no foreground voxel: all four are 0 by the reference's convention.
    #[serde(skip)]
    pub empty_prediction: bool,
}

/// Dice of two binary masks given as flat slices of the same length (0 when both are empty,
/// as medpy's ZeroDivisionError branch returns).
pub fn dice(a: &[u8], b: &[u8]) -> f64 {
    let (inter, na, nb) = counts(a, b);
    if na + nb == 0 { 0.0 } else { 2.0 * inter as f64 / (na + nb) as f64 }
}

/// Jaccard index (0 when both are empty).
pub fn jaccard(a: &[u8], b: &[u8]) -> f64 {
    let (inter, na, nb) = counts(a, b);
    let union = na + nb - inter;
    if union == 0 { 0.0 } else { inter as f64 / union as f64 }
}

fn counts(a: &[u8], b: &[u8]) -> (usize, usize, usize) {
    assert_eq!(a.len(), b.len(), "masks of different sizes");
    let mut inter = 0;
    let mut na = 0;
    let mut nb = 0;
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x != 0, y != 0);
        inter += (x && y) as usize;
        na += x as usize;
        nb += y as usize;
    }
    (inter, na, nb)
}

/// The surface voxels of a mask of `dims` (X-major, Z fastest): foreground voxels with at least
/// one face neighbour that is background or outside the array.
pub fn surface(mask: &[u8], dims: [usize; 3]) -> Vec<bool> {
    let [nx, ny, nz] = dims;
    assert_eq!(mask.len(), nx * ny * nz);
    let fg = |x: usize, y: usize, z: usize| mask[(x * ny + y) * nz + z] != 0;
    let mut out = vec![false; mask.len()];
    for x in 0..nx {
        for y in 0..ny {
            for z in 0..nz {
                if !fg(x, y, z) {
                    continue;
                }
                let interior = x > 0
                    && x + 1 < nx
                    && y > 0
                    && y + 1 < ny
                    && z > 0
                    && z + 1 < nz
                    && fg(x - 1, y, z)
                    && fg(x + 1, y, z)
                    && fg(x, y - 1, z)
                    && fg(x, y + 1, z)
                    && fg(x, y, z - 1)
                    && fg(x, y, z + 1);
                out[(x * ny + y) * nz + z] = !interior;
            }
        }
    }
    out
}

const FAR: f64 = f64::INFINITY;

/// One line of the squared distance transform: `d[q] = min_p f[p] + ((q - p) * s)^2`, in place.
/// `v`/`zs` are scratch buffers of at least `f.len()` and `f.len() + 1`.
fn edt_line(f: &mut [f64], s: f64, v: &mut [usize], zs: &mut [f64], out: &mut [f64]) {
    let n = f.len();
    let mut k: isize = -1;
    for q in 0..n {
        if f[q] == FAR {
            continue;
        }
        let fq = f[q] + (q as f64 * s).powi(2);
        loop {
            if k < 0 {
                k = 0;
                v[0] = q;
                zs[0] = f64::NEG_INFINITY;
                zs[1] = f64::INFINITY;
                break;
            }
            let p = v[k as usize];
            let fp = f[p] + (p as f64 * s).powi(2);
            let inter = (fq - fp) / (2.0 * s * (q as f64 - p as f64));
            if inter <= zs[k as usize] {
                k -= 1;
            } else {
                k += 1;
                v[k as usize] = q;
                zs[k as usize] = inter;
                zs[k as usize + 1] = f64::INFINITY;
                break;
            }
        }
    }
    if k < 0 {
        out[..n].fill(FAR);
        return;
    }
    let mut j = 0usize;
    for (q, o) in out.iter_mut().enumerate().take(n) {
        let x = q as f64 * s;
        while zs[j + 1] < x {
            j += 1;
        }
        let p = v[j];
        *o = f[p] + ((q as f64 - p as f64) * s).powi(2);
    }
}

/// Exact squared Euclidean distance from every voxel to the nearest `feature` voxel, with
/// per-axis `spacing`; infinite where there is no feature.
pub fn squared_edt(feature: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let [nx, ny, nz] = dims;
    let mut d: Vec<f64> = feature.iter().map(|&f| if f { 0.0 } else { FAR }).collect();
    let nmax = nx.max(ny).max(nz);
    let mut f = vec![0.0; nmax];
    let mut out = vec![0.0; nmax];
    let mut v = vec![0usize; nmax];
    let mut zs = vec![0.0; nmax + 1];
    // Along Z (contiguous), then Y, then X.
    let passes: [(usize, usize, [usize; 2], [usize; 2]); 3] = [
        (nz, 1, [nx, ny], [ny * nz, nz]),
        (ny, nz, [nx, nz], [ny * nz, 1]),
        (nx, ny * nz, [ny, nz], [nz, 1]),
    ];
    for (axis, (len, stride, outer, ostride)) in passes.into_iter().enumerate() {
        let s = spacing[2 - axis];
        for i in 0..outer[0] {
            for j in 0..outer[1] {
                let base = i * ostride[0] + j * ostride[1];
                for (q, fq) in f.iter_mut().enumerate().take(len) {
                    *fq = d[base + q * stride];
                }
                edt_line(&mut f[..len], s, &mut v, &mut zs, &mut out);
                for (q, &o) in out.iter().enumerate().take(len) {
                    d[base + q * stride] = o;
                }
            }
        }
    }
    d
}

/// sd(A→B): distances from each surface voxel of `a` to the nearest surface voxel of `b`, in
/// flat index order. Both masks must be non-empty.
pub fn surface_distances(a: &Mask, b: &Mask, spacing: [f64; 3]) -> Result<Vec<f64>> {
    ensure!(a.dims() == b.dims(), "masks differ in shape: {:?} vs {:?}", a.dims(), b.dims());
    // The distances depend only on the surfaces' positions, so the transform runs on the union
    // of the two bounding boxes; the surfaces are taken inside each mask's own box, where the
    // outside is background as in the full array.
    let (Some((alo, ahi)), Some((blo, bhi))) = (a.bounding_box(), b.bounding_box()) else {
        bail!("surface distances need two non-empty masks");
    };
    let lo = [0, 1, 2].map(|k| alo[k].min(blo[k]));
    let hi = [0, 1, 2].map(|k| ahi[k].max(bhi[k]));
    let size = [0, 1, 2].map(|k| hi[k] - lo[k] + 1);
    let ac = a.crop(lo, size)?;
    let bc = b.crop(lo, size)?;
    let sa = surface(ac.data(), size);
    let sb = surface(bc.data(), size);
    let dt = squared_edt(&sb, size, spacing);
    Ok(sa.iter().zip(&dt).filter(|(s, _)| **s).map(|(_, &d)| d.sqrt()).collect())
}

/// numpy.percentile(values, q) with the default linear interpolation.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    assert!(!values.is_empty(), "percentile of nothing");
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = q / 100.0 * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    let t = rank - lo as f64;
    let (a, b) = (v[lo], v[hi]);
    // numpy's _lerp: a + (b - a) t, computed from the upper end when t >= 0.5.
    if t >= 0.5 { b - (b - a) * (1.0 - t) } else { a + (b - a) * t }
}

pub fn hd95(a: &Mask, b: &Mask, spacing: [f64; 3]) -> Result<f64> {
    let mut d = surface_distances(a, b, spacing)?;
    d.extend(surface_distances(b, a, spacing)?);
    Ok(percentile(&d, 95.0))
}

pub fn asd(a: &Mask, b: &Mask, spacing: [f64; 3]) -> Result<f64> {
    let d = surface_distances(a, b, spacing)?;
    Ok(d.iter().sum::<f64>() / d.len() as f64)
}

/// All four metrics of a prediction against a ground truth. An empty prediction scores 0 with
/// the flag set; an empty ground truth with a non-empty prediction is an error (the distances
/// are undefined).
pub fn evaluate(pred: &Mask, gt: &Mask, spacing: [f64; 3]) -> Result<Metrics> {
    ensure!(
        pred.dims() == gt.dims(),
        "prediction is {:?} but the ground truth is {:?}",
        pred.dims(),
        gt.dims()
    );
    if pred.count_foreground() == 0 {
        return Ok(Metrics { dice: 0.0, jaccard: 0.0, hd95: 0.0, asd: 0.0, empty_prediction: true });
    }
    ensure!(gt.count_foreground() > 0, "the ground truth is empty: surface distances are undefined");
    let mut ab = surface_distances(pred, gt, spacing)?;
    let asd = ab.iter().sum::<f64>() / ab.len() as f64;
    ab.extend(surface_distances(gt, pred, spacing)?);
    Ok(Metrics {
        dice: dice(pred.data(), gt.data()),
        jaccard: jaccard(pred.data(), gt.data()),
        hd95: percentile(&ab, 95.0),
        asd,
        empty_prediction: false,
    })
}

/// The mean of each metric over cases, as the reference reports a test set; the flag is set
/// when any case had an empty prediction. `None` for no cases.
pub fn mean_metrics(ms: &[Metrics]) -> Option<Metrics> {
    if ms.is_empty() {
        return None;
    }
    let n = ms.len() as f64;
    let mean = |f: fn(&Metrics) -> f64| ms.iter().map(f).sum::<f64>() / n;
    Some(Metrics {
        dice: mean(|m| m.dice),
        jaccard: mean(|m| m.jaccard),
        hd95: mean(|m| m.hd95),
        asd: mean(|m| m.asd),
        empty_prediction: ms.iter().any(|m| m.empty_prediction),
    })
}

/// The standard deviation over cases of each metric (numpy's `np.std`: divided by the number of
/// cases), as "mean +- std" tables report it; `empty_prediction` as in [`mean_metrics`].
pub fn std_metrics(ms: &[Metrics]) -> Option<Metrics> {
    let mean = mean_metrics(ms)?;
    let n = ms.len() as f64;
    let std = |f: fn(&Metrics) -> f64| (ms.iter().map(|m| (f(m) - f(&mean)).powi(2)).sum::<f64>() / n).sqrt();
    Some(Metrics {
        dice: std(|m| m.dice),
        jaccard: std(|m| m.jaccard),
        hd95: std(|m| m.hd95),
        asd: std(|m| m.asd),
        empty_prediction: mean.empty_prediction,
    })
}

/// Neighbourhood for connected components.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connectivity {
    /// Face neighbours only.
    Face6,
    /// Face, edge and corner neighbours: skimage.measure.label's default in 3D, which the
    /// reference's largest-component post-processing uses.
    Full26,
}

/// Keeps the largest connected component of the foreground (ties: the component met first in
/// index order, as numpy's argmax over skimage's raster-ordered labels picks). An empty mask
/// stays empty.
pub fn largest_connected_component(mask: &Mask, conn: Connectivity) -> Mask {
    let [nx, ny, nz] = mask.dims();
    let n = mask.len();
    let mut label = vec![0u32; n];
    let mut sizes: Vec<usize> = vec![0];
    let mut stack = Vec::new();
    let mut offsets = Vec::new();
    for dx in -1i64..=1 {
        for dy in -1i64..=1 {
            for dz in -1i64..=1 {
                let nonzero = (dx != 0) as u8 + (dy != 0) as u8 + (dz != 0) as u8;
                let keep = match conn {
                    Connectivity::Face6 => nonzero == 1,
                    Connectivity::Full26 => nonzero >= 1,
                };
                if keep {
                    offsets.push([dx, dy, dz]);
                }
            }
        }
    }
    let data = mask.data();
    for start in 0..n {
        if data[start] == 0 || label[start] != 0 {
            continue;
        }
        let id = sizes.len() as u32;
        let mut size = 0;
        label[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            size += 1;
            let p = [(i / (ny * nz)) as i64, ((i / nz) % ny) as i64, (i % nz) as i64];
            for o in &offsets {
                let q = [p[0] + o[0], p[1] + o[1], p[2] + o[2]];
                if q[0] < 0
                    || q[1] < 0
                    || q[2] < 0
                    || q[0] >= nx as i64
                    || q[1] >= ny as i64
                    || q[2] >= nz as i64
                {
                    continue;
                }
                let j = ((q[0] as usize) * ny + q[1] as usize) * nz + q[2] as usize;
                if data[j] != 0 && label[j] == 0 {
                    label[j] = id;
                    stack.push(j);
                }
            }
        }
        sizes.push(size);
    }
    let mut best = 0u32;
    for (id, &s) in sizes.iter().enumerate().skip(1) {
        if best == 0 || s > sizes[best as usize] {
            best = id as u32;
        }
    }
    let mut out = mask.map(|_| 0u8);
    for (o, &l) in out.data_mut().iter_mut().zip(&label) {
        *o = (best != 0 && l == best) as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Volume;
    use crate::rng::Rng;

    fn cube(dims: [usize; 3], lo: [usize; 3], s: usize) -> Mask {
        Volume::from_fn(dims, |x, y, z| {
            (x >= lo[0] && x < lo[0] + s && y >= lo[1] && y < lo[1] + s && z >= lo[2] && z < lo[2] + s) as u8
        })
    }

    /// Surface by the definition, distances by trying every pair.
    fn brute_sd(a: &Mask, b: &Mask, sp: [f64; 3]) -> Vec<f64> {
        let [nx, ny, nz] = a.dims();
        let fg = |m: &Mask, x: i64, y: i64, z: i64| {
            x >= 0
                && y >= 0
                && z >= 0
                && (x as usize) < nx
                && (y as usize) < ny
                && (z as usize) < nz
                && m.get(x as usize, y as usize, z as usize) != 0
        };
        let surf = |m: &Mask| {
            let mut pts = Vec::new();
            for x in 0..nx as i64 {
                for y in 0..ny as i64 {
                    for z in 0..nz as i64 {
                        if fg(m, x, y, z)
                            && [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
                                .iter()
                                .any(|(dx, dy, dz)| !fg(m, x + dx, y + dy, z + dz))
                        {
                            pts.push([x as f64, y as f64, z as f64]);
                        }
                    }
                }
            }
            pts
        };
        let (sa, sb) = (surf(a), surf(b));
        sa.iter()
            .map(|p| {
                sb.iter()
                    .map(|q| (0..3).map(|k| ((p[k] - q[k]) * sp[k]).powi(2)).sum::<f64>().sqrt())
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        // numpy.percentile([1, 2, 3, 4], 95) and (range(10), 95), bit for bit.
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 95.0), 3.8499999999999996);
        let v: Vec<f64> = (0..10).map(f64::from).collect();
        assert_eq!(percentile(&v, 95.0), 8.549999999999999);
        assert_eq!(percentile(&[5.0], 95.0), 5.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
    }

    /// Values printed by medpy 0.5.2 (numpy 2.4, scipy 1.17) for the same two masks:
    /// `A = ellipsoid | ((7x + 13y + 5z) % 17 == 0)`, `B = ellipsoid | box`, 14 x 12 x 10.
    #[test]
    fn matches_medpy_on_a_fixture() {
        let dims = [14, 12, 10];
        let a = Volume::from_fn(dims, |x, y, z| {
            let (xf, yf, zf) = (x as f64, y as f64, z as f64);
            let e = ((xf - 6.0) / 5.0).powi(2) + ((yf - 5.0) / 4.0).powi(2) + ((zf - 4.0) / 3.5).powi(2);
            (e <= 1.0 || (x * 7 + y * 13 + z * 5) % 17 == 0) as u8
        });
        let b = Volume::from_fn(dims, |x, y, z| {
            let (xf, yf, zf) = (x as f64, y as f64, z as f64);
            let e = ((xf - 7.5) / 4.5).powi(2) + ((yf - 6.0) / 4.5).powi(2) + ((zf - 5.0) / 3.0).powi(2);
            (e <= 1.0 || (x < 3 && y < 2)) as u8
        });
        let m = evaluate(&a, &b, [1.0; 3]).unwrap();
        assert!((m.dice - 0.5072886297376094).abs() < 1e-15);
        assert!((m.jaccard - 0.33984375).abs() < 1e-15);
        assert!((m.hd95 - 3.0).abs() < 1e-12);
        assert!((m.asd - 1.4961077509346967).abs() < 1e-12);
        let m = evaluate(&a, &b, [0.7, 1.3, 2.5]).unwrap();
        assert!((m.hd95 - 5.0).abs() < 1e-12);
        assert!((m.asd - 2.1067623635183783).abs() < 1e-12, "{m:?}");
    }

    #[test]
    fn shifted_cubes_have_known_overlap_and_distances() {
        let dims = [20, 16, 16];
        for k in 0..4 {
            let a = cube(dims, [3 + k, 4, 4], 6);
            let b = cube(dims, [3, 4, 4], 6);
            let m = evaluate(&a, &b, [1.0; 3]).unwrap();
            let s = 6.0;
            let kf = k as f64;
            assert!((m.dice - (s - kf) / s).abs() < 1e-12, "k={k} {m:?}");
            assert!((m.jaccard - (s - kf) / (s + kf)).abs() < 1e-12);
            let bsd = brute_sd(&a, &b, [1.0; 3]);
            let want_asd = bsd.iter().sum::<f64>() / bsd.len() as f64;
            assert!((m.asd - want_asd).abs() < 1e-12);
            let mut all = bsd.clone();
            all.extend(brute_sd(&b, &a, [1.0; 3]));
            assert!((m.hd95 - percentile(&all, 95.0)).abs() < 1e-12);
            if k == 0 {
                assert_eq!((m.hd95, m.asd), (0.0, 0.0));
            } else {
                // The far face of A lies k voxels from B's far face: the largest distance is k.
                assert!(m.hd95 <= kf + 1e-12 && m.hd95 > 0.0);
            }
        }
    }

    #[test]
    fn single_voxels_are_their_own_surface() {
        let mut a = Mask::filled([6, 7, 8], 0);
        let mut b = a.clone();
        a.set(0, 0, 0, 1);
        b.set(3, 4, 0, 1);
        let m = evaluate(&a, &b, [1.0; 3]).unwrap();
        assert_eq!((m.dice, m.jaccard, m.hd95, m.asd), (0.0, 0.0, 5.0, 5.0));
        let m = evaluate(&a, &b, [2.0, 0.5, 1.0]).unwrap();
        assert!((m.hd95 - (36.0f64 + 4.0).sqrt()).abs() < 1e-12);
        let m = evaluate(&a, &a, [1.0; 3]).unwrap();
        assert_eq!((m.dice, m.jaccard, m.hd95, m.asd), (1.0, 1.0, 0.0, 0.0));
    }

    #[test]
    fn border_voxels_count_as_surface() {
        let full = Mask::filled([4, 5, 6], 1);
        let s = surface(full.data(), full.dims());
        let interior = (4 - 2) * (5 - 2) * (6 - 2);
        assert_eq!(s.iter().filter(|&&v| v).count(), 4 * 5 * 6 - interior);
        assert!(s[0] && !s[full.index(1, 1, 1)]);
        // A mask filling the array against a cube inside it.
        let inner = cube([4, 5, 6], [1, 1, 1], 2);
        let m = evaluate(&full, &inner, [1.0; 3]).unwrap();
        let mut all = brute_sd(&full, &inner, [1.0; 3]);
        let asd = all.iter().sum::<f64>() / all.len() as f64;
        all.extend(brute_sd(&inner, &full, [1.0; 3]));
        assert!((m.asd - asd).abs() < 1e-12 && (m.hd95 - percentile(&all, 95.0)).abs() < 1e-12);
    }

    #[test]
    fn random_masks_match_brute_force_distances() {
        let mut r = Rng::new(11);
        for trial in 0..12 {
            let dims = [3 + r.below(8) as usize, 3 + r.below(8) as usize, 3 + r.below(8) as usize];
            let density = r.uniform_in(0.05, 0.7);
            let mut gen_mask = || {
                let mut m = Volume::from_fn(dims, |_, _, _| 0u8);
                for v in m.data_mut() {
                    *v = (r.uniform() < density) as u8;
                }
                m
            };
            let (a, b) = (gen_mask(), gen_mask());
            if a.count_foreground() == 0 || b.count_foreground() == 0 {
                continue;
            }
            let sp = if trial % 2 == 0 { [1.0; 3] } else { [0.7, 1.3, 2.5] };
            let got = surface_distances(&a, &b, sp).unwrap();
            let want = brute_sd(&a, &b, sp);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-9, "trial {trial}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn concentric_spheres_are_about_the_radius_difference_apart() {
        let dims = [40, 40, 40];
        let ball = |r: f64| {
            Volume::from_fn(dims, |x, y, z| {
                let d = [x, y, z].map(|v| v as f64 - 19.5);
                ((d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt() <= r) as u8
            })
        };
        let m = evaluate(&ball(14.0), &ball(10.0), [1.0; 3]).unwrap();
        assert!((m.asd - 4.0).abs() < 0.6, "{m:?}");
        assert!((m.hd95 - 4.0).abs() < 1.0, "{m:?}");
        let vol = |r: f64| 4.0 / 3.0 * std::f64::consts::PI * r.powi(3);
        let want_dice = 2.0 * vol(10.0) / (vol(10.0) + vol(14.0));
        assert!((m.dice - want_dice).abs() < 0.03, "{m:?} vs {want_dice}");
    }

    #[test]
    fn empty_prediction_scores_zero_with_flag_and_empty_truth_is_an_error() {
        let empty = Mask::filled([5, 5, 5], 0);
        let gt = cube([5, 5, 5], [1, 1, 1], 2);
        let m = evaluate(&empty, &gt, [1.0; 3]).unwrap();
        assert!(m.empty_prediction);
        assert_eq!((m.dice, m.jaccard, m.hd95, m.asd), (0.0, 0.0, 0.0, 0.0));
        assert!(evaluate(&gt, &empty, [1.0; 3]).is_err());
        assert!(evaluate(&gt, &Mask::filled([5, 5, 4], 0), [1.0; 3]).is_err());
    }

    #[test]
    fn mean_over_cases_counts_empty_predictions_as_zero() {
        let a = Metrics { dice: 0.9, jaccard: 0.8, hd95: 4.0, asd: 1.0, empty_prediction: false };
        let empty = Metrics { dice: 0.0, jaccard: 0.0, hd95: 0.0, asd: 0.0, empty_prediction: true };
        let m = mean_metrics(&[a, empty]).unwrap();
        assert!((m.dice - 0.45).abs() < 1e-12 && (m.hd95 - 2.0).abs() < 1e-12);
        assert!(m.empty_prediction);
        assert!(mean_metrics(&[]).is_none());
        // np.std([0.9, 0.0]) = 0.45, np.std([4.0, 0.0]) = 2.0.
        let s = std_metrics(&[a, empty]).unwrap();
        assert!((s.dice - 0.45).abs() < 1e-12 && (s.hd95 - 2.0).abs() < 1e-12, "{s:?}");
        assert_eq!(std_metrics(&[a]).unwrap().dice, 0.0);
        assert!(std_metrics(&[]).is_none());
    }

    #[test]
    fn largest_component_uses_the_chosen_connectivity() {
        let mut m = Mask::filled([8, 8, 8], 0);
        // A 2x2x2 block (8 voxels) and a diagonal chain of 9 voxels.
        for x in 0..2 {
            for y in 0..2 {
                for z in 0..2 {
                    m.set(x, y, z, 1);
                }
            }
        }
        for i in 3..8 {
            m.set(i, i, i, 1);
            if i < 7 {
                m.set(i + 1, i, i, 1);
            }
        }
        // 26-connected, the chain (9 voxels) wins; 6-connected it falls apart into pairs.
        let full = largest_connected_component(&m, Connectivity::Full26);
        assert_eq!(full.count_foreground(), 9);
        assert_eq!(full.get(0, 0, 0), 0);
        let face = largest_connected_component(&m, Connectivity::Face6);
        assert_eq!(face.count_foreground(), 8);
        assert_eq!(face.get(0, 0, 0), 1);
        assert_eq!(
            largest_connected_component(&Mask::filled([2, 2, 2], 0), Connectivity::Full26).count_foreground(),
            0
        );
    }
}
