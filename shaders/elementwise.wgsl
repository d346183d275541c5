// Elementwise kernels: binary ops with broadcasting, unary maps and their gradients, fill.
// One-dimensional launches: index = gid.x + gid.y * num_workgroups.x * 256.

struct Params {
    n: u32,
    rank: u32,
    s0: f32,
    s1: f32,
    // Output shape and the input strides (0 along broadcast axes), 8 dims in two vec4s each.
    shape: array<vec4<u32>, 2>,
    sa: array<vec4<u32>, 2>,
    sb: array<vec4<u32>, 2>,
    // Broadcast launches: where each tensor's first element sits in its binding.
    a_off: u32,
    b_off: u32,
    out_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Selects the operation; see BinaryOp / UnaryOp in src/ops/elementwise.rs.
override OP: u32 = 0u;
override BROADCAST: bool = false;


fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

@group(0) @binding(1) var<storage, read> xa: array<f32>;
@group(0) @binding(2) var<storage, read> xb: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn binary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.n {
        return;
    }
    var ia = i;
    var ib = i;
    var io = i;
    if BROADCAST {
        ia = p.a_off;
        ib = p.b_off;
        io = p.out_off + i;
        var r = i;
        for (var d = i32(p.rank) - 1; d >= 0; d--) {
            let s = p.shape[u32(d) >> 2u][u32(d) & 3u];
            let c = r % s;
            r = r / s;
            ia += c * p.sa[u32(d) >> 2u][u32(d) & 3u];
            ib += c * p.sb[u32(d) >> 2u][u32(d) & 3u];
        }
    }
    let a = xa[ia];
    let b = xb[ib];
    let z = binary_f(a, b);
    out[io] = z;
}

// The binary op on one value of each operand.
fn binary_f(a: f32, b: f32) -> f32 {
    switch OP {
        case 0u: { return a + b; }
        case 1u: { return a - b; }
        case 2u: { return a * b; }
        case 3u: { return a / b; }
        case 4u: { return max(a, b); }
        case 5u: { return select(0.0, 1.0, a == b); }
        case 6u: { return select(0.0, 1.0, a > b); }
        case 7u: { return select(0.0, 1.0, a >= b); }
        case 8u: { return b; }
        default: { return 0.0; }
    }
}

// Same-shape operands whose length is a multiple of 4: four values per invocation, one vector
// load per operand (p.n counts vectors).
@group(0) @binding(1) var<storage, read> xa4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> xb4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn binary4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.n {
        return;
    }
    let a = xa4[i];
    let b = xb4[i];
    out4[i] = vec4<f32>(binary_f(a.x, b.x), binary_f(a.y, b.y), binary_f(a.z, b.z), binary_f(a.w, b.w));
}

fn unary_f(x: f32) -> f32 {
    switch OP {
        case 0u: { return max(x, 0.0); }
        case 1u: { return exp(x); }
        case 2u: { return log(x); }
        case 3u: { return sqrt(x); }
        case 4u: { return pow_s(x, p.s0); }
        case 5u: { return clamp(x, p.s0, p.s1); }
        case 6u: { return p.s0 * x + p.s1; }
        default: { return 0.0; }
    }
}

// x^e with PyTorch's conventions for negative bases and integer exponents.
fn pow_s(x: f32, e: f32) -> f32 {
    if e == 2.0 {
        return x * x;
    }
    if e == 1.0 {
        return x;
    }
    if x < 0.0 && e == round(e) {
        let m = pow(-x, e);
        return select(m, -m, (i32(e) & 1) == 1);
    }
    return pow(x, e);
}

@group(0) @binding(1) var<storage, read> ux: array<f32>;
@group(0) @binding(2) var<storage, read_write> uy: array<f32>;

@compute @workgroup_size(256)
fn unary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.n {
        return;
    }
    uy[i] = unary_f(ux[i]);
}

@group(0) @binding(1) var<storage, read> ux4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> uy4: array<vec4<f32>>;

// `unary` four values per invocation (p.n counts vectors).
@compute @workgroup_size(256)
fn unary4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.n {
        return;
    }
    let x = ux4[i];
    uy4[i] = vec4<f32>(unary_f(x.x), unary_f(x.y), unary_f(x.z), unary_f(x.w));
}

