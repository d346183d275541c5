//! Training augmentation, as the reference's `RandomRotFlip` then `RandomCrop`:
//!
//! 1. rotate by k * 90 degrees in the X-Y plane (`np.rot90(v, k)`, k uniform in 0..3);
//! 2. flip along X or Y (`np.flip(v, axis)`, axis uniform in {0, 1});
//! 3. if any side is <= the patch, pad every side by `max((patch - size) // 2 + 3, 0)` zeros
//!    (Python's floor division: a side up to 4 voxels longer than the patch is padded too);
//! 4. crop the patch at an offset uniform in `[0, size - patch)` per axis (numpy's `randint`).
//!
//! After step 3 every side is longer than the patch (a padded side grows by at least 5 beyond
//! it when it was <= the patch, and by 1..3 when it was 1..4 longer), so the offset range is
//! never empty; were it empty, offset 0 is used rather than failing.
//!
//! Draw order per sample: k, flip axis, then the three offsets. The steps are fused into one
//! gather that reads only the voxels that end up in the patch; a literal step-by-step version
//! is kept in the tests as the reference.
//!
//! [`IntensityParams`] adds an intensity augmentation the reference does not have (off unless
//! asked for): contrast, brightness, gamma and noise, in the manner of nnU-Net's, for data whose
//! contrast and bias vary per case more than a few labeled cases show.

use crate::data::{Image, Mask};
use crate::rng::Rng;

/// One sample's random choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AugmentParams {
    /// Quarter turns in the X-Y plane.
    pub k: usize,
    /// 0 = flip X, 1 = flip Y.
    pub flip_axis: usize,
    /// Zeros added on both sides of each axis (after rotation).
    pub pad: [usize; 3],
    /// Crop corner in the padded, rotated volume.
    pub offset: [usize; 3],
}

/// The dims after rotating by `k` quarter turns in X-Y.
pub fn rotated_dims(dims: [usize; 3], k: usize) -> [usize; 3] {
    if k % 2 == 1 { [dims[1], dims[0], dims[2]] } else { dims }
}

/// The reference's padding rule for (rotated) `dims`.
pub fn crop_padding(dims: [usize; 3], patch: [usize; 3]) -> [usize; 3] {
    if (0..3).any(|a| dims[a] <= patch[a]) {
        [0, 1, 2].map(|a| ((patch[a] as i64 - dims[a] as i64).div_euclid(2) + 3).max(0) as usize)
    } else {
        [0; 3]
    }
}

impl AugmentParams {
    /// Draws the choices for a volume of `dims`.
    pub fn draw(rng: &mut Rng, dims: [usize; 3], patch: [usize; 3]) -> Self {
        let k = rng.below(4) as usize;
        let flip_axis = rng.below(2) as usize;
        let rd = rotated_dims(dims, k);
        let pad = crop_padding(rd, patch);
        let offset = [0, 1, 2].map(|a| {
            let size = rd[a] + 2 * pad[a];
            let span = size.saturating_sub(patch[a]);
            if span == 0 { 0 } else { rng.below(span as u64) as usize }
        });
        Self { k, flip_axis, pad, offset }
    }
}

/// Source (x, y) of rotated coordinates (i, j) for `np.rot90(v, k)` over axes (0, 1), where
/// the source is `w` x `h` in X-Y.
#[inline]
fn rot_source(k: usize, i: usize, j: usize, w: usize, h: usize) -> (usize, usize) {
    match k % 4 {
        0 => (i, j),
        1 => (j, h - 1 - i),
        2 => (w - 1 - i, h - 1 - j),
        _ => (w - 1 - j, i),
    }
}

