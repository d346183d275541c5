"""Repeats in PyTorch the training step `cargo run --release --example step_torch -- DIR` took in
caml-wgpu, and compares: the loss parts, and per parameter and BatchNorm statistic the change
the step made (after - before) in both, as the largest difference relative to the largest change
(tensors whose change is below --least are skipped).

    python benches/reference/check_step.py DIR

The small preset, iteration 1, without what draws random numbers (the omni-correlation's weight 0:
its value depends on the memory bank's draws; the attention layers' dropout off). Prints one line per tensor whose relative difference passes --show (all with
--show 0) and the worst one; exits 1 when the worst passes --tolerance.
"""

import argparse
import dataclasses
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from caml_torch import PRESETS, Caml, MemoryBank, make_optimizer, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--show", type=float, default=1e-3)
    ap.add_argument("--least", type=float, default=1e-6,
                    help="compare tensors whose change is at least this (conv biases before a BatchNorm "
                         "have no gradient: their change is weight decay and rounding)")
    a = ap.parse_args()
    torch.manual_seed(0)
    before = load_file(os.path.join(a.dir, "before.safetensors"))
    after = load_file(os.path.join(a.dir, "after.safetensors"))
    batch = load_file(os.path.join(a.dir, "batch.safetensors"))
    cfg = dataclasses.replace(PRESETS["small"], omni=0.0, lr=float(batch["lr"][0]))
    model = Caml(cfg.width, cfg.embed, cma=True, dropout=cfg.dropout)
    model.load_state_dict(before, strict=True)
    for m in model.encoder2.modules():  # the attention layers' dropout off, as step_torch does
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    opt = make_optimizer(model, cfg)
    bank = MemoryBank(cfg.labeled)
    x = batch["image"]
    label = batch["label"][: cfg.labeled_bs].long()
    cases = list(range(cfg.labeled_bs))
    loss = train_step(model, opt, bank, cfg, x, label, cases, 1, torch.Generator().manual_seed(1))
    print("PyTorch:   loss {} loss_s {} loss_c {}".format(*loss[:3]))
    ours = model.state_dict()
    worst, rels = (0.0, ""), []
    for name, b in before.items():
        if b.dtype != torch.float32:
            continue
        d_ref = ours[name].float() - b
        d_ours = after[name] - b
        scale = d_ref.abs().max().item()
        if scale < a.least:
            continue
        rel = (d_ours - d_ref).abs().max().item() / scale
        if rel >= a.show:
            print(f"  {name:60s} change {scale:.3e}  relative difference {rel:.2e}")
        worst = max(worst, (rel, name))
        rels.append(rel)
    rels.sort()
    print(f"{len(rels)} tensors changed by at least {a.least:g}: median relative difference "
          f"{rels[len(rels) // 2]:.2e}, worst {worst[0]:.2e} ({worst[1]})")
    sys.exit(1 if worst[0] > a.tolerance else 0)


if __name__ == "__main__":
    main()
