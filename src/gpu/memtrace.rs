//! Where the memory goes: with `CAML_MEMORY_TRACE` set, every tensor buffer of at least 1 MiB
//! remembers the call stack that made it, and the set of such buffers alive at the peak of the
//! bytes they hold is kept; `report` groups that set by the model code that made each buffer.
//! For benchmarks (`caml-wgpu bench train-step`); capturing stacks slows every allocation.

use std::backtrace::Backtrace;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Buffers smaller than this are not traced.
const MIN_BYTES: u64 = 1 << 20;

struct Live {
    bytes: u64,
    shape: Vec<usize>,
    stack: Arc<Backtrace>,
}

#[derive(Default)]
struct Trace {
    live: HashMap<usize, Live>,
    live_bytes: u64,
    peak_bytes: u64,
    peak: Vec<(u64, Vec<usize>, Arc<Backtrace>)>,
}

fn trace() -> Option<&'static Mutex<Trace>> {
    static T: OnceLock<Option<Mutex<Trace>>> = OnceLock::new();
    T.get_or_init(|| std::env::var_os("CAML_MEMORY_TRACE").map(|_| Mutex::new(Trace::default()))).as_ref()
}

pub fn enabled() -> bool {
    trace().is_some()
}

/// Records a buffer (its address while it lives) made for a tensor of `shape`.
pub(crate) fn record(key: usize, bytes: u64, shape: &[usize]) {
    let Some(t) = trace() else { return };
    if bytes < MIN_BYTES {
        return;
    }
    let stack = Arc::new(Backtrace::force_capture());
    let mut t = t.lock().unwrap();
    t.live.insert(key, Live { bytes, shape: shape.to_vec(), stack });
    t.live_bytes += bytes;
    if t.live_bytes > t.peak_bytes {
        t.peak_bytes = t.live_bytes;
        t.peak = t.live.values().map(|l| (l.bytes, l.shape.clone(), l.stack.clone())).collect();
    }
}

pub(crate) fn release(key: usize) {
    let Some(t) = trace() else { return };
    let mut t = t.lock().unwrap();
    if let Some(l) = t.live.remove(&key) {
        t.live_bytes -= l.bytes;
    }
}

/// Forgets the peak (after warm-up iterations).
pub fn reset_peak() {
    if let Some(t) = trace() {
        let mut t = t.lock().unwrap();
        t.peak_bytes = t.live_bytes;
        t.peak = t.live.values().map(|l| (l.bytes, l.shape.clone(), l.stack.clone())).collect();
    }
}

/// The buffers alive at the peak, grouped by the innermost frames of the model code that made
/// them (engine internals skipped), the largest groups first: (bytes, buffers, shape, site).
pub fn report(top: usize) -> Vec<(u64, usize, Vec<usize>, String)> {
    let Some(t) = trace() else { return Vec::new() };
    let peak = t.lock().unwrap().peak.clone();
    let mut groups: HashMap<String, (u64, usize, Vec<usize>)> = HashMap::new();
    for (bytes, shape, stack) in peak {
        let e = groups.entry(site(&stack)).or_insert((0, 0, shape));
        e.0 += bytes;
        e.1 += 1;
    }
    let mut v: Vec<_> = groups.into_iter().map(|(s, (b, n, shape))| (b, n, shape, s)).collect();
    v.sort_by_key(|g| std::cmp::Reverse(g.0));
    v.truncate(top);
    v
}

/// The first three frames of this crate outside the tensor, engine and autograd plumbing.
fn site(stack: &Backtrace) -> String {
    let text = stack.to_string();
    let plumbing = ["caml_wgpu::tensor", "caml_wgpu::gpu", "caml_wgpu::ops::Tiling", "core::", "std::"];
    let frames: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter_map(|l| l.split_once(": ").map(|(_, f)| f.to_string()))
        .filter(|f| f.starts_with("caml_wgpu::") && !plumbing.iter().any(|p| f.starts_with(p)))
        .map(|f| f.rsplit_once("::h").map_or(f.clone(), |(name, _)| name.to_string()))
        .take(3)
        .collect();
    if frames.is_empty() { "(unknown)".to_string() } else { frames.join(" < ") }
}
