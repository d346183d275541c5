//! A tensor: a shape and a contiguous, row-major GPU buffer, plus the op that made it when it
//! takes part in a gradient computation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::autograd::{self, Op};
use crate::gpu::{Binding, GpuBuffer, gpu};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    /// Indices and counts; no gradient flows through them.
    U32,
}

#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

pub(crate) struct Inner {
    id: u64,
    shape: Vec<usize>,
    dtype: DType,
    /// `None` for a graph handle ([`Tensor::graph_handle`]).
    buf: Option<Arc<GpuBuffer>>,
    /// Shared by a tensor and its graph handles.
    op: Arc<Mutex<Option<Op>>>,
    is_variable: bool,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor#{}{:?}{:?}", self.id(), self.shape(), self.dtype())
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Bytes needed for a shape, with an error naming the shape when the adapter cannot hold it.
fn alloc_for(shape: &[usize]) -> GpuBuffer {
    let Some(bytes) = shape.iter().try_fold(4u64, |a, &d| a.checked_mul(d as u64)) else {
        panic!(
            "a tensor of shape {shape:?} has more bytes than fit in 64 bits; use a smaller --patch or --batch"
        )
    };
    gpu()
        .alloc(bytes)
        .unwrap_or_else(|e| {
            panic!("cannot allocate a tensor of shape {shape:?} ({bytes} bytes): {e}; use a smaller --patch or --batch")
        })
}

fn traced(buf: GpuBuffer, shape: &[usize]) -> Arc<GpuBuffer> {
    let buf = Arc::new(buf);
    crate::gpu::memtrace::record(Arc::as_ptr(&buf) as usize, buf.size(), shape);
    buf
}

impl Tensor {
    fn make(
        shape: Vec<usize>,
        dtype: DType,
        buf: Option<Arc<GpuBuffer>>,
        op: Option<Op>,
        var: bool,
    ) -> Tensor {
        Tensor(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shape,
            dtype,
            buf,
            op: Arc::new(Mutex::new(op)),
            is_variable: var,
        }))
    }

    /// The same node of the graph (id, shape, the op that made it) without its data: what an op
    /// whose backward needs only its input's shape records, so that the input's buffer is freed
    /// as soon as the forward pass is done with it instead of living until the backward.
    pub(crate) fn graph_handle(&self) -> Tensor {
        Tensor(Arc::new(Inner {
            id: self.0.id,
            shape: self.0.shape.clone(),
            dtype: self.0.dtype,
            buf: None,
            op: self.0.op.clone(),
            is_variable: self.0.is_variable,
        }))
    }

    /// A fresh tensor with undefined contents, to be written by a kernel.
    pub fn empty(shape: &[usize]) -> Tensor {
        Tensor::make(shape.to_vec(), DType::F32, Some(traced(alloc_for(shape), shape)), None, false)
    }

    pub fn empty_u32(shape: &[usize]) -> Tensor {
        Tensor::make(shape.to_vec(), DType::U32, Some(traced(alloc_for(shape), shape)), None, false)
    }

    pub fn from_vec(data: &[f32], shape: &[usize]) -> Tensor {
        assert_eq!(data.len(), numel(shape), "data length does not match shape {shape:?}");
        let t = Tensor::empty(shape);
        gpu().upload(t.buffer(), 0, bytemuck::cast_slice(data));
        t
    }

    pub fn from_u32(data: &[u32], shape: &[usize]) -> Tensor {
        assert_eq!(data.len(), numel(shape), "data length does not match shape {shape:?}");
        let t = Tensor::empty_u32(shape);
        gpu().upload(t.buffer(), 0, bytemuck::cast_slice(data));
        t
    }

    pub fn full(shape: &[usize], value: f32) -> Tensor {
        let t = Tensor::empty(shape);
        crate::ops::elementwise::fill(&t, value);
        t
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    pub fn scalar(value: f32) -> Tensor {
        Tensor::from_vec(&[value], &[1])
    }

    /// A leaf whose gradient `backward` reports (a parameter or an input under test).
    pub fn variable(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(data, shape).into_variable()
    }

    /// The same storage as a gradient-tracking leaf.
    pub fn into_variable(self) -> Tensor {
        Tensor::make(self.0.shape.clone(), self.0.dtype, self.0.buf.clone(), None, true)
    }

    /// The result of a kernel written into `out`, recording `op` when any input tracks gradients.
    pub(crate) fn with_op(out: Tensor, mut op: Op) -> Tensor {
        if autograd::is_enabled() && op.inputs().iter().any(|t| t.tracks_grad()) {
            op.pack_saved();
            Tensor::make(out.0.shape.clone(), out.0.dtype, out.0.buf.clone(), Some(op), false)
        } else {
            out
        }
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    pub fn rank(&self) -> usize {
        self.0.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel(&self.0.shape)
    }
    pub fn dim(&self, axis: usize) -> usize {
        self.0.shape[axis]
    }
    pub fn bytes(&self) -> u64 {
        self.numel() as u64 * 4
    }
    pub fn buffer(&self) -> &GpuBuffer {
        self.0.buf.as_deref().unwrap_or_else(|| {
            panic!("tensor #{} {:?} is a graph handle: its data was not kept", self.0.id, self.0.shape)
        })
    }
    /// The tensor's bytes as a storage binding.
    pub fn binding(&self) -> Binding<'_> {
        let limit = gpu().max_binding();
        assert!(
            self.bytes() <= limit,
            "a tensor of shape {:?} ({} bytes) is over this adapter's limit of {limit} bytes per storage \
             binding; use a smaller --patch or --batch",
            self.shape(),
            self.bytes()
        );
        Binding { buffer: self.buffer(), offset: 0, size: Some(self.bytes().max(4)) }
    }
    /// The inputs of the op that made this tensor (none for a leaf).
    pub(crate) fn op_inputs(&self) -> Vec<Tensor> {
        let op = self.0.op.lock().unwrap();
        op.as_ref().map(|op| op.inputs().into_iter().cloned().collect()).unwrap_or_default()
    }
    /// `f` of the op that made this tensor (None: a leaf, made without recording, or its op
    /// was consumed by a backward pass).
    pub(crate) fn with_recorded_op<R>(&self, f: impl FnOnce(Option<&Op>) -> R) -> R {
        f(self.0.op.lock().unwrap().as_ref())
    }
    pub(crate) fn take_op(&self) -> Option<Op> {
        self.0.op.lock().unwrap().take()
    }
    pub fn is_variable(&self) -> bool {
        self.0.is_variable
    }
    /// True when a gradient can flow back through this tensor.
    pub fn tracks_grad(&self) -> bool {
        self.0.is_variable || self.0.op.lock().unwrap().is_some()
    }

    /// The leading elements under a smaller shape, sharing the buffer; no gradient flows.
    pub(crate) fn with_shape_unchecked(&self, shape: &[usize]) -> Tensor {
        assert!(numel(shape) <= self.numel(), "{shape:?} is larger than {:?}", self.shape());
        Tensor::make(shape.to_vec(), self.0.dtype, self.0.buf.clone(), None, false)
    }

    /// The same values, cut from the graph.
    pub fn detach(&self) -> Tensor {
        Tensor::make(self.0.shape.clone(), self.0.dtype, self.0.buf.clone(), None, false)
    }

    pub fn to_vec(&self) -> Vec<f32> {
        assert_eq!(self.dtype(), DType::F32, "to_vec on a {:?} tensor", self.dtype());
        let bytes = gpu().read(self.buffer(), 0, self.bytes());
        bytes.chunks_exact(4).map(|w| f32::from_ne_bytes(w.try_into().expect("4 bytes"))).collect()
    }

    pub fn to_u32(&self) -> Vec<u32> {
        assert_eq!(self.dtype(), DType::U32, "to_u32 on a {:?} tensor", self.dtype());
        // (Not a cast of the byte vector: an empty one is not aligned for u32.)
        let bytes = gpu().read(self.buffer(), 0, self.bytes());
        bytes.chunks_exact(4).map(|w| u32::from_ne_bytes(w.try_into().expect("4 bytes"))).collect()
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> f32 {
        assert_eq!(self.numel(), 1, "item() on a tensor of shape {:?}", self.shape());
        self.to_vec()[0]
    }

    /// The same data under another shape with as many elements (one dimension may be usize::MAX,
    /// inferred).
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        let mut shape = shape.to_vec();
        if let Some(p) = shape.iter().position(|&d| d == usize::MAX) {
            let rest: usize = shape.iter().enumerate().filter(|&(i, _)| i != p).map(|(_, d)| d).product();
            shape[p] = self.numel() / rest.max(1);
        }
        assert_eq!(numel(&shape), self.numel(), "cannot reshape {:?} to {shape:?}", self.shape());
        let op =
            (autograd::is_enabled() && self.tracks_grad()).then(|| Op::Reshape { x: self.graph_handle() });
        Tensor::make(shape, self.0.dtype, self.0.buf.clone(), op, false)
    }
}
