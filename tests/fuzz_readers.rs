//! Hostile inputs for every file reader. Each target starts from small valid files, mutates them
//! (truncation, bit flips, header fields set to zero, negative or huge values, wrong magic,
//! corrupt gzip streams, wrong types, random bytes) and reads the result under `catch_unwind`.
//! A case passes when the reader does not panic, every error it returns names the file, and no
//! single allocation is larger than the file could hold (a header that claims 2^40 voxels must
//! fail before allocating them).
//!
//! Each target runs `CAML_FUZZ_CASES` cases (default 300) derived from `CAML_FUZZ_SEED`;
//! `CAML_FUZZ_SAVE=DIR` keeps the failing inputs. Inputs that once made a reader fail are kept in
//! `tests/fixtures/fuzz/<reader>/` and read on every run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use anyhow::Result;
use caml_wgpu::caml::memory::MemoryBank;
use caml_wgpu::caml::step::TrainState;
use caml_wgpu::checkpoint::{self, Data, Entry};
use caml_wgpu::config::{Preset, TrainConfig};
use caml_wgpu::data::dataset::{Dataset, read_list, write_list};
use caml_wgpu::data::nifti_io::{read_image, read_mask, write_image, write_mask};
use caml_wgpu::data::nrrd::read_nrrd;
use caml_wgpu::data::sampler::Sampler;
use caml_wgpu::data::synth::generate_case;
use caml_wgpu::optim::{Sgd, SgdConfig};
use caml_wgpu::rng::{Rng, derive_seed};
use caml_wgpu::tensor::Tensor;
use caml_wgpu::train;

// ---- the largest single allocation of the current thread ----

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(n: usize) {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(n)));
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note(n);
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

// ---- the harness ----

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn cases() -> u64 {
    env_u64("CAML_FUZZ_CASES", 300)
}

fn fixtures(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz").join(target)
}

/// A reader under test: reads the input file (or the folder holding it) and returns every result
/// it produced; each error must contain `names`.
type Read<'a> = dyn Fn(&Path) -> Vec<Result<()>> + 'a;

/// A mutation: a seeded change of a valid file's bytes.
type Mutate<'a> = dyn Fn(&mut Rng, &[u8]) -> Vec<u8> + 'a;

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Writes `bytes` to `path`, reads it, and says what went wrong, if anything.
fn check_case(path: &Path, bytes: &[u8], names: &str, read: &Read<'_>) -> Result<(), String> {
    std::fs::write(path, bytes).unwrap();
    LARGEST.with(|c| c.set(0));
    let results = catch_unwind(AssertUnwindSafe(|| read(path)));
    let largest = LARGEST.with(|c| c.get());
    let results = results.map_err(|p| format!("panicked: {}", panic_text(&*p)))?;
    for r in results {
        if let Err(e) = r {
            let text = format!("{e:#}");
            if !text.contains(names) {
                return Err(format!("the error does not name {names}: {text}"));
            }
        }
    }
    // Gzip inflates at most ~1032:1; the rest is working room.
    let limit = (32 << 20) + 1100 * bytes.len();
    if largest > limit {
        return Err(format!("allocated {largest} bytes at once for a file of {} bytes", bytes.len()));
    }
    Ok(())
}

struct Target<'a> {
    name: &'static str,
    /// The file the input is written to, in `dir`.
    file: String,
    dir: tempfile::TempDir,
    /// What every error must contain (the file's path, or the dataset folder's).
    names: String,
    seeds: Vec<Vec<u8>>,
    mutate: Box<Mutate<'a>>,
    read: Box<Read<'a>>,
}

impl Target<'_> {
    fn path(&self) -> PathBuf {
        self.dir.path().join(&self.file)
    }

    /// Reads every seed (they must be accepted), the kept regression inputs, and `cases()`
    /// mutated inputs.
    fn run(&self) {
        let path = self.path();
        for (i, s) in self.seeds.iter().enumerate() {
            let results = catch_unwind(AssertUnwindSafe(|| {
                std::fs::write(&path, s).unwrap();
                (self.read)(&path)
            }));
            let results =
                results.unwrap_or_else(|p| panic!("{} seed {i} panicked: {}", self.name, panic_text(&*p)));
            for r in results {
                r.unwrap_or_else(|e| panic!("{} seed {i} is not accepted: {e:#}", self.name));
            }
        }
        let mut failures = Vec::new();
        for f in regression_files(self.name) {
            let bytes = std::fs::read(&f).unwrap();
            if let Err(m) = check_case(&path, &bytes, &self.names, &*self.read) {
                failures.push(format!("{}: {m}", f.display()));
            }
        }
        let seed = env_u64("CAML_FUZZ_SEED", 0x5EED)
            ^ self.name.bytes().fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64));
        let save = std::env::var_os("CAML_FUZZ_SAVE").map(PathBuf::from);
        let trace = std::env::var_os("CAML_FUZZ_TRACE").is_some();
        let n = cases();
        for i in 0..n {
            let mut rng = Rng::new(derive_seed(seed, i));
            let base = &self.seeds[rng.below(self.seeds.len() as u64) as usize];
            let bytes = (self.mutate)(&mut rng, base);
            if trace {
                eprintln!("{} case {i} ({} bytes)", self.name, bytes.len());
            }
            if let Err(m) = check_case(&path, &bytes, &self.names, &*self.read) {
                if let Some(dir) = &save {
                    let d = dir.join(self.name);
                    std::fs::create_dir_all(&d).unwrap();
                    std::fs::write(d.join(format!("case{i}-{}", self.file)), &bytes).unwrap();
                }
                failures.push(format!("case {i}: {m}"));
            }
        }
        assert!(
            failures.is_empty(),
            "{}: {} of {n} inputs (and regression files) failed:\n{}",
            self.name,
            failures.len(),
            failures.join("\n")
        );
    }
}

