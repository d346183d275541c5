//! Denormal (subnormal) f32 values on a software device.
//!
//! A CPU adapter (lavapipe) runs the kernels on worker threads that its driver starts when the
//! device is opened, and on x86 an instruction that reads or yields a denormal takes a microcode
//! assist: a [147456, 32] x [32, 32] product whose B holds denormals took 420 ms on llvmpipe
//! instead of 14 ms. Late in a training run the omni-correlation's gradients can be full of them
//! (its loss near 1e-30, the softmax's tails below 1e-38): the small preset's step on a late
//! batch of the default run took 1.64 to 1.76 s instead of 1.26 to 1.48 s (alternating runs).
//! GPUs flush them to zero or handle them at full speed, and so does a software device here: it
//! is opened from a thread that flushes them (MXCSR's flush-to-zero and denormals-are-zero), a
//! setting threads inherit from the thread that starts them. The caller's own floating-point
//! state is left as it is.

/// `f` run on a thread of its own that flushes denormals to zero (where the CPU has such a
/// mode; elsewhere as it is), so that threads `f` starts do too.
pub(super) fn with_denormals_flushed<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            flush_denormals();
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(target_arch = "x86_64")]
fn flush_denormals() {
    // FTZ (bit 15): denormal results are zero; DAZ (bit 6): denormal inputs are read as zero.
    // Every x86-64 CPU has both.
    const FTZ_DAZ: u32 = 0x8040;
    let mut csr: u32 = 0;
    // SAFETY: stmxcsr and ldmxcsr read and write only the 4 bytes of `csr` and this thread's
    // MXCSR; the value loaded is the current one with two defined mode bits set.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
        csr |= FTZ_DAZ;
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags, readonly));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn flush_denormals() {}
