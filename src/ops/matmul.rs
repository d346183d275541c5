//! Batched matrix product with optional transposes of either operand.

use crate::autograd::Op;
use crate::gpu::{Kernel, gpu};
use crate::ops::{MAX_LOOP, Params, Tiling, binding_limit, too_large};
use crate::tensor::Tensor;

/// The (batch, rows, cols) of a rank-2 or rank-3 operand, transposed when `t`.
fn dims(x: &Tensor, t: bool) -> (usize, usize, usize) {
    let (b, r, c) = match x.shape() {
        [r, c] => (1, *r, *c),
        [b, r, c] => (*b, *r, *c),
        s => panic!("matmul operand of shape {s:?}: rank 2 or 3 expected"),
    };
    if t { (b, c, r) } else { (b, r, c) }
}

/// op(a) @ op(b), op = transpose where `ta`/`tb`; [B, M, K] x [B, K, N] -> [B, M, N], a rank-2
/// operand shared over the batch.
pub fn matmul_t(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Tensor {
    let (ba, m, k) = dims(a, ta);
    let (bb, k2, n) = dims(b, tb);
    assert_eq!(k, k2, "matmul inner dimensions differ: {:?} x {:?} (ta {ta}, tb {tb})", a.shape(), b.shape());
    assert!(ba == bb || ba == 1 || bb == 1, "matmul batch sizes {ba} and {bb}");
    let batch = ba.max(bb);
    let shape = if a.rank() == 3 || b.rank() == 3 { vec![batch, m, n] } else { vec![m, n] };
    let stride_a = if a.rank() == 3 && ba > 1 { m * k } else { 0 };
    let stride_b = if b.rank() == 3 && bb > 1 { k * n } else { 0 };
    let vec4 =
        k > 0 && (k.is_multiple_of(4) || (ta && !tb)) && n.is_multiple_of(4) && (!ta || m.is_multiple_of(4));
    let fits = each_fits(&[a.numel(), b.numel(), batch * m * n]);
    let fast = if vec4 && fits {
        matmul4(a, b, &shape, [batch, m, n, k], [stride_a, stride_b], ta, tb)
    } else {
        None
    };
    let out =
        fast.unwrap_or_else(|| matmul_boxes(a, b, &shape, [batch, m, n, k], [stride_a, stride_b], ta, tb));
    Tensor::with_op(out, Op::Matmul { a: a.clone(), b: b.clone(), ta, tb })
}

/// True when tensors of these element counts fit one storage binding each: the kernels that bind
/// whole operands can take them.
pub(crate) fn each_fits(elems: &[usize]) -> bool {
    elems.iter().all(|&e| e as u64 * 4 <= binding_limit())
}

/// The product with the scalar kernel over boxes of (batch, M, N, K) whose footprints fit one
/// binding each and whose K ranges fit the loop budget of one invocation; a box past K's first
/// range adds to C.
fn matmul_boxes(
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
    [batch, m, n, k]: [usize; 4],
    [stride_a, stride_b]: [usize; 2],
    ta: bool,
    tb: bool,
) -> Tensor {
    let out = if k == 0 { Tensor::zeros(shape) } else { Tensor::empty(shape) };
    let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
    let sa = [stride_a, if ta { 1 } else { lda }, 0, if ta { lda } else { 1 }];
    let sb = [stride_b, 0, if tb { ldb } else { 1 }, if tb { 1 } else { ldb }];
    let sc = [m * n, n, 1, 0];
    let max_groups = gpu().limits.max_compute_workgroups_per_dimension as usize;
    let tiles = Tiling::new(&[batch, m, n, k])
        .tensor(&sc)
        .tensor(&sa)
        .tensor(&sb)
        .at_most(0, max_groups)
        .at_most(1, max_groups * 64)
        .at_most(2, max_groups * 64)
        .at_most(3, MAX_LOOP)
        .split()
        .unwrap_or_else(|e| too_large("matmul", [&out, a, b][e.tensor], &e, "one element"));
    let kernel = Kernel::new("matmul", "matmul").with("TA", ta as u8 as f64).with("TB", tb as u8 as f64);
    for t in tiles {
        let ((bc, c_off), (ba_, a_off), (bb_, b_off)) =
            (t.bind(&out, 0, &sc), t.bind(a, 0, &sa), t.bind(b, 0, &sb));
        let [tz, tm, tn, tk] = [t.len[0], t.len[1], t.len[2], t.len[3]];
        let p = Params::new().u(tm).u(tn).u(tk).u(stride_a).u(stride_b).u(m * n).u(lda).u(ldb).u(n);
        let p = p.u(a_off).u(b_off).u(c_off).u((t.start[3] > 0) as usize);
        gpu().dispatch(
            &kernel,
            p.bytes(),
            &[ba_, bb_, bc],
            [tn.div_ceil(64) as u32, tm.div_ceil(64) as u32, tz as u32],
        );
    }
    out
}

/// The 16-byte-load kernel; N, K (unless `ta` and not `tb`) and M (when `ta`) are multiples of 4. A single product whose
/// 4 x 4 blocks are too few to fill the device and whose K is long sums K in splits, then adds
/// the splits up. None when an invocation's loop over its K range would pass the loop budget.
fn matmul4(
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
    [batch, m, n, k]: [usize; 4],
    [stride_a, stride_b]: [usize; 2],
    ta: bool,
    tb: bool,
) -> Option<Tensor> {
    if !ta && tall_kernel_fits(m, k, n) {
        return Some(tall(a, b, None, [batch, m, n, k], [stride_a, stride_b], tb, Rows::Plain));
    }
    if ta && !tb && batch == 1 && tall_tn_fits(k, m, n) {
        return Some(tall_tn(&a.reshape(&[k, m]), &b.reshape(&[k, n]), false).0.reshape(shape));
    }
    let blocks = m.div_ceil(4) * n.div_ceil(4);
    // Invocations below which a product with a long K is split along K.
    let fill = gpu().fill_invocations().max(16384);
    let splits = if batch == 1 && blocks < fill { fill.div_ceil(blocks).min(k / 256).max(1) } else { 1 };
    let kc = k.div_ceil(splits).next_multiple_of(4);
    let splits = k.div_ceil(kc);
    if kc / 4 > MAX_LOOP {
        return None;
    }
    let p = Params::new().u(m).u(n).u(k).u(stride_a).u(stride_b).u(m * n).u(kc).u(splits);
    let out = Tensor::empty(&[batch * splits * m * n]);
    let bindings = [a.binding(), b.binding(), out.binding()];
    let kernel = |entry| Kernel::new("matmul", entry).with("TA", ta as u8 as f64).with("TB", tb as u8 as f64);
    if splits == 1 {
        let groups = [n.div_ceil(4 * 8) as u32, m.div_ceil(4 * 32) as u32, batch as u32];
        gpu().dispatch(&kernel("matmul4"), p.bytes(), &bindings, groups);
        return Some(out.reshape(shape));
    }
    gpu().dispatch_1d(&kernel("matmul4_split"), p.bytes(), &bindings, (blocks * splits) as u64);
    Some(crate::ops::reduce::sum_middle(&out, 1, splits, m * n).reshape(shape))
}

impl Tensor {
    /// Matrix product, batched over a leading axis.
    pub fn matmul(&self, other: &Tensor) -> Tensor {
        matmul_t(self, other, false, false)
    }
}

/// CPU reference (f64 accumulation): [B, M, K] x [B, K, N] with transposes as above.
pub fn matmul_cpu(a: &[f32], b: &[f32], [batch, m, k, n]: [usize; 4], ta: bool, tb: bool) -> Vec<f32> {
    let mut c = vec![0f32; batch * m * n];
    for z in 0..batch {
        let (a, b) = (&a[z * m * k..], &b[z * k * n..]);
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|l| {
                        let av = if ta { a[l * m + i] } else { a[i * k + l] };
                        let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                        av as f64 * bv as f64
                    })
                    .sum();
                c[z * m * n + i * n + j] = s as f32;
            }
        }
    }
    c
}

