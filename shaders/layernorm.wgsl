// LayerNorm over the last dimension of x [rows, d] (PyTorch: biased variance, eps inside the
// square root, affine): y = (x - mean) * rstd * w + b. One invocation per row.

struct Params {
    rows: u32,
    d: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

fn row_index(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;

@compute @workgroup_size(256)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let row = row_index(gid, nw);
    if row >= p.rows {
        return;
    }
    let base = row * p.d;
    var sum = 0.0;
    for (var i = 0u; i < p.d; i++) {
        sum += x[base + i];
    }
    let mean = sum / f32(p.d);
    // Two passes: the variance of centred values does not cancel catastrophically.
    var sq = 0.0;
    for (var i = 0u; i < p.d; i++) {
        let c = x[base + i] - mean;
        sq += c * c;
    }
    let rstd = inverseSqrt(sq / f32(p.d) + p.eps);
    for (var i = 0u; i < p.d; i++) {
        y[base + i] = (x[base + i] - mean) * rstd * w[i] + b[i];
    }
    mean_out[row] = mean;
    rstd_out[row] = rstd;
}

// dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)) with gw = g * w, xhat = (x - mean) * rstd;
// also g * xhat, whose column sums are dw (db is the column sums of g).
@group(0) @binding(1) var<storage, read> bx: array<f32>;
@group(0) @binding(2) var<storage, read> bw: array<f32>;
@group(0) @binding(3) var<storage, read> bg: array<f32>;
@group(0) @binding(4) var<storage, read> bmean: array<f32>;
@group(0) @binding(5) var<storage, read> brstd: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;
@group(0) @binding(7) var<storage, read_write> gxhat: array<f32>;

@compute @workgroup_size(256)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let row = row_index(gid, nw);
    if row >= p.rows {
        return;
    }
    let base = row * p.d;
    let mean = bmean[row];
    let rstd = brstd[row];
    var sum_gw = 0.0;
    var sum_gwx = 0.0;
    for (var i = 0u; i < p.d; i++) {
        let g = bg[base + i];
        let xhat = (bx[base + i] - mean) * rstd;
        let gw = g * bw[i];
        sum_gw += gw;
        sum_gwx += gw * xhat;
        gxhat[base + i] = g * xhat;
    }
    let a = sum_gw / f32(p.d);
    let c = sum_gwx / f32(p.d);
    for (var i = 0u; i < p.d; i++) {
        let xhat = (bx[base + i] - mean) * rstd;
        dx[base + i] = rstd * (bg[base + i] * bw[i] - a - xhat * c);
    }
}
