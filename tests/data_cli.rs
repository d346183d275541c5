//! The data sub-commands end to end through the binary.

use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_caml-wgpu"))
}

/// A path inside a fresh folder, not yet made; the folder is removed when the `TempDir` is dropped,
/// so keep it bound for the test.
fn tmpdir(tag: &str) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::Builder::new().prefix(&format!("caml-cli-{tag}-")).tempdir().unwrap();
    let d = t.path().join("out");
    (t, d)
}

#[test]
fn synth_then_metrics_and_overlay() {
    let (_d, d) = tmpdir("synth");
    let out = bin()
        .args(["synth", "--cases", "3", "--seed", "5", "--size", "32", "32", "24", "--out"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lab0 = d.join("synth_000/label.nii.gz");
    let lab1 = d.join("synth_001/label.nii.gz");

    let out = bin().args(["metrics", "--json", "--pred"]).arg(&lab0).arg("--gt").arg(&lab0).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dice"], 1.0);
    assert_eq!(v["jaccard"], 1.0);
    assert_eq!(v["hd95"], 0.0);
    assert_eq!(v["asd"], 0.0);

    let out = bin()
        .args(["metrics", "--json", "--spacing", "header", "--pred"])
        .arg(&lab0)
        .arg("--gt")
        .arg(&lab1)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dice = v["dice"].as_f64().unwrap();
    assert!(dice < 1.0 && v["hd95"].as_f64().unwrap() > 0.0);

    let png = d.join("o.png");
    let out = bin()
        .args(["overlay", "--image"])
        .arg(d.join("synth_000/image.nii.gz"))
        .arg("--gt")
        .arg(&lab0)
        .arg("--pred")
        .arg(&lab1)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
}

#[test]
fn errors_name_the_file_and_exit_non_zero() {
    let (_d, d) = tmpdir("err");
    std::fs::create_dir_all(&d).unwrap();
    let bad = d.join("bad.nii.gz");
    std::fs::write(&bad, b"\x1f\x8b\x08\x00garbage").unwrap();
    let out = bin().args(["metrics", "--pred"]).arg(&bad).arg("--gt").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.nii.gz"), "{err}");

    let out = bin()
        .args(["prepare-la", "--raw"])
        .arg(d.join("absent"))
        .arg("--out")
        .arg(d.join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent"));
}