fn regression_files(target: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures(target))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A fresh folder, removed when the `TempDir` is dropped.
fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("caml-fuzz-{tag}-")).tempdir().unwrap()
}

// ---- mutations ----

const EXTREMES: [u64; 16] = [
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    1 << 40,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    u64::MAX,
    348,
];

fn pick<'a, T>(rng: &mut Rng, v: &'a [T]) -> &'a T {
    &v[rng.below(v.len() as u64) as usize]
}

fn random_bytes(n: usize, rng: &mut Rng) -> Vec<u8> {
    (0..n).map(|_| rng.below(256) as u8).collect()
}

/// One generic mutation of a byte string.
fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>) {
    let n = b.len();
    let at = |rng: &mut Rng| rng.below(n as u64 + 1) as usize;
    match rng.below(10) {
        0 => b.truncate(at(rng)),
        1 | 2 => {
            for _ in 0..1 + rng.below(8) {
                if n > 0 {
                    let i = rng.below(n as u64) as usize;
                    b[i] ^= 1 << rng.below(8);
                }
            }
        }
        3 | 4 => {
            // A word set to an extreme value, in either byte order.
            let w = *pick(rng, &[1usize, 2, 4, 8]);
            if n >= w {
                let i = rng.below((n - w + 1) as u64) as usize;
                let v = if rng.below(4) == 0 { rng.next_u64() } else { *pick(rng, &EXTREMES) };
                let bytes =
                    if rng.below(2) == 0 { v.to_le_bytes() } else { (v << (64 - 8 * w)).to_be_bytes() };
                b[i..i + w].copy_from_slice(&bytes[..w]);
            }
        }
        5 => {
            let i = at(rng);
            let len = (1 + rng.below(16) as usize).min(n - i);
            let r = random_bytes(len, rng);
            b[i..i + len].copy_from_slice(&r);
        }
        6 => {
            let i = at(rng);
            let r = random_bytes(1 + rng.below(32) as usize, rng);
            b.splice(i..i, r);
        }
        7 => {
            let i = at(rng);
            let j = (i + 1 + rng.below(64) as usize).min(n);
            if rng.below(2) == 0 {
                b.drain(i..j);
            } else {
                let dup = b[i..j].to_vec();
                b.splice(i..i, dup);
            }
        }
        8 => {
            let r = random_bytes(1 + rng.below(64) as usize, rng);
            b.extend(r);
        }
        _ => *b = random_bytes(rng.below(2 * n as u64 + 2) as usize, rng),
    }
}

fn some_byte_mutations(rng: &mut Rng, b: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        mutate_bytes(rng, b);
    }
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(b), &mut out).unwrap();
    out
}

/// A damaged gzip stream: its deflate body, its CRC and size trailer, or its length.
fn corrupt_gzip(rng: &mut Rng, gz: &mut Vec<u8>) {
    let n = gz.len();
    match rng.below(4) {
        0 if n > 18 => {
            for _ in 0..1 + rng.below(4) {
                let i = 10 + rng.below((n - 18) as u64) as usize;
                gz[i] ^= 1 << rng.below(8);
            }
        }
        1 if n > 8 => {
            let i = n - 8 + rng.below(8) as usize;
            gz[i] = gz[i].wrapping_add(1 + rng.below(255) as u8);
        }
        2 => gz.truncate(rng.below(n as u64) as usize),
        _ => some_byte_mutations(rng, gz),
    }
}

// ---- NIfTI ----

/// A single-file NIfTI-1 written from the specification's offsets (vox_offset 352).
fn raw_nifti(dims: [i16; 3], datatype: i16, bitpix: i16, data: &[u8], big: bool) -> Vec<u8> {
    let mut h = vec![0u8; 352];
    let mut put = |off: usize, b: &[u8]| h[off..off + b.len()].copy_from_slice(b);
    macro_rules! enc {
        ($v:expr) => {
            if big { $v.to_be_bytes() } else { $v.to_le_bytes() }
        };
    }
    put(0, &enc!(348i32));
    for (k, d) in [3i16, dims[0], dims[1], dims[2], 1, 1, 1, 1].iter().enumerate() {
        put(40 + 2 * k, &enc!(*d));
    }
    put(70, &enc!(datatype));
    put(72, &enc!(bitpix));
    for (k, p) in [1.0f32, 0.7, 0.8, 2.5, 1.0, 1.0, 1.0, 1.0].iter().enumerate() {
        put(76 + 4 * k, &enc!(*p));
    }
    put(108, &enc!(352f32));
    put(344, b"n+1\0");
    h.extend_from_slice(data);
    h
}

fn nifti_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let n = 3 * 4 * 5;
    let labels: Vec<u8> = (0..n).map(|i| (i % 3 == 0) as u8).collect();
    let mut seeds = Vec::new();
    for big in [false, true] {
        macro_rules! of {
            ($t:ty) => {
                labels
                    .iter()
                    .flat_map(|&v| if big { (v as $t).to_be_bytes() } else { (v as $t).to_le_bytes() })
                    .collect::<Vec<u8>>()
            };
        }
        seeds.push(raw_nifti([3, 4, 5], 2, 8, &labels, big));
        seeds.push(raw_nifti([3, 4, 5], 4, 16, &of!(i16), big));
        seeds.push(raw_nifti([3, 4, 5], 512, 16, &of!(u16), big));
        seeds.push(raw_nifti([3, 4, 5], 8, 32, &of!(i32), big));
        seeds.push(raw_nifti([3, 4, 5], 16, 32, &of!(f32), big));
        seeds.push(raw_nifti([3, 4, 5], 64, 64, &of!(f64), big));
    }
    // Files as the tool writes them.
    let (img, lab) = generate_case(3, 0, [12, 10, 8]);
    // Whole numbers, so that the image reads as a mask too.
    let img = img.map(|v| (v.abs() * 10.0).round().min(255.0));
    let (pi, pm) = (dir.join("seed_image.nii"), dir.join("seed_label.nii"));
    write_image(&pi, &img).unwrap();
    write_mask(&pm, &lab).unwrap();
    seeds.push(std::fs::read(pi).unwrap());
    seeds.push(std::fs::read(pm).unwrap());
    seeds
}

