//! A lost device is an error that says so, not a hang. Alone in its test binary: the test
//! destroys the process's device.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use caml_wgpu::gpu::gpu;
use caml_wgpu::tensor::Tensor;

#[test]
fn work_after_the_device_is_lost_fails_with_a_message() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t = Tensor::from_vec(&[1.0, 2.0, 3.0], &[3]);
        assert_eq!(t.to_vec(), vec![1.0, 2.0, 3.0]);
        gpu().device.destroy();
        let r = catch_unwind(AssertUnwindSafe(|| t.add_scalar(1.0).to_vec()));
        let msg = match r {
            Ok(v) => format!("no error: {v:?}"),
            Err(p) => p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        };
        let _ = tx.send(msg);
    });
    let msg = rx.recv_timeout(Duration::from_secs(120)).expect("a readback on a lost device hung");
    assert!(msg.contains("lost"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}
