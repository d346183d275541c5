//! A training process killed with SIGKILL mid-run leaves a run that `--resume` finishes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caml_wgpu::data::synth::{SynthSpec, generate_dataset};

#[test]
fn killed_training_resumes_from_its_last_complete_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = generate_dataset(dir.path().join("data"), &SynthSpec::new(8, 5, [24, 24, 20])).unwrap();
    let run = dir.path().join("run");
    let args = |iters: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_caml-wgpu"));
        c.env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .args([
                "train",
                "--preset",
                "small",
                "--labeled",
                "2",
                "--width",
                "2",
                "--patch",
                "16",
                "16",
                "16",
            ])
            .args([
                "--memory-num",
                "16",
                "--num-filtered",
                "64",
                "--val-every",
                "0",
                "--checkpoint-every",
                "1",
            ])
            .args(["--iters", iters, "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&run)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let mut child = args("40").spawn().unwrap();
    // Kill it once a few checkpoints have been written, most likely in the middle of the next one.
    let start = Instant::now();
    let log = run.join("log.csv");
    loop {
        let lines = std::fs::read_to_string(&log).map(|t| t.lines().count()).unwrap_or(0);
        if lines >= 4 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "training made no progress");
        assert!(child.try_wait().unwrap().is_none(), "training ended before it was killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (_, meta) = caml_wgpu::checkpoint::load(&run.join("checkpoint.safetensors")).unwrap();
    let saved: u64 = meta["iteration"].parse().unwrap();
    assert!(saved >= 2, "a complete checkpoint survives the kill (iteration {saved})");
    // A kill during a write leaves its temporary file; the resumed run removes it.
    let pid = child.id();
    let stray: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.iter().all(|n| n.ends_with(&format!(".tmp-{pid}"))), "{stray:?}");
    let planted = run.join(format!(".checkpoint.safetensors.tmp-{pid}"));
    std::fs::write(&planted, b"the first bytes of a checkpoint").unwrap();
    // Resume to a nearer end so the test stays short.
    let status = args(&(saved + 2).to_string()).arg("--resume").status().unwrap();
    assert!(status.success());
    assert!(!planted.exists(), "the killed run's temporary file is removed");
    let text = std::fs::read_to_string(&log).unwrap();
    let iters: Vec<u64> =
        text.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert_eq!(iters, (1..=saved + 2).collect::<Vec<_>>(), "one log line per iteration, none repeated");
    let (_, meta) = caml_wgpu::checkpoint::load(&run.join("checkpoint.safetensors")).unwrap();
    assert_eq!(meta["iteration"], (saved + 2).to_string());
}
