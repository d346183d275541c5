"""Repeats in PyTorch the training step `cargo run --release --example step_torch -- DIR` took in
caml-wgpu, and compares: the loss parts, and per parameter and BatchNorm statistic the change
the step made (after - before) in both, as the largest difference relative to the largest change
(tensors whose change is below --least are skipped).

    python benches/reference/check_step.py DIR

The small preset, iteration 1, with the attention layers' dropout off, the omni-correlation's
weight that step_torch used (0 unless its --omni) and the memory bank's draws that caml-wgpu made
(`memory_c` in batch.safetensors). Prints one line per tensor whose relative difference passes
--show (all with --show 0) and the worst one; exits 1 when the worst passes --tolerance.
"""

import argparse
import dataclasses
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from caml_torch import PRESETS, Caml, MemoryBank, make_optimizer, train_step  # noqa: E402


def drawn(bank, batch):
    """The memory caml-wgpu drew: per class c, the rows at the positions `memory_c` among the
    filled entries' rows of class c (entries in order); None where it drew none."""
    filled = [i for i, f in enumerate(bank.feats) if f is not None]
    feats = torch.cat([bank.feats[i] for i in filled])
    labels = torch.cat([bank.labels[i] for i in filled])
    return [feats[labels == c][batch[f"memory_{c}"]] if f"memory_{c}" in batch else None for c in range(2)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--show", type=float, default=1e-3)
    ap.add_argument("--least", type=float, default=2e-5,
                    help="compare tensors whose change is at least this (biases before a BatchNorm have no "
                         "gradient in exact arithmetic: their change is weight decay and rounding, below "
                         "1e-5 with --omni 100, while the smallest real change is 4e-5)")
    ap.add_argument("--float64", action="store_true",
                    help="also run the step in float64 and compare both float32 programs with it: tells how "
                         "much of the difference is float32 rounding")
    a = ap.parse_args()
    before = load_file(os.path.join(a.dir, "before.safetensors"))
    after = load_file(os.path.join(a.dir, "after.safetensors"))
    batch = load_file(os.path.join(a.dir, "batch.safetensors"))
    ref = reference_step(before, batch, torch.float32)
    exact = reference_step(before, batch, torch.float64) if a.float64 else None
    worst, rels, rels64, rels_ref64 = (0.0, ""), [], [], []
    for name, b in before.items():
        if b.dtype != torch.float32:
            continue
        d_ref = ref[name] - b
        d_ours = after[name] - b
        scale = d_ref.abs().max().item()
        if scale < a.least:
            continue
        rel = (d_ours - d_ref).abs().max().item() / scale
        line = f"  {name:60s} change {scale:.3e}  relative difference {rel:.2e}"
        if exact is not None:
            d_exact = exact[name] - b.double()
            s64 = d_exact.abs().max().item()
            rels64.append((d_ours.double() - d_exact).abs().max().item() / s64)
            rels_ref64.append((d_ref.double() - d_exact).abs().max().item() / s64)
            line += f"  to float64: caml-wgpu {rels64[-1]:.2e}, PyTorch {rels_ref64[-1]:.2e}"
        if rel >= a.show:
            print(line)
        worst = max(worst, (rel, name))
        rels.append(rel)
    print(f"{len(rels)} tensors changed by at least {a.least:g}: median relative difference "
          f"{median(rels):.2e}, worst {worst[0]:.2e} ({worst[1]})")
    if exact is not None:
        print(f"against the float64 step: caml-wgpu median {median(rels64):.2e}, worst {max(rels64):.2e}; "
              f"PyTorch float32 median {median(rels_ref64):.2e}, worst {max(rels_ref64):.2e}")
    sys.exit(1 if worst[0] > a.tolerance else 0)


def median(xs):
    return sorted(xs)[len(xs) // 2]


def reference_step(before, batch, dtype):
    """PyTorch's step from the weights `before` on the batch, in `dtype`: the state dict after it
    (floating tensors in float32, or float64 for a float64 step)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["small"], omni=float(batch["omni"][0]), lr=float(batch["lr"][0]))
    model = Caml(cfg.width, cfg.embed, cma=True, dropout=cfg.dropout)
    model.load_state_dict(before, strict=True)
    model.to(dtype)
    for m in model.encoder2.modules():  # the attention layers' dropout off, as step_torch does
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    opt = make_optimizer(model, cfg)
    bank = MemoryBank(cfg.labeled)
    bank.sample = lambda per_class, generator: drawn(bank, batch)
    x = batch["image"].to(dtype)
    label = batch["label"][: cfg.labeled_bs].long()
    cases = list(range(cfg.labeled_bs))
    loss = train_step(model, opt, bank, cfg, x, label, cases, 1, torch.Generator().manual_seed(1))
    print(f"PyTorch ({dtype}): loss {loss[0]} loss_s {loss[1]} loss_c {loss[2]} loss_o {loss[3]}")
    return model.state_dict()


if __name__ == "__main__":
    main()
