//! Device faults: a tensor the adapter cannot hold, a configuration predicted not to fit, and a
//! panic deep in the engine reach the user as one line naming the tensor (shape, bytes) and the
//! option to change, never as a wgpu validation report or a backtrace.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;

use caml_wgpu::config::{Preset, TrainConfig};
use caml_wgpu::gpu::gpu;
use caml_wgpu::tensor::Tensor;

fn panic_text(r: Result<impl Sized, Box<dyn std::any::Any + Send>>) -> String {
    let p = r.err().expect("a panic");
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap()
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_caml-wgpu"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir()).env_remove("RUST_BACKTRACE");
    c
}

/// The lines of a failed run's stderr, checked to be one `error:` line and no Rust report.
fn one_error_line(out: &std::process::Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: ") && !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    lines[0].to_string()
}

#[test]
fn a_tensor_over_the_maximum_buffer_size_names_its_shape_bytes_and_the_options() {
    let max = gpu().limits.max_buffer_size;
    let n = (max / 8 + 1) as usize;
    let msg = panic_text(catch_unwind(|| Tensor::empty(&[2, n])));
    let bytes = 8 * n as u64;
    assert!(msg.contains(&format!("shape [2, {n}] ({bytes} bytes)")), "{msg}");
    assert!(msg.contains("use a smaller --patch or --batch"), "{msg}");
    // A shape whose byte count does not fit in 64 bits is named too, not wrapped around.
    let msg = panic_text(catch_unwind(|| Tensor::empty(&[1 << 40, 1 << 40])));
    assert!(msg.contains("[1099511627776, 1099511627776]") && msg.contains("--patch"), "{msg}");
    // The device is still usable.
    assert_eq!(Tensor::from_vec(&[1.0, 2.0], &[2]).to_vec(), vec![1.0, 2.0]);
}

#[test]
fn a_buffer_just_under_the_maximum_is_not_rounded_past_it() {
    let g = gpu();
    let max = g.limits.max_buffer_size;
    // Lazily backed on the software device; released at once.
    let b = g.alloc(max - 4).unwrap();
    assert!(b.size() >= max - 4 && b.size() <= max, "{} for a limit of {max}", b.size());
    drop(b);
    g.trim_pool();
}

#[test]
fn binding_a_tensor_over_the_binding_limit_names_it() {
    let g = gpu();
    let limit = g.max_binding();
    assert!(limit < g.limits.max_buffer_size, "this adapter binds whole buffers; nothing to test");
    let n = (limit / 4) as usize + 64;
    let t = Tensor::empty(&[n]);
    let msg = panic_text(catch_unwind(AssertUnwindSafe(|| t.binding().size)));
    assert!(
        msg.contains(&format!("shape [{n}] ({} bytes)", 4 * n)) && msg.contains(&limit.to_string()),
        "{msg}"
    );
    assert!(msg.contains("use a smaller --patch or --batch"), "{msg}");
    drop(t);
    g.trim_pool();
}

#[test]
fn preflight_names_the_largest_tensor_and_the_option() {
    let limits = (1u64 << 31, 1u64 << 27);
    let small = TrainConfig { width: 4, patch: [48, 48, 32], ..TrainConfig::preset(Preset::Small) };
    caml_wgpu::train::preflight(&small, 4, limits, "--batch").unwrap();
    let cases = [
        (
            TrainConfig { patch: [512, 512, 512], ..small.clone() },
            1,
            "one sample's activations of shape [4, 512, 512, 512]",
            "--patch",
        ),
        (
            small.clone(),
            100_000,
            "a batch's activations of shape [100000, 4, 48, 48, 32]",
            "--patch or --batch",
        ),
        (
            TrainConfig { width: 1000, ..small.clone() },
            4,
            "the deepest convolution's weights of shape [16000, 16000, 3, 3, 3]",
            "--width",
        ),
        (TrainConfig { embed: 1 << 20, ..small.clone() }, 4, "the heads' weights", "embed"),
        (
            TrainConfig { patch: [1 << 40, 1 << 40, 16], ..small.clone() },
            4,
            "one sample's activations",
            "--patch",
        ),
    ];
    for (cfg, batch, what, knob) in cases {
        let e = caml_wgpu::train::preflight(&cfg, batch, limits, "--batch").unwrap_err().to_string();
        assert!(e.contains(what) && e.contains(&format!("use a smaller {knob}")), "{e}");
    }
}