#[derive(Clone, Copy)]
enum Field {
    I32(usize),
    I16(usize),
    U8(usize),
    F32(usize),
    Magic,
}

/// Header fields with the values most likely to break a reader.
fn nifti_field(rng: &mut Rng) -> (Field, f64) {
    let f32s = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -1.0,
        0.0,
        1e-38,
        1e38,
        3e38,
        1e20,
        347.0,
        348.0,
        352.0,
        353.0,
    ];
    match rng.below(10) {
        0 => (Field::I32(0), *pick(rng, &[348.0, 540.0, 0.0, -1.0, 347.0, 2147483647.0])),
        1..=3 => {
            let k = rng.below(8) as usize;
            let v =
                *pick(rng, &[0.0, -1.0, -32768.0, 32767.0, 1.0, 2.0, 3.0, 4.0, 7.0, 8.0, 1024.0, 20000.0]);
            (Field::I16(40 + 2 * k), v)
        }
        4 => {
            let codes = [
                0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 768.0, 1024.0, 1280.0,
                1536.0, 2304.0, -1.0, 32767.0,
            ];
            (Field::I16(70), *pick(rng, &codes))
        }
        5 => (Field::I16(72), *pick(rng, &[0.0, 8.0, 16.0, 24.0, 32.0, 64.0, -8.0])),
        6 => (Field::F32(108), *pick(rng, &f32s)),
        7 => (Field::F32(*pick(rng, &[112usize, 116])), *pick(rng, &f32s)),
        8 => (
            if rng.below(2) == 0 { Field::F32(76 + 4 * rng.below(8) as usize) } else { Field::U8(123) },
            *pick(rng, &[f64::NAN, f64::INFINITY, 0.0, -1.0, 1e38, 1.0, 2.0, 3.0, 255.0]),
        ),
        _ => (Field::Magic, rng.below(5) as f64),
    }
}

fn set_field(h: &mut [u8], field: Field, v: f64, big: bool) {
    macro_rules! put {
        ($off:expr, $x:expr) => {{
            let b = if big { $x.to_be_bytes() } else { $x.to_le_bytes() };
            if h.len() >= $off + b.len() {
                h[$off..$off + b.len()].copy_from_slice(&b);
            }
        }};
    }
    match field {
        Field::I32(o) => put!(o, v as i32),
        Field::I16(o) => put!(o, v as i16),
        Field::U8(o) => put!(o, v as u8),
        Field::F32(o) => put!(o, v as f32),
        Field::Magic => {
            let m: &[u8; 4] = [b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"abcd"][v as usize];
            if h.len() >= 348 {
                h[344..348].copy_from_slice(m);
            }
        }
    }
}

fn mutate_nifti(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    let big = b.len() >= 4 && b[..4] != 348i32.to_le_bytes();
    if rng.below(10) < 6 {
        for _ in 0..1 + rng.below(3) {
            let (f, v) = nifti_field(rng);
            // Now and then in the other byte order.
            set_field(&mut b, f, v, big ^ (rng.below(10) == 0));
        }
    }
    if rng.below(10) < 4 {
        some_byte_mutations(rng, &mut b);
    }
    b
}

fn mutate_nifti_gz(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let raw = gunzip(seed);
    match rng.below(3) {
        0 => gzip(&mutate_nifti(rng, &raw)),
        1 => {
            let mut gz = gzip(&raw);
            corrupt_gzip(rng, &mut gz);
            gz
        }
        _ => {
            let mut gz = gzip(&mutate_nifti(rng, &raw));
            corrupt_gzip(rng, &mut gz);
            gz
        }
    }
}

fn read_nifti(p: &Path) -> Vec<Result<()>> {
    vec![read_image(p).map(drop), read_mask(p).map(drop)]
}

fn nifti_target(name: &'static str, gz: bool) -> Target<'static> {
    let dir = tmpdir(name);
    let mut seeds = nifti_seeds(dir.path());
    if gz {
        seeds = seeds.iter().map(|s| gzip(s)).collect();
    }
    let file = if gz { "case.nii.gz" } else { "case.nii" }.to_string();
    Target {
        name,
        names: dir.path().join(&file).display().to_string(),
        file,
        dir,
        seeds,
        mutate: Box::new(if gz { mutate_nifti_gz } else { mutate_nifti }),
        read: Box::new(read_nifti),
    }
}

#[test]
fn fuzz_nifti() {
    nifti_target("nifti", false).run();
}

#[test]
fn fuzz_nifti_gz() {
    nifti_target("nifti_gz", true).run();
}

// ---- NRRD ----

/// A NRRD file as header lines, the payload before encoding, and its encoding.
struct Nrrd {
    lines: Vec<String>,
    payload: Vec<u8>,
}

fn nrrd_seed_parts() -> Vec<Nrrd> {
    let vals: Vec<i16> = (0..24).map(|i| (i * 7 % 11) as i16 - 3).collect();
    let head = |ty: &str, enc: &str, endian: Option<&str>, extra: &[&str]| {
        let mut l = vec![
            "NRRD0004".to_string(),
            "# made by hand".into(),
            format!("type: {ty}"),
            "dimension: 3".into(),
        ];
        l.push("sizes: 2 3 4".into());
        if let Some(e) = endian {
            l.push(format!("endian: {e}"));
        }
        l.push(format!("encoding: {enc}"));
        l.extend(extra.iter().map(|s| s.to_string()));
        l
    };
    let lps = [
        "space: left-posterior-superior",
        "space directions: (0.625,0,0) (0,0.625,0) (0,0,2.5)",
        "space origin: (10,20,30)",
    ];
    let le: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let be: Vec<u8> = vals.iter().flat_map(|v| v.to_be_bytes()).collect();
    let f32s: Vec<u8> = vals.iter().flat_map(|&v| (v as f32).to_be_bytes()).collect();
    let u8s: Vec<u8> = vals.iter().map(|&v| v as u8).collect();
    let ascii = vals.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" ").into_bytes();
    vec![
        Nrrd { lines: head("short", "raw", Some("little"), &lps), payload: le.clone() },
        Nrrd { lines: head("short", "raw", Some("big"), &["spacings: 1.5 2 3"]), payload: be },
        Nrrd { lines: head("short", "gzip", Some("little"), &lps), payload: le },
        Nrrd { lines: head("uchar", "gzip", None, &lps), payload: u8s.clone() },
        Nrrd { lines: head("uchar", "raw", None, &[]), payload: u8s },
        Nrrd { lines: head("float", "raw", Some("big"), &["byte skip: 0"]), payload: f32s },
        Nrrd { lines: head("int", "ascii", None, &lps), payload: ascii },
    ]
}

