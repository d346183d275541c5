// Data movement as bit copies (f32 and u32 alike): strided box copies (permute, slice, concat,
// padding), row gather and scatter-add. Tensors are bound in windows that fit one storage
// binding; offsets say where a launch's first element sits in each window.

struct Params {
    n: u32,
    rank: u32,
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    e: u32,
    f: u32,
    shape: array<vec4<u32>, 2>,
    xs: array<vec4<u32>, 2>,
    ys: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;

fn at(v: array<vec4<u32>, 2>, d: u32) -> u32 {
    return v[d / 4u][d % 4u];
}

fn linear(gid: vec3<u32>, nw: vec3<u32>) -> u32 {
    return gid.x + gid.y * nw.x * 256u;
}

@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<u32>;

// y[b + sum_d i_d * ys[d]] = x[a + sum_d i_d * xs[d]] for every index i of the box `shape`
// (`rank` axes, n elements).
@compute @workgroup_size(256)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    var r = t;
    var src = p.a;
    var dst = p.b;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let s = at(p.shape, u32(d));
        let i = r % s;
        r = r / s;
        src += i * at(p.xs, u32(d));
        dst += i * at(p.ys, u32(d));
    }
    y[dst] = x[src];
}

@group(0) @binding(1) var<storage, read> gx: array<u32>;
@group(0) @binding(2) var<storage, read> gidx: array<u32>;
@group(0) @binding(3) var<storage, read_write> gy: array<u32>;

// gy[a + r * f + col] = gx[b + (idx[c + r] - d) * f + col] for the n / f output rows r whose
// source row idx falls in the window [d, d + e) of table rows bound at gx; f = cols.
@compute @workgroup_size(256)
fn gather_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let col = t % p.f;
    let s = gidx[p.c + t / p.f] - p.d;
    if s >= p.e {
        return;
    }
    gy[p.a + t] = gx[p.b + s * p.f + col];
}

@group(0) @binding(1) var<storage, read> sg: array<f32>;
@group(0) @binding(2) var<storage, read> sidx: array<u32>;
@group(0) @binding(3) var<storage, read_write> sout: array<atomic<u32>>;

// sout[b + (idx[c + r] - d) * f + col] += sg[a + r * f + col] for the rows whose destination
// falls in the window [d, d + e) of table rows bound at sout: an f32 add through compare-exchange, so
// that repeated indices add up.
@compute @workgroup_size(256)
fn scatter_add_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let t = linear(gid, nw);
    if t >= p.n {
        return;
    }
    let col = t % p.f;
    let s = sidx[p.c + t / p.f] - p.d;
    if s >= p.e {
        return;
    }
    let k = p.b + s * p.f + col;
    let v = sg[p.a + t];
    var old = atomicLoad(&sout[k]);
    loop {
        let res = atomicCompareExchangeWeak(&sout[k], old, bitcast<u32>(bitcast<f32>(old) + v));
        if res.exchanged {
            break;
        }
        old = res.old_value;
    }
}
