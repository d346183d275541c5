"""Loads a caml-wgpu model file strictly into the PyTorch model, runs it in eval mode on a fixed
random input and writes the input and every output to one safetensors file, which
`cargo run --release --example compare_torch -- CK REF` compares with caml-wgpu's own forward.

    python benches/reference/check_checkpoint.py runs/x/model_final.safetensors --out ref.safetensors

Outputs (eval mode: BatchNorm running statistics, no dropout, CMA skipped):
  out_v, out_a, emb_v, emb_a   the model's forward on `input` [2, 1, X, Y, Z]
  proj_v, pred_v               prediction_head1(projection_head1(emb_v rows)), rows channels-last
  proj_a, pred_a               the same through heads 2 from emb_a
  cma_output                   when the file has CMA weights: encoder2's intra- then inter-sample
                               layer on `cma_input` [2, 8F, X/8, Y/8, Z/8] with dropout off
"""

import argparse
import os
import sys
import tomllib

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from caml_torch import Caml, has_cma  # noqa: E402


def saved_config(path):
    """The configuration caml-wgpu stores in its model files' metadata, or {}."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return tomllib.loads(meta["config"]) if "config" in meta else {}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--width", type=int, help="base width F (default: the file's saved configuration, else 16)")
    ap.add_argument("--patch", type=int, nargs=3, help="input size X Y Z (default: the saved patch, else 112 112 80)")
    ap.add_argument("--out", help="default: <checkpoint>.torch_ref.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    cfg = saved_config(a.checkpoint)
    width = a.width or cfg.get("width", 16)
    patch = a.patch or cfg.get("patch", [112, 112, 80])
    embed = cfg.get("embed", 32)
    sd = load_file(a.checkpoint)
    cma = has_cma(sd)
    model = Caml(width, embed, cma=cma)
    model.load_state_dict(sd, strict=True)
    model.eval()
    print(f"loaded {a.checkpoint} strictly: {len(sd)} tensors, width {width}, embed {embed}, CMA {cma}")

    gen = torch.Generator().manual_seed(a.seed)
    x = torch.randn((2, 1, *patch), generator=gen)
    out = {"input": x}
    with torch.no_grad():
        out_v, out_a, emb_v, emb_a = model(x)
        out.update(out_v=out_v, out_a=out_a, emb_v=emb_v, emb_a=emb_a)
        for k, e in (("v", emb_v), ("a", emb_a)):
            rows = e.permute(0, 2, 3, 4, 1).reshape(-1, width)
            i = "1" if k == "v" else "2"
            proj = getattr(model, "projection_head" + i)(rows)
            out["proj_" + k] = proj
            out["pred_" + k] = getattr(model, "prediction_head" + i)(proj)
        if cma:
            c = 8 * width
            cma_in = torch.randn((2, c, *(p // 8 for p in patch)), generator=gen)
            enc = model.encoder2
            out["cma_input"] = cma_in
            out["cma_output"] = enc.inter_attention(enc.intra_attention(cma_in))
    dst = a.out or a.checkpoint.removesuffix(".safetensors") + ".torch_ref.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, dst)
    for k, v in out.items():
        print(f"  {k:<11} {list(v.shape)}  mean {v.mean().item():+.6f}  max |.| {v.abs().max().item():.6f}")
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