fn nrrd_bytes(n: &Nrrd) -> Vec<u8> {
    let enc = n.lines.iter().find_map(|l| l.strip_prefix("encoding: ")).unwrap_or("raw");
    let mut b = n.lines.join("\n").into_bytes();
    b.extend_from_slice(b"\n\n");
    if enc.starts_with("gz") {
        b.extend(gzip(&n.payload));
    } else {
        b.extend_from_slice(&n.payload);
    }
    b
}

/// Splits a file back into header lines and payload (decoding gzip) for structured mutation.
fn nrrd_parts(b: &[u8]) -> Nrrd {
    let split = b.windows(2).position(|w| w == b"\n\n").expect("a seed has a blank line");
    let lines: Vec<String> =
        String::from_utf8(b[..split].to_vec()).unwrap().lines().map(str::to_string).collect();
    let data = &b[split + 2..];
    let gz = lines.iter().any(|l| l.starts_with("encoding: gz"));
    Nrrd { payload: if gz { gunzip(data) } else { data.to_vec() }, lines }
}

fn nrrd_value(rng: &mut Rng, key: &str) -> String {
    let generic = ["", "-1", "0", "nan", "inf", "1e400", "18446744073709551616", "((((", "\u{0}", "ü"];
    let specific: &[&str] = match key {
        "type" => {
            &["uchar", "short", "float", "double", "int64", "ulonglong", "complex", "block", "unsigned char"]
        }
        "dimension" => &["0", "1", "2", "3", "4", "-3", "3.0"],
        "sizes" => &[
            "0 0 0",
            "-1 2 3",
            "1 1 1",
            "2 3",
            "2 3 4 5",
            "4294967296 4294967296 4294967296",
            "65536 65536 65536",
            "1024 1024 1024",
            "1073741824 1 1",
            "18446744073709551615 1 1",
            "2 3 x",
            "3 2 4",
        ],
        "endian" => &["big", "little", "middle"],
        "encoding" => &["raw", "gzip", "gz", "ascii", "text", "bzip2", "hex"],
        "byte skip" => &["-1", "0", "1", "18446744073709551615", "1000000", "9223372036854775807"],
        "space directions" => &[
            "(1,0,0) (0,1,0) (0,0,1)",
            "(nan,0,0) (0,inf,0) (0,0,1e999)",
            "none (0,1,0) (0,0,1)",
            "(1,0) (0,1,0) (0,0,1)",
            ")))",
            "(1,0,0)",
            "(,,) (,,) (,,)",
            "(1e308,1e308,1e308) (0,1,0) (0,0,1)",
            "(0,0,0) (0,0,0) (0,0,0)",
        ],
        "spacings" => &["1 1 1", "nan inf -1", "0 0 0", "1e999 1 1", "1", "1e-320 1 1"],
        "space origin" => &["(0,0,0)", "(nan,nan,nan)", "(1e999,0,0)", "none", "(1,2)", "garbage"],
        "space" => &["left-posterior-superior", "RAS", "LAS", "3D-right-handed"],
        "data file" => &["x.raw", "LIST"],
        _ => &["1", "-1", "domain domain domain"],
    };
    if rng.below(4) == 0 { pick(rng, &generic).to_string() } else { pick(rng, specific).to_string() }
}

const NRRD_KEYS: [&str; 13] = [
    "type",
    "dimension",
    "sizes",
    "endian",
    "encoding",
    "byte skip",
    "space directions",
    "spacings",
    "space origin",
    "space",
    "data file",
    "line skip",
    "kinds",
];

