//! Conversion of the 2018 Atrial Segmentation Challenge data to the case-folder layout, with
//! the reference's preprocessing:
//!
//! - label = (laendo == 255);
//! - image z-normalised with the mean and (population) standard deviation of the whole volume;
//! - cropped in X and Y only to the label's bounding box, each side widened by a random 10..19
//!   voxels plus half of any shortfall of the box to the 112 x 112 patch, clamped to the
//!   volume; all Z slices kept. As in the reference, the box's upper bound is the last label
//!   voxel's index (not one past it) plus the widening, used as an exclusive end, and the
//!   shortfall is `max(112 - (max - min), 0) // 2`.
//!
//! Each case draws from its own stream (the seed forked by a hash of the case name), so the
//! crop of a case does not depend on which other cases are converted.
//!
//! With the `h5` feature, `import_h5` converts the widely shared preprocessed
//! `<case>/mri_norm2.h5` files (datasets `image`, f32, and `label`, u8, both X, Y, Z with Z
//! fastest) instead; they carry no geometry, so the spacing is 1.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use crate::data::dataset::{read_list, write_list};
use crate::data::nifti_io::{write_image, write_mask};
use crate::data::nrrd::read_nrrd;
use crate::data::{Image, Mask};
use crate::rng::Rng;

/// The reference's patch in X and Y, which the crop is widened towards.
pub const PATCH_XY: [usize; 2] = [112, 112];

pub const BUNDLED_TRAIN_LIST: &str = include_str!("../../data/la/train.list");
pub const BUNDLED_TEST_LIST: &str = include_str!("../../data/la/test.list");

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across platforms and releases.
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The X-Y crop `[lo, hi)` per axis for a label whose inclusive bounding box is
/// `bbox_lo..=bbox_hi` in a volume of `dims`. Draws, in order: x low, x high, y low, y high.
pub fn la_crop_box(
    bbox_lo: [usize; 3],
    bbox_hi: [usize; 3],
    dims: [usize; 3],
    rng: &mut Rng,
) -> ([usize; 2], [usize; 2]) {
    let mut lo = [0usize; 2];
    let mut hi = [0usize; 2];
    for a in 0..2 {
        let (mn, mx) = (bbox_lo[a] as i64, bbox_hi[a] as i64);
        let short = (PATCH_XY[a] as i64 - (mx - mn)).max(0) / 2;
        let r_lo = rng.range(10, 20);
        let r_hi = rng.range(10, 20);
        lo[a] = (mn - r_lo - short).max(0) as usize;
        hi[a] = (mx + r_hi + short).min(dims[a] as i64) as usize;
    }
    (lo, hi)
}

/// Applies the reference's preprocessing to one case.
pub fn preprocess_la(image: &Image, laendo: &Image, rng: &mut Rng) -> Result<(Image, Mask)> {
    ensure!(
        image.dims() == laendo.dims(),
        "the label is {:?} but the image is {:?}",
        laendo.dims(),
        image.dims()
    );
    let label = laendo.map(|v| (v == 255.0) as u8);
    let (bl, bh) = label.bounding_box().context("the label has no voxel equal to 255")?;
    let norm = super::dataset::z_normalize(image)?;
    let (lo, hi) = la_crop_box(bl, bh, image.dims(), rng);
    let dz = image.dims()[2];
    let crop_lo = [lo[0], lo[1], 0];
    let size = [hi[0] - lo[0], hi[1] - lo[1], dz];
    Ok((norm.crop(crop_lo, size)?, label.crop(crop_lo, size)?))
}

/// What a conversion did.
#[derive(Debug)]
pub struct PrepareReport {
    pub cases: Vec<(String, [usize; 3])>,
    /// Converted cases that are in neither list.
    pub unlisted: Vec<String>,
}

fn lists(dir: Option<&Path>) -> Result<(Vec<String>, Vec<String>)> {
    match dir {
        Some(d) => Ok((read_list(d.join("train.list"))?, read_list(d.join("test.list"))?)),
        None => {
            let parse = |t: &str| -> Vec<String> {
                t.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
            };
            Ok((parse(BUNDLED_TRAIN_LIST), parse(BUNDLED_TEST_LIST)))
        }
    }
}

