// Direct reference convolutions (one invocation per output value, no tiling): conv3d with cubic
// kernel k, stride s, padding p; its input gradient (which is also conv_transpose3d's forward) and
// its weight gradient. Conv input [B, CI, I], weight [CO, CI, k, k, k], conv output [B, CO, O].

struct Params {
    total: u32,
    batch: u32,
    ci: u32,
    co: u32,
    k: u32,
    stride: u32,
    pad: u32,
    _unused: u32,
    // conv input and conv output spatial sizes (X, Y, Z)
    ind: array<vec4<u32>, 2>,
    outd: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;

override HAS_BIAS: bool = true;

fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

// (x, y, z, rest) of a flat index over [rest, X, Y, Z].
fn split(t: u32, d: vec3<u32>) -> vec4<u32> {
    let z = t % d.z;
    let y = (t / d.z) % d.y;
    let r = t / (d.z * d.y);
    return vec4<u32>(r % d.x, y, z, r / d.x);
}

@group(0) @binding(1) var<storage, read> fx: array<f32>;
@group(0) @binding(2) var<storage, read> fw: array<f32>;
@group(0) @binding(3) var<storage, read> fb: array<f32>;
@group(0) @binding(4) var<storage, read_write> fy: array<f32>;

// y[b, co, o] = bias[co] + sum over ci, kk of x[b, ci, o * s - p + kk] * w[co, ci, kk].
@compute @workgroup_size(256)
fn conv_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.total {
        return;
    }
    let ind = vec3<i32>(p.ind[0].xyz);
    let o = split(t, p.outd[0].xyz);
    let co = o.w % p.co;
    let b = o.w / p.co;
    let k = i32(p.k);
    var acc = 0.0;
    if HAS_BIAS {
        acc = fb[co];
    }
    let base = vec3<i32>(o.xyz) * i32(p.stride) - i32(p.pad);
    for (var ci = 0u; ci < p.ci; ci++) {
        let xplane = (b * p.ci + ci) * u32(ind.x * ind.y * ind.z);
        let wbase = (co * p.ci + ci) * p.k * p.k * p.k;
        for (var kx = 0; kx < k; kx++) {
            let ix = base.x + kx;
            if ix < 0 || ix >= ind.x {
                continue;
            }
            for (var ky = 0; ky < k; ky++) {
                let iy = base.y + ky;
                if iy < 0 || iy >= ind.y {
                    continue;
                }
                for (var kz = 0; kz < k; kz++) {
                    let iz = base.z + kz;
                    if iz < 0 || iz >= ind.z {
                        continue;
                    }
                    let xi = xplane + u32((ix * ind.y + iy) * ind.z + iz);
                    acc += fx[xi] * fw[wbase + u32((kx * k + ky) * k + kz)];
                }
            }
        }
    }
    fy[t] = acc;
}

@group(0) @binding(1) var<storage, read> ddy: array<f32>;
@group(0) @binding(2) var<storage, read> dw: array<f32>;
@group(0) @binding(3) var<storage, read> db: array<f32>;
@group(0) @binding(4) var<storage, read_write> ddx: array<f32>;

// dx[b, ci, i] = bias[ci] + sum over co, kk with i = o * s - p + kk of dy[b, co, o] * w[co, ci, kk].
@compute @workgroup_size(256)
fn conv_bwd_data(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.total {
        return;
    }
    let outd = vec3<i32>(p.outd[0].xyz);
    let i = split(t, p.ind[0].xyz);
    let ci = i.w % p.ci;
    let b = i.w / p.ci;
    let k = i32(p.k);
    let s = i32(p.stride);
    var acc = 0.0;
    if HAS_BIAS {
        acc = db[ci];
    }
    let base = vec3<i32>(i.xyz) + i32(p.pad);
    for (var co = 0u; co < p.co; co++) {
        let yplane = (b * p.co + co) * u32(outd.x * outd.y * outd.z);
        let wbase = (co * p.ci + ci) * p.k * p.k * p.k;
        for (var kx = 0; kx < k; kx++) {
            let tx = base.x - kx;
            if tx < 0 || tx % s != 0 || tx / s >= outd.x {
                continue;
            }
            for (var ky = 0; ky < k; ky++) {
                let ty = base.y - ky;
                if ty < 0 || ty % s != 0 || ty / s >= outd.y {
                    continue;
                }
                for (var kz = 0; kz < k; kz++) {
                    let tz = base.z - kz;
                    if tz < 0 || tz % s != 0 || tz / s >= outd.z {
                        continue;
                    }
                    let yi = yplane + u32(((tx / s) * outd.y + ty / s) * outd.z + tz / s);
                    acc += ddy[yi] * dw[wbase + u32((kx * k + ky) * k + kz)];
                }
            }
        }
    }
    ddx[t] = acc;
}

@group(0) @binding(1) var<storage, read> wx: array<f32>;
@group(0) @binding(2) var<storage, read> wdy: array<f32>;
@group(0) @binding(3) var<storage, read_write> wdw: array<f32>;

// dw[co, ci, kk] = sum over b, o of dy[b, co, o] * x[b, ci, o * s - p + kk].
@compute @workgroup_size(256)
fn conv_bwd_weight(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.total {
        return;
    }
    let kk = split(t, vec3<u32>(p.k));
    let ci = kk.w % p.ci;
    let co = kk.w / p.ci;
    let ind = vec3<i32>(p.ind[0].xyz);
    let outd = vec3<i32>(p.outd[0].xyz);
    let off = vec3<i32>(kk.xyz) - i32(p.pad);
    let s = i32(p.stride);
    var acc = 0.0;
    for (var b = 0u; b < p.batch; b++) {
        let xplane = (b * p.ci + ci) * u32(ind.x * ind.y * ind.z);
        let yplane = (b * p.co + co) * u32(outd.x * outd.y * outd.z);
        for (var ox = 0; ox < outd.x; ox++) {
            let ix = ox * s + off.x;
            if ix < 0 || ix >= ind.x {
                continue;
            }
            for (var oy = 0; oy < outd.y; oy++) {
                let iy = oy * s + off.y;
                if iy < 0 || iy >= ind.y {
                    continue;
                }
                for (var oz = 0; oz < outd.z; oz++) {
                    let iz = oz * s + off.z;
                    if iz < 0 || iz >= ind.z {
                        continue;
                    }
                    let yi = yplane + u32((ox * outd.y + oy) * outd.z + oz);
                    let xi = xplane + u32((ix * ind.y + iy) * ind.z + iz);
                    acc += wdy[yi] * wx[xi];
                }
            }
        }
    }
    wdw[t] = acc;
}
