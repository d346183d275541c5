// SGD with momentum and weight decay, PyTorch semantics, updating weights and momentum in place:
// g += wd * w; buf = momentum * buf + g; w -= lr * buf. Nothing changes when any of the first
// `guard_len` values of `guard` (the step's losses and gradient sum) is infinite or NaN, so a
// step can be recorded before the host has read them.

struct Params {
    n: u32,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    guard_len: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> momentum_buf: array<f32>;
@group(0) @binding(4) var<storage, read> guard: array<f32>;

@compute @workgroup_size(256)
fn sgd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 256u;
    if i >= p.n {
        return;
    }
    for (var j = 0u; j < p.guard_len; j++) {
        // Exponent bits all set: infinite or NaN.
        if (bitcast<u32>(guard[j]) & 0x7f800000u) == 0x7f800000u {
            return;
        }
    }
    let w = weight[i];
    let g = grad[i] + p.weight_decay * w;
    let b = p.momentum * momentum_buf[i] + g;
    momentum_buf[i] = b;
    weight[i] = w - p.lr * b;
}