#[test]
fn train_with_an_absurd_patch_or_batch_stops_before_reading_data() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("no-such-data");
    for (patch, batch, want) in [
        ("4096", "4", "one sample's activations of shape [4, 4096, 4096, 4096]"),
        ("64", "100000", "a batch's activations of shape [100000, 4, 64, 64, 64]"),
    ] {
        let out = bin()
            .args(["train", "--preset", "small", "--patch", patch, patch, patch, "--batch", batch, "--data"])
            .arg(&absent)
            .arg("--out")
            .arg(dir.path().join("run"))
            .output()
            .unwrap();
        let line = one_error_line(&out);
        assert!(line.contains(want) && line.contains("bytes) exceed this adapter's"), "{line}");
        assert!(line.contains("use a smaller --patch"), "{line}");
        // Checked before the data folder was looked at or the run folder made.
        assert!(!line.contains("no-such-data") && !dir.path().join("run").exists(), "{line}");
    }
}

#[test]
fn predict_with_an_absurd_window_batch_stops_before_the_network_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { width: 2, embed: 4, patch: [16, 16, 16], ..TrainConfig::preset(Preset::Small) };
    let model = caml_wgpu::train::build_model(&cfg);
    let (p, b) = model.named();
    let dict = p
        .iter()
        .chain(&b)
        .map(|(k, t)| {
            let e = match t.dtype() {
                caml_wgpu::DType::F32 => caml_wgpu::checkpoint::Entry::f32(t.shape(), t.to_vec()),
                caml_wgpu::DType::U32 => caml_wgpu::checkpoint::Entry::i64(
                    t.shape(),
                    t.to_u32().into_iter().map(i64::from).collect(),
                ),
            };
            (k.clone(), e)
        })
        .collect();
    let ck = dir.path().join("model.safetensors");
    caml_wgpu::checkpoint::save(&ck, &dict, &caml_wgpu::train::model_metadata(&cfg)).unwrap();
    let img = caml_wgpu::data::Volume::from_fn([20, 20, 20], |x, y, z| (x + y + z) as f32);
    let input = dir.path().join("in.nii.gz");
    caml_wgpu::data::nifti_io::write_image(&input, &img).unwrap();
    let out = bin()
        .args(["predict", "--window-batch", "1000000000", "-i"])
        .arg(&input)
        .arg("-o")
        .arg(dir.path().join("out.nii.gz"))
        .arg("--checkpoint")
        .arg(&ck)
        .output()
        .unwrap();
    let line = one_error_line(&out);
    assert!(line.contains("a batch's activations of shape [1000000000, 2, 16, 16, 16]"), "{line}");
    assert!(line.contains("use a smaller --patch or --window-batch"), "{line}");
    // A patch the network cannot take is refused too, rather than failing inside it.
    let out = bin()
        .args(["predict", "--patch", "24", "24", "24", "-i"])
        .arg(&input)
        .arg("-o")
        .arg(dir.path().join("out.nii.gz"))
        .arg("--checkpoint")
        .arg(&ck)
        .output()
        .unwrap();
    let line = one_error_line(&out);
    assert!(line.contains("multiple of 16"), "{line}");
}

/// Runs inside a copy of this test binary: installs the command line's panic hook and makes the
/// engine fail the way an oversized configuration would.
#[test]
fn an_engine_panic_under_the_cli_hook_is_one_line() {
    if std::env::var_os("CAML_PANIC_HOOK_CHILD").is_some() {
        caml_wgpu::cli::install_panic_hook();
        let max = gpu().limits.max_buffer_size;
        let _ = Tensor::empty(&[4, (max / 16 + 1) as usize]);
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_engine_panic_under_the_cli_hook_is_one_line",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("CAML_PANIC_HOOK_CHILD", "1")
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let line = one_error_line(&out);
    assert!(
        line.contains("cannot allocate a tensor of shape [4, ") && line.contains("use a smaller --patch"),
        "{line}"
    );
}
