//! The buffer pool's trace, in a test binary of its own: the trace is switched on for the whole
//! process before the device opens, and no other test's buffers may enter it.

use caml_wgpu::Tensor;
use caml_wgpu::gpu::{gpu, replay_pool_trace};

mod common;

use common::{MIB, expected, step};

#[test]
fn a_replayed_trace_reserves_what_the_device_pool_reserved() {
    let dir = tempfile::Builder::new().prefix("caml-pool-trace-").tempdir().unwrap();
    let path = dir.path().join("pool.trace");
    // SAFETY: the only test of this binary, and no other thread runs yet.
    unsafe { std::env::set_var("CAML_POOL_TRACE", &path) };
    let g = gpu();
    let mut steps = 0;
    for (k, rows, extra) in
        [(1, 1000, false), (2, 1000, false), (3, 1500, false), (4, 1500, true), (5, 3000, false)]
    {
        assert_eq!(step(k as f32, rows, extra), expected(k as f32, rows, extra));
        steps += 1;
    }
    // Requests outside a step, then a trim, then more steps.
    drop(Tensor::zeros(&[3 * MIB]).add_scalar(1.0));
    g.trim_pool();
    for k in 6..9 {
        step(k as f32, 1000, false);
        steps += 1;
    }
    let live = g.memory();
    let r = replay_pool_trace(&path).unwrap();
    assert_eq!(r.steps.len(), steps);
    assert_eq!(r.plans_made, g.buffer_plans());
    assert_eq!(r.total.allocations, live.allocations);
    assert_eq!(r.total.reserved, live.reserved);
    assert_eq!(r.total.peak_reserved, live.peak_reserved);
    assert_eq!(r.total.peak_in_use, live.peak_in_use);
    assert_eq!(r.steps.iter().map(|s| s.allocations).sum::<u64>(), live.allocations);
    // The later steps follow their plan: no buffers made.
    assert_eq!(r.steps.last().unwrap().allocations, 0);

    // A damaged trace names the file and the line.
    let bad = dir.path().join("bad.trace");
    std::fs::write(&bad, "max_buffer 1024\nb\nt 0 64\nr 1\n").unwrap();
    let e = format!("{:#}", replay_pool_trace(&bad).err().expect("an error"));
    assert!(e.contains("bad.trace") && e.contains("line 4") && e.contains("never took"), "{e}");
    // A process's last events, written after its last step, may be cut short.
    std::fs::write(&bad, "max_buffer 1024\nb\nt 0 64\nr 0\ne\nt 1 6").unwrap();
    let r = replay_pool_trace(&bad).unwrap();
    assert_eq!((r.steps.len(), r.total.allocations, r.total.peak_in_use), (1, 1, 64));
    std::fs::write(&bad, "b\n").unwrap();
    let e = format!("{:#}", replay_pool_trace(&bad).err().expect("an error"));
    assert!(e.contains("bad.trace") && e.contains("line 1"), "{e}");
    dir.close().unwrap();
}
