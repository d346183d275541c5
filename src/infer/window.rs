//! Sliding-window inference over a whole volume, as the reference's `test_single_case` does it.
//!
//! A side smaller than the patch is padded with zeros, `pad // 2` in front and the rest behind,
//! and the result is cropped back. Per axis there are `n = ceil((size - patch) / stride) + 1`
//! windows starting at `min(i * stride, size - patch)`. Windows are visited x outermost, then
//! y, then z, and handed to the model `batch` at a time; the foreground probabilities are summed
//! per voxel (in f32, as the reference's score map is) and divided by the per-voxel count.
//! With `gaussian` the sum is weighted by a Gaussian importance map (sigma = patch / 8 per axis,
//! centred on the patch, as nnU-Net and MONAI blend) and divided by the summed weights.

use anyhow::{Result, ensure};

use crate::data::{Image, Mask, Volume};

/// The reference's inference patch and strides (18 in X and Y, 4 in Z).
pub const REFERENCE_PATCH: [usize; 3] = [112, 112, 80];
pub const REFERENCE_STRIDE: [usize; 3] = [18, 18, 4];

#[derive(Clone, Debug, PartialEq)]
pub struct WindowOptions {
    pub patch: [usize; 3],
    pub stride: [usize; 3],
    /// Weight each window by a Gaussian importance map instead of uniformly.
    pub gaussian: bool,
    /// Windows per model call.
    pub batch: usize,
}

impl Default for WindowOptions {
    fn default() -> Self {
        Self { patch: REFERENCE_PATCH, stride: REFERENCE_STRIDE, gaussian: false, batch: 1 }
    }
}

/// Window starts along one axis of (padded) length `size >= patch`.
pub fn axis_starts(size: usize, patch: usize, stride: usize) -> Vec<usize> {
    assert!(size >= patch && stride > 0 && patch > 0);
    let n = (size - patch).div_ceil(stride) + 1;
    (0..n).map(|i| (i * stride).min(size - patch)).collect()
}

/// Where each window goes in the padded volume.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowPlan {
    /// The input's dims.
    pub size: [usize; 3],
    /// Zeros added in front along each axis (`pad // 2`).
    pub pad_lo: [usize; 3],
    /// Dims after padding (each at least the patch).
    pub padded: [usize; 3],
    pub patch: [usize; 3],
    pub starts: [Vec<usize>; 3],
}

impl WindowPlan {
    pub fn new(size: [usize; 3], patch: [usize; 3], stride: [usize; 3]) -> Result<Self> {
        ensure!(
            patch.iter().all(|&p| p > 0) && stride.iter().all(|&s| s > 0),
            "patch {patch:?} and stride {stride:?} must be positive"
        );
        ensure!(size.iter().all(|&s| s > 0), "cannot run a sliding window over an empty volume {size:?}");
        let pad = [0, 1, 2].map(|a| patch[a].saturating_sub(size[a]));
        let pad_lo = pad.map(|p| p / 2);
        let padded = [0, 1, 2].map(|a| size[a] + pad[a]);
        let starts = [0, 1, 2].map(|a| axis_starts(padded[a], patch[a], stride[a]));
        Ok(Self { size, pad_lo, padded, patch, starts })
    }

    /// Window corners in visiting order (x outermost, z innermost).
    pub fn windows(&self) -> Vec<[usize; 3]> {
        let mut w = Vec::new();
        for &x in &self.starts[0] {
            for &y in &self.starts[1] {
                for &z in &self.starts[2] {
                    w.push([x, y, z]);
                }
            }
        }
        w
    }
}

