//! The persistent pipeline cache: where it lives, that damaged or foreign files never break
//! compilation, and that a saved file replaces the old one atomically and is reloaded.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use caml_wgpu::gpu::gpu;
use caml_wgpu::gpu::pipeline_cache::{PipelineCacheFile, cache_dir_from, cache_file, decode, encode};

/// data[i] = 3 data[i] + 1.
const SHADER: &str = "
@group(0) @binding(0) var<storage, read_write> data: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if gid.x < arrayLength(&data) {
        data[gid.x] = data[gid.x] * 3u + 1u;
    }
}";

/// Compiles `SHADER` through `cache`, runs it on 0..n and reads the result back.
fn compile_and_run(cache: &wgpu::PipelineCache, n: u32) -> Vec<u32> {
    let d = &gpu().device;
    let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(SHADER.into()),
    });
    let pipeline = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: Some(cache),
    });
    let bytes = n as u64 * 4;
    let data = d.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let staging = d.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let input: Vec<u32> = (0..n).collect();
    gpu().queue.write_buffer(&data, 0, bytemuck::cast_slice(&input));
    let bind = d.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry { binding: 0, resource: data.as_entire_binding() }],
    });
    let mut enc = d.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(n.div_ceil(64), 1, 1);
    }
    enc.copy_buffer_to_buffer(&data, 0, &staging, 0, bytes);
    gpu().queue.submit([enc.finish()]);
    staging.slice(..).map_async(wgpu::MapMode::Read, |r| r.unwrap());
    d.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    bytemuck::cast_slice(&staging.slice(..).get_mapped_range().unwrap()).to_vec()
}

fn expected(n: u32) -> Vec<u32> {
    (0..n).map(|i| 3 * i + 1).collect()
}

/// The cache file this adapter would use inside `dir`.
fn file_in(dir: &Path) -> PathBuf {
    cache_file(dir, &gpu().info).expect("the test adapter is a Vulkan one, which has pipeline caches")
}

/// A file as a real run leaves it: one pipeline compiled, then saved.
fn saved_file(dir: &Path) -> Vec<u8> {
    let path = file_in(dir);
    let c = PipelineCacheFile::open(&gpu().device, path.clone());
    assert_eq!(compile_and_run(&c.cache, 100), expected(100));
    assert!(c.save(1).unwrap(), "one compile since the start: the file is written");
    std::fs::read(path).unwrap()
}

#[test]
fn cache_folder_follows_the_environment() {
    fn s(v: &str) -> Option<&OsStr> {
        Some(OsStr::new(v))
    }
    for off in ["0", "off", "OFF", ""] {
        assert_eq!(cache_dir_from(s(off), s("/x"), s("/home/u")), None, "{off:?} disables");
    }
    assert_eq!(cache_dir_from(s("/data/c"), s("/x"), s("/home/u")), Some("/data/c".into()));
    assert_eq!(cache_dir_from(None, s("/x"), s("/home/u")), Some("/x/caml-wgpu".into()));
    assert_eq!(cache_dir_from(None, s(""), s("/home/u")), Some("/home/u/.cache/caml-wgpu".into()));
    assert_eq!(cache_dir_from(None, None, None), None);
}

#[test]
fn damaged_or_foreign_cache_files_do_not_break_compilation() {
    if !gpu().features.contains(wgpu::Features::PIPELINE_CACHE) {
        eprintln!("skipped: the adapter has no PIPELINE_CACHE");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = saved_file(dir.path());
    let payload = decode(&good).unwrap().to_vec();

    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 0x5a;
    // wgpu's header (magic, version, ABI, backend) puts the adapter key at byte 17: valid framing
    // around data from another adapter.
    let mut foreign = payload.clone();
    foreign[17] ^= 0xff;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    // (what, file contents, rejected: wgpu starts empty without being handed the data, or
    // reports it as another adapter's; None where wgpu drops the data silently)
    let cases: [(&str, Vec<u8>, Option<bool>); 6] = [
        ("empty", Vec::new(), Some(true)),
        ("garbage", garbage.clone(), Some(true)),
        ("truncated", good[..good.len() - 3].to_vec(), Some(true)),
        ("flipped byte", flipped, Some(true)),
        ("framed garbage", encode(&garbage), None),
        ("another adapter's", encode(&foreign), Some(true)),
    ];
    for (what, bytes, rejected) in cases {
        let path = dir.path().join(format!("{what}.bin"));
        std::fs::write(&path, &bytes).unwrap();
        let c = PipelineCacheFile::open(&gpu().device, path);
        if let Some(r) = rejected {
            assert_eq!(c.loaded_bytes == 0, r, "{what}");
        }
        assert_eq!(compile_and_run(&c.cache, 300), expected(300), "{what} cache file");
    }
}

#[test]
fn saved_cache_replaces_the_file_atomically_and_is_reloaded() {
    if !gpu().features.contains(wgpu::Features::PIPELINE_CACHE) {
        eprintln!("skipped: the adapter has no PIPELINE_CACHE");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = file_in(dir.path());
    std::fs::write(&path, b"an older, damaged cache").unwrap();
    let c = PipelineCacheFile::open(&gpu().device, path.clone());
    assert_eq!(c.loaded_bytes, 0);
    assert!(!c.save(0).unwrap(), "nothing compiled: nothing written");
    assert_eq!(std::fs::read(&path).unwrap(), b"an older, damaged cache");

    #[cfg(unix)]
    let before = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
    assert_eq!(compile_and_run(&c.cache, 70), expected(70));
    assert!(c.save(1).unwrap());
    assert!(!c.save(1).unwrap(), "no new compile since: not written again");
    #[cfg(unix)]
    assert_ne!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()),
        before,
        "replaced by a rename, not rewritten in place"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [path.file_name().unwrap().to_str().unwrap()], "no temporary file left behind");

    let bytes = std::fs::read(&path).unwrap();
    let payload = decode(&bytes).expect("a saved file is a valid cache file");
    assert!(payload.starts_with(b"WGPUPLCH"), "the payload is wgpu's cache data");
    let again = PipelineCacheFile::open(&gpu().device, path);
    assert_eq!(again.loaded_bytes, payload.len(), "the saved data is handed to wgpu on the next start");
    assert_eq!(compile_and_run(&again.cache, 70), expected(70));
}

#[test]
fn a_command_starts_despite_a_damaged_cache_in_its_folder() {
    if !gpu().features.contains(wgpu::Features::PIPELINE_CACHE) {
        eprintln!("skipped: the adapter has no PIPELINE_CACHE");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(file_in(dir.path()), b"CAMLPLC1 but nothing valid after it").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_caml-wgpu"))
        .arg("info")
        .env("CAML_PIPELINE_CACHE", dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("ignoring the pipeline cache"), "{stderr}");
    assert!(stdout.contains(&format!("pipeline cache: {}", file_in(dir.path()).display())), "{stdout}");
    let off = std::process::Command::new(env!("CARGO_BIN_EXE_caml-wgpu"))
        .arg("info")
        .env("CAML_PIPELINE_CACHE", "off")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&off.stdout).contains("pipeline cache: off"));
}