// dL/dx from x, y = f(x) and dL/dy.
@group(0) @binding(1) var<storage, read> gx_in: array<f32>;
@group(0) @binding(2) var<storage, read> gy_in: array<f32>;
@group(0) @binding(3) var<storage, read> gg: array<f32>;
@group(0) @binding(4) var<storage, read_write> gout: array<f32>;

@compute @workgroup_size(256)
fn unary_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.n {
        return;
    }
    let x = gx_in[i];
    let y = gy_in[i];
    let g = gg[i];
    var d: f32;
    switch OP {
        case 0u: { d = select(0.0, g, x > 0.0); }
        case 1u: { d = g * y; }
        case 2u: { d = g / x; }
        case 3u: { d = g * 0.5 / y; }
        case 4u: { d = g * p.s0 * pow_s(x, p.s0 - 1.0); }
        case 5u: { d = select(0.0, g, x >= p.s0 && x <= p.s1); }
        case 6u: { d = g * p.s0; }
        default: { d = 0.0; }
    }
    gout[i] = d;
}

@group(0) @binding(1) var<storage, read_write> fill_out: array<f32>;

@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.n {
        return;
    }
    fill_out[i] = p.s0;
}

@group(0) @binding(1) var<storage, read_write> fill_out4: array<vec4<f32>>;

// `fill` four values per invocation (p.n counts vectors).
@compute @workgroup_size(256)
fn fill4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.n {
        return;
    }
    fill_out4[i] = vec4<f32>(p.s0);
}

// The sharpened mutual consistency of two probability maps u = P_v and w = P_a (same shape):
// loss_c = mean((u - s(w))^2) + mean((w - s(u))^2), s(p) = p^e / (p^e + (1 - p)^e), e = 1 / T
// (p.s0). `consistency_terms` writes each element's two squared differences added;
// `consistency_grad` writes both inputs' gradients given the loss's, through the sharpened
// targets unless DETACH (p.s1 = 2 / M for the M elements of the whole loss):
//   du = g 2/M ((u - s(w)) - (w - s(u)) s'(u)),  dw = g 2/M ((w - s(u)) - (u - s(w)) s'(w)).

// Whether the consistency targets are detached (no gradient through s).
override DETACH: bool = false;

fn sharpen(x: f32) -> f32 {
    let a = pow_s(x, p.s0);
    return a / (a + pow_s(1.0 - x, p.s0));
}

// ds/dx, as the chain of the composed ops gives it: (a' (a + b) - a (a' + b')) / (a + b)^2.
fn sharpen_grad(x: f32) -> f32 {
    let a = pow_s(x, p.s0);
    let b = pow_s(1.0 - x, p.s0);
    let da = p.s0 * pow_s(x, p.s0 - 1.0);
    let db = -p.s0 * pow_s(1.0 - x, p.s0 - 1.0);
    let s = a + b;
    return (da * s - a * (da + db)) / (s * s);
}

@group(0) @binding(1) var<storage, read> cu: array<f32>;
@group(0) @binding(2) var<storage, read> cw: array<f32>;
@group(0) @binding(3) var<storage, read_write> csq: array<f32>;

@compute @workgroup_size(256)
fn consistency_terms(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.n {
        return;
    }
    let u = cu[i];
    let w = cw[i];
    let du = u - sharpen(w);
    let dw = w - sharpen(u);
    csq[i] = du * du + dw * dw;
}

@group(0) @binding(1) var<storage, read> cgu: array<f32>;
@group(0) @binding(2) var<storage, read> cgw: array<f32>;
@group(0) @binding(3) var<storage, read> cgg: array<f32>;
@group(0) @binding(4) var<storage, read_write> cgdu: array<f32>;
@group(0) @binding(5) var<storage, read_write> cgdw: array<f32>;

@compute @workgroup_size(256)
fn consistency_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.n {
        return;
    }
    let u = cgu[i];
    let w = cgw[i];
    let k = cgg[0] * p.s1;
    let ru = u - sharpen(w);
    let rw = w - sharpen(u);
    var du = ru;
    var dw = rw;
    if !DETACH {
        du -= rw * sharpen_grad(u);
        dw -= ru * sharpen_grad(w);
    }
    cgdu[i] = k * du;
    cgdw[i] = k * dw;
}