/// The Gaussian importance map over a patch, maximum 1.
pub fn gaussian_importance(patch: [usize; 3]) -> Vec<f32> {
    let axis = |n: usize| -> Vec<f64> {
        let c = (n as f64 - 1.0) / 2.0;
        let sigma = n as f64 / 8.0;
        (0..n).map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp()).collect()
    };
    let (gx, gy, gz) = (axis(patch[0]), axis(patch[1]), axis(patch[2]));
    let mut w = Vec::with_capacity(patch.iter().product());
    for a in &gx {
        for b in &gy {
            for c in &gz {
                w.push((a * b * c) as f32);
            }
        }
    }
    let max = w.iter().cloned().fold(0.0f32, f32::max);
    let min_pos = f32::MIN_POSITIVE;
    w.iter().map(|v| (v / max).max(min_pos)).collect()
}

/// The foreground probability of every voxel of `image`. `model` receives `n` patches laid out
/// as (n, 1, X, Y, Z) row-major and returns `n * patch voxels` foreground probabilities in the
/// same layout.
pub fn sliding_window<F>(image: &Image, opts: &WindowOptions, mut model: F) -> Result<Image>
where
    F: FnMut(&[f32], usize) -> Result<Vec<f32>>,
{
    ensure!(opts.batch > 0, "the window batch must hold at least one window");
    let plan = WindowPlan::new(image.dims(), opts.patch, opts.stride)?;
    let after = [0, 1, 2].map(|a| plan.padded[a] - plan.size[a] - plan.pad_lo[a]);
    let padded = image.pad(plan.pad_lo, after, 0.0);
    let [_, py, pz] = plan.padded;
    let [wx, wy, wz] = plan.patch;
    let pv = wx * wy * wz;
    let weights = opts.gaussian.then(|| gaussian_importance(plan.patch));

    let mut score = vec![0f32; padded.len()];
    let mut count = vec![0f32; padded.len()];
    let windows = plan.windows();
    let mut input = Vec::with_capacity(opts.batch * pv);
    for group in windows.chunks(opts.batch) {
        input.clear();
        for &[x0, y0, z0] in group {
            for x in x0..x0 + wx {
                for y in y0..y0 + wy {
                    let s = (x * py + y) * pz + z0;
                    input.extend_from_slice(&padded.data()[s..s + wz]);
                }
            }
        }
        let out = model(&input, group.len())?;
        ensure!(
            out.len() == group.len() * pv,
            "the model returned {} values for {} patches of {pv} voxels",
            out.len(),
            group.len()
        );
        for (k, &[x0, y0, z0]) in group.iter().enumerate() {
            let probs = &out[k * pv..(k + 1) * pv];
            let mut i = 0;
            for x in x0..x0 + wx {
                for y in y0..y0 + wy {
                    let s = (x * py + y) * pz + z0;
                    for z in 0..wz {
                        let w = weights.as_ref().map_or(1.0, |w| w[i]);
                        score[s + z] += w * probs[i];
                        count[s + z] += w;
                        i += 1;
                    }
                }
            }
        }
    }
    for (s, c) in score.iter_mut().zip(&count) {
        *s /= c;
    }
    let prob = Volume::from_vec(plan.padded, score)?.crop(plan.pad_lo, plan.size)?;
    Ok(prob.with_geometry(image.geometry.clone()))
}

/// Every combination of flips along the axes set in `axes`, the identity first: 2^k of them for
/// k axes.
pub fn mirror_combinations(axes: [bool; 3]) -> Vec<[bool; 3]> {
    (0..8u8)
        .map(|m| [m & 1 != 0, m & 2 != 0, m & 4 != 0])
        .filter(|f| (0..3).all(|a| axes[a] || !f[a]))
        .collect()
}

/// Patches of `patch` voxels each (X-major, Z fastest, one after another) flipped along the axes
/// set in `flip`. Flipping twice gives the patches back.
pub fn flip_patches(data: &[f32], patch: [usize; 3], flip: [bool; 3]) -> Vec<f32> {
    let [wx, wy, wz] = patch;
    let pv = wx * wy * wz;
    assert_eq!(data.len() % pv, 0, "{} values are not whole patches of {pv} voxels", data.len());
    let mut out = Vec::with_capacity(data.len());
    for p in data.chunks_exact(pv) {
        for x in 0..wx {
            let sx = if flip[0] { wx - 1 - x } else { x };
            for y in 0..wy {
                let sy = if flip[1] { wy - 1 - y } else { y };
                let row = &p[(sx * wy + sy) * wz..][..wz];
                if flip[2] {
                    out.extend(row.iter().rev());
                } else {
                    out.extend_from_slice(row);
                }
            }
        }
    }
    out
}

