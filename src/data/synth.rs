//! Synthetic left-atrium-like phantoms: a smooth, lobed chamber with tubular veins leaving it,
//! next to distractors of similar brightness (an "aorta" tube and a "ventricle" blob), on a
//! textured background with a smooth multiplicative bias field and Gaussian noise. Shape, size,
//! position, orientation, contrast, bias and noise vary per case, so that a few labeled cases
//! do not cover the set and unlabeled ones have something to teach. The label is the chamber
//! and its veins only.
//!
//! Each case is generated from its own stream (`seed` forked by case index), so a case does
//! not depend on how many others are generated. Images are z-normalised over the whole volume,
//! like the LA preprocessing; spacing is 1 mm.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::data::dataset::write_list;
use crate::data::nifti_io::{write_image, write_mask};
use crate::data::{Geometry, Image, Mask, Volume};
use crate::fsutil::write_atomic;
use crate::rng::Rng;

pub const DEFAULT_SIZE: [usize; 3] = [64, 64, 48];
pub const DEFAULT_CASES: usize = 100;
pub const DEFAULT_SEED: u64 = 2023;
/// Written last, so a set without it is incomplete and is regenerated.
pub const MARKER: &str = ".complete.json";
/// Bumped whenever the generator's output changes, so stale sets are regenerated.
pub const GENERATOR_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthSpec {
    pub cases: usize,
    pub seed: u64,
    pub size: [usize; 3],
    pub version: u32,
}

impl SynthSpec {
    pub fn new(cases: usize, seed: u64, size: [usize; 3]) -> Self {
        Self { cases, seed, size, version: GENERATOR_VERSION }
    }

    /// The bundled default set: 100 cases of 64 x 64 x 48, fixed seed.
    pub fn default_set() -> Self {
        Self::new(DEFAULT_CASES, DEFAULT_SEED, DEFAULT_SIZE)
    }

    /// Training cases: 80 % (80 of 100), the rest test.
    pub fn n_train(&self) -> usize {
        if self.cases < 2 { self.cases } else { (self.cases * 4 / 5).clamp(1, self.cases - 1) }
    }
}

pub fn case_name(i: usize) -> String {
    format!("synth_{i:03}")
}

type V3 = [f64; 3];

fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
fn add(a: V3, b: V3) -> V3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}
fn scale(a: V3, s: f64) -> V3 {
    [a[0] * s, a[1] * s, a[2] * s]
}
fn dot(a: V3, b: V3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
fn norm(a: V3) -> f64 {
    dot(a, a).sqrt()
}

/// A rotated ellipsoid whose radius is modulated by a few smooth lobes; `sd` approximates the
/// signed distance in voxels (negative inside).
struct Blob {
    c: V3,
    axes: [V3; 3],
    radii: V3,
    lobes: Vec<(V3, f64, f64)>,
}

impl Blob {
    fn random(rng: &mut Rng, c: V3, radii: V3, lobes: usize, amp: f64) -> Self {
        let a = rng.unit3();
        let mut b = rng.unit3();
        b = sub(b, scale(a, dot(a, b)));
        let nb = norm(b).max(1e-9);
        b = scale(b, 1.0 / nb);
        let cvec = [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
        let lobes =
            (0..lobes).map(|_| (rng.unit3(), rng.uniform_in(1.0, 3.0), rng.uniform_in(0.0, amp))).collect();
        Self { c, axes: [a, b, cvec], radii, lobes }
    }

    fn bbox_radius(&self) -> f64 {
        let amp: f64 = self.lobes.iter().map(|l| l.2).sum();
        self.radii.iter().cloned().fold(0.0, f64::max) * (1.0 + amp) + 2.0
    }

    fn sd(&self, p: V3) -> f64 {
        let d = sub(p, self.c);
        let q = [0, 1, 2].map(|k| dot(d, self.axes[k]) / self.radii[k]);
        let r = norm(q);
        if r < 1e-9 {
            return -self.radii.iter().cloned().fold(f64::MAX, f64::min);
        }
        let dir = scale(q, 1.0 / r);
        let mut m = 1.0;
        for &(u, f, a) in &self.lobes {
            m += a * (f * dot(dir, u)).cos().max(0.0).powi(2);
        }
        let mean_r = (self.radii[0] + self.radii[1] + self.radii[2]) / 3.0;
        (r - m) * mean_r
    }
}

/// A tube of varying radius along a quadratic Bezier curve.
struct Tube {
    pts: Vec<V3>,
    r0: f64,
    r1: f64,
}

impl Tube {
    fn bezier(p0: V3, p1: V3, p2: V3, r0: f64, r1: f64) -> Self {
        let pts = (0..=16)
            .map(|i| {
                let t = i as f64 / 16.0;
                let a = scale(p0, (1.0 - t) * (1.0 - t));
                let b = scale(p1, 2.0 * t * (1.0 - t));
                let c = scale(p2, t * t);
                add(add(a, b), c)
            })
            .collect();
        Self { pts, r0, r1 }
    }

    fn sd(&self, p: V3) -> f64 {
        let n = self.pts.len() - 1;
        let mut best = f64::MAX;
        for i in 0..n {
            let (a, b) = (self.pts[i], self.pts[i + 1]);
            let ab = sub(b, a);
            let t = (dot(sub(p, a), ab) / dot(ab, ab).max(1e-12)).clamp(0.0, 1.0);
            let d = norm(sub(p, add(a, scale(ab, t))));
            let s = (i as f64 + t) / n as f64;
            let r = self.r0 + (self.r1 - self.r0) * s;
            best = best.min(d - r);
        }
        best
    }

    fn bbox(&self) -> (V3, V3) {
        let r = self.r0.max(self.r1) + 2.0;
        let mut lo = [f64::MAX; 3];
        let mut hi = [f64::MIN; 3];
        for p in &self.pts {
            for k in 0..3 {
                lo[k] = lo[k].min(p[k] - r);
                hi[k] = hi[k].max(p[k] + r);
            }
        }
        (lo, hi)
    }
}

/// A smooth random field: a sum of a few low-frequency cosines, roughly in [-1, 1].
struct Smooth {
    waves: Vec<(V3, f64, f64)>,
}

impl Smooth {
    fn random(rng: &mut Rng, n: usize, max_freq: f64, dims: [usize; 3]) -> Self {
        let size = dims.iter().cloned().fold(1, usize::max) as f64;
        let waves = (0..n)
            .map(|_| {
                let u = rng.unit3();
                let f = rng.uniform_in(0.3, 1.0) * max_freq * std::f64::consts::TAU / size;
                (scale(u, f), rng.uniform_in(0.0, std::f64::consts::TAU), rng.uniform_in(0.5, 1.0))
            })
            .collect::<Vec<_>>();
        Self { waves }
    }

    fn at(&self, p: V3) -> f64 {
        let total: f64 = self.waves.iter().map(|w| w.2).sum();
        self.waves.iter().map(|(k, ph, a)| a * (dot(*k, p) + ph).cos()).sum::<f64>() / total.max(1e-9)
    }
}

/// Soft occupancy from a signed distance: 1 inside, 0 outside, ~1 voxel of partial volume.
fn occupancy(sd: f64) -> f64 {
    1.0 / (1.0 + (sd / 0.45).exp())
}

/// Rasterises `sd` into `occ` (max) within a box around a primitive.
fn raster(occ: &mut [f64], dims: [usize; 3], lo: V3, hi: V3, sd: impl Fn(V3) -> f64) {
    let [nx, ny, nz] = dims;
    let clampi = |v: f64, n: usize| v.max(0.0).min(n as f64 - 1.0) as usize;
    let (x0, x1) = (clampi(lo[0].floor(), nx), clampi(hi[0].ceil(), nx));
    let (y0, y1) = (clampi(lo[1].floor(), ny), clampi(hi[1].ceil(), ny));
    let (z0, z1) = (clampi(lo[2].floor(), nz), clampi(hi[2].ceil(), nz));
    for x in x0..=x1 {
        for y in y0..=y1 {
            for z in z0..=z1 {
                let o = occupancy(sd([x as f64, y as f64, z as f64]));
                let i = (x * ny + y) * nz + z;
                if o > occ[i] {
                    occ[i] = o;
                }
            }
        }
    }
}

/// One phantom: a z-normalised image and its label.
pub fn generate_case(seed: u64, index: usize, dims: [usize; 3]) -> (Image, Mask) {
    let mut rng = Rng::new(seed).fork(index as u64);
    let d = dims.map(|v| v as f64);
    let unit = d[0].min(d[1]) / 64.0;
    let n: usize = dims.iter().product();

    // The chamber: a lobed ellipsoid near the centre, plus an appendage lobe.
    let radii = [
        rng.uniform_in(8.5, 13.0) * unit,
        rng.uniform_in(7.5, 12.0) * unit,
        (rng.uniform_in(6.5, 10.0) * unit).min(d[2] * 0.3),
    ];
    let margin = radii.map(|r| r * 1.3 + 3.0);
    let c = [0, 1, 2].map(|k| {
        let half = (d[k] / 2.0 - margin[k]).max(0.0);
        d[k] / 2.0 + rng.uniform_in(-half, half) * 0.45
    });
    let chamber = Blob::random(&mut rng, c, radii, 3, 0.25);
    let app_dir = rng.unit3();
    let rmean = (radii[0] + radii[1]) / 2.0;
    let app_c = add(c, scale(app_dir, rmean * rng.uniform_in(0.7, 0.95)));
    let app_r = rmean * rng.uniform_in(0.3, 0.45);
    let appendage = Blob::random(&mut rng, app_c, [app_r * 1.4, app_r, app_r], 1, 0.15);

    // Veins leave the chamber roughly outward, mostly in one hemisphere (the "posterior").
    let back = {
        let t = rng.uniform_in(0.0, std::f64::consts::TAU);
        [t.cos(), t.sin(), 0.0]
    };
    let n_veins = 3 + rng.below(3) as usize;
    let veins: Vec<Tube> = (0..n_veins)
        .map(|_| {
            let mut dir = add(scale(back, 0.9), scale(rng.unit3(), 0.8));
            dir = scale(dir, 1.0 / norm(dir).max(1e-9));
            let start = add(c, scale(dir, rmean * 0.5));
            let len = rmean + rng.uniform_in(7.0, 15.0) * unit;
            let end = add(c, scale(dir, len));
            let bend =
                add(add(c, scale(dir, len * 0.6)), scale(rng.unit3(), rng.uniform_in(1.0, 4.0) * unit));
            let r0 = rng.uniform_in(2.0, 3.3) * unit;
            Tube::bezier(start, bend, end, r0, r0 * rng.uniform_in(0.6, 0.9))
        })
        .collect();

    // Distractors: an aorta-like tube passing beside the chamber and a ventricle-like blob.
    let side = {
        let t = rng.uniform_in(0.0, std::f64::consts::TAU);
        [t.cos(), t.sin(), 0.0]
    };
    let aorta_r = rng.uniform_in(3.5, 5.5) * unit;
    // Sometimes touching the chamber, as the aorta does in LGE-MRI.
    let gap = rng.uniform_in(-1.5, 3.5) * unit;
    let ac = add(c, scale(side, rmean * 1.15 + aorta_r + gap));
    let tilt = [rng.uniform_in(-0.4, 0.4), rng.uniform_in(-0.4, 0.4), 1.0];
    let aorta = Tube::bezier(
        sub(ac, scale(tilt, d[2])),
        add(ac, scale(rng.unit3(), 3.0 * unit)),
        add(ac, scale(tilt, d[2])),
        aorta_r,
        aorta_r * rng.uniform_in(0.85, 1.1),
    );
    let vdir = {
        let t = rng.uniform_in(0.0, std::f64::consts::TAU);
        [t.cos(), t.sin(), rng.uniform_in(-0.5, 0.5)]
    };
    let vr = rmean * rng.uniform_in(0.8, 1.2);
    let vc = add(c, scale(vdir, rmean + vr * 0.9 + rng.uniform_in(1.0, 5.0) * unit));
    let ventricle = Blob::random(&mut rng, vc, [vr * 1.2, vr, vr * 0.9], 2, 0.2);
    let has_ventricle = rng.uniform() < 0.75;

    let mut fg = vec![0f64; n];
    let mut dis = vec![0f64; n];
    let box_of = |b: &Blob| {
        let r = b.bbox_radius();
        (sub(b.c, [r; 3]), add(b.c, [r; 3]))
    };
    let (lo, hi) = box_of(&chamber);
    raster(&mut fg, dims, lo, hi, |p| chamber.sd(p));
    let (lo, hi) = box_of(&appendage);
    raster(&mut fg, dims, lo, hi, |p| appendage.sd(p));
    for v in &veins {
        let (lo, hi) = v.bbox();
        raster(&mut fg, dims, lo, hi, |p| v.sd(p));
    }
    let (lo, hi) = aorta.bbox();
    raster(&mut dis, dims, lo, hi, |p| aorta.sd(p));
    let mut dis2 = vec![0f64; n];
    if has_ventricle {
        let (lo, hi) = box_of(&ventricle);
        raster(&mut dis2, dims, lo, hi, |p| ventricle.sd(p));
    }

    // Intensities: blood pool bright, the aorta about as bright, the ventricle a little darker,
    // tissue textured; then bias, then noise.
    let bg_level = rng.uniform_in(0.15, 0.35);
    let fg_level = rng.uniform_in(0.7, 1.0);
    let aorta_level = fg_level * rng.uniform_in(0.85, 1.1);
    let ventricle_level = fg_level * rng.uniform_in(0.7, 1.0);
    let texture = Smooth::random(&mut rng, 6, 4.0, dims);
    let tex_amp = rng.uniform_in(0.04, 0.12);
    let bias = Smooth::random(&mut rng, 4, 1.2, dims);
    let bias_amp = rng.uniform_in(0.2, 0.5);
    let noise = rng.uniform_in(0.06, 0.15);

    let mut img = vec![0f32; n];
    let mut lab = vec![0u8; n];
    let [_, ny, nz] = dims;
    for (i, (v, l)) in img.iter_mut().zip(lab.iter_mut()).enumerate() {
        let p = [(i / (ny * nz)) as f64, ((i / nz) % ny) as f64, (i % nz) as f64];
        let f = fg[i];
        let a = dis[i] * (1.0 - f);
        let vn = dis2[i] * (1.0 - f) * (1.0 - a);
        let base = bg_level + tex_amp * texture.at(p);
        let mut s = base * (1.0 - f - a - vn) + fg_level * f + aorta_level * a + ventricle_level * vn;
        s *= (bias_amp * bias.at(p)).exp();
        s += noise * rng.normal();
        *v = s as f32;
        *l = (f > 0.5) as u8;
    }
    let mean = img.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = img.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    let std = var.sqrt().max(1e-12);
    for v in &mut img {
        *v = ((*v as f64 - mean) / std) as f32;
    }
    let geometry = Geometry::with_spacing([1.0; 3]);
    let image = Volume::from_vec(dims, img).expect("dims match").with_geometry(geometry.clone());
    let label = Volume::from_vec(dims, lab).expect("dims match").with_geometry(geometry);
    (image, label)
}

/// Generates a set in the case-folder layout with train/test lists, then the marker file.
pub fn generate_dataset(dir: impl AsRef<Path>, spec: &SynthSpec) -> Result<PathBuf> {
    let dir = dir.as_ref();
    ensure!(spec.cases > 0, "a synthetic set needs at least one case");
    ensure!(
        spec.size.iter().all(|&s| (16..=1024).contains(&s)),
        "synthetic volume size {:?} must be 16..=1024 per side",
        spec.size
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let marker = dir.join(MARKER);
    if marker.exists() {
        std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(spec.cases);
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<()> {
                    for i in (t..spec.cases).step_by(threads) {
                        let (img, lab) = generate_case(spec.seed, i, spec.size);
                        let cd = dir.join(case_name(i));
                        std::fs::create_dir_all(&cd).with_context(|| format!("creating {}", cd.display()))?;
                        write_image(cd.join("image.nii.gz"), &img)?;
                        write_mask(cd.join("label.nii.gz"), &lab)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("generator thread panicked")).collect()
    });
    for r in results {
        r?;
    }
    let names: Vec<String> = (0..spec.cases).map(case_name).collect();
    let nt = spec.n_train();
    write_list(dir.join("train.list"), &names[..nt])?;
    write_list(dir.join("test.list"), &names[nt..])?;
    let json = serde_json::to_string_pretty(spec).expect("the spec serialises");
    write_atomic(&marker, json.as_bytes())?;
    Ok(dir.to_path_buf())
}

/// Whether `dir` holds a complete set generated from exactly `spec`.
pub fn is_complete(dir: &Path, spec: &SynthSpec) -> bool {
    std::fs::read_to_string(dir.join(MARKER))
        .ok()
        .and_then(|t| serde_json::from_str::<SynthSpec>(&t).ok())
        .is_some_and(|s| &s == spec)
}

/// The bundled default set (100 cases, fixed seed) in `dir`, generated on first use; a no-op
/// when a complete set from the same generator is already there.
pub fn ensure_default_dataset(dir: impl AsRef<Path>) -> Result<PathBuf> {
    ensure_dataset(dir, &SynthSpec::default_set())
}

/// A complete set from `spec` in `dir`: generated unless already there.
pub fn ensure_dataset(dir: impl AsRef<Path>, spec: &SynthSpec) -> Result<PathBuf> {
    let dir = dir.as_ref();
    if is_complete(dir, spec) {
        return Ok(dir.to_path_buf());
    }
    generate_dataset(dir, spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::Dataset;

    /// A path inside a fresh folder, not yet made; the folder is removed when the `TempDir` is
    /// dropped, so keep it bound for the test.
    fn tmpdir(tag: &str) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::Builder::new().prefix(&format!("caml-synth-{tag}-")).tempdir().unwrap();
        let d = t.path().join("set");
        (t, d)
    }

    #[test]
    fn phantoms_look_like_an_atrium_with_distractors() {
        for i in 0..6 {
            let (img, lab) = generate_case(DEFAULT_SEED, i, DEFAULT_SIZE);
            let n = lab.len() as f64;
            let fg = lab.count_foreground() as f64;
            assert!(fg / n > 0.02 && fg / n < 0.25, "case {i}: fraction {}", fg / n);
            // Foreground clearly brighter on average, yet some background voxels are as bright
            // as the median foreground (distractors, bias, noise).
            let (mut f, mut b): (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
            for (&v, &l) in img.data().iter().zip(lab.data()) {
                if l == 1 { f.push(v) } else { b.push(v) }
            }
            f.sort_by(f32::total_cmp);
            let med = f[f.len() / 2];
            let mean_b = b.iter().sum::<f32>() / b.len() as f32;
            assert!(med > mean_b + 1.0, "case {i}");
            let bright_bg = b.iter().filter(|&&v| v > med).count();
            assert!(bright_bg > 200, "case {i}: {bright_bg} bright background voxels");
            // z-normalised.
            let m = img.data().iter().map(|&v| v as f64).sum::<f64>() / n;
            let s = (img.data().iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n).sqrt();
            assert!(m.abs() < 1e-4 && (s - 1.0).abs() < 1e-4);
            // The label stays inside the volume with room for training crops.
            let (lo, hi) = lab.bounding_box().unwrap();
            assert!(hi[0] - lo[0] < 60 && hi[1] - lo[1] < 60, "{lo:?} {hi:?}");
        }
        let (a, _) = generate_case(DEFAULT_SEED, 0, DEFAULT_SIZE);
        let (b, _) = generate_case(DEFAULT_SEED, 1, DEFAULT_SIZE);
        assert_ne!(a.data(), b.data());
    }

    #[test]
    fn same_seed_same_bytes_other_seed_different() {
        let spec = SynthSpec::new(3, 7, [32, 32, 24]);
        let ((_a, a), (_b, b), (_c, c)) = (tmpdir("a"), tmpdir("b"), tmpdir("c"));
        generate_dataset(&a, &spec).unwrap();
        generate_dataset(&b, &spec).unwrap();
        generate_dataset(&c, &SynthSpec::new(3, 8, [32, 32, 24])).unwrap();
        for f in ["synth_000/image.nii.gz", "synth_002/label.nii.gz", "train.list"] {
            assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap());
        }
        assert_ne!(
            std::fs::read(a.join("synth_000/image.nii.gz")).unwrap(),
            std::fs::read(c.join("synth_000/image.nii.gz")).unwrap()
        );
        let ds = Dataset::open(&a).unwrap();
        assert_eq!(ds.train, vec!["synth_000", "synth_001"]);
        assert_eq!(ds.test, vec!["synth_002"]);
        let case = ds.load_case("synth_001").unwrap();
        assert_eq!(case.image.dims(), [32, 32, 24]);
        assert!(is_complete(&a, &spec));
        assert!(!is_complete(&a, &SynthSpec::new(4, 7, [32, 32, 24])));
    }

    #[test]
    fn split_is_80_20_for_100_cases() {
        assert_eq!(SynthSpec::default_set().n_train(), 80);
        assert_eq!(SynthSpec::new(10, 0, DEFAULT_SIZE).n_train(), 8);
        assert_eq!(SynthSpec::new(2, 0, DEFAULT_SIZE).n_train(), 1);
        assert_eq!(SynthSpec::new(1, 0, DEFAULT_SIZE).n_train(), 1);
    }

    #[test]
    fn incomplete_sets_are_regenerated() {
        let (_d, d) = tmpdir("marker");
        let spec = SynthSpec::new(2, 1, [24, 24, 16]);
        ensure_dataset(&d, &spec).unwrap();
        // Present and complete: nothing is rewritten.
        std::fs::write(d.join("synth_000/label.nii.gz"), b"left alone").unwrap();
        ensure_dataset(&d, &spec).unwrap();
        assert_eq!(std::fs::read(d.join("synth_000/label.nii.gz")).unwrap(), b"left alone");
        generate_dataset(&d, &spec).unwrap();
        let before = std::fs::read(d.join("synth_001/image.nii.gz")).unwrap();
        // A half-written set: the marker is gone and a case was damaged.
        std::fs::remove_file(d.join(MARKER)).unwrap();
        std::fs::write(d.join("synth_001/image.nii.gz"), b"junk").unwrap();
        assert!(!is_complete(&d, &spec));
        ensure_dataset(&d, &spec).unwrap();
        assert_eq!(std::fs::read(d.join("synth_001/image.nii.gz")).unwrap(), before);
        assert!(is_complete(&d, &spec));
    }
}
