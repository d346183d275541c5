//! Ops, one file per family: the launch, the backward rule's kernels, and a CPU reference.

pub mod attention;
pub mod batchnorm;
pub mod consistency;
pub mod conv;
pub mod conv_ref;
pub mod dropout;
pub mod elementwise;
pub mod half;
pub mod layernorm;
pub mod layout;
pub mod linear;
pub mod matmul;
pub mod moments;
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

/// A shape seen as `[outer, shape[axis], inner]`.
pub fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    assert!(axis < shape.len(), "axis {axis} out of range for shape {shape:?}");
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

thread_local! {
    static BINDING_LIMIT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The largest byte range one storage binding may cover: the adapter's limit, or a smaller one
/// set on this thread by [`with_binding_limit`].
pub fn binding_limit() -> u64 {
    let real = crate::gpu::gpu().max_binding();
    BINDING_LIMIT.with(|c| c.get()).map_or(real, |l| l.min(real))
}

/// Runs `f` as if one storage binding could hold at most `bytes` (tests of the split paths on
/// small tensors).
pub fn with_binding_limit<R>(bytes: u64, f: impl FnOnce() -> R) -> R {
    crate::autograd::with_flag(&BINDING_LIMIT, Some(bytes), f)
}

/// The most iterations the loops of one invocation may run together, loops over a tensor's extent
/// included: llvmpipe counts every loop's passes (its trips plus one) against one budget of 65535
/// per invocation and silently ends all loops past it, so such loops are split over launches.
/// The margin covers the kernels' short loops.
pub(crate) const MAX_LOOP: usize = 65_000;

/// Storage bindings start at multiples of this many 4-byte elements.
pub(crate) fn align_elems() -> usize {
    (crate::gpu::gpu().limits.min_storage_buffer_offset_alignment as usize / 4).max(1)
}

/// Splits `outer` planes into runs [start, start + count) that each fit one storage binding for
/// every tensor laid out as [outer, plane] with the given plane sizes (elements), with every run's
/// byte offset aligned as storage bindings require. One run when everything fits.
pub(crate) fn plane_groups(outer: usize, planes: &[usize]) -> Vec<(usize, usize)> {
    let max = binding_limit() as usize;
    let align = align_elems() * 4;
    let biggest = planes.iter().copied().max().unwrap_or(1).max(1);
    if outer * biggest * 4 <= max {
        return vec![(0, outer)];
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

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The elements [start, start + len) of a tensor as a storage binding.
pub(crate) fn range_binding(t: &crate::tensor::Tensor, start: usize, len: usize) -> crate::gpu::Binding<'_> {
    crate::gpu::Binding { buffer: t.buffer(), offset: start as u64 * 4, size: Some(len.max(1) as u64 * 4) }
}

/// The elements [start, start + len) of a tensor (cut at its end) bound from the aligned offset at
/// or below `start`, and the position of `start` within the binding.
pub(crate) fn window(
    t: &crate::tensor::Tensor,
    start: usize,
    len: usize,
) -> (crate::gpu::Binding<'_>, usize) {
    let a = align_elems();
    let from = start / a * a;
    let end = (start + len).min(t.numel()).max(from + 1);
    (
        crate::gpu::Binding {
            buffer: t.buffer(),
            offset: from as u64 * 4,
            size: Some((end - from) as u64 * 4),
        },
        start - from,
    )
}

/// A box of an index space: per axis, its first index and its extent.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Tile {
    pub start: Vec<usize>,
    pub len: Vec<usize>,
}

impl Tile {
    /// Element offset of the box's first element in a tensor with these strides.
    pub fn at(&self, strides: &[usize]) -> usize {
        self.start.iter().zip(strides).map(|(i, s)| i * s).sum()
    }
    /// Elements from the box's first to its last element in a tensor with these strides, both
    /// included.
    pub fn span(&self, strides: &[usize]) -> usize {
        span(&self.len, strides)
    }
    pub fn count(&self) -> usize {
        self.len.iter().product()
    }
    /// The box's footprint in `t` (elements `base + sum_d i_d * strides[d]`) as a binding, and
    /// the position of the box's first element within it.
    pub fn bind<'a>(
        &self,
        t: &'a crate::tensor::Tensor,
        base: usize,
        strides: &[usize],
    ) -> (crate::gpu::Binding<'a>, usize) {
        window(t, base + self.at(strides), self.span(strides))
    }
}

