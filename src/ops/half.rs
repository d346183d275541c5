//! f16 storage of the activations a backward pass reads: f32 values rounded to f16 and packed two
//! per u32 (U32 tensors of ceil(n / 2) words), unpacked to f32 where they are used. Core WGSL
//! (`pack2x16float`), so it needs no adapter feature; arithmetic stays f32.

use crate::DType;
use crate::gpu::{Kernel, gpu};
use crate::ops::{Params, align_elems, binding_limit, range_binding};
use crate::tensor::Tensor;

/// Words per launch: both bindings (the words and twice as many f32 values) within the limit,
/// and every launch's offsets aligned.
fn words_per_launch() -> usize {
    let align = align_elems();
    ((binding_limit() / 8) as usize / align * align).max(align)
}

fn launch(entry: &'static str, n: usize, f32s: &Tensor, words: &Tensor) {
    let k = Kernel::new("half", entry);
    let total = n.div_ceil(2);
    let chunk = words_per_launch();
    let mut w = 0;
    while w < total {
        let len = chunk.min(total - w);
        let elems = (2 * len).min(n - 2 * w);
        let p = Params::new().u(len).u(elems);
        let (src, dst) = (range_binding(f32s, 2 * w, elems), range_binding(words, w, len));
        let b = if entry == "pack" { [src, dst] } else { [dst, src] };
        gpu().dispatch_1d(&k, p.bytes(), &b, len as u64);
        w += len;
    }
}

/// `x` (f32) rounded to f16, two values per u32 word; no gradient.
pub fn pack(x: &Tensor) -> Tensor {
    assert_eq!(x.dtype(), DType::F32, "pack_f16 of {x:?}");
    let words = Tensor::empty_u32(&[x.numel().div_ceil(2).max(1)]);
    launch("pack", x.numel(), x, &words);
    words
}

/// The f32 values of `shape` that [`pack`] stored in `words`.
pub fn unpack(words: &Tensor, shape: &[usize]) -> Tensor {
    let n = crate::tensor::numel(shape);
    assert!(
        words.dtype() == DType::U32 && words.numel() >= n.div_ceil(2),
        "unpack_f16 of {words:?} to {shape:?}"
    );
    let out = Tensor::empty(shape);
    launch("unpack", n, &out, words);
    out
}
