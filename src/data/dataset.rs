//! Datasets on disk and their train/test splits.
//!
//! Two layouts are recognised:
//! - case folders: `ROOT/<case>/image.nii.gz` and `ROOT/<case>/label.nii.gz` (or `.nii`), with
//!   `ROOT/train.list` and `ROOT/test.list` naming one case per line (the reference's LA layout,
//!   and what `prepare-la` and `synth` write);
//! - nnU-Net: `ROOT/imagesTr/<case>_0000.nii.gz` and `ROOT/labelsTr/<case>.nii.gz` (test cases
//!   in `imagesTs`/`labelsTs`), an optional `dataset.json` (single channel, `file_ending`), and
//!   optional `train.list`/`test.list`; without them every labelled training case is in the
//!   train split and every `imagesTs` case with a label in `labelsTs` is in the test split.
//!
//! Every loaded case is checked: image and label of the same shape, labels in {0, 1}, no NaN or
//! infinite intensities. Each failure is an error naming the file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use super::nifti_io::{read_image, read_mask};
use super::volume::{Image, Mask};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    CaseFolders,
    NnUnet,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub layout: Layout,
    pub train: Vec<String>,
    pub test: Vec<String>,
    /// nnU-Net file ending (".nii.gz" unless dataset.json says otherwise).
    ending: String,
}

/// One image with its label, both validated.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub image: Image,
    pub label: Mask,
}

/// Reads a split file: one case name per line; blank lines and `#` comments are skipped.
pub fn read_list(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading case list {}", path.display()))?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if name.contains(['/', '\\']) || name == "." || name == ".." {
            bail!("case list {} line {}: {name:?} is not a case name", path.display(), i + 1);
        }
        if !seen.insert(name.to_string()) {
            bail!("case list {} line {}: {name:?} is listed twice", path.display(), i + 1);
        }
        out.push(name.to_string());
    }
    Ok(out)
}

/// Writes a split file atomically.
pub fn write_list(path: impl AsRef<Path>, names: &[String]) -> Result<()> {
    let path = path.as_ref();
    let mut text = names.join("\n");
    text.push('\n');
    crate::fsutil::write_atomic(path, text.as_bytes())
}

fn first_existing(dir: &Path, stem: &str) -> Option<PathBuf> {
    [".nii.gz", ".nii"].iter().map(|e| dir.join(format!("{stem}{e}"))).find(|p| p.is_file())
}