/// Applies `p` to one image/label pair and returns the patches, each `patch` voxels in the
/// volume layout (X-major, Z fastest). The patch must fit after padding (it always does for
/// parameters from [`AugmentParams::draw`]).
pub fn apply(image: &Image, label: &Mask, p: &AugmentParams, patch: [usize; 3]) -> (Vec<f32>, Vec<u8>) {
    assert_eq!(image.dims(), label.dims(), "image and label differ in shape");
    let [w, h, d] = image.dims();
    let rd = rotated_dims([w, h, d], p.k);
    let n: usize = patch.iter().product();
    let mut img = Vec::with_capacity(n);
    let mut lab = Vec::with_capacity(n);
    // Coordinate in the rotated, flipped volume for a patch coordinate, or None in padding.
    let unpad = |a: usize, u: usize| -> Option<usize> {
        let c = (u + p.offset[a]).checked_sub(p.pad[a])?;
        (c < rd[a]).then_some(c)
    };
    for u in 0..patch[0] {
        let ri = unpad(0, u);
        for v in 0..patch[1] {
            let rj = unpad(1, v);
            let src = match (ri, rj) {
                (Some(i), Some(j)) => {
                    let (i, j) = if p.flip_axis == 0 { (rd[0] - 1 - i, j) } else { (i, rd[1] - 1 - j) };
                    let (x, y) = rot_source(p.k, i, j, w, h);
                    Some((x * h + y) * d)
                }
                _ => None,
            };
            for t in 0..patch[2] {
                match (src, unpad(2, t)) {
                    (Some(s), Some(z)) => {
                        img.push(image.data()[s + z]);
                        lab.push(label.data()[s + z]);
                    }
                    _ => {
                        img.push(0.0);
                        lab.push(0);
                    }
                }
            }
        }
    }
    (img, lab)
}

/// One sample's intensity change, applied to the cropped patch in this order: contrast `c`
/// around the patch mean m and a shift b (v -> (v - m) c + m + b); gamma on the patch's range
/// [lo, hi] (v -> lo + (hi - lo) ((v - lo) / (hi - lo))^gamma, which keeps lo and hi); Gaussian
/// noise of standard deviation `noise` (0: none). Images are z-normalised, so the ranges are in
/// units of the case's standard deviation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IntensityParams {
    pub contrast: f32,
    pub shift: f32,
    pub gamma: f32,
    pub noise: f32,
}

impl IntensityParams {
    /// Contrast uniform in [0.7, 1.4], shift in [-0.3, 0.3], gamma in [0.7, 1.5], and with
    /// probability 1/2 noise of a deviation uniform in [0, 0.1]. Always four draws, in that order.
    pub fn draw(rng: &mut Rng) -> Self {
        let contrast = rng.uniform_in(0.7, 1.4) as f32;
        let shift = rng.uniform_in(-0.3, 0.3) as f32;
        let gamma = rng.uniform_in(0.7, 1.5) as f32;
        let u = rng.uniform();
        let noise = if u < 0.5 { (0.2 * u) as f32 } else { 0.0 };
        Self { contrast, shift, gamma, noise }
    }

    /// Applies the change to `img` in place; the noise is drawn from `rng`.
    pub fn apply(&self, img: &mut [f32], rng: &mut Rng) {
        if img.is_empty() {
            return;
        }
        let mean = (img.iter().map(|&v| v as f64).sum::<f64>() / img.len() as f64) as f32;
        for v in img.iter_mut() {
            *v = (*v - mean) * self.contrast + mean + self.shift;
        }
        let (lo, hi) = img.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let range = hi - lo;
        if range > 0.0 && self.gamma != 1.0 {
            for v in img.iter_mut() {
                *v = lo + range * ((*v - lo) / range).clamp(0.0, 1.0).powf(self.gamma);
            }
        }
        if self.noise > 0.0 {
            for v in img.iter_mut() {
                *v += self.noise * rng.normal() as f32;
            }
        }
    }
}

