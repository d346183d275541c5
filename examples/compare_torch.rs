//! Compares caml-wgpu's eval-mode forward with PyTorch's on the same weights and input.
//!
//! ```sh
//! python benches/reference/check_checkpoint.py CK.safetensors --out REF.safetensors
//! cargo run --release --example compare_torch -- CK.safetensors REF.safetensors
//! ```
//!
//! REF holds `input` and the outputs `benches/reference/check_checkpoint.py` computed; each output
//! present there is recomputed here and the largest absolute difference printed, also relative
//! to the largest magnitude of the PyTorch output.

use std::path::Path;

use anyhow::{Context, Result, bail};
use caml_wgpu::checkpoint::{self, StateDict};
use caml_wgpu::config::TrainConfig;
use caml_wgpu::{Tensor, no_grad};

fn tensor(dict: &StateDict, name: &str, path: &Path) -> Result<Tensor> {
    let e = dict.get(name).with_context(|| format!("{}: no tensor '{name}'", path.display()))?;
    let v = e.as_f32().with_context(|| format!("{}: '{name}' is not f32", path.display()))?;
    Ok(Tensor::from_vec(v, &e.shape))
}

/// [N, C, X, Y, Z] -> [N X Y Z, C]: one row per voxel.
fn voxel_rows(t: &Tensor) -> Tensor {
    let c = t.dim(1);
    t.permute(&[0, 2, 3, 4, 1]).reshape(&[t.numel() / c, c])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ck, reference] = args.as_slice() else {
        bail!("usage: compare_torch CHECKPOINT.safetensors REFERENCE.safetensors");
    };
    let (ck, reference) = (Path::new(ck), Path::new(reference));
    caml_wgpu::gpu::Gpu::init()?;
    let (model, cfg) = caml_wgpu::train::load_model(ck, &TrainConfig::default())?;
    let (dict, _) = checkpoint::load(reference)?;
    let x = tensor(&dict, "input", reference)?;
    println!(
        "{}: width {}, CMA {}; input {:?} from {}",
        ck.display(),
        cfg.width,
        model.encoder2.cma.is_some(),
        x.shape(),
        reference.display()
    );

    let ours: Vec<(&str, Tensor)> = no_grad(|| {
        let o = model.forward(&x, None);
        let (rv, ra) = (voxel_rows(&o.emb_v), voxel_rows(&o.emb_a));
        let proj_v = model.projection_head1.forward(&rv, false);
        let pred_v = model.prediction_head1.forward(&proj_v, false);
        let proj_a = model.projection_head2.forward(&ra, false);
        let pred_a = model.prediction_head2.forward(&proj_a, false);
        let mut v = vec![
            ("out_v", o.out_v),
            ("out_a", o.out_a),
            ("emb_v", o.emb_v),
            ("emb_a", o.emb_a),
            ("proj_v", proj_v),
            ("pred_v", pred_v),
            ("proj_a", proj_a),
            ("pred_a", pred_a),
        ];
        if let (Some(cma), Some(input)) = (&model.encoder2.cma, dict.get("cma_input")) {
            // Cma::forward skips the layers in eval mode; run them without dropout instead.
            let t = Tensor::from_vec(input.as_f32().unwrap_or_default(), &input.shape);
            let (n, c) = (t.dim(0), t.dim(1));
            let voxels = t.numel() / (n * c);
            let s = t.reshape(&[n, c, voxels]).permute(&[0, 2, 1]);
            let s = cma.intra_attention.forward(&s, None);
            let s = cma.inter_attention.forward(&s.permute(&[1, 0, 2]), None);
            v.push(("cma_output", s.permute(&[1, 2, 0]).reshape(t.shape())));
        }
        v
    });

    println!(
        "{:<11} {:>22} {:>14} {:>14} {:>12}",
        "output", "shape", "max |ours-pt|", "max |pt|", "relative"
    );
    for (name, t) in ours {
        let Some(e) = dict.get(name) else { continue };
        if e.shape != t.shape() {
            bail!("{name}: PyTorch has shape {:?}, ours {:?}", e.shape, t.shape());
        }
        let theirs = e.as_f32().with_context(|| format!("{name} is not f32"))?;
        let mine = t.to_vec();
        let diff = mine.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = theirs.iter().map(|v| v.abs()).fold(0f32, f32::max);
        println!(
            "{name:<11} {:>22} {diff:>14.3e} {scale:>14.4} {:>12.3e}",
            format!("{:?}", t.shape()),
            diff / scale.max(f32::MIN_POSITIVE)
        );
    }
    Ok(())
}