impl Dataset {
    /// Opens a dataset folder, detecting the layout and checking that every listed case has
    /// its files.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        ensure!(root.is_dir(), "dataset folder {} does not exist", root.display());
        let ds = if root.join("imagesTr").is_dir() {
            Self::open_nnunet(root)?
        } else {
            let train_list = root.join("train.list");
            ensure!(
                train_list.is_file(),
                "dataset {}: neither a case-folder dataset (no train.list) nor an nnU-Net one \
                 (no imagesTr)",
                root.display()
            );
            let train = read_list(&train_list)?;
            let test_list = root.join("test.list");
            let test = if test_list.is_file() { read_list(&test_list)? } else { Vec::new() };
            Self { root, layout: Layout::CaseFolders, train, test, ending: ".nii.gz".into() }
        };
        let train: HashSet<&String> = ds.train.iter().collect();
        if let Some(both) = ds.test.iter().find(|n| train.contains(n)) {
            bail!("dataset {}: case {both:?} is in both the train and the test list", ds.root.display());
        }
        for name in ds.train.iter().chain(&ds.test) {
            ds.image_path(name)?;
            ds.label_path(name)?;
        }
        Ok(ds)
    }

    fn open_nnunet(root: PathBuf) -> Result<Self> {
        let mut ending = ".nii.gz".to_string();
        let json = root.join("dataset.json");
        if json.is_file() {
            let text =
                std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", json.display()))?;
            if let Some(e) = v.get("file_ending").and_then(|e| e.as_str()) {
                ensure!(e == ".nii.gz" || e == ".nii", "{}: file_ending {e:?} is not NIfTI", json.display());
                ending = e.to_string();
            }
            let channels = v
                .get("channel_names")
                .or_else(|| v.get("modality"))
                .and_then(|c| c.as_object())
                .map_or(1, |c| c.len());
            ensure!(
                channels == 1,
                "{}: {channels} input channels; only single-channel images are supported",
                json.display()
            );
        }
        let cases_in = |dir: &Path| -> Result<Vec<String>> {
            if !dir.is_dir() {
                return Ok(Vec::new());
            }
            let mut names = Vec::new();
            for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
                let f = e?.file_name().to_string_lossy().into_owned();
                if let Some(stem) = f.strip_suffix(ending.as_str()) {
                    names.push(stem.to_string());
                }
            }
            names.sort();
            Ok(names)
        };
        let images = cases_in(&root.join("imagesTr"))?;
        if let Some(extra) = images
            .iter()
            .find(|n| n.len() > 5 && n.ends_with(|c: char| c.is_ascii_digit()) && !n.ends_with("_0000"))
        {
            bail!(
                "{}: {extra}{ending} is a second channel; only single-channel images are supported",
                root.join("imagesTr").display()
            );
        }
        let (train, test) = if root.join("train.list").is_file() {
            let train = read_list(root.join("train.list"))?;
            let test = if root.join("test.list").is_file() {
                read_list(root.join("test.list"))?
            } else {
                Vec::new()
            };
            (train, test)
        } else {
            let train = cases_in(&root.join("labelsTr"))?;
            let ts_images: HashSet<String> = cases_in(&root.join("imagesTs"))?
                .into_iter()
                .filter_map(|n| n.strip_suffix("_0000").map(str::to_string))
                .collect();
            let test =
                cases_in(&root.join("labelsTs"))?.into_iter().filter(|n| ts_images.contains(n)).collect();
            (train, test)
        };
        Ok(Self { root, layout: Layout::NnUnet, train, test, ending })
    }

    /// The image file of a case; an error naming the expected path when it is missing.
    pub fn image_path(&self, name: &str) -> Result<PathBuf> {
        match self.layout {
            Layout::CaseFolders => {
                let dir = self.root.join(name);
                first_existing(&dir, "image").with_context(|| {
                    format!("case {name:?}: missing image {}", dir.join("image.nii.gz").display())
                })
            }
            Layout::NnUnet => self.nnunet_file(&format!("{name}_0000"), "images", name),
        }
    }

    /// The label file of a case; an error naming the expected path when it is missing.
    pub fn label_path(&self, name: &str) -> Result<PathBuf> {
        match self.layout {
            Layout::CaseFolders => {
                let dir = self.root.join(name);
                first_existing(&dir, "label").with_context(|| {
                    format!("case {name:?}: missing label {}", dir.join("label.nii.gz").display())
                })
            }
            Layout::NnUnet => self.nnunet_file(name, "labels", name),
        }
    }

    fn nnunet_file(&self, stem: &str, kind: &str, name: &str) -> Result<PathBuf> {
        let file = format!("{stem}{}", self.ending);
        let tr = self.root.join(format!("{kind}Tr")).join(&file);
        let ts = self.root.join(format!("{kind}Ts")).join(&file);
        if tr.is_file() {
            Ok(tr)
        } else if ts.is_file() {
            Ok(ts)
        } else {
            bail!("case {name:?}: missing {} (nor in {kind}Ts)", tr.display())
        }
    }

    /// Reads and validates one case.
    pub fn load_case(&self, name: &str) -> Result<Case> {
        let ip = self.image_path(name)?;
        let lp = self.label_path(name)?;
        let image = read_image(&ip)?;
        let label = read_mask(&lp)?;
        validate_case(&image, &ip, &label, &lp)?;
        Ok(Case { name: name.to_string(), image, label })
    }

    /// Reads an image alone (for prediction), checking it for NaN/Inf.
    pub fn load_image(&self, name: &str) -> Result<Image> {
        let ip = self.image_path(name)?;
        let image = read_image(&ip)?;
        check_finite(&image, &ip)?;
        Ok(image)
    }

    pub fn load_cases(&self, names: &[String]) -> Result<Vec<Case>> {
        names.iter().map(|n| self.load_case(n)).collect()
    }

    /// The cases `names` as a model takes them: their images z-normalised when `normalize`
    /// ([`z_normalize`]), else as stored, with a warning for each that is not z-normalised
    /// ([`unnormalized_warning`]).
    pub fn load_model_inputs(&self, names: &[String], normalize: bool) -> Result<(Vec<Case>, Vec<String>)> {
        let mut cases = self.load_cases(names)?;
        let mut warnings = Vec::new();
        for c in &mut cases {
            let path = self.image_path(&c.name)?;
            if normalize {
                c.image = z_normalize(&c.image).with_context(|| format!("image {}", path.display()))?;
            } else {
                warnings.extend(unnormalized_warning(&c.image, &path));
            }
        }
        Ok((cases, warnings))
    }

    pub fn load_train(&self) -> Result<Vec<Case>> {
        self.load_cases(&self.train)
    }

    pub fn load_test(&self) -> Result<Vec<Case>> {
        self.load_cases(&self.test)
    }
}

