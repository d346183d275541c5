//! predict and eval through the binary: names and geometry kept, bad cases reported and skipped.

use std::path::Path;
use std::process::Command;

use caml_wgpu::config::{Method, Preset, TrainConfig};
use caml_wgpu::data::nifti_io::{read_header, read_mask};
use caml_wgpu::data::synth::{SynthSpec, generate_dataset};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_caml-wgpu"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

fn trained_model(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = generate_dataset(dir.join("data"), &SynthSpec::new(6, 9, [20, 22, 18])).unwrap();
    let cfg = TrainConfig {
        data: Some(data.clone()),
        method: Method::Caml,
        labeled: 2,
        iters: 1,
        patch: [16, 16, 16],
        width: 2,
        embed: 8,
        memory_num: 8,
        val_every: 0,
        ..TrainConfig::preset(Preset::Small)
    };
    caml_wgpu::train::train(&cfg, &dir.join("run"), false).unwrap();
    (data, dir.join("run").join(caml_wgpu::train::FINAL_MODEL))
}

#[test]
fn predict_on_a_folder_keeps_names_and_geometry_and_skips_bad_cases() {
    let dir = tempfile::tempdir().unwrap();
    let (data, model) = trained_model(dir.path());
    let inputs = dir.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    for case in ["synth_000", "synth_005"] {
        std::fs::copy(data.join(case).join("image.nii.gz"), inputs.join(format!("{case}.nii.gz"))).unwrap();
    }
    std::fs::write(inputs.join("broken.nii.gz"), b"not a nifti file").unwrap();
    let mut nan = caml_wgpu::data::nifti_io::read_image(data.join("synth_000/image.nii.gz")).unwrap();
    nan.set(3, 4, 5, f32::NAN);
    caml_wgpu::data::nifti_io::write_image(inputs.join("nan.nii.gz"), &nan).unwrap();
    let out = dir.path().join("out");
    // What writers killed mid-write by an earlier run left (a process that has exited).
    std::fs::create_dir_all(&out).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    for stale in [format!(".synth_000-{}-tmp.nii.gz", gone.id()), format!(".table.csv.tmp-{}", gone.id())] {
        std::fs::write(out.join(stale), b"half a file").unwrap();
    }
    let res = bin()
        .args(["predict", "-i", inputs.to_str().unwrap(), "-o", out.to_str().unwrap(), "--checkpoint"])
        .arg(&model)
        .arg("--save-probabilities")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "a failed case makes the exit status non-zero");
    assert!(stderr.contains("broken.nii.gz"), "{stderr}");
    assert!(stderr.contains("nan.nii.gz") && stderr.contains("1 voxels are NaN or infinite"), "{stderr}");
    assert!(!out.join("nan.nii.gz").exists());
    for case in ["synth_000", "synth_005"] {
        let mask = read_mask(out.join(format!("{case}.nii.gz"))).unwrap();
        let image_header = read_header(data.join(case).join("image.nii.gz")).unwrap();
        let mask_header = read_header(out.join(format!("{case}.nii.gz"))).unwrap();
        assert_eq!(mask.dims(), [20, 22, 18]);
        assert_eq!(mask_header.pixdim, image_header.pixdim);
        assert_eq!(mask_header.srow_x, image_header.srow_x);
        assert!(out.join(format!("{case}_prob.nii.gz")).exists());
    }
    assert!(!out.join("broken.nii.gz").exists());
    // Nothing half-written is left behind, from this run or the killed one.
    let stray: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn predict_settles_its_outputs_before_the_model_loads_and_never_overwrites_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let (data, model) = trained_model(dir.path());
    let inputs = dir.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let image = inputs.join("case.nii.gz");
    std::fs::copy(data.join("synth_000").join("image.nii.gz"), &image).unwrap();
    let before = std::fs::read(&image).unwrap();
    let run = |input: &Path, output: &Path, extra: &[&str], checkpoint: &Path| {
        let res = bin()
            .args(["predict", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--checkpoint"])
            .arg(checkpoint)
            .args(extra)
            .output()
            .unwrap();
        (res.status.success(), String::from_utf8_lossy(&res.stderr).into_owned())
    };
    // Refused before the model loads: the checkpoint named does not exist.
    let absent = dir.path().join("absent.safetensors");
    let prob_named = inputs.join("other_prob.nii.gz");
    std::fs::copy(&image, &prob_named).unwrap();
    let refused = [
        (image.clone(), image.clone(), vec![], "is an input"),
        (prob_named.clone(), inputs.join("other.nii.gz"), vec!["--save-probabilities"], "is an input"),
        (inputs.clone(), inputs.join("."), vec![], "is the input folder"),
        (image.clone(), dir.path().join("mask.txt"), vec![], "must end in .nii or .nii.gz"),
        (inputs.join("missing.nii.gz"), dir.path().join("m.nii.gz"), vec![], "no such file or folder"),
    ];
    for (input, output, extra, why) in refused {
        let (ok, stderr) = run(&input, &output, &extra, &absent);
        assert!(!ok && stderr.contains(why), "{input:?} -> {output:?}: {stderr}");
        assert!(!stderr.contains("absent.safetensors"), "refused after loading the model: {stderr}");
    }
    std::fs::remove_file(&prob_named).unwrap();
    assert_eq!(std::fs::read(&image).unwrap(), before, "an input was written");
    // One file into a file whose folders do not exist yet, and into a folder under its own name.
    let nested = dir.path().join("a").join("b").join("seg.nii.gz");
    let (ok, stderr) = run(&image, &nested, &[], &model);
    assert!(ok, "{stderr}");
    assert_eq!(read_mask(&nested).unwrap().dims(), [20, 22, 18]);
    let folder = dir.path().join("masks");
    std::fs::create_dir_all(&folder).unwrap();
    let (ok, stderr) = run(&image, &folder, &["--save-probabilities"], &model);
    assert!(ok, "{stderr}");
    assert!(folder.join("case.nii.gz").is_file() && folder.join("case_prob.nii.gz").is_file());
    let (ok, stderr) = run(&image, Path::new(&format!("{}/", dir.path().join("new").display())), &[], &model);
    assert!(ok, "{stderr}");
    assert!(dir.path().join("new").join("case.nii.gz").is_file());
}

#[test]
fn eval_prints_a_table_and_writes_metrics_and_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let (data, model) = trained_model(dir.path());
    let out = dir.path().join("eval");
    let res = bin()
        .args(["eval", "--data", data.to_str().unwrap(), "--split", "test", "--out", out.to_str().unwrap()])
        .arg("--checkpoint")
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{stdout}{}", String::from_utf8_lossy(&res.stderr));
    assert!(stdout.contains("mean"), "{stdout}");
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(csv.starts_with("case,dice,jaccard,hd95,asd"));
    let cases = csv.lines().count() - 2;
    assert!(cases >= 1);
    let pngs = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png"))
        .count();
    assert_eq!(pngs, cases);
    // summary.json: the settings, every case and the mean of metrics.csv, and the deviation.
    let summary = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
    };
    let s = summary(&out);
    assert_eq!(s["cases"].as_array().unwrap().len(), cases);
    let csv_mean: f64 = csv.lines().last().unwrap().split(',').nth(1).unwrap().parse().unwrap();
    assert_eq!(s["mean"]["dice"].as_f64().unwrap(), csv_mean);
    assert!(s["std"]["dice"].as_f64().unwrap() >= 0.0);
    assert!(s["settings"].as_str().unwrap().contains("no mirroring"), "{s}");
    assert!(stdout.lines().any(|l| l.starts_with("std ")), "{stdout}");

    // Test-time mirroring along X and Y scores the same cases; an axis that is not one is refused.
    let mirrored = dir.path().join("eval-mirror");
    let res = bin()
        .args([
            "eval",
            "--data",
            data.to_str().unwrap(),
            "--out",
            mirrored.to_str().unwrap(),
            "--mirror",
            "xy",
        ])
        .arg("--checkpoint")
        .arg(&model)
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let csv = std::fs::read_to_string(mirrored.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count() - 2, cases);
    assert!(summary(&mirrored)["settings"].as_str().unwrap().contains("mirrored along xy"));
    for bad in ["xq", "xx", ""] {
        let res = bin()
            .args(["eval", "--data", data.to_str().unwrap(), "--mirror", bad, "--checkpoint"])
            .arg(&model)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success() && stderr.contains("--mirror"), "{bad}: {stderr}");
    }
}
