//! Runtime counters, in a test binary of their own so that no other test's work is counted.

use caml_wgpu::Tensor;
use caml_wgpu::gpu::gpu;
use caml_wgpu::ops::scan;

#[test]
fn batching_pool_and_readback_counters() {
    let a = Tensor::from_vec(&[0.0, 1.0, 1.0, 0.0, 1.0], &[5]);
    let b = Tensor::from_vec(&[1.0, 0.0, 0.0], &[3]);
    let before = gpu().counters();
    // Several compactions share one readback of their counts.
    let _ = scan::nonzero_many(&[&a, &b]);
    let after = gpu().counters();
    assert_eq!(after.readbacks - before.readbacks, 1);
    assert_eq!(after.bytes_read - before.bytes_read, 8);
    // Launches are recorded without submitting until something is read back.
    let s0 = gpu().counters().submissions;
    let mut x = a.clone();
    for _ in 0..50 {
        x = x.add(&a);
    }
    assert_eq!(gpu().counters().submissions, s0, "launches submitted before a readback");
    assert_eq!(x.to_vec()[1], 51.0);
    assert_eq!(gpu().counters().submissions, s0 + 1);
    // Released buffers are reused: a repeated computation allocates nothing new.
    let step = || a.mul(&a).add(&a).sum_all().item();
    step();
    let allocs = gpu().allocations();
    for _ in 0..5 {
        step();
    }
    assert_eq!(gpu().allocations(), allocs, "pool misses on a repeated computation");
    let m = gpu().memory();
    assert!(m.peak_in_use >= m.in_use && m.peak_reserved >= m.reserved && m.reserved >= m.in_use);
    // Uploads are copied in recording order: they submit nothing, and a launch recorded before
    // one still sees the old contents of a recycled buffer.
    let s1 = gpu().counters().submissions;
    let y = Tensor::from_vec(&[2.0; 5], &[5]).add(&x);
    let z = Tensor::from_vec(&[3.0; 5], &[5]).mul(&y);
    assert_eq!(gpu().counters().submissions, s1, "an upload submitted");
    assert_eq!(z.to_vec(), vec![6.0, 159.0, 159.0, 6.0, 159.0]);
    // A small request takes a released buffer up to three size classes up (16000 bytes -> 20480).
    drop(Tensor::zeros(&[5000]));
    let allocs = gpu().allocations();
    let smaller = Tensor::zeros(&[4000]);
    assert_eq!(gpu().allocations(), allocs, "a larger free buffer was not reused");
    assert!(smaller.buffer().size() >= 16000);
    assert_eq!(smaller.to_vec(), vec![0.0; 4000]);
    // So does a large one (48 MiB -> 40 MiB), and the reused buffer binds only the bytes asked
    // for: a kernel reading the whole binding sees the tensor, not the buffer's tail.
    drop(Tensor::zeros(&[12 << 20]).add_scalar(5.0));
    let allocs = gpu().allocations();
    let ones = Tensor::zeros(&[10 << 20]).add_scalar(1.0);
    assert_eq!(gpu().allocations(), allocs, "a larger free buffer was not reused for a large request");
    assert_eq!(ones.buffer().bytes(), 40 << 20);
    assert!(ones.buffer().size() > ones.buffer().bytes());
    assert_eq!(ones.sum_all().item(), (10 << 20) as f32);
    drop(ones);
    // A buffer more than three classes up (32 MiB for 16 MiB: 20, 24 and 28 MiB are the three)
    // is left for a request it fits better.
    drop(Tensor::zeros(&[8 << 20]));
    let allocs = gpu().allocations();
    let half = Tensor::zeros(&[4 << 20]);
    assert_eq!(gpu().allocations(), allocs + 1, "a buffer twice the size asked for was reused");
    drop(half);
    // An op whose backward needs only its input's shape (here a permute, then a row gather)
    // keeps no reference to the input's data: the 8 MiB intermediate is freed once the forward
    // drops it, and the gradient still flows through it.
    let v = Tensor::variable(&vec![1.5; 2 << 20], &[2, 1 << 20]);
    let before = gpu().memory().in_use;
    let doubled = v.add(&v);
    let rows = doubled.permute(&[1, 0]).gather_rows(&Tensor::from_u32(&[3, 3, 7], &[3]));
    assert!(gpu().memory().in_use >= before + (8 << 20));
    drop(doubled);
    assert!(gpu().memory().in_use < before + (8 << 20), "a shape-only op kept its input's data alive");
    let grads = caml_wgpu::backward(&rows.sum_all());
    let g = grads.get(&v).unwrap().to_vec();
    assert_eq!((g[3], g[(1 << 20) + 3], g[7], g[8]), (4.0, 4.0, 2.0, 0.0));
}