/// The mean and (population) standard deviation of an image's intensities.
pub fn intensity_stats(image: &Image) -> (f64, f64) {
    let n = image.len().max(1) as f64;
    let mean = image.data().iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = image.data().iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// The image z-normalised with the mean and standard deviation of its whole volume (the LA
/// preprocessing's step, which `prepare-la` applies before cropping); an error for a constant one.
pub fn z_normalize(image: &Image) -> Result<Image> {
    let (mean, std) = intensity_stats(image);
    ensure!(std > 0.0 && std.is_finite(), "the image is constant (or not finite): it cannot be z-normalised");
    Ok(image.map(|v| ((v as f64 - mean) / std) as f32))
}

/// A warning for an image at `path` whose intensities are far from those of z-normalised data
/// (what `prepare-la` and `synth` write, and the LA models learn from): a mean beyond 3 or a
/// standard deviation outside 0.2 to 5, as raw scanner values have. None when they are not.
pub fn unnormalized_warning(image: &Image, path: &Path) -> Option<String> {
    let (mean, std) = intensity_stats(image);
    let far = mean.abs() > 3.0 || !(0.2..=5.0).contains(&std);
    far.then(|| {
        format!(
            "{}: intensities of mean {mean:.3} and standard deviation {std:.3} are not z-normalised; \
             --normalize z-normalises each volume as the LA preprocessing does",
            path.display()
        )
    })
}

/// An error naming the file when any voxel is NaN or infinite.
pub fn check_finite(image: &Image, path: &Path) -> Result<()> {
    let bad = image.data().iter().filter(|v| !v.is_finite()).count();
    ensure!(bad == 0, "image {}: {bad} voxels are NaN or infinite", path.display());
    Ok(())
}

/// The per-case checks: same shape, labels in {0, 1}, finite intensities.
pub fn validate_case(image: &Image, image_path: &Path, label: &Mask, label_path: &Path) -> Result<()> {
    ensure!(
        image.dims() == label.dims(),
        "label {} is {:?} but its image {} is {:?}",
        label_path.display(),
        label.dims(),
        image_path.display(),
        image.dims()
    );
    let outside = label.data().iter().filter(|&&v| v > 1).count();
    if outside > 0 {
        let mut values: Vec<u8> = label.data().iter().copied().filter(|&v| v > 1).collect();
        values.sort_unstable();
        values.dedup();
        values.truncate(8);
        bail!(
            "label {}: {outside} voxels have values outside {{0, 1}} (values {values:?})",
            label_path.display()
        );
    }
    check_finite(image, image_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::nifti_io::{write_image, write_mask};
    use crate::data::volume::Volume;

    /// A fresh folder, removed when the `TempDir` is dropped: keep it bound for the test.
    fn tmpdir(tag: &str) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::Builder::new().prefix(&format!("caml-ds-{tag}-")).tempdir().unwrap();
        let d = t.path().to_path_buf();
        (t, d)
    }

    fn pair(dims: [usize; 3]) -> (Image, Mask) {
        let img = Volume::from_fn(dims, |x, y, z| (x + y + z) as f32);
        let lab = Volume::from_fn(dims, |x, _, _| (x > 1) as u8);
        (img, lab)
    }

    fn folder_case(root: &Path, name: &str, img: &Image, lab: &Mask) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        write_image(d.join("image.nii.gz"), img).unwrap();
        write_mask(d.join("label.nii.gz"), lab).unwrap();
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn case_folder_dataset_loads_and_validates() {
        let (_root, root) = tmpdir("folders");
        let (img, lab) = pair([4, 3, 2]);
        for n in ["a", "b", "c"] {
            folder_case(&root, n, &img, &lab);
        }
        write_list(root.join("train.list"), &names(&["a", "b"])).unwrap();
        write_list(root.join("test.list"), &names(&["c"])).unwrap();
        let ds = Dataset::open(&root).unwrap();
        assert_eq!(ds.layout, Layout::CaseFolders);
        assert_eq!(ds.train, names(&["a", "b"]));
        let cases = ds.load_train().unwrap();
        assert_eq!(cases[1].name, "b");
        assert_eq!(cases[1].image.data(), img.data());
        assert_eq!(cases[1].label.data(), lab.data());
        assert_eq!(ds.load_test().unwrap().len(), 1);

        // A listed case without files.
        write_list(root.join("test.list"), &names(&["c", "missing"])).unwrap();
        let e = format!("{:#}", Dataset::open(&root).unwrap_err());
        assert!(e.contains("missing") && e.contains("image.nii.gz"), "{e}");
        // The same case in both splits.
        write_list(root.join("test.list"), &names(&["a"])).unwrap();
        let e = format!("{:#}", Dataset::open(&root).unwrap_err());
        assert!(e.contains("both"), "{e}");
    }

    #[test]
    fn model_inputs_are_z_normalised_when_asked_and_flagged_when_raw() {
        let (_root, root) = tmpdir("norm");
        let (_, lab) = pair([4, 3, 2]);
        let prepared =
            Volume::from_fn([4, 3, 2], |x, y, z| (x as f32 - 1.5) * 0.8 + (y + z) as f32 * 0.1 - 0.3);
        let prepared = z_normalize(&prepared).unwrap();
        let (mean, std) = intensity_stats(&prepared);
        assert!(mean.abs() < 1e-6 && (std - 1.0).abs() < 1e-6, "{mean} {std}");
        let raw = prepared.map(|v| v * 300.0 + 800.0);
        folder_case(&root, "prepared", &prepared, &lab);
        folder_case(&root, "raw", &raw, &lab);
        write_list(root.join("train.list"), &names(&["prepared", "raw"])).unwrap();
        write_list(root.join("test.list"), &names(&[])).unwrap();
        let ds = Dataset::open(&root).unwrap();

        let (as_stored, warnings) = ds.load_model_inputs(&ds.train, false).unwrap();
        assert_eq!(as_stored[1].image.data(), raw.data());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("raw") && warnings[0].contains("mean 800.000"), "{warnings:?}");
        let (normalized, warnings) = ds.load_model_inputs(&ds.train, true).unwrap();
        assert!(warnings.is_empty());
        for c in &normalized {
            for (a, b) in c.image.data().iter().zip(prepared.data()) {
                assert!((a - b).abs() < 1e-5, "{}: {a} vs {b}", c.name);
            }
        }
        // Scanner-like ranges in either direction are flagged; prepared crops (not centred) are not.
        assert!(unnormalized_warning(&prepared.map(|v| v * 0.05), Path::new("x")).is_some());
        assert!(unnormalized_warning(&prepared.map(|v| v + 4.0), Path::new("x")).is_some());
        assert!(unnormalized_warning(&prepared.map(|v| v * 1.3 + 0.6), Path::new("x")).is_none());
        let e = format!("{:#}", z_normalize(&Volume::from_fn([2, 2, 2], |_, _, _| 7.0)).unwrap_err());
        assert!(e.contains("constant"), "{e}");
    }

    #[test]
    fn invalid_cases_are_errors_naming_the_file() {
        let (_root, root) = tmpdir("invalid");
        let (img, lab) = pair([4, 3, 2]);
        let (img2, _) = pair([4, 3, 3]);
        folder_case(&root, "shape", &img2, &lab);
        let mut lab3 = lab.clone();
        lab3.set(0, 0, 0, 2);
        lab3.set(0, 1, 0, 255);
        folder_case(&root, "values", &img, &lab3);
        let mut nan = img.clone();
        nan.set(1, 1, 1, f32::NAN);
        nan.set(1, 1, 0, f32::INFINITY);
        folder_case(&root, "nan", &nan, &lab);
        write_list(root.join("train.list"), &names(&["shape", "values", "nan"])).unwrap();
        let ds = Dataset::open(&root).unwrap();
        let e = format!("{:#}", ds.load_case("shape").unwrap_err());
        assert!(e.contains("shape/label.nii.gz") && e.contains("[4, 3, 3]"), "{e}");
        let e = format!("{:#}", ds.load_case("values").unwrap_err());
        assert!(e.contains("values/label.nii.gz") && e.contains("2 voxels"), "{e}");
        let e = format!("{:#}", ds.load_case("nan").unwrap_err());
        assert!(e.contains("nan/image.nii.gz") && e.contains("2 voxels are NaN"), "{e}");
    }

    #[test]
    fn nnunet_layout_with_and_without_lists() {
        let (_root, root) = tmpdir("nnunet");
        for d in ["imagesTr", "labelsTr", "imagesTs", "labelsTs"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let (img, lab) = pair([4, 3, 2]);
        for n in ["la_003", "la_001"] {
            write_image(root.join(format!("imagesTr/{n}_0000.nii.gz")), &img).unwrap();
            write_mask(root.join(format!("labelsTr/{n}.nii.gz")), &lab).unwrap();
        }
        write_image(root.join("imagesTs/la_009_0000.nii.gz"), &img).unwrap();
        write_mask(root.join("labelsTs/la_009.nii.gz"), &lab).unwrap();
        write_image(root.join("imagesTs/la_010_0000.nii.gz"), &img).unwrap();
        std::fs::write(
            root.join("dataset.json"),
            r#"{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "atrium": 1},
                "file_ending": ".nii.gz"}"#,
        )
        .unwrap();
        let ds = Dataset::open(&root).unwrap();
        assert_eq!(ds.layout, Layout::NnUnet);
        assert_eq!(ds.train, names(&["la_001", "la_003"]));
        assert_eq!(ds.test, names(&["la_009"]));
        assert_eq!(ds.load_case("la_009").unwrap().label.data(), lab.data());

        write_list(root.join("train.list"), &names(&["la_003"])).unwrap();
        write_list(root.join("test.list"), &names(&["la_001", "la_042"])).unwrap();
        let e = format!("{:#}", Dataset::open(&root).unwrap_err());
        assert!(e.contains("labelsTr/la_042.nii.gz") || e.contains("imagesTr/la_042_0000"), "{e}");

        std::fs::write(
            root.join("dataset.json"),
            r#"{"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz"}"#,
        )
        .unwrap();
        let e = format!("{:#}", Dataset::open(&root).unwrap_err());
        assert!(e.contains("dataset.json") && e.contains("2 input channels"), "{e}");
    }

    #[test]
    fn lists_skip_blanks_and_reject_duplicates() {
        let (_root, root) = tmpdir("lists");
        let p = root.join("l.list");
        std::fs::write(&p, "a\n\n# note\n b \r\nc").unwrap();
        assert_eq!(read_list(&p).unwrap(), names(&["a", "b", "c"]));
        std::fs::write(&p, "a\nb\na\n").unwrap();
        let e = format!("{:#}", read_list(&p).unwrap_err());
        assert!(e.contains("l.list line 3") && e.contains("twice"), "{e}");
    }

    #[test]
    fn bundled_la_lists_are_80_train_and_20_test_disjoint() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/la");
        let train = read_list(dir.join("train.list")).unwrap();
        let test = read_list(dir.join("test.list")).unwrap();
        assert_eq!((train.len(), test.len()), (80, 20));
        let t: HashSet<_> = train.iter().collect();
        assert!(test.iter().all(|n| !t.contains(n)));
    }
}