/// Draws parameters and applies them.
pub fn augment(image: &Image, label: &Mask, patch: [usize; 3], rng: &mut Rng) -> (Vec<f32>, Vec<u8>) {
    let p = AugmentParams::draw(rng, image.dims(), patch);
    apply(image, label, &p, patch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Volume;

    /// np.rot90(v, k) over axes (0, 1), literally: k=1 is transpose(flip(v, 1)), k=2 is
    /// flip(flip(v, 0), 1), k=3 is flip(transpose(v), 1).
    fn rot90<T: Copy>(v: &Volume<T>, k: usize) -> Volume<T> {
        let flip1 = |v: &Volume<T>| {
            let [_, h, _] = v.dims();
            Volume::from_fn(v.dims(), |x, y, z| v.get(x, h - 1 - y, z))
        };
        let flip0 = |v: &Volume<T>| {
            let [w, _, _] = v.dims();
            Volume::from_fn(v.dims(), |x, y, z| v.get(w - 1 - x, y, z))
        };
        let transpose = |v: &Volume<T>| {
            let [w, h, d] = v.dims();
            Volume::from_fn([h, w, d], |x, y, z| v.get(y, x, z))
        };
        match k {
            0 => v.clone(),
            1 => transpose(&flip1(v)),
            2 => flip1(&flip0(v)),
            _ => flip1(&transpose(v)),
        }
    }

    fn literal(img: &Image, p: &AugmentParams, patch: [usize; 3]) -> Vec<f32> {
        let r = rot90(img, p.k);
        let [w, h, _] = r.dims();
        let f = if p.flip_axis == 0 {
            Volume::from_fn(r.dims(), |x, y, z| r.get(w - 1 - x, y, z))
        } else {
            Volume::from_fn(r.dims(), |x, y, z| r.get(x, h - 1 - y, z))
        };
        let padded = f.pad(p.pad, p.pad, 0.0);
        padded.crop(p.offset, patch).unwrap().into_data()
    }

    #[test]
    fn rot90_matches_numpy_on_a_2x3_plane() {
        // numpy: np.rot90([[0, 1, 2], [3, 4, 5]]) == [[2, 5], [1, 4], [0, 3]].
        let v = Volume::from_fn([2, 3, 1], |x, y, _| (3 * x + y) as u8);
        let r = rot90(&v, 1);
        assert_eq!(r.dims(), [3, 2, 1]);
        assert_eq!(r.data(), &[2, 5, 1, 4, 0, 3]);
        for i in 0..3 {
            for j in 0..2 {
                let (x, y) = rot_source(1, i, j, 2, 3);
                assert_eq!(r.get(i, j, 0), v.get(x, y, 0));
            }
        }
    }

    #[test]
    fn fused_gather_equals_the_literal_steps() {
        let mut rng = Rng::new(4);
        let patch = [6, 5, 4];
        for dims in [[9, 7, 6], [5, 8, 3], [6, 5, 4], [7, 9, 8], [10, 4, 9]] {
            let img = Volume::from_fn(dims, |x, y, z| 1.0 + (x * 100 + y * 10 + z) as f32);
            let lab = img.map(|v| ((v as u32).is_multiple_of(3)) as u8);
            for _ in 0..24 {
                let p = AugmentParams::draw(&mut rng, dims, patch);
                let (gi, gl) = apply(&img, &lab, &p, patch);
                let want = literal(&img, &p, patch);
                assert_eq!(gi, want, "{dims:?} {p:?}");
                let wl: Vec<u8> =
                    want.iter().map(|&v| (v != 0.0 && (v as u32).is_multiple_of(3)) as u8).collect();
                assert_eq!(gl, wl);
            }
        }
    }

    #[test]
    fn padding_follows_python_floor_division() {
        // Sides 112, 100, 80 vs patch 112 x 112 x 80: pads (0//2+3, 12//2+3, 0//2+3).
        assert_eq!(crop_padding([112, 100, 80], [112, 112, 80]), [3, 9, 3]);
        // One short side pads every side; sides 1..4 longer than the patch get 3 - ceil(d/2).
        assert_eq!(crop_padding([113, 116, 70], [112, 112, 80]), [2, 1, 8]);
        assert_eq!(crop_padding([117, 120, 70], [112, 112, 80]), [0, 0, 8]);
        // No side short: no padding.
        assert_eq!(crop_padding([113, 116, 81], [112, 112, 80]), [0, 0, 0]);
        // After padding every side exceeds the patch, so offsets are drawn from a non-empty range.
        for s in 60..130 {
            let dims = [s, 120, 88];
            let pad = crop_padding(dims, [112, 112, 80]);
            for a in 0..3 {
                assert!(dims[a] + 2 * pad[a] > [112, 112, 80][a], "{dims:?} {pad:?}");
            }
        }
    }

    fn mean_std(v: &[f32]) -> (f64, f64) {
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64;
        (m, var.sqrt())
    }

    fn test_image(n: usize) -> Vec<f32> {
        let mut rng = Rng::new(3);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    #[test]
    fn intensity_identity_leaves_the_patch_alone() {
        let img = test_image(500);
        let mut out = img.clone();
        let p = IntensityParams { contrast: 1.0, shift: 0.0, gamma: 1.0, noise: 0.0 };
        p.apply(&mut out, &mut Rng::new(1));
        for (a, b) in img.iter().zip(&out) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn intensity_contrast_and_shift_move_mean_and_scale_deviation() {
        let img = test_image(2000);
        let (m0, s0) = mean_std(&img);
        let mut out = img.clone();
        IntensityParams { contrast: 1.3, shift: -0.2, gamma: 1.0, noise: 0.0 }
            .apply(&mut out, &mut Rng::new(1));
        let (m1, s1) = mean_std(&out);
        assert!((m1 - (m0 - 0.2)).abs() < 1e-4, "{m0} {m1}");
        assert!((s1 / s0 - 1.3).abs() < 1e-4, "{s0} {s1}");
    }

    #[test]
    fn intensity_gamma_keeps_the_range_and_the_order() {
        let img = test_image(1000);
        let mut out = img.clone();
        IntensityParams { contrast: 1.0, shift: 0.0, gamma: 1.5, noise: 0.0 }
            .apply(&mut out, &mut Rng::new(1));
        let range = |v: &[f32]| v.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let ((lo, hi), (lo2, hi2)) = (range(&img), range(&out));
        assert!((lo - lo2).abs() < 1e-5 && (hi - hi2).abs() < 1e-5);
        let mut idx: Vec<usize> = (0..img.len()).collect();
        idx.sort_by(|&a, &b| img[a].total_cmp(&img[b]));
        assert!(idx.windows(2).all(|w| out[w[0]] <= out[w[1]]));
        // gamma > 1 darkens the middle of the range: the mean drops.
        assert!(mean_std(&out).0 < mean_std(&img).0 - 0.05);
    }

    #[test]
    fn intensity_noise_has_the_asked_deviation() {
        let img = vec![0.5f32; 20000];
        let mut out = img.clone();
        IntensityParams { contrast: 1.0, shift: 0.0, gamma: 1.0, noise: 0.08 }
            .apply(&mut out, &mut Rng::new(5));
        let (m, s) = mean_std(&out);
        assert!((m - 0.5).abs() < 0.003 && (s - 0.08).abs() < 0.003, "{m} {s}");
    }

    #[test]
    fn intensity_draws_stay_in_their_ranges() {
        let mut rng = Rng::new(11);
        let mut noisy = 0;
        for _ in 0..2000 {
            let p = IntensityParams::draw(&mut rng);
            assert!((0.7..=1.4).contains(&p.contrast) && (-0.3..=0.3).contains(&p.shift));
            assert!((0.7..=1.5).contains(&p.gamma) && (0.0..=0.1).contains(&p.noise));
            noisy += (p.noise > 0.0) as usize;
        }
        assert!((900..1100).contains(&noisy), "{noisy}");
    }

    #[test]
    fn draws_cover_rotations_flips_and_offsets_uniformly() {
        let mut rng = Rng::new(9);
        let mut ks = [0usize; 4];
        let mut flips = [0usize; 2];
        let mut offsets = [0usize; 3];
        for _ in 0..4000 {
            let p = AugmentParams::draw(&mut rng, [12, 12, 10], [8, 8, 8]);
            ks[p.k] += 1;
            flips[p.flip_axis] += 1;
            assert!(p.offset[0] < 4 && p.offset[2] < 2);
            offsets[p.offset[2]] += 1;
        }
        assert!(ks.iter().all(|&c| (850..1150).contains(&c)), "{ks:?}");
        assert!(flips.iter().all(|&c| (1850..2150).contains(&c)), "{flips:?}");
        assert!((1850..2150).contains(&offsets[0]), "{offsets:?}");
        assert_eq!(offsets[2], 0);
    }
}