fn mutate_nrrd(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut n = nrrd_parts(seed);
    for _ in 0..1 + rng.below(3) {
        match rng.below(10) {
            0..=4 => {
                let key = *pick(rng, &NRRD_KEYS);
                let line = format!("{key}: {}", nrrd_value(rng, key));
                match n.lines.iter().position(|l| l.starts_with(&format!("{key}:"))) {
                    Some(i) if rng.below(4) != 0 => n.lines[i] = line,
                    _ => n.lines.push(line),
                }
            }
            5 if n.lines.len() > 1 => {
                let i = 1 + rng.below(n.lines.len() as u64 - 1) as usize;
                n.lines.remove(i);
            }
            6 => {
                n.lines[0] = pick(rng, &["NRRD0001", "NRRD", "nrrd0004", "P5", "", "NRRD0004\r"]).to_string()
            }
            7 => {
                let i = rng.below(n.lines.len() as u64 + 1) as usize;
                let junk =
                    pick(rng, &["garbage", "key:value", ":", "a:= b", "#", "type:  short"]).to_string();
                n.lines.insert(i, junk);
            }
            _ => some_byte_mutations(rng, &mut n.payload),
        }
    }
    let mut b = nrrd_bytes(&n);
    let header_end = b.windows(2).position(|w| w == b"\n\n").unwrap_or(0) + 2;
    match rng.below(10) {
        // A damaged gzip stream.
        0 | 1 if n.lines.iter().any(|l| l.starts_with("encoding: gz")) => {
            let mut gz = b.split_off(header_end);
            corrupt_gzip(rng, &mut gz);
            b.extend(gz);
        }
        // No blank line between header and data.
        2 => {
            b.remove(header_end - 1);
        }
        3 | 4 => some_byte_mutations(rng, &mut b),
        _ => {}
    }
    b
}

#[test]
fn fuzz_nrrd() {
    let dir = tmpdir("nrrd");
    let file = "case.nrrd".to_string();
    Target {
        name: "nrrd",
        names: dir.path().join(&file).display().to_string(),
        file,
        dir,
        seeds: nrrd_seed_parts().iter().map(nrrd_bytes).collect(),
        mutate: Box::new(mutate_nrrd),
        read: Box::new(|p: &Path| vec![read_nrrd(p).map(drop)]),
    }
    .run();
}

// ---- split lists and the dataset they describe ----

fn mutate_list(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let tokens = [
        "a",
        "b",
        "c",
        "d",
        "missing",
        "..",
        ".",
        "a/b",
        "a\\b",
        "#comment",
        "",
        "  b  ",
        "\u{feff}a",
        "ü",
        "\0",
        "c\r",
        "image.nii.gz",
        "a ",
        "\t",
    ];
    let mut b = if rng.below(3) == 0 {
        seed.to_vec()
    } else {
        let long = "x".repeat(300);
        let lines: Vec<&str> =
            (0..rng.below(8)).map(|_| if rng.below(20) == 0 { &long } else { *pick(rng, &tokens) }).collect();
        lines.join(if rng.below(3) == 0 { "\r\n" } else { "\n" }).into_bytes()
    };
    if rng.below(3) == 0 {
        some_byte_mutations(rng, &mut b);
    }
    b
}

#[test]
fn fuzz_split_lists() {
    let dir = tmpdir("lists");
    for name in ["a", "b", "c", "d"] {
        let (img, lab) = generate_case(5, name.as_bytes()[0] as usize, [12, 10, 8]);
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        write_image(dir.path().join(name).join("image.nii.gz"), &img).unwrap();
        write_mask(dir.path().join(name).join("label.nii.gz"), &lab).unwrap();
    }
    write_list(dir.path().join("test.list"), &["d".to_string()]).unwrap();
    let root = dir.path().to_path_buf();
    Target {
        name: "lists",
        names: dir.path().display().to_string(),
        file: "train.list".into(),
        dir,
        seeds: vec![b"a\nb\nc\n".to_vec(), b"# train\r\nb\r\n\r\na\r\n".to_vec()],
        mutate: Box::new(mutate_list),
        read: Box::new(move |p: &Path| {
            let list = read_list(p).map(drop);
            let ds = Dataset::open(&root).and_then(|ds| {
                ds.load_train()?;
                ds.load_test()?;
                Ok(())
            });
            vec![list, ds]
        }),
    }
    .run();
}

// ---- TOML configuration ----

const CONFIG_KEYS: [&str; 27] = [
    "data",
    "method",
    "labeled",
    "iters",
    "patch",
    "width",
    "batch",
    "labeled_bs",
    "lr",
    "momentum",
    "weight_decay",
    "seed",
    "rampup",
    "ramp_every",
    "consistency",
    "omni",
    "memory_num",
    "num_filtered",
    "temperature",
    "corr_temperature",
    "embed",
    "detach_targets",
    "fix_memory_view",
    "val_every",
    "checkpoint_every",
    "preset",
    "widht",
];

const CONFIG_VALUES: [&str; 34] = [
    "-1",
    "0",
    "1",
    "2",
    "16",
    "1e30",
    "-1e30",
    "nan",
    "inf",
    "-inf",
    "0.5",
    "-0.0",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "\"str\"",
    "\"caml\"",
    "\"labeled-only\"",
    "\"small\"",
    "true",
    "[]",
    "[16, 16]",
    "[16, 16, 16]",
    "[0, 0, 0]",
    "[16, 16, 16, 16]",
    "[-16, 16, 16]",
    "[9223372036854775792, 16, 16]",
    "[1048576, 1048576, 1048576]",
    "[16.5, 16, 16]",
    "{ a = 1 }",
    "1979-05-27",
    "'''x'''",
    "[[1]]",
    "0x10",
];

fn mutate_config(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut text = String::from_utf8_lossy(seed).into_owned();
    for _ in 0..1 + rng.below(3) {
        let key = *pick(rng, &CONFIG_KEYS);
        let line = format!("{key} = {}", pick(rng, &CONFIG_VALUES));
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        match lines.iter().position(|l| l.starts_with(&format!("{key} ="))) {
            Some(i) if rng.below(5) != 0 => lines[i] = line,
            _ => lines.push(line),
        }
        text = lines.join("\n") + "\n";
    }
    let mut b = text.into_bytes();
    if rng.below(5) == 0 {
        some_byte_mutations(rng, &mut b);
    }
    b
}