/// True when A [M, K] op(B) [K, N] can take the tall kernel: subgroups, many rows, K and N
/// multiples of 4, K within the loop budget of one invocation.
pub(crate) fn tall_kernel_fits(m: usize, k: usize, n: usize) -> bool {
    m >= 256 && tall_kernel_takes(k, n)
}

/// True when the tall kernel takes products with B [K, N] over any number of rows (at least one):
/// what [`tall_kernel_fits`] asks but many rows. Rows selected by a mask take it whatever their
/// number, so that their launches and buffers do not change with it.
pub(crate) fn tall_kernel_takes(k: usize, n: usize) -> bool {
    k > 0
        && k.is_multiple_of(4)
        && k / 4 <= MAX_LOOP
        && n.is_multiple_of(4)
        && crate::ops::conv::subgroups_usable()
}

/// What the tall kernel does around the product.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Rows {
    Plain,
    /// ReLU of the result.
    Relu,
    /// A holds pre-activations: the product is of relu(A), and the result is zero where A is not
    /// positive (the gradient of a function of relu(A) back to A; N = K).
    ReluA,
}

/// A [B, M, K] op(B) [B, K, N] (+ bias [N]) with the tall kernel, as [B, M, N] (or [M, N]),
/// `rows` saying what happens around the product.
pub(crate) fn tall(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    [batch, m, n, k]: [usize; 4],
    [stride_a, stride_b]: [usize; 2],
    tb: bool,
    rows: Rows,
) -> Tensor {
    assert!(rows != Rows::ReluA || n == k, "a mask by A needs N = K, got {n} and {k}");
    let (kernel, p, groups) = if b_in_registers(k, n) {
        let name = format!("matmul_rowsr_k{k}_n{n}_t{}_b{}_r{}", tb as u8, bias.is_some() as u8, rows as u8);
        let source = crate::gpu::generated_shader(&name, || registers_source(k, n, tb, bias.is_some(), rows));
        // Rows per lane: enough to spread B's loads thin, few enough that a small product still
        // fills a few workgroups (more where the workgroups would pass the launch limit).
        let max_groups = gpu().limits.max_compute_workgroups_per_dimension as usize;
        let per_lane = m.div_ceil(64 * 16).clamp(4, 64).max(m.div_ceil(64 * max_groups));
        let lanes = m.div_ceil(per_lane).next_multiple_of(64);
        let p = Params::new().u(m).u(stride_a).u(stride_b).u(m * n).u(lanes);
        (Kernel::new(source, "matmul_rows"), p, [(lanes / 64) as u32, 1, batch as u32])
    } else {
        // Columns per workgroup: the largest of 32, 16, 8, 4 dividing N.
        let nb = [32, 16, 8, 4].into_iter().find(|c| n.is_multiple_of(*c)).unwrap();
        let kernel = Kernel::new(rows_shader(nb, tb, bias.is_some(), rows), "matmul_rows");
        let p = Params::new().u(m).u(n).u(k).u(stride_a).u(stride_b).u(m * n);
        let [gx, gy, _] = gpu().groups_1d(m as u64, 64);
        (kernel, p, [gx, gy, (batch * n / nb) as u32])
    };
    let out = Tensor::empty(&[batch * m * n]);
    let mut bindings = vec![a.binding(), b.binding(), out.binding()];
    bindings.extend(bias.map(Tensor::binding));
    gpu().dispatch(&kernel, p.bytes(), &bindings, groups);
    if a.rank() == 3 || b.rank() == 3 { out.reshape(&[batch, m, n]) } else { out.reshape(&[m, n]) }
}

