//! The WGSL sources, embedded at build time: one file per op family. Families whose kernels are
//! specialized by a generator register the generated sources at run time.

use std::collections::HashMap;
use std::sync::Mutex;

const SHADERS: &[(&str, &str)] = &[
    ("elementwise", include_str!("../../shaders/elementwise.wgsl")),
    ("half", include_str!("../../shaders/half.wgsl")),
    ("reduce", include_str!("../../shaders/reduce.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("layout", include_str!("../../shaders/layout.wgsl")),
    ("scan", include_str!("../../shaders/scan.wgsl")),
    ("sort", include_str!("../../shaders/sort.wgsl")),
    ("select", include_str!("../../shaders/select.wgsl")),
    ("batchnorm", include_str!("../../shaders/batchnorm.wgsl")),
    ("dropout", include_str!("../../shaders/dropout.wgsl")),
    ("upsample", include_str!("../../shaders/upsample.wgsl")),
    ("conv_ref", include_str!("../../shaders/conv_ref.wgsl")),
    ("layernorm", include_str!("../../shaders/layernorm.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    ("conv3d", include_str!("../../shaders/conv3d.wgsl")),
    ("conv3d_grad", include_str!("../../shaders/conv3d_grad.wgsl")),
];

/// Generated sources by name; each is built once per process and kept for its lifetime.
static GENERATED: Mutex<Option<HashMap<&'static str, &'static str>>> = Mutex::new(None);

/// The name under which `make()`'s source is compiled, generating it on first use.
pub fn generated(name: &str, make: impl FnOnce() -> String) -> &'static str {
    let mut g = GENERATED.lock().unwrap();
    let map = g.get_or_insert_with(HashMap::new);
    if let Some((&key, _)) = map.get_key_value(name) {
        return key;
    }
    let key: &'static str = Box::leak(name.to_string().into_boxed_str());
    map.insert(key, Box::leak(make().into_boxed_str()));
    key
}

pub(crate) fn source(name: &str) -> Option<&'static str> {
    SHADERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .or_else(|| GENERATED.lock().unwrap().as_ref().and_then(|m| m.get(name).copied()))
}