/// What the training loop and the run folder rely on for an accepted configuration.
fn use_config(cfg: &TrainConfig) -> Result<()> {
    let ramp = caml_wgpu::caml::losses::Ramp {
        consistency: cfg.consistency,
        omni: cfg.omni,
        length: cfg.ramp_length(),
        every: cfg.ramp_every,
    };
    for iter in [0, 1, 2, 149, 150, 1000, u64::MAX] {
        let (c, o) = ramp.weights(iter);
        assert!(c.is_finite() && o.is_finite(), "ramp weights ({c}, {o}) at iteration {iter}");
    }
    let back: TrainConfig = toml::from_str(&cfg.to_toml()).expect("a resolved config reads back");
    assert_eq!(&back, cfg, "a resolved config reads back unchanged");
    let _ = train::preflight(cfg, cfg.batch, ((1 << 31) - 1, 1 << 27), "--batch");
    let unlabeled = cfg.batch - cfg.labeled_bs;
    let _ =
        Sampler::new(cfg.labeled.saturating_add(unlabeled), cfg.labeled, cfg.labeled_bs, unlabeled, cfg.seed);
    Ok(())
}

#[test]
fn fuzz_config() {
    let dir = tmpdir("config");
    let file = "run.toml".to_string();
    let small = TrainConfig::preset(Preset::Small);
    Target {
        name: "config",
        names: dir.path().join(&file).display().to_string(),
        file,
        dir,
        seeds: vec![small.to_toml().into_bytes(), b"width = 2\npatch = [16, 16, 16]\n".to_vec(), Vec::new()],
        mutate: Box::new(mutate_config),
        read: Box::new(move |p: &Path| vec![small.clone().merge_file(p).and_then(|c| use_config(&c))]),
    }
    .run();
}

// ---- model checkpoints (safetensors) ----

fn tiny_config() -> TrainConfig {
    TrainConfig {
        labeled: 2,
        patch: [16, 16, 16],
        width: 2,
        embed: 4,
        batch: 2,
        labeled_bs: 1,
        memory_num: 4,
        ..TrainConfig::preset(Preset::Small)
    }
}

fn model_entries(model: &caml_wgpu::caml::model::Caml) -> checkpoint::StateDict {
    let (p, b) = model.named();
    p.iter()
        .chain(&b)
        .map(|(k, t)| {
            let e = match t.dtype() {
                caml_wgpu::DType::F32 => Entry::f32(t.shape(), t.to_vec()),
                caml_wgpu::DType::U32 => {
                    Entry::i64(t.shape(), t.to_u32().into_iter().map(i64::from).collect())
                }
            };
            (k.clone(), e)
        })
        .collect()
}

fn safetensors_bytes(dict: &checkpoint::StateDict, meta: &HashMap<String, String>) -> Vec<u8> {
    let dir = tmpdir("st-write");
    let p = dir.path().join("x.safetensors");
    checkpoint::save(&p, dict, meta).unwrap();
    let b = std::fs::read(&p).unwrap();
    dir.close().unwrap();
    b
}

/// A change to one tensor: removed, renamed, reshaped, retyped, or holding NaN.
fn mutate_dict(rng: &mut Rng, dict: &mut checkpoint::StateDict) {
    let keys: Vec<String> = dict.keys().cloned().collect();
    let key = pick(rng, &keys).clone();
    match rng.below(7) {
        0 => {
            dict.remove(&key);
        }
        1 => {
            let e = dict[&key].clone();
            dict.insert(format!("{key}{}", pick(rng, &["_x", ".extra", "/stray"])), e);
        }
        2 => {
            let e = dict.remove(&key).unwrap();
            dict.insert(format!("stray.{}", rng.below(100)), e);
        }
        3 => {
            let e = dict.get_mut(&key).unwrap();
            let n: usize = e.shape.iter().product();
            e.shape = match rng.below(4) {
                0 => vec![n],
                1 => [vec![1], e.shape.clone()].concat(),
                2 => e.shape.iter().rev().copied().collect(),
                _ => vec![n, 1],
            };
        }
        4 => {
            let e = dict.get_mut(&key).unwrap();
            e.data = match &e.data {
                Data::F32(v) => Data::I64(v.iter().map(|&x| x as i64).collect()),
                Data::I64(v) => Data::F32(v.iter().map(|&x| x as f32).collect()),
            };
        }
        5 => {
            let e = dict.get_mut(&key).unwrap();
            if let Data::F32(v) = &mut e.data
                && !v.is_empty()
            {
                let i = rng.below(v.len() as u64) as usize;
                v[i] = *pick(rng, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX]);
            }
        }
        _ => {
            // Fewer values under a smaller shape.
            let e = dict.get_mut(&key).unwrap();
            let n: usize = e.shape.iter().product();
            let k = rng.below(n as u64 + 1) as usize;
            e.shape = vec![k];
            match &mut e.data {
                Data::F32(v) => v.truncate(k),
                Data::I64(v) => v.truncate(k),
            }
        }
    }
}

/// Textual changes to the safetensors JSON header: another dtype, offsets or shape.
fn mutate_header_text(rng: &mut Rng, b: &mut Vec<u8>) {
    if b.len() < 8 {
        return;
    }
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    if b.len() < 8 + n {
        return;
    }
    let mut header = String::from_utf8_lossy(&b[8..8 + n]).into_owned();
    let (from, to) = match rng.below(4) {
        0 => (
            "\"F32\"".to_string(),
            pick(
                rng,
                &["\"F16\"", "\"BF16\"", "\"F64\"", "\"U8\"", "\"BOOL\"", "\"I32\"", "\"F8_E4M3\"", "\"X\""],
            )
            .to_string(),
        ),
        1 => ("\"data_offsets\":[0,".to_string(), format!("\"data_offsets\":[{},", pick(rng, &EXTREMES))),
        2 => (
            "\"shape\":[".to_string(),
            format!("\"shape\":[{},", pick(rng, &["0", "1", "-1", "4294967296", "18446744073709551615"])),
        ),
        _ => ("\"caml-wgpu\"".to_string(), "\"other\"".to_string()),
    };
    if let Some(i) = header.find(&from) {
        header.replace_range(i..i + from.len(), &to);
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&b[8 + n..]);
    *b = out;
}