/// Converted cases with their cropped dims.
type Converted = Vec<(String, [usize; 3])>;

/// Case folders under `raw` that hold `file`, sorted.
fn case_dirs(raw: &Path, file: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(raw).with_context(|| format!("listing {}", raw.display()))? {
        let e = e?;
        if e.path().join(file).is_file() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Checks that every listed case is present, then converts every present case with `convert`
/// (two at a time) and writes the lists.
fn convert_all(
    raw: &Path,
    out: &Path,
    file: &str,
    list_dir: Option<&Path>,
    convert: impl Fn(&str) -> Result<(Image, Mask)> + Sync,
) -> Result<PrepareReport> {
    ensure!(raw.is_dir(), "raw data folder {} does not exist", raw.display());
    let (train, test) = lists(list_dir)?;
    let present = case_dirs(raw, file)?;
    ensure!(!present.is_empty(), "no case folder under {} holds {file}", raw.display());
    let missing: Vec<&String> =
        train.iter().chain(&test).filter(|n| present.binary_search(n).is_err()).collect();
    if !missing.is_empty() {
        bail!(
            "{} of the {} listed cases are missing, e.g. {} (give --lists for another split)",
            missing.len(),
            train.len() + test.len(),
            raw.join(missing[0]).join(file).display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(2).min(present.len());
    let results: Vec<Result<Converted>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let present = &present;
                let convert = &convert;
                s.spawn(move || -> Result<Converted> {
                    let mut done = Vec::new();
                    for name in present.iter().skip(t).step_by(threads) {
                        let (img, lab) = convert(name)?;
                        let cd = out.join(name);
                        std::fs::create_dir_all(&cd).with_context(|| format!("creating {}", cd.display()))?;
                        write_image(cd.join("image.nii.gz"), &img)?;
                        write_mask(cd.join("label.nii.gz"), &lab)?;
                        done.push((name.clone(), img.dims()));
                    }
                    Ok(done)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("conversion thread panicked")).collect()
    });
    let mut cases = Vec::new();
    for r in results {
        cases.extend(r?);
    }
    cases.sort();
    write_list(out.join("train.list"), &train)?;
    write_list(out.join("test.list"), &test)?;
    let unlisted = present.iter().filter(|n| !train.contains(n) && !test.contains(n)).cloned().collect();
    Ok(PrepareReport { cases, unlisted })
}

/// Converts `raw/<case>/{lgemri,laendo}.nrrd` into `out/<case>/{image,label}.nii.gz` with the
/// split lists (the bundled LA lists unless `list_dir` holds others).
pub fn prepare_la(raw: &Path, out: &Path, seed: u64, list_dir: Option<&Path>) -> Result<PrepareReport> {
    let root = Rng::new(seed);
    convert_all(raw, out, "lgemri.nrrd", list_dir, |name| {
        let dir: PathBuf = raw.join(name);
        let image = read_nrrd(dir.join("lgemri.nrrd"))?;
        let laendo_path = dir.join("laendo.nrrd");
        let laendo = read_nrrd(&laendo_path)?;
        let mut rng = root.fork(name_hash(name));
        preprocess_la(&image, &laendo, &mut rng)
            .with_context(|| format!("preprocessing {}", laendo_path.display()))
    })
}

/// Converts `h5/<case>/mri_norm2.h5` (already preprocessed) into the case-folder layout.
#[cfg(feature = "h5")]
pub fn import_h5(h5: &Path, out: &Path, list_dir: Option<&Path>) -> Result<PrepareReport> {
    convert_all(h5, out, "mri_norm2.h5", list_dir, |name| {
        let p = h5.join(name).join("mri_norm2.h5");
        read_la_h5(&p)
    })
}

/// Reads the `image` and `label` datasets of one preprocessed LA file.
#[cfg(feature = "h5")]
pub fn read_la_h5(path: &Path) -> Result<(Image, Mask)> {
    read_la_h5_inner(path).with_context(|| format!("reading HDF5 {}", path.display()))
}

#[cfg(feature = "h5")]
fn read_la_h5_inner(path: &Path) -> Result<(Image, Mask)> {
    use crate::data::Volume;
    let file_len = std::fs::metadata(path).context("cannot open")?.len();
    let f = rust_hdf5::H5File::open(path).map_err(|e| anyhow::anyhow!("cannot open: {e}"))?;
    let read = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let ds = f.dataset(name).map_err(|e| anyhow::anyhow!("no dataset {name:?}: {e}"))?;
        let shape = ds.shape();
        ensure!(shape.len() == 3, "dataset {name:?} has shape {shape:?}, expected 3 dims");
        // The data and each chunk the reader decodes whole must fit in what the file can hold
        // (deflate expands at most 1032-fold) before anything that large is read.
        let most = file_len.saturating_mul(1032).min(1 << 32);
        let elem = ds.element_size() as u64;
        ensure!((1..=8).contains(&elem), "dataset {name:?} has {elem}-byte elements");
        let bytes = |dims: &[usize]| dims.iter().try_fold(elem, |a, &d| a.checked_mul(d as u64));
        ensure!(
            bytes(&shape).is_some_and(|b| b <= most),
            "dataset {name:?} has shape {shape:?}, more than the {file_len}-byte file can hold"
        );
        if let Some(chunk) = ds.chunk_dims() {
            ensure!(
                chunk.len() == shape.len() && bytes(&chunk).is_some_and(|b| b <= most),
                "dataset {name:?} has chunks of {chunk:?}, more than the {file_len}-byte file can hold"
            );
        }
        let v = ds
            .read_raw::<f32>()
            .or_else(|_| ds.read_raw::<u8>().map(|v| v.into_iter().map(f32::from).collect()))
            .or_else(|_| ds.read_raw::<f64>().map(|v| v.into_iter().map(|x| x as f32).collect()))
            .map_err(|e| anyhow::anyhow!("dataset {name:?}: unsupported element type: {e}"))?;
        Ok((shape, v))
    };
    let (si, vi) = read("image")?;
    let (sl, vl) = read("label")?;
    ensure!(si == sl, "label is {sl:?} but image is {si:?}");
    let dims = [si[0], si[1], si[2]];
    // h5py writes C order: the last axis (Z) fastest, which is the volume layout already.
    let image = Volume::from_vec(dims, vi)?;
    let bad = image.data().iter().filter(|v| !v.is_finite()).count();
    ensure!(bad == 0, "image has {bad} voxels that are NaN or infinite");
    let bad = vl.iter().filter(|&&v| v != 0.0 && v != 1.0).count();
    ensure!(bad == 0, "label has {bad} voxels outside {{0, 1}}");
    let label = Volume::from_vec(dims, vl.iter().map(|&v| v as u8).collect())?;
    Ok((image, label))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Volume;
    use crate::data::dataset::Dataset;
    use std::io::Write;

    /// A fresh folder, removed when the `TempDir` is dropped: keep it bound for the test.
    fn tmpdir(tag: &str) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::Builder::new().prefix(&format!("caml-la-{tag}-")).tempdir().unwrap();
        let d = t.path().to_path_buf();
        (t, d)
    }

    #[test]
    fn crop_box_follows_the_reference_formula() {
        let mut a = Rng::new(3);
        let mut b = Rng::new(3);
        // A 100-wide box in X (shortfall (112 - 99) // 2 = 6), 130-wide in Y (none).
        let (lo, hi) = la_crop_box([200, 300, 10], [299, 429, 60], [640, 640, 88], &mut a);
        let (r1, r2, r3, r4) = (b.range(10, 20), b.range(10, 20), b.range(10, 20), b.range(10, 20));
        assert_eq!(lo, [(200 - r1 - 6) as usize, (300 - r3) as usize]);
        assert_eq!(hi, [(299 + r2 + 6) as usize, (429 + r4) as usize]);
        // Clamped at the volume's edges.
        let (lo, hi) = la_crop_box([3, 5, 0], [630, 630, 1], [640, 640, 88], &mut a);
        assert_eq!((lo, hi), ([0, 0], [640, 640]));
        for _ in 0..200 {
            let (lo, hi) = la_crop_box([200, 200, 0], [300, 300, 0], [640, 640, 88], &mut a);
            let w_lo = 200 - lo[0] - 6;
            let w_hi = hi[0] - 300 - 6;
            assert!((10..20).contains(&w_lo) && (10..20).contains(&w_hi));
        }
    }

    fn write_nrrd_gz(path: &Path, dims: [usize; 3], v: &[u8]) {
        let mut f = std::fs::File::create(path).unwrap();
        write!(
            f,
            "NRRD0004\ntype: unsigned char\ndimension: 3\nspace: left-posterior-superior\n\
             sizes: {} {} {}\nspace directions: (0.625,0,0) (0,0.625,0) (0,0,0.625)\n\
             encoding: gzip\nspace origin: (0,0,0)\n\n",
            dims[0], dims[1], dims[2]
        )
        .unwrap();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(v).unwrap();
        f.write_all(&e.finish().unwrap()).unwrap();
    }

    /// Values in NRRD file order (x fastest) from a function of (x, y, z).
    fn file_order(dims: [usize; 3], f: impl Fn(usize, usize, usize) -> u8) -> Vec<u8> {
        let mut v = Vec::new();
        for z in 0..dims[2] {
            for y in 0..dims[1] {
                for x in 0..dims[0] {
                    v.push(f(x, y, z));
                }
            }
        }
        v
    }

    #[test]
    fn converts_raw_cases_with_lists_and_normalisation() {
        let (_raw, raw) = tmpdir("raw");
        let (_out, out) = tmpdir("out");
        let (_lists, lists) = tmpdir("lists");
        let dims = [160, 150, 6];
        let names = ["caseA", "caseB", "caseC"];
        for (k, n) in names.iter().enumerate() {
            let d = raw.join(n);
            std::fs::create_dir_all(&d).unwrap();
            let img = file_order(dims, |x, y, z| ((x + 2 * y + 3 * z + k) % 200) as u8);
            let lab =
                file_order(
                    dims,
                    |x, y, _| {
                        if (20 + k..60).contains(&x) && (30..70).contains(&y) { 255 } else { 0 }
                    },
                );
            write_nrrd_gz(&d.join("lgemri.nrrd"), dims, &img);
            write_nrrd_gz(&d.join("laendo.nrrd"), dims, &lab);
        }
        write_list(lists.join("train.list"), &["caseA".into(), "caseB".into()]).unwrap();
        write_list(lists.join("test.list"), &["caseC".into()]).unwrap();
        let rep = prepare_la(&raw, &out, 1337, Some(&lists)).unwrap();
        assert_eq!(rep.cases.len(), 3);
        assert!(rep.unlisted.is_empty());
        let ds = Dataset::open(&out).unwrap();
        let c = ds.load_case("caseB").unwrap();
        // All Z kept; X (label 21..=59) widens by 10..19 + (112 - 38) // 2 = 37 per side,
        // clamped at 0 below, so the crop is [0, 59 + 37 + r).
        assert_eq!(c.image.dims()[2], 6);
        let nx = c.image.dims()[0];
        assert!((59 + 37 + 10..=59 + 37 + 19).contains(&nx), "{nx}");
        // The label survived intact and the image is the whole-volume z-score.
        assert_eq!(c.label.count_foreground(), 39 * 40 * 6);
        let src = read_nrrd(raw.join("caseB/lgemri.nrrd")).unwrap();
        let n = src.len() as f64;
        let mean = src.data().iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (src.data().iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let want = ((src.get(5, 7, 2) as f64 - mean) / std) as f32;
        // Both crops start at 0 (30 - r - 36 < 0 in Y), so coordinates carry over.
        assert_eq!(c.image.get(5, 7, 2), want);
        // Reproducible: the same seed gives the same bytes.
        let (_out2, out2) = tmpdir("out2");
        prepare_la(&raw, &out2, 1337, Some(&lists)).unwrap();
        assert_eq!(
            std::fs::read(out.join("caseA/image.nii.gz")).unwrap(),
            std::fs::read(out2.join("caseA/image.nii.gz")).unwrap()
        );
    }

    /// `tests/fixtures/la_case.h5` was written by h5py like the shared files:
    /// `create_dataset('image', data=(100x + 10y + z) as f32, compression="gzip")` and
    /// `label = (x > 2) & (y < 4)` as u8, shape 7 x 6 x 5, libver 'earliest'.
    #[cfg(feature = "h5")]
    #[test]
    fn reads_h5py_gzip_datasets_in_volume_layout() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let (img, lab) = read_la_h5(&fixtures.join("la_case.h5")).unwrap();
        assert_eq!(img.dims(), [7, 6, 5]);
        for (x, y, z) in [(0, 0, 0), (6, 5, 4), (3, 1, 2)] {
            assert_eq!(img.get(x, y, z), (100 * x + 10 * y + z) as f32);
            assert_eq!(lab.get(x, y, z), (x > 2 && y < 4) as u8);
        }
        let (_h5, h5) = tmpdir("h5");
        let (_out, out) = tmpdir("h5-out");
        let (_lists, lists) = tmpdir("h5-lists");
        std::fs::create_dir_all(h5.join("caseX")).unwrap();
        std::fs::copy(fixtures.join("la_case.h5"), h5.join("caseX/mri_norm2.h5")).unwrap();
        write_list(lists.join("train.list"), &["caseX".into()]).unwrap();
        write_list(lists.join("test.list"), &[]).unwrap();
        import_h5(&h5, &out, Some(&lists)).unwrap();
        let c = Dataset::open(&out).unwrap().load_case("caseX").unwrap();
        assert_eq!(c.image.data(), img.data());
        std::fs::write(h5.join("caseX/mri_norm2.h5"), b"not hdf5").unwrap();
        let e = format!("{:#}", import_h5(&h5, &out, Some(&lists)).unwrap_err());
        assert!(e.contains("caseX/mri_norm2.h5"), "{e}");
    }

    #[test]
    fn missing_listed_cases_and_empty_labels_are_errors() {
        let (_raw, raw) = tmpdir("raw-bad");
        let (_out, out) = tmpdir("out-bad");
        let e = format!("{:#}", prepare_la(&raw, &out, 1, None).unwrap_err());
        assert!(e.contains("no case folder"), "{e}");
        let d = raw.join("06SR5RBREL16DQ6M8LWS");
        std::fs::create_dir_all(&d).unwrap();
        write_nrrd_gz(&d.join("lgemri.nrrd"), [4, 4, 2], &[1; 32]);
        write_nrrd_gz(&d.join("laendo.nrrd"), [4, 4, 2], &[0; 32]);
        let e = format!("{:#}", prepare_la(&raw, &out, 1, None).unwrap_err());
        assert!(e.contains("99 of the 100 listed cases are missing"), "{e}");
        let (_lists, lists) = tmpdir("lists-bad");
        write_list(lists.join("train.list"), &["06SR5RBREL16DQ6M8LWS".into()]).unwrap();
        write_list(lists.join("test.list"), &[]).unwrap();
        let e = format!("{:#}", prepare_la(&raw, &out, 1, Some(&lists)).unwrap_err());
        assert!(e.contains("laendo.nrrd") && e.contains("255"), "{e}");
        let img = Volume::filled([4, 4, 2], 3.0f32);
        let lab = Volume::filled([4, 4, 2], 255.0f32);
        let e = format!("{:#}", preprocess_la(&img, &lab, &mut Rng::new(0)).unwrap_err());
        assert!(e.contains("constant"), "{e}");
    }
}