thread_local! {
    static B_IN_REGISTERS: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the tall products' B held in registers (`true`) or passed round by shuffles
/// wherever it fits, instead of the adapter's default (tests, benchmarks).
pub fn with_b_in_registers<R>(on: bool, f: impl FnOnce() -> R) -> R {
    crate::autograd::with_flag(&B_IN_REGISTERS, Some(on), f)
}

/// Whether a tall product keeps all of B [K, N] in every lane's registers. A software device
/// spends far more on the shuffles that pass B round than on the products (a 32 x 32 B over
/// 120,000 rows: 8 ms with B in registers, 18-28 ms with shuffles on llvmpipe); a GPU lane holds
/// a few hundred registers, not the 1024 values of such a B, so it keeps the shuffles.
fn b_in_registers(k: usize, n: usize) -> bool {
    k <= 32 && n <= 32 && B_IN_REGISTERS.with(|c| c.get()).unwrap_or_else(|| gpu().is_software())
}

/// The bindings of both tall-product kernels: A, B, C and the bias (read where the kernel adds one).
const ROWS_BINDINGS: &str = "@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias4: array<vec4<f32>>;
";

/// An output vector `v` of a tall product with the bias `bias` added and `rows`' epilogue, `a`
/// the vector of A at the output's columns (read for [`Rows::ReluA`]).
fn rows_epilogue(v: String, bias: Option<String>, rows: Rows, a: &str) -> String {
    let v = match bias {
        Some(b) => format!("{v} + {b}"),
        None => v,
    };
    match rows {
        Rows::Plain => v,
        Rows::Relu => format!("max({v}, vec4<f32>())"),
        Rows::ReluA => format!("select(vec4<f32>(), {v}, {a} > vec4<f32>())"),
    }
}

/// The tall-product kernel with all of B (and the bias) loaded once into each lane's registers,
/// each lane then walking rows `p.lanes` apart: a lane's loads per row are K / 4 vectors of A,
/// against K N / 4 FMAs. K and N are known to the shader and every loop but the rows' unrolled.
fn registers_source(k: usize, n: usize, tb: bool, bias: bool, rows: Rows) -> String {
    use std::fmt::Write;
    let (kq, nq) = (k / 4, n / 4);
    let mut w = String::from(
        "// Generated: C[b] = A[b] op(B[b]) with B in registers, see registers_source in src/ops/matmul.rs.
struct Params {
    m: u32,
    batch_a: u32,
    batch_b: u32,
    batch_c: u32,
    lanes: u32,
}
",
    );
    w.push_str(ROWS_BINDINGS);
    w.push_str(
        "
@compute @workgroup_size(64)
fn matmul_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let bb = wid.z * p.batch_b / 4u;
",
    );
    // B's vectors in its own layout: [N, K] row c at c K / 4, or [K, N] row r at r N / 4.
    for i in 0..k * n / 4 {
        let _ = writeln!(w, "    let bm{i} = b4[bb + {i}u];");
    }
    if bias {
        for g in 0..nq {
            let _ = writeln!(w, "    let bv{g} = bias4[{g}u];");
        }
    }
    w.push_str("    for (var row = wid.x * 64u + li; row < p.m; row += p.lanes) {\n");
    let _ = writeln!(w, "        let ab = (wid.z * p.batch_a + row * {k}u) / 4u;");
    for q in 0..kq {
        let _ = writeln!(w, "        let r{q} = a4[ab + {q}u];");
        let x = if rows == Rows::ReluA { format!("max(r{q}, vec4<f32>())") } else { format!("r{q}") };
        let _ = writeln!(w, "        let x{q} = {x};");
    }
    // One output vector at a time, so that only its accumulator is live beside A's row.
    let _ = writeln!(w, "        let cb = (wid.z * p.batch_c + row * {n}u) / 4u;");
    for g in 0..nq {
        if tb {
            for c in 4 * g..4 * g + 4 {
                let terms: Vec<String> = (0..kq).map(|q| format!("dot(x{q}, bm{})", c * kq + q)).collect();
                let _ = writeln!(w, "        let s{c} = {};", terms.join(" + "));
            }
        } else {
            let _ = writeln!(w, "        var acc{g} = vec4<f32>();");
            for q in 0..kq {
                for (j, comp) in ["x", "y", "z", "w"].iter().enumerate() {
                    let i = (4 * q + j) * nq + g;
                    let _ = writeln!(w, "        acc{g} = fma(vec4<f32>(x{q}.{comp}), bm{i}, acc{g});");
                }
            }
        }
        let v = if tb {
            format!("vec4<f32>(s{}, s{}, s{}, s{})", 4 * g, 4 * g + 1, 4 * g + 2, 4 * g + 3)
        } else {
            format!("acc{g}")
        };
        let v = rows_epilogue(v, bias.then(|| format!("bv{g}")), rows, &format!("r{g}"));
        let _ = writeln!(w, "        c4[cb + {g}u] = {v};");
    }
    w.push_str("    }\n}\n");
    w
}

/// True when A^T B for A [K, M], B [K, N] can take the tall-reduction kernel: subgroups, a long
/// K, M and N multiples of 4 up to 32.
pub(crate) fn tall_tn_fits(k: usize, m: usize, n: usize) -> bool {
    k >= 1024 && tall_tn_takes(m, n)
}

/// True when the tall-reduction kernel takes A^T B [M, N] over any number of rows (at least one):
/// what [`tall_tn_fits`] asks but a long K (see [`tall_kernel_takes`]).
pub(crate) fn tall_tn_takes(m: usize, n: usize) -> bool {
    (4..=32).contains(&m)
        && m.is_multiple_of(4)
        && (4..=32).contains(&n)
        && n.is_multiple_of(4)
        && crate::ops::conv::subgroups_usable()
}

/// A^T B `[M, N]` for A `[K, M]`, B `[K, N]` with a long K (the weight gradient of a linear layer over
/// many rows), and with `col_sums` also A's column sums `[M]` (its bias gradient) from the same
/// pass over A. Each group of 8 lanes walks its own rows and holds partial sums of its C rows;
/// the partials are added up after.
pub fn tall_tn(a: &Tensor, b: &Tensor, col_sums: bool) -> (Tensor, Option<Tensor>) {
    let (&[k, m], &[k2, n]) = (a.shape(), b.shape()) else {
        panic!("tall_tn operands {:?} and {:?}: rank 2 expected", a.shape(), b.shape())
    };
    assert_eq!(k, k2, "tall_tn: {:?} and {:?} differ in rows", a.shape(), b.shape());
    if n < m {
        // Every lane computes every C row (a lane holds C's columns 4j..4j+3 of them), so the
        // product with fewer C rows, B^T A, does m / n times less work; its transpose is small.
        let (ct, sums) =
            tall_tn_launch(b, a, [k, n, m], if col_sums { Sums::B } else { Sums::None }, Gram::No);
        return (ct.permute(&[1, 0]), sums);
    }
    tall_tn_launch(a, b, [k, m, n], if col_sums { Sums::A } else { Sums::None }, Gram::No)
}

/// Whether the tall-reduction kernel computes A^T B, or the Gram matrix of A (or of relu(A)) about
/// a shift.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Gram {
    No,
    Of { relu: bool },
}