fn mutate_checkpoint(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let dir = tmpdir("st-read");
    let p = dir.path().join("x.safetensors");
    std::fs::write(&p, seed).unwrap();
    let (mut dict, mut meta) = checkpoint::load(&p).unwrap();
    dir.close().unwrap();
    match rng.below(10) {
        0..=3 => {
            for _ in 0..1 + rng.below(3) {
                mutate_dict(rng, &mut dict);
            }
        }
        4 | 5 => {
            // The saved configuration: mutated, unreadable, or gone.
            match (rng.below(4), meta.get("config")) {
                (0, _) => {
                    meta.remove("config");
                }
                (1, _) => {
                    meta.insert("config".into(), "width = [".into());
                }
                // A network size the weights do not have, up to one no memory could hold.
                (2, Some(text)) => {
                    let key = pick(rng, &["width", "embed"]);
                    let v = pick(rng, &["0", "3", "16", "64", "100000", "2147483648", "9223372036854775807"]);
                    let t = format!("{text}\n{key} = {v}\n");
                    let t = t.replacen(&format!("\n{key} = "), &format!("\n# {key} = "), 1);
                    meta.insert("config".into(), t);
                }
                (_, Some(text)) => {
                    let t = mutate_config(rng, text.as_bytes());
                    meta.insert("config".into(), String::from_utf8_lossy(&t).into_owned());
                }
                _ => {}
            }
        }
        _ => {}
    }
    let mut b = safetensors_bytes(&dict, &meta);
    match rng.below(10) {
        0..=2 => mutate_header_text(rng, &mut b),
        3..=5 => some_byte_mutations(rng, &mut b),
        _ => {}
    }
    b
}

#[test]
fn fuzz_checkpoints() {
    let cfg = tiny_config();
    let model = train::build_model(&cfg);
    let dict = model_entries(&model);
    drop(model);
    let dir = tmpdir("checkpoint");
    let file = "model.safetensors".to_string();
    let fallback = cfg.clone();
    Target {
        name: "checkpoint",
        names: dir.path().join(&file).display().to_string(),
        file,
        dir,
        seeds: vec![
            safetensors_bytes(&dict, &train::model_metadata(&cfg)),
            safetensors_bytes(&dict, &HashMap::new()),
        ],
        mutate: Box::new(mutate_checkpoint),
        read: Box::new(move |p: &Path| vec![train::load_model(p, &fallback).map(drop)]),
    }
    .run();
}

// ---- the training state (checkpoint.safetensors of a run folder) ----

fn mutate_json(rng: &mut Rng, v: &mut serde_json::Value, depth: usize) {
    use serde_json::Value;
    let hostile = |rng: &mut Rng| -> Value {
        match rng.below(8) {
            0 => Value::from(-1),
            1 => Value::from(0),
            2 => Value::from(u64::MAX),
            3 => Value::from(1e300),
            4 => Value::from("x"),
            5 => Value::Null,
            6 => Value::from(rng.below(6)),
            _ => Value::Array(vec![]),
        }
    };
    match v {
        Value::Array(a) if !a.is_empty() && depth < 4 && rng.below(4) != 0 => {
            let i = rng.below(a.len() as u64) as usize;
            mutate_json(rng, &mut a[i], depth + 1);
        }
        Value::Array(a) if rng.below(2) == 0 => match rng.below(3) {
            0 => {
                a.pop();
            }
            1 => a.push(hostile(rng)),
            _ => a.clear(),
        },
        Value::Object(m) if !m.is_empty() && depth < 4 => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = pick(rng, &keys).clone();
            if rng.below(8) == 0 {
                m.remove(&k);
            } else {
                mutate_json(rng, m.get_mut(&k).unwrap(), depth + 1);
            }
        }
        _ => *v = hostile(rng),
    }
}

fn mutate_training_state(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let dir = tmpdir("ts-read");
    let p = dir.path().join("x.safetensors");
    std::fs::write(&p, seed).unwrap();
    let (mut dict, mut meta) = checkpoint::load(&p).unwrap();
    dir.close().unwrap();
    for _ in 0..1 + rng.below(2) {
        match rng.below(10) {
            0..=5 => {
                let key = *pick(rng, &["sampler", "sampler", "sampler", "bank", "bank", "rng", "iteration"]);
                let text = meta.get(key).cloned().unwrap_or_default();
                let new = match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(mut v) if rng.below(6) != 0 => {
                        mutate_json(rng, &mut v, 0);
                        v.to_string()
                    }
                    _ => pick(rng, &["", "-1", "18446744073709551616", "{", "null", "[[0,[1,2]],[0,[1,2]]]"])
                        .to_string(),
                };
                meta.insert(key.into(), new);
            }
            6..=8 => {
                // Mostly the optimizer and bank tensors, the part only this file has.
                let keys: Vec<String> = dict.keys().filter(|k| k.contains('/')).cloned().collect();
                let mut sub: checkpoint::StateDict =
                    keys.iter().map(|k| (k.clone(), dict.remove(k).unwrap())).collect();
                mutate_dict(rng, &mut sub);
                dict.extend(sub);
            }
            _ => mutate_dict(rng, &mut dict),
        }
    }
    let mut b = safetensors_bytes(&dict, &meta);
    if rng.below(10) == 0 {
        some_byte_mutations(rng, &mut b);
    }
    b
}

