//! SGD with momentum and weight decay, PyTorch's semantics, updating parameters in place.

use crate::autograd::Grads;
use crate::gpu::{Kernel, gpu};
use crate::ops::Params;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug)]
pub struct SgdConfig {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig { lr: 0.01, momentum: 0.9, weight_decay: 1e-4 }
    }
}

/// One momentum buffer per parameter. Buffers start at zero, which makes the first step's
/// `buf = momentum * 0 + g` equal PyTorch's `buf = g`.
pub struct Sgd {
    pub config: SgdConfig,
    pub momentum: Vec<Tensor>,
}

impl Sgd {
    pub fn new(config: SgdConfig, params: &[Tensor]) -> Sgd {
        Sgd { config, momentum: params.iter().map(|p| Tensor::zeros(p.shape())).collect() }
    }

    /// Updates every parameter that has a gradient; the others keep their values and momentum.
    pub fn step(&mut self, params: &[Tensor], grads: &Grads) {
        self.launch(params, grads, None);
    }

    /// [`Sgd::step`], skipped on the device when any entry of `guard` is infinite or NaN: the
    /// step can be recorded before the host has read the values it depends on.
    pub fn step_guarded(&mut self, params: &[Tensor], grads: &Grads, guard: &Tensor) {
        self.launch(params, grads, Some(guard));
    }

    fn launch(&mut self, params: &[Tensor], grads: &Grads, guard: Option<&Tensor>) {
        assert_eq!(params.len(), self.momentum.len(), "parameter list changed since the optimizer was made");
        let c = self.config;
        let guard_len = guard.map_or(0, |g| g.numel());
        let updates: Vec<(&Tensor, &Tensor, &Tensor)> = params
            .iter()
            .zip(&self.momentum)
            .filter_map(|(w, buf)| {
                let g = grads.get(w)?;
                assert_eq!(g.shape(), w.shape(), "gradient shape for {w:?}");
                Some((g, w, buf))
            })
            .collect();
        // Several parameters per launch: most are small (BatchNorm's, biases), where a launch's
        // fixed cost outweighs its work.
        let per_launch = ((gpu().limits.max_storage_buffers_per_shader_stage as usize).saturating_sub(1) / 3)
            .clamp(1, MAX_PER_LAUNCH);
        for chunk in updates.chunks(per_launch) {
            // Each invocation updates a run of RUN entries of one parameter.
            let mut ends = Vec::with_capacity(chunk.len());
            let mut lens = Vec::with_capacity(chunk.len());
            let mut total = 0;
            for (_, w, _) in chunk {
                total += w.numel().div_ceil(RUN);
                ends.push(total);
                lens.push(w.numel());
            }
            let p = Params::new()
                .u(total)
                .f(c.lr)
                .f(c.momentum)
                .f(c.weight_decay)
                .u(guard_len)
                .dims8(&ends)
                .dims8(&lens);
            // Without a guard the first gradient is bound in its place, never read there.
            let guard = guard.unwrap_or(chunk[0].0);
            let mut bindings = vec![guard.binding()];
            for (g, w, buf) in chunk {
                bindings.extend([g.binding(), w.binding(), buf.binding()]);
            }
            let kernel = Kernel::new(sgd_shader(chunk.len()), "sgd");
            gpu().dispatch_1d(&kernel, p.bytes(), &bindings, total as u64);
        }
    }
}

/// The most parameters one launch updates.
const MAX_PER_LAUNCH: usize = 8;
/// Entries per invocation at most: the guard is read once for them. On the software device an
/// invocation's fixed cost outweighs its entries' (the small preset's 35 launches took 34 ms of
/// device time with 8 entries per invocation, 10 to 18 ms with 32).
const RUN: usize = 32;

fn sgd_shader(count: usize) -> &'static str {
    crate::gpu::generated_shader(&format!("sgd_{count}"), || sgd_source(count))
}

/// SGD with momentum and weight decay, PyTorch semantics, for `count` parameters in one launch,
/// updating weights and momentum in place: g += wd * w; buf = momentum * buf + g; w -= lr * buf.
/// Parameter k has the invocations ends[k - 1] <= t < ends[k], c = ends[k] - ends[k - 1] of them
/// (lens[k] / RUN, rounded up); invocation t updates its entries u, u + c, u + 2 c, ... for
/// u = t - ends[k - 1], so that consecutive invocations touch consecutive entries.
/// Nothing changes when any of the first `guard_len` values of `guard` (the step's losses and
/// gradient sum) is infinite or NaN, so a step can be recorded before the host has read them.
fn sgd_source(count: usize) -> String {
    use std::fmt::Write;
    let mut w = String::from(
        "// Generated: see sgd_source in src/optim.rs.
struct Params {
    total: u32,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    guard_len: u32,
    ends: array<vec4<u32>, 2>,
    lens: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> guard: array<f32>;
",
    );
    for k in 0..count {
        let b = 2 + 3 * k;
        let _ = writeln!(w, "@group(0) @binding({b}) var<storage, read> g{k}: array<f32>;");
        let _ = writeln!(w, "@group(0) @binding({}) var<storage, read_write> w{k}: array<f32>;", b + 1);
        let _ = writeln!(w, "@group(0) @binding({}) var<storage, read_write> m{k}: array<f32>;", b + 2);
    }
    w.push_str(
        "
fn step(grad: f32, w: f32, m: f32) -> vec2<f32> {
    let g = grad + p.weight_decay * w;
    let b = p.momentum * m + g;
    return vec2<f32>(w - p.lr * b, b);
}

@compute @workgroup_size(256)
fn sgd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = gid.x + gid.y * nw.x * 256u;
    if t >= p.total {
        return;
    }
    for (var j = 0u; j < p.guard_len; j++) {
        // Exponent bits all set: infinite or NaN.
        if (bitcast<u32>(guard[j]) & 0x7f800000u) == 0x7f800000u {
            return;
        }
    }
",
    );
    for k in 0..count {
        let at = |a: &str, k: usize| format!("p.{a}[{}u][{}u]", k / 4, k % 4);
        let start = if k == 0 { "0u".to_string() } else { at("ends", k - 1) };
        let _ = writeln!(w, "    {}if t < {} {{", if k == 0 { "" } else { "} else " }, at("ends", k));
        let _ = writeln!(w, "        let c = {} - {start};", at("ends", k));
        let _ = writeln!(w, "        for (var i = t - {start}; i < {}; i += c) {{", at("lens", k));
        let _ = writeln!(w, "            let r = step(g{k}[i], w{k}[i], m{k}[i]);");
        let _ = writeln!(w, "            w{k}[i] = r.x;");
        let _ = writeln!(w, "            m{k}[i] = r.y;");
        let _ = writeln!(w, "        }}");
    }
    w.push_str("    }\n");
    w.push_str("}\n");
    w
}