/// Which operand's column sums the tall-reduction kernel adds up beside the product.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Sums {
    None,
    A,
    B,
}

/// The Gram matrix (x - shift)^T (x - shift) `[C, C]` of rows x `[R, C]` and the column sums of
/// x - shift `[C]`, from one pass over x with the tall-reduction kernel (see `tall_tn_fits`). The
/// shift `[C]` only changes the rounding: a shift near the column means keeps the moments that
/// follow from these sums accurate for columns with a large mean.
/// With `relu`, of relu(x).
pub fn gram(x: &Tensor, shift: &Tensor, relu: bool) -> (Tensor, Tensor) {
    let &[k, c] = x.shape() else { panic!("gram of {:?}: rows [R, C] expected", x.shape()) };
    assert_eq!(shift.numel(), c, "gram shift {:?} for rows {:?}", shift.shape(), x.shape());
    let (g, sums) = tall_tn_launch(x, shift, [k, c, c], Sums::A, Gram::Of { relu });
    (g, sums.expect("column sums"))
}

fn tall_tn_launch(
    a: &Tensor,
    b: &Tensor,
    [k, m, n]: [usize; 3],
    sums: Sums,
    gram: Gram,
) -> (Tensor, Option<Tensor>) {
    // Every C row in one pass: the loads of A and B rows dominate on a software device (two
    // passes of 16 C rows took twice as long as one of 32), and 32 vec4 accumulators fit a GPU
    // lane's registers.
    // Partial sums per C-row block: enough groups to fill the device, each walking at least
    // ROWS rows, at most PARTS partials in all.
    const ROWS: usize = 256;
    const PARTS: usize = 2048;
    let most = (gpu().fill_invocations() / 8).clamp(1, PARTS).div_ceil(8) * 8;
    let want = most.min(k.div_ceil(ROWS)).max(1);
    let wgs = want.div_ceil(8);
    let kc = k.div_ceil(wgs * 8) * 8;
    let wgs = k.div_ceil(kc);
    let parts = wgs * 8;
    let sums_len = match sums {
        Sums::None => 0,
        Sums::A => m,
        Sums::B => n,
    };
    let width = m * n + sums_len;
    let kernel = Kernel::new(tall_tn_shader(m, n, sums, gram), "matmul_tn");
    let p = Params::new().u(k).u(kc).u(width);
    // The partials take room for the most parts and are summed the same way for every k: the rows
    // are often a selection whose size changes from step to step, and a training step's buffer
    // plan then holds.
    let out = Tensor::empty(&[most * width]);
    gpu().dispatch(&kernel, p.bytes(), &[a.binding(), b.binding(), out.binding()], [wgs as u32, 1, 1]);
    let total = crate::ops::reduce::sum_middle_upto(&out, 1, parts, width, most);
    if sums != Sums::None {
        (total.narrow(0, 0, m * n).reshape(&[m, n]), Some(total.narrow(0, m * n, sums_len)))
    } else {
        (total.reshape(&[m, n]), None)
    }
}

