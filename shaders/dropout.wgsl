// Dropout with a counter-based generator: unit u (a (sample, channel) volume for Dropout3d, an
// element for elementwise dropout) is kept when the 24 high bits of hash(u, seed) reach
// `threshold` = round(p * 2^24); kept values are scaled by 1 / (1 - p). The same (seed, p, inner)
// gives the same mask, so the backward is this kernel applied to dy.

struct Params {
    // elements in this launch, elements per unit, index of this launch's first unit
    n: u32,
    inner: u32,
    unit0: u32,
    threshold: u32,
    seed_lo: u32,
    seed_hi: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

// The PCG output permutation ("Hash Functions for GPU Rendering", Jarzynski and Olano 2020).
fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// Each round is a bijection of u32 with full avalanche: distinct (u, seed) mix completely.
fn keep(u: u32) -> bool {
    let h = pcg(pcg(pcg(u) ^ p.seed_lo) ^ p.seed_hi);
    return (h >> 8u) >= p.threshold;
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn dropout(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    y[t] = select(0.0, x[t] * p.scale, keep(p.unit0 + t / p.inner));
}

@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y4: array<vec4<f32>>;

// Four elements per invocation, for units whose size is a multiple of 4.
@compute @workgroup_size(256)
fn dropout4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t * 4u >= p.n {
        return;
    }
    y4[t] = select(vec4<f32>(0.0), x4[t] * p.scale, keep(p.unit0 + t * 4u / p.inner));
}
