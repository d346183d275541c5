//! Ops, one file per family: the launch, the backward rule's kernels, and a CPU reference.

pub mod attention;
pub mod batchnorm;
pub mod conv;
pub mod conv_ref;
pub mod dropout;
pub mod elementwise;
pub mod layernorm;
pub mod layout;
pub mod linear;
pub mod matmul;
pub mod reduce;
pub mod scan;
pub mod sort;
pub mod upsample;

/// A kernel's uniform block, built word by word to match the WGSL struct: 4-byte scalars in
/// order, and `array<vec4<u32>, 2>` dimension lists aligned to 16 bytes.
#[derive(Default)]
pub struct Params(Vec<u32>);

impl Params {
    pub fn new() -> Self {
        Params(Vec::with_capacity(32))
    }
    pub fn u(mut self, v: usize) -> Self {
        self.0.push(u32::try_from(v).expect("kernel parameter over u32"));
        self
    }
    pub fn i(mut self, v: i64) -> Self {
        self.0.push(i32::try_from(v).expect("kernel parameter over i32") as u32);
        self
    }
    pub fn f(mut self, v: f32) -> Self {
        self.0.push(v.to_bits());
        self
    }
    /// Up to 8 values as `array<vec4<u32>, 2>`, 16-byte aligned.
    pub fn dims8(mut self, v: &[usize]) -> Self {
        assert!(v.len() <= 8, "at most 8 dimensions");
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        for i in 0..8 {
            self.0.push(v.get(i).map_or(0, |&d| u32::try_from(d).expect("dimension over u32")));
        }
        self
    }
    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// A shape seen as [outer, shape[axis], inner].
pub fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    assert!(axis < shape.len(), "axis {axis} out of range for shape {shape:?}");
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Splits `outer` planes into runs [start, start + count) that each fit one storage binding for
/// every tensor laid out as [outer, plane] with the given plane sizes (elements), with every run's
/// byte offset aligned as storage bindings require. One run when everything fits.
pub(crate) fn plane_groups(outer: usize, planes: &[usize]) -> Vec<(usize, usize)> {
    let g = crate::gpu::gpu();
    let max = g.max_binding() as usize;
    let align = g.limits.min_storage_buffer_offset_alignment as usize;
    let biggest = planes.iter().copied().max().unwrap_or(1).max(1);
    if outer * biggest * 4 <= max {
        return vec![(0, outer)];
    }
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    // Runs of `step` planes keep every tensor's offset aligned.
    let step = planes.iter().fold(1, |s, &p| {
        let need = align / gcd(p.max(1) * 4, align);
        s / gcd(s, need) * need
    });
    let count = max / (biggest * 4) / step * step;
    assert!(
        count > 0,
        "planes of {planes:?} elements cannot be split into aligned runs that fit this adapter's \
         storage binding limit of {max} bytes"
    );
    (0..outer).step_by(count).map(|s| (s, count.min(outer - s))).collect()
}

/// The elements [start, start + len) of a tensor as a storage binding.
pub(crate) fn range_binding(t: &crate::tensor::Tensor, start: usize, len: usize) -> crate::gpu::Binding<'_> {
    crate::gpu::Binding { buffer: t.buffer(), offset: start as u64 * 4, size: Some(len.max(1) as u64 * 4) }
}
