//! The buffer plan of training steps, in a test binary of its own so that no other test's
//! buffers are counted.

use caml_wgpu::Tensor;
use caml_wgpu::gpu::gpu;
use caml_wgpu::ops::sort;

mod common;

use common::{MIB, expected, step};

#[test]
fn steps_follow_a_plan_made_from_the_previous_step() {
    let g = gpu();
    g.trim_pool();
    let rows = 1000;
    assert_eq!(step(1.0, rows, false), expected(1.0, rows, false));
    let online = g.memory().peak_reserved;
    let plans = g.buffer_plans();
    // The second step follows a plan made from the first; from then on a step allocates nothing
    // and the plan stands.
    for k in 2..6 {
        assert_eq!(step(k as f32, rows, false), expected(k as f32, rows, false), "step {k}");
        if k == 3 {
            assert_eq!(g.buffer_plans(), plans + 1);
        }
    }
    let allocs = g.allocations();
    for k in 6..9 {
        assert_eq!(step(k as f32, rows, false), expected(k as f32, rows, false), "step {k}");
    }
    assert_eq!(g.allocations(), allocs, "a planned step allocated");
    assert_eq!(g.buffer_plans(), plans + 1, "a step that repeats its predecessor made a new plan");
    // The two 8 MiB buffers hold the 4 MiB tensors too (the step's peak is two 8 MiB tensors;
    // buffers of their own would be 24 MiB); without a plan, the pool released the free 4 MiB
    // buffers before it made the 8 MiB ones.
    let planned = g.memory().reserved;
    assert!(planned <= 17 * MIB as u64, "planned {planned} bytes");
    assert!(online <= 17 * MIB as u64, "the first step reserved {online} bytes");

    // More rows selected than planned (up to twice): the buffer is made again at the new size,
    // the values are right, and the next step follows a plan made for the new sizes, which a
    // smaller selection fits.
    let allocs = g.allocations();
    assert_eq!(step(9.0, 1900, false), expected(9.0, 1900, false));
    assert!(g.allocations() > allocs);
    let allocs = g.allocations();
    assert_eq!(step(10.0, 1500, false), expected(10.0, 1500, false));
    assert_eq!(g.allocations(), allocs, "a smaller selection allocated");
    assert_eq!(g.buffer_plans(), plans + 2);

    // Requests added in the middle: right values, a new plan, then nothing allocated again.
    for k in 11..14 {
        assert_eq!(step(k as f32, rows, true), expected(k as f32, rows, true), "step {k}");
    }
    assert_eq!(g.buffer_plans(), plans + 3);
    let allocs = g.allocations();
    assert_eq!(step(14.0, rows, true), expected(14.0, rows, true));
    assert_eq!(g.allocations(), allocs);

    // Between steps a request borrows a free planned buffer of its size (the 8 MiB ones).
    let allocs = g.allocations();
    let outside = Tensor::zeros(&[2 * MIB]).add_scalar(3.0);
    assert_eq!(outside.sum_all().item(), (6 * MIB) as f32);
    assert_eq!(g.allocations(), allocs, "a request between steps allocated");
    drop(outside);
    assert_eq!(step(15.0, rows, true), expected(15.0, rows, true));
    assert_eq!(g.allocations(), allocs);
    assert_eq!(g.buffer_plans(), plans + 3);

    // top_set with its flags padded makes the same requests for any number of keys up to the
    // padding (unpadded, 900 keys scan in one block and 2000 in two levels of blocks).
    let top = |n: usize| {
        g.begin_step();
        let keys: Vec<f32> = (0..n).map(|i| (i % 97) as f32).collect();
        let got = sort::top_set(&Tensor::from_vec(&keys, &[n]), 10, 5000).to_u32();
        g.end_step();
        let mut want = sort::top_indices_cpu(&keys, 10);
        want.sort_unstable();
        assert_eq!(got, want, "{n} keys");
    };
    for n in [2000, 2000, 2000] {
        top(n);
    }
    let plans = g.buffer_plans();
    for n in [900, 1500, 2000] {
        top(n);
    }
    assert_eq!(g.buffer_plans(), plans, "fewer keys changed the requests of top_set");

    // A trim releases the plan's free buffers; the next steps make them again and stay right.
    g.trim_pool();
    assert!(g.memory().reserved < planned);
    for k in 16..18 {
        assert_eq!(step(k as f32, rows, true), expected(k as f32, rows, true), "step {k}");
    }
}