fn tall_tn_shader(m: usize, n: usize, sums: Sums, gram: Gram) -> &'static str {
    let g = match gram {
        Gram::No => 0,
        Gram::Of { relu } => 1 + relu as u8,
    };
    let name = format!("matmul_tn_m{m}_n{n}_s{}_g{g}", sums as u8);
    crate::gpu::generated_shader(&name, || tall_tn_source(m, n, sums, gram))
}

/// The tall-reduction kernel: workgroup w takes rows [w kc, (w + 1) kc); group g of 8 lanes
/// takes every 8th row from g. For each row, lane j loads B's columns 4j..4j+3 and A's
/// columns 4j..4j+3 and passes the A vector round with shuffles: two loads per 4 m FMAs.
/// Group g of workgroup w writes its partial as part 8 w + g: C [m, n] row-major, then (with
/// `sums`) A's column sums [m] or B's [n]. With `gram` (m = n), B is A itself and binding 2 holds a shift
/// [m] taken from every row of A (of relu(A) with `relu`) first: the partials of
/// (A - shift)^T (A - shift), one load per row and lane.
fn tall_tn_source(m: usize, n: usize, sums: Sums, gram: Gram) -> String {
    use std::fmt::Write;
    let (mv, nv) = (m / 4, n / 4);
    let mut w = String::from(
        "// Generated: partial sums of A^T B over row ranges, see tall_tn in src/ops/matmul.rs.
struct Params {
    k: u32,
    kc: u32,
    width: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c4: array<vec4<f32>>;

@compute @workgroup_size(64)
fn matmul_tn(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_invocation_id) sid: u32,
) {
    let lane = sid & 7u;
    let sb = sid - lane;
    let g = li / 8u;
",
    );
    let _ = writeln!(w, "    let ja = 4u * min(lane, {}u);", mv - 1);
    let _ = writeln!(w, "    let jb = 4u * min(lane, {}u);", nv - 1);
    for i in 0..m {
        let _ = writeln!(w, "    var acc{i} = vec4<f32>();");
    }
    if sums != Sums::None {
        let _ = writeln!(w, "    var sums = vec4<f32>();");
    }
    if gram != Gram::No {
        assert_eq!(m, n, "a Gram matrix is square");
        let _ = writeln!(w, "    let shift = b4[ja / 4u];");
    }
    let _ = writeln!(w, "    let r0 = wid.x * p.kc + g;");
    // Every lane runs every step: its loads feed the others' shuffles.
    let _ = writeln!(w, "    for (var i = 0u; i < p.kc; i += 8u) {{");
    let _ = writeln!(w, "        let r = r0 + i;");
    let _ = writeln!(w, "        let rr = min(r, p.k - 1u);");
    if let Gram::Of { relu } = gram {
        let a = format!("a4[(rr * {m}u + ja) / 4u]");
        let a = if relu { format!("max({a}, vec4<f32>())") } else { a };
        // A padded row contributes zero to the sums too.
        let _ = writeln!(w, "        let la = select(vec4<f32>(), {a} - shift, r < p.k);");
        let _ = writeln!(w, "        let lb = la;");
    } else {
        let _ = writeln!(w, "        let la = select(vec4<f32>(), a4[(rr * {m}u + ja) / 4u], r < p.k);");
        let _ = writeln!(w, "        let lb = b4[(rr * {n}u + jb) / 4u];");
    }
    match sums {
        Sums::None => {}
        Sums::A => {
            let _ = writeln!(w, "        sums += la;");
        }
        // B's row is loaded at a clamped index past the end.
        Sums::B => {
            let _ = writeln!(w, "        sums += select(vec4<f32>(), lb, r < p.k);");
        }
    }
    for v in 0..mv {
        let _ = writeln!(w, "        let a{v} = subgroupShuffle(la, sb + {v}u);");
        for (c, comp) in ["x", "y", "z", "w"].iter().enumerate() {
            let i = 4 * v + c;
            let _ = writeln!(w, "        acc{i} = fma(vec4<f32>(a{v}.{comp}), lb, acc{i});");
        }
    }
    let _ = writeln!(w, "    }}");
    let _ = writeln!(w, "    let base = (wid.x * 8u + g) * p.width;");
    let _ = writeln!(w, "    if lane < {nv}u {{");
    for i in 0..m {
        let _ = writeln!(w, "        c4[(base + {i}u * {n}u + jb) / 4u] = acc{i};");
    }
    let _ = writeln!(w, "    }}");
    let (lanes, j) = if sums == Sums::B { (nv, "jb") } else { (mv, "ja") };
    if sums != Sums::None {
        let _ = writeln!(w, "    if lane < {lanes}u {{");
        let _ = writeln!(w, "        c4[(base + {} + {j}) / 4u] = sums;", m * n);
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
    w
}

/// The tall-product kernel for `nb` columns per workgroup (4 or a multiple of 8), B transposed or not:
/// one row of C per lane, 64 rows per workgroup. For each four values of K, the 8 lanes of a
/// group load the B block (nb vectors of 4) an eighth each and pass it round with shuffles, so a
/// lane's loads per 4 nb FMAs are one vector of A and nb / 8 of B.
/// With `bias`, binding 4 holds a bias [N] added to every row; `rows` as in [`tall`].
fn rows_shader(nb: usize, tb: bool, bias: bool, rows: Rows) -> &'static str {
    let name = format!("matmul_rows_n{nb}_t{}_b{}_r{}", tb as u8, bias as u8, rows as u8);
    crate::gpu::generated_shader(&name, || rows_source(nb, tb, bias, rows))
}

fn rows_source(nb: usize, tb: bool, bias: bool, rows: Rows) -> String {
    use std::fmt::Write;
    let per_lane = nb.div_ceil(8);
    // With fewer than 8 vectors per block, lanes past them load a copy.
    let lane = if nb < 8 { format!("(lane % {nb}u)") } else { "lane".to_string() };
    let groups = nb / 4;
    let mut w = String::from(
        "// Generated: C[b] = A[b] op(B[b]) for a tall A, see rows_shader in src/ops/matmul.rs.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch_a: u32,
    batch_b: u32,
    batch_c: u32,
}
",
    );
    w.push_str(ROWS_BINDINGS);
    w.push_str(
        "
@compute @workgroup_size(64)
fn matmul_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(subgroup_invocation_id) sid: u32,
) {
    let lane = sid & 7u;
    let sb = sid - lane;
    let row = (wid.x + wid.y * nw.x) * 64u + li;
    // Every lane stays to the end: its loads feed the others' shuffles.
    let r = min(row, p.m - 1u);
",
    );
    let _ = writeln!(w, "    let blocks = p.n / {nb}u;");
    let _ = writeln!(w, "    let batch = wid.z / blocks;");
    let _ = writeln!(w, "    let col0 = (wid.z % blocks) * {nb}u;");
    let _ = writeln!(w, "    let ab = batch * p.batch_a + r * p.k;");
    let _ = writeln!(w, "    let bb = batch * p.batch_b;");
    if tb {
        for c in 0..nb {
            let _ = writeln!(w, "    var acc{c} = 0.0;");
        }
    } else {
        for g in 0..groups {
            let _ = writeln!(w, "    var acc{g} = vec4<f32>();");
        }
    }
    let _ = writeln!(w, "    for (var kk = 0u; kk < p.k; kk += 4u) {{");
    if rows == Rows::ReluA {
        let _ = writeln!(w, "        let a = max(a4[(ab + kk) / 4u], vec4<f32>());");
    } else {
        let _ = writeln!(w, "        let a = a4[(ab + kk) / 4u];");
    }
    for i in 0..per_lane {
        // Vector v = lane + 8 i of the block.
        if tb {
            // Column v, four values of K.
            let _ =
                writeln!(w, "        let l{i} = b4[(bb + (col0 + {lane} + {}u) * p.k + kk) / 4u];", 8 * i);
        } else {
            // K offset v / groups, columns 4 (v % groups) .. + 4.
            let _ = writeln!(
                w,
                "        let l{i} = b4[(bb + (kk + ({lane} + {o}u) / {groups}u) * p.n + col0 + 4u * (({lane} + {o}u) % {groups}u)) / 4u];",
                o = 8 * i
            );
        }
    }
    for v in 0..nb {
        let e = format!("subgroupShuffle(l{}, sb + {}u)", v / 8, v % 8);
        if tb {
            let _ = writeln!(w, "        acc{v} += dot(a, {e});");
        } else {
            let (j, g) = (v / groups, v % groups);
            let comp = ["x", "y", "z", "w"][j];
            let _ = writeln!(w, "        acc{g} = fma(vec4<f32>(a.{comp}), {e}, acc{g});");
        }
    }
    let _ = writeln!(w, "    }}");
    let _ = writeln!(w, "    if row < p.m {{");
    let _ = writeln!(w, "        let cb = (batch * p.batch_c + row * p.n + col0) / 4u;");
    for g in 0..groups {
        let v = if tb {
            format!("vec4<f32>(acc{}, acc{}, acc{}, acc{})", 4 * g, 4 * g + 1, 4 * g + 2, 4 * g + 3)
        } else {
            format!("acc{g}")
        };
        let bias = bias.then(|| format!("bias4[col0 / 4u + {g}u]"));
        // Row `row` of A at the output's columns (N = K).
        let v = rows_epilogue(v, bias, rows, &format!("a4[(ab + col0) / 4u + {g}u]"));
        let _ = writeln!(w, "        c4[cb + {g}u] = {v};");
    }
    let _ = writeln!(w, "    }}\n}}");
    w
}