#[test]
fn fuzz_training_state() {
    let cfg = tiny_config();
    let n_train = 4;
    let model = train::build_model(&cfg);
    let opt = Sgd::new(
        SgdConfig { lr: cfg.lr, momentum: cfg.momentum, weight_decay: cfg.weight_decay },
        &model.params(),
    );
    let mut bank =
        MemoryBank::new(cfg.labeled, cfg.memory_num, caml_wgpu::caml::step::bank_capacity(&cfg), cfg.embed);
    bank.update(0, Tensor::from_vec(&Rng::new(1).vec(5 * cfg.embed, -1.0, 1.0), &[5, cfg.embed]), [3, 2]);
    bank.update(1, Tensor::from_vec(&Rng::new(2).vec(6 * cfg.embed, -1.0, 1.0), &[6, cfg.embed]), [2, 4]);
    let mut sampler =
        Sampler::new(n_train, cfg.labeled, cfg.labeled_bs, cfg.batch - cfg.labeled_bs, cfg.seed).unwrap();
    for _ in 0..3 {
        sampler.next_indices();
    }
    let st = TrainState { model, opt, bank, rng: Rng::new(9), iter: 3, pending: None };
    let dir = tmpdir("training-state");
    train::save_checkpoint(dir.path(), &st, &cfg, &sampler.state()).unwrap();
    let seed = std::fs::read(dir.path().join(train::CHECKPOINT)).unwrap();
    let st = RefCell::new(st);
    let run_dir = dir.path().to_path_buf();
    Target {
        name: "training_state",
        names: dir.path().join(train::CHECKPOINT).display().to_string(),
        file: train::CHECKPOINT.into(),
        dir,
        seeds: vec![seed],
        mutate: Box::new(mutate_training_state),
        read: Box::new(move |_: &Path| {
            let mut st = st.borrow_mut();
            let r = train::restore_checkpoint(&run_dir, &mut st, &cfg, n_train).map(|mut sampler| {
                // The restored stream and bank must be usable.
                for _ in 0..6 {
                    let b = sampler.next_indices();
                    assert!(b.all().iter().all(|&i| i < n_train), "batch {b:?} of {n_train} cases");
                }
                let mut rng = st.rng.clone();
                st.bank.sample(&mut rng);
            });
            vec![r]
        }),
    }
    .run();
}

// ---- HDF5 (preprocessed LA files) ----

#[cfg(feature = "h5")]
#[test]
fn fuzz_h5() {
    use caml_wgpu::data::prepare_la::read_la_h5;
    let dir = tmpdir("h5");
    let file = "mri_norm2.h5".to_string();
    let seed =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/la_case.h5")).unwrap();
    Target {
        name: "h5",
        names: dir.path().join(&file).display().to_string(),
        file,
        dir,
        seeds: vec![seed],
        mutate: Box::new(|rng: &mut Rng, s: &[u8]| {
            let mut b = s.to_vec();
            some_byte_mutations(rng, &mut b);
            b
        }),
        read: Box::new(|p: &Path| vec![read_la_h5(p).map(drop)]),
    }
    .run();
}

#[test]
fn the_mutators_change_their_input() {
    // A harness whose mutations were no-ops would pass every reader.
    let seeds = nifti_seeds(tmpdir("mutators").path());
    let mut rng = Rng::new(1);
    let changed = (0..100).filter(|_| mutate_nifti(&mut rng, &seeds[0]) != seeds[0]).count();
    assert!(changed > 60, "{changed} of 100 NIfTI mutations changed the file");
    let gz = gzip(&seeds[0]);
    let changed = (0..100).filter(|_| gunzip_lossy(&mutate_nifti_gz(&mut rng, &gz)) != seeds[0]).count();
    assert!(changed > 60, "{changed} of 100 gzip mutations changed the content");
    let nrrd = nrrd_bytes(&nrrd_seed_parts()[0]);
    let changed = (0..100).filter(|_| mutate_nrrd(&mut rng, &nrrd) != nrrd).count();
    assert!(changed > 60, "{changed} of 100 NRRD mutations changed the file");
    let huge = {
        let mut h = seeds[0].clone();
        set_field(&mut h, Field::I16(42), 32767.0, false);
        set_field(&mut h, Field::I16(44), 32767.0, false);
        set_field(&mut h, Field::I16(46), 32767.0, false);
        h
    };
    // 32767^3 voxels (2^45) is refused before anything that large is allocated.
    let dir = tmpdir("huge");
    let p = dir.path().join("huge.nii");
    let r = check_case(&p, &huge, &p.display().to_string(), &read_nifti);
    assert!(r.is_ok(), "{r:?}");
    let e = format!("{:#}", read_image(&p).unwrap_err());
    assert!(e.contains("huge.nii") && e.contains("implausibly large"), "{e}");
}

fn gunzip_lossy(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(b), &mut out);
    out
}

#[test]
fn the_harness_catches_panics_unnamed_errors_and_huge_allocations() {
    let dir = tmpdir("harness");
    let p = dir.path().join("x.bin");
    let names = p.display().to_string();
    let panics: &Read<'_> = &|_| panic!("boom");
    assert!(check_case(&p, b"x", &names, panics).unwrap_err().contains("boom"));
    let unnamed: &Read<'_> = &|_| vec![Err(anyhow::anyhow!("no file here"))];
    assert!(check_case(&p, b"x", &names, unnamed).unwrap_err().contains("does not name"));
    let hungry: &Read<'_> = &|_| {
        let v: Vec<u8> = Vec::with_capacity(1 << 30);
        std::hint::black_box(&v);
        vec![Ok(())]
    };
    assert!(check_case(&p, b"x", &names, hungry).unwrap_err().contains("allocated"));
    let fine: &Read<'_> = &|p| vec![Err(anyhow::anyhow!("{}: bad", p.display()))];
    assert!(check_case(&p, b"x", &names, fine).is_ok());
}
