// f16 storage: f32 values packed two per u32 (pack2x16float, round to nearest even; values past
// the f16 range are clamped to it first, where the conversion would be undefined) and unpacked.
// One-dimensional launches over the packed words: index = gid.x + gid.y * num_workgroups.x * 256.

struct Params {
    // Packed words and f32 elements of this launch (elems = 2 words, or 2 words - 1 at the end).
    words: u32,
    elems: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

const F16_MAX: f32 = 65504.0;

fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

@group(0) @binding(1) var<storage, read> values: array<f32>;
@group(0) @binding(2) var<storage, read_write> packed_out: array<u32>;

@compute @workgroup_size(256)
fn pack(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.words {
        return;
    }
    let lo = values[2u * i];
    var hi = 0.0;
    if 2u * i + 1u < p.elems {
        hi = values[2u * i + 1u];
    }
    packed_out[i] = pack2x16float(clamp(vec2<f32>(lo, hi), vec2<f32>(-F16_MAX), vec2<f32>(F16_MAX)));
}

@group(0) @binding(1) var<storage, read> packed_in: array<u32>;
@group(0) @binding(2) var<storage, read_write> values_out: array<f32>;

@compute @workgroup_size(256)
fn unpack(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = linear(gid, nw);
    if i >= p.words {
        return;
    }
    let v = unpack2x16float(packed_in[i]);
    values_out[2u * i] = v.x;
    if 2u * i + 1u < p.elems {
        values_out[2u * i + 1u] = v.y;
    }
}
