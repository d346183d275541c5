//! Compiled pipelines kept across processes: a `wgpu::PipelineCache` (Vulkan's VkPipelineCache)
//! loaded at start from a per-adapter file and saved after new pipelines were compiled.
//!
//! The folder: `CAML_PIPELINE_CACHE` if set (`0`, `off` or empty disable the cache), else
//! `$XDG_CACHE_HOME/caml-wgpu`, else `~/.cache/caml-wgpu`. The file is named by
//! `wgpu::util::pipeline_cache_key` (backends without one have no cache) and a hash of the
//! adapter's name and driver, so that drivers sharing a folder do not overwrite each other.
//!
//! File layout: `MAGIC`, the payload length (u64 LE), a checksum of the payload (u64 LE), then the
//! payload, which is exactly what `PipelineCache::get_data` returned. wgpu checks its own header
//! (format version, backend, adapter, driver) but nothing past it; the checksum keeps a damaged
//! file away from the driver. Any file that fails a check is ignored with a warning and the run
//! compiles from scratch.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};

/// The first bytes of a cache file.
pub const MAGIC: &[u8; 8] = b"CAMLPLC1";
const HEADER: usize = 24;

/// The cache folder for the given environment values (see the module comment); None disables
/// the cache.
pub fn cache_dir_from(
    setting: Option<&OsStr>,
    xdg_cache_home: Option<&OsStr>,
    home: Option<&OsStr>,
) -> Option<PathBuf> {
    match setting {
        Some(v) if v.is_empty() || v == "0" || v.eq_ignore_ascii_case("off") => None,
        Some(v) => Some(PathBuf::from(v)),
        None => xdg_cache_home
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| home.filter(|v| !v.is_empty()).map(|h| Path::new(h).join(".cache")))
            .map(|d| d.join("caml-wgpu")),
    }
}

/// The cache folder this process uses: `CAML_PIPELINE_CACHE`, `XDG_CACHE_HOME`, `HOME`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = std::env::var_os;
    cache_dir_from(
        var("CAML_PIPELINE_CACHE").as_deref(),
        var("XDG_CACHE_HOME").as_deref(),
        var("HOME").as_deref(),
    )
}

/// The cache file of an adapter inside `dir`; None for backends without pipeline caches.
pub fn cache_file(dir: &Path, info: &wgpu::AdapterInfo) -> Option<PathBuf> {
    let key = wgpu::util::pipeline_cache_key(info)?;
    let driver = checksum(format!("{}\n{}\n{}", info.name, info.driver, info.driver_info).as_bytes());
    Some(dir.join(format!("{key}_{driver:016x}.bin")))
}

/// FNV-1a over 8-byte little-endian words (the tail zero-padded), seeded with the length.
fn checksum(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(PRIME);
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    (h ^ u64::from_le_bytes(tail)).wrapping_mul(PRIME)
}

/// `payload` framed as a cache file.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of a cache file's bytes, or why they are not one.
pub fn decode(bytes: &[u8]) -> Result<&[u8]> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        bail!("not a caml-wgpu pipeline cache");
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let sum = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        bail!("{} bytes of payload, the header says {len}", payload.len());
    }
    if checksum(payload) != sum {
        bail!("checksum mismatch");
    }
    Ok(payload)
}

/// A pipeline cache bound to its file.
pub struct PipelineCacheFile {
    pub cache: wgpu::PipelineCache,
    pub path: PathBuf,
    /// Bytes of the file handed to wgpu at start (0: no file, or one that was rejected).
    pub loaded_bytes: usize,
    /// The compile count recorded by the latest save.
    saved_at: AtomicU64,
}

impl PipelineCacheFile {
    /// Creates the cache on `device` from the file at `path` when it holds a valid one. A missing
    /// file is silent; an unreadable or damaged one is reported on stderr and ignored.
    pub fn open(device: &wgpu::Device, path: PathBuf) -> PipelineCacheFile {
        let bytes = match std::fs::read(&path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                eprintln!(
                    "warning: cannot read the pipeline cache {}: {e}; compiling afresh",
                    path.display()
                );
                None
            }
        };
        let payload = bytes.as_deref().and_then(|b| match decode(b) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("warning: ignoring the pipeline cache {}: {e:#}", path.display());
                None
            }
        });
        // SAFETY: the payload is what `PipelineCache::get_data` returned when this file was
        // saved: `decode` accepts only bytes framed by `encode` with a matching checksum. wgpu
        // checks that it came from this wgpu format, backend, adapter and driver; with `fallback`
        // it starts an empty cache on a version or driver change, and it reports data from
        // another adapter as a validation error, caught here.
        let create = |data| unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("caml-wgpu"),
                data,
                fallback: true,
            })
        };
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let cache = create(payload);
        let (cache, loaded_bytes) = match pollster::block_on(scope.pop()) {
            None => (cache, payload.map_or(0, <[u8]>::len)),
            Some(e) => {
                eprintln!("warning: ignoring the pipeline cache {}: {e}", path.display());
                (create(None), 0)
            }
        };
        PipelineCacheFile { cache, path, loaded_bytes, saved_at: AtomicU64::new(0) }
    }

    /// Writes the cache's current data to its file atomically when `compiled` (a count of
    /// pipelines compiled so far) moved since the last save; true when it wrote.
    pub fn save(&self, compiled: u64) -> Result<bool> {
        if self.saved_at.load(Ordering::Relaxed) == compiled {
            return Ok(false);
        }
        let Some(data) = self.cache.get_data() else { return Ok(false) };
        crate::fsutil::write_atomic(&self.path, &encode(&data))
            .with_context(|| "cannot save the pipeline cache")?;
        self.saved_at.store(compiled, Ordering::Relaxed);
        Ok(true)
    }
}