fn span(len: &[usize], strides: &[usize]) -> usize {
    1 + len.iter().zip(strides).map(|(l, s)| (l - 1) * s).sum::<usize>()
}

/// A tensor whose footprint cannot be cut to fit one binding along the axes that may be split:
/// its position in the tiling's list and the bytes its smallest footprint still spans.
#[derive(Debug)]
pub(crate) struct Overflow {
    pub tensor: usize,
    pub bytes: u64,
}

/// An index space shared by the tensors of a launch, each reading or writing the elements
/// `sum_d i_d * strides[d]` (from its own base): [`Tiling::split`] cuts it into boxes whose
/// footprints fit one storage binding each.
pub(crate) struct Tiling {
    dims: Vec<usize>,
    max: Vec<usize>,
    whole: Vec<bool>,
    strides: Vec<Vec<usize>>,
}

impl Tiling {
    pub fn new(dims: &[usize]) -> Tiling {
        Tiling {
            dims: dims.to_vec(),
            max: dims.to_vec(),
            whole: vec![false; dims.len()],
            strides: Vec::new(),
        }
    }
    /// A tensor of the launch, by its strides along the space's axes (0 where it does not move).
    pub fn tensor(mut self, strides: &[usize]) -> Tiling {
        assert_eq!(strides.len(), self.dims.len(), "strides {strides:?} for dims {:?}", self.dims);
        self.strides.push(strides.to_vec());
        self
    }
    /// An axis that every box takes whole.
    pub fn whole(mut self, axis: usize) -> Tiling {
        self.whole[axis] = true;
        self
    }
    /// The largest extent of a box along `axis` (launch-size limits).
    pub fn at_most(mut self, axis: usize, len: usize) -> Tiling {
        self.max[axis] = self.max[axis].min(len.max(1));
        self
    }

    /// Boxes covering the space in row-major order of their first indices: the whole space when
    /// every footprint fits. Otherwise, while some footprint is too large, the axis contributing
    /// most to the largest one is shortened to the longest extent that fits (or to 1), so that
    /// the outer axes of the tensor that overflows are split first.
    pub fn split(&self) -> Result<Vec<Tile>, Overflow> {
        let rank = self.dims.len();
        if self.dims.contains(&0) {
            return Ok(Vec::new());
        }
        let cap = (binding_limit() / 4) as usize - (align_elems() - 1);
        let mut len: Vec<usize> = self.dims.iter().zip(&self.max).map(|(&d, &m)| d.min(m)).collect();
        loop {
            let mut worst: Option<(usize, usize)> = None;
            for (t, s) in self.strides.iter().enumerate() {
                let sp = span(&len, s);
                if sp > cap && worst.is_none_or(|(w, _)| sp > w) {
                    worst = Some((sp, t));
                }
            }
            let Some((sp, t)) = worst else { break };
            let s = &self.strides[t];
            let axis = (0..rank)
                .rev()
                .filter(|&d| !self.whole[d] && len[d] > 1 && s[d] > 0)
                .max_by_key(|&d| (len[d] - 1) * s[d]);
            let Some(d) = axis else { return Err(Overflow { tensor: t, bytes: sp as u64 * 4 }) };
            let rest = sp - (len[d] - 1) * s[d];
            len[d] = if rest <= cap { (cap - rest) / s[d] + 1 } else { 1 };
        }
        let counts: Vec<usize> = self.dims.iter().zip(&len).map(|(d, l)| d.div_ceil(*l)).collect();
        let total: usize = counts.iter().product();
        Ok((0..total)
            .map(|mut k| {
                let (mut start, mut ext) = (vec![0; rank], vec![0; rank]);
                for d in (0..rank).rev() {
                    start[d] = k % counts[d] * len[d];
                    ext[d] = len[d].min(self.dims[d] - start[d]);
                    k /= counts[d];
                }
                Tile { start, len: ext }
            })
            .collect())
    }
}

/// The error for a tensor that cannot be split into pieces that fit one storage binding.
pub(crate) fn too_large(op: &str, t: &crate::tensor::Tensor, o: &Overflow, what: &str) -> ! {
    panic!(
        "{op}: a tensor of shape {:?} ({} bytes) is over this adapter's limit of {} bytes per storage \
         binding and {what} still spans {} bytes; use a smaller patch or batch",
        t.shape(),
        t.bytes(),
        binding_limit(),
        o.bytes
    )
}