/// Foreground where the probability exceeds 0.5 (argmax of two classes, ties to background).
pub fn threshold(prob: &Image) -> Mask {
    prob.map(|p| (p > 0.5) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_follow_the_formula() {
        assert_eq!(axis_starts(112, 112, 18), vec![0]);
        assert_eq!(axis_starts(130, 112, 18), vec![0, 18]);
        assert_eq!(axis_starts(131, 112, 18), vec![0, 18, 19]);
        assert_eq!(axis_starts(88, 80, 4), vec![0, 4, 8]);
        assert_eq!(axis_starts(89, 80, 4), vec![0, 4, 8, 9]);
        for size in 112..200 {
            let s = axis_starts(size, 112, 18);
            assert_eq!(s.len(), (size - 112).div_ceil(18) + 1);
            assert_eq!(*s.last().unwrap(), size - 112);
            for (i, &v) in s.iter().enumerate() {
                assert_eq!(v, (i * 18).min(size - 112));
            }
        }
        // A typical LA case: 144 x 128 x 88 voxels.
        let p = WindowPlan::new([144, 128, 88], REFERENCE_PATCH, REFERENCE_STRIDE).unwrap();
        assert_eq!(p.windows().len(), 3 * 2 * 3);
    }

    #[test]
    fn small_sides_are_padded_symmetrically_and_cropped_back() {
        let p = WindowPlan::new([100, 112, 75], [112, 112, 80], [18, 18, 4]).unwrap();
        assert_eq!(p.pad_lo, [6, 0, 2]);
        assert_eq!(p.padded, [112, 112, 80]);
        assert_eq!(p.windows(), vec![[0, 0, 0]]);
        // The model sees zeros in the padding and the image where pad // 2 puts it.
        let img = Volume::from_fn([5, 3, 4], |x, y, z| 1.0 + (x * 12 + y * 4 + z) as f32);
        let opts = WindowOptions { patch: [8, 3, 7], stride: [2, 2, 2], gaussian: false, batch: 4 };
        let prob = sliding_window(&img, &opts, |patches, n| {
            assert_eq!(n, 1);
            let v = Volume::from_vec([8, 3, 7], patches.to_vec()).unwrap();
            assert_eq!(v.get(0, 0, 0), 0.0);
            assert_eq!(v.get(1, 0, 1), img.get(0, 0, 0));
            assert_eq!(v.get(5, 2, 4), img.get(4, 2, 3));
            assert_eq!(v.get(6, 2, 4), 0.0);
            Ok(patches.iter().map(|p| p / 100.0).collect())
        })
        .unwrap();
        assert_eq!(prob.dims(), [5, 3, 4]);
        for (p, v) in prob.data().iter().zip(img.data()) {
            assert!((p - v / 100.0).abs() < 1e-7);
        }
    }

    #[test]
    fn identity_model_averages_back_to_the_input() {
        let img = Volume::from_fn([23, 17, 13], |x, y, z| ((x * 7 + y * 3 + z) % 11) as f32 / 10.0);
        for gaussian in [false, true] {
            for batch in [1, 3, 64] {
                let opts = WindowOptions { patch: [8, 8, 4], stride: [3, 5, 2], gaussian, batch };
                let mut calls = 0;
                let prob = sliding_window(&img, &opts, |p, n| {
                    assert!(n <= batch && p.len() == n * 256);
                    calls += 1;
                    Ok(p.to_vec())
                })
                .unwrap();
                let windows = WindowPlan::new([23, 17, 13], [8, 8, 4], [3, 5, 2]).unwrap().windows().len();
                assert_eq!(windows, 6 * 3 * 6);
                assert_eq!(calls, windows.div_ceil(batch));
                for (p, v) in prob.data().iter().zip(img.data()) {
                    assert!((p - v).abs() < 1e-5, "gaussian={gaussian}: {p} vs {v}");
                }
            }
        }
    }

    #[test]
    fn overlapping_windows_average_their_outputs() {
        // 1 x 1 x 6 volume, patch 4 along z, stride 1: windows start at 0, 1, 2 and return
        // their index; voxel z is covered by windows max(0, z-3)..=min(z, 2).
        let img = Volume::filled([1, 1, 6], 0.0f32);
        let mut next = 0.0;
        let opts = WindowOptions { patch: [1, 1, 4], stride: [1, 1, 1], gaussian: false, batch: 1 };
        let prob = sliding_window(&img, &opts, |p, _| {
            let v = vec![next; p.len()];
            next += 1.0;
            Ok(v)
        })
        .unwrap();
        let want: Vec<f32> = (0..6usize)
            .map(|z| {
                let ws: Vec<f32> = (z.saturating_sub(3)..=z.min(2)).map(|w| w as f32).collect();
                ws.iter().sum::<f32>() / ws.len() as f32
            })
            .collect();
        assert_eq!(prob.data(), &want[..]);
        assert_eq!(threshold(&prob).data(), &[0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn model_errors_and_wrong_sizes_propagate() {
        let img = Volume::filled([4, 4, 4], 0.0f32);
        let opts = WindowOptions { patch: [4, 4, 4], stride: [1, 1, 1], gaussian: false, batch: 1 };
        assert!(sliding_window(&img, &opts, |_, _| anyhow::bail!("out of memory")).is_err());
        assert!(sliding_window(&img, &opts, |_, _| Ok(vec![0.0; 3])).is_err());
        let g = gaussian_importance([8, 8, 8]);
        let max = g.iter().cloned().fold(0.0, f32::max);
        assert!((max - 1.0).abs() < 1e-6 && g.iter().all(|&v| v > 0.0));
        assert!(g[0] < g[(4 * 8 + 4) * 8 + 4]);
    }

    #[test]
    fn flips_reverse_the_chosen_axes_of_each_patch() {
        assert_eq!(mirror_combinations([false; 3]), vec![[false; 3]]);
        assert_eq!(
            mirror_combinations([true, true, false]),
            vec![[false, false, false], [true, false, false], [false, true, false], [true, true, false]]
        );
        assert_eq!(mirror_combinations([true; 3]).len(), 8);
        assert_eq!(mirror_combinations([false, false, true]), vec![[false; 3], [false, false, true]]);
        // Two patches of 2 x 3 x 4, each value its (patch, x, y, z).
        let patch = [2, 3, 4];
        let code = |n: usize, x: usize, y: usize, z: usize| (1000 * n + 100 * x + 10 * y + z) as f32;
        let mut data = Vec::new();
        for n in 0..2 {
            for x in 0..2 {
                for y in 0..3 {
                    for z in 0..4 {
                        data.push(code(n, x, y, z));
                    }
                }
            }
        }
        for flip in mirror_combinations([true; 3]) {
            let f = flip_patches(&data, patch, flip);
            let mut i = 0;
            for n in 0..2 {
                for x in 0..2 {
                    for y in 0..3 {
                        for z in 0..4 {
                            let src = |v: usize, a: usize| if flip[a] { patch[a] - 1 - v } else { v };
                            assert_eq!(f[i], code(n, src(x, 0), src(y, 1), src(z, 2)), "{flip:?} at {i}");
                            i += 1;
                        }
                    }
                }
            }
            assert_eq!(flip_patches(&f, patch, flip), data);
        }
    }
}
