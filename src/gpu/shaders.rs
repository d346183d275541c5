//! The WGSL sources, embedded at build time: one file per op family.

const SHADERS: &[(&str, &str)] = &[
    ("elementwise", include_str!("../../shaders/elementwise.wgsl")),
    ("reduce", include_str!("../../shaders/reduce.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("layout", include_str!("../../shaders/layout.wgsl")),
    ("scan", include_str!("../../shaders/scan.wgsl")),
    ("optim", include_str!("../../shaders/optim.wgsl")),
    ("sort", include_str!("../../shaders/sort.wgsl")),
    ("batchnorm", include_str!("../../shaders/batchnorm.wgsl")),
    ("dropout", include_str!("../../shaders/dropout.wgsl")),
    ("upsample", include_str!("../../shaders/upsample.wgsl")),
    ("conv_ref", include_str!("../../shaders/conv_ref.wgsl")),
    ("layernorm", include_str!("../../shaders/layernorm.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
];

pub(crate) fn source(name: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
