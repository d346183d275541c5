//! The omni-correlation's selection and the buffer plan, in a test binary of its own so that no
//! other test's buffers are counted.

use caml_wgpu::Tensor;
use caml_wgpu::gpu::gpu;

/// The omni-correlation rows of a step whose class 1 has voxels or has none.
fn select_step(class1_empty: bool) -> [usize; 2] {
    use caml_wgpu::caml::omni;
    gpu().begin_step();
    let n = 6000;
    let conf =
        Tensor::from_vec(&(0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect::<Vec<_>>(), &[n]);
    let evens: Vec<u32> = (0..n as u32).step_by(2).collect();
    let odds: Vec<u32> = (1..n as u32).step_by(2).collect();
    let class0 = Tensor::from_u32(&evens, &[evens.len()]);
    let class1 = if class1_empty { Tensor::empty_u32(&[0]) } else { Tensor::from_u32(&odds, &[odds.len()]) };
    let rank = Tensor::from_u32(&(0..n as u32).collect::<Vec<_>>(), &[n]);
    let rows = omni::select_rows(&rank, [&class0, &class1], &conf, 1000);
    let counts = [rows[0].numel(), rows[1].numel()];
    drop(rows);
    gpu().end_step();
    counts
}

#[test]
fn a_class_without_voxels_keeps_the_step_on_its_plan() {
    // The omni-correlation's selection makes the same requests when a class has no voxels, so
    // steps alternating between the two cases follow one plan.
    let g = gpu();
    // The first steps make the plan (and the one-key index an empty class selects from, once).
    for empty in [false, true, false, true] {
        select_step(empty);
    }
    let plans = g.buffer_plans();
    for i in 0..6 {
        let empty = i % 2 == 0;
        assert_eq!(select_step(empty), [1000, if empty { 0 } else { 1000 }]);
    }
    assert_eq!(g.buffer_plans(), plans, "a step with an empty class left the plan");
}
