"""Seconds per CAML training iteration in PyTorch, on random data of a caml-wgpu preset's shape:
the counterpart of `caml-wgpu bench train-step --preset P --iters N`.

    python benches/reference/bench_step.py --preset small --iters 5 --threads 2
"""

import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from caml_torch import PRESETS, Caml, MemoryBank, make_optimizer, synthetic_batch, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations after the warm-up ones")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first (as caml-wgpu's bench)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1337)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    cfg = PRESETS[a.preset]
    model = Caml(cfg.width, cfg.embed, cma=True, dropout=cfg.dropout).to(dev)
    opt = make_optimizer(model, cfg)
    bank = MemoryBank(cfg.labeled)
    gen = torch.Generator().manual_seed(a.seed)
    img, lab = synthetic_batch(cfg, gen)
    img, lab = img.to(dev), lab.to(dev)
    cases = list(range(cfg.labeled_bs))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    it = 0
    for _ in range(a.warmup):
        it += 1
        train_step(model, opt, bank, cfg, img, lab, cases, it, gen)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, last = [], None
    for _ in range(max(a.iters, 1)):
        it += 1
        t0 = time.perf_counter()
        last = train_step(model, opt, bank, cfg, img, lab, cases, it, gen)
        sync()
        times.append(time.perf_counter() - t0)

    print(
        f"PyTorch {torch.__version__} train step, {a.preset} preset (width {cfg.width}, patch "
        f"{list(cfg.patch)}, batch {cfg.batch}) on {a.device}, {torch.get_num_threads()} threads:"
    )
    print(
        f"  median {statistics.median(times):.3f} s per iteration (min {min(times):.3f}, "
        f"max {max(times):.3f}, {len(times)} timed after {a.warmup} warm-up)"
    )
    print("  last losses: loss {:.4f} loss_s {:.4f} loss_c {:.4f} loss_o {:.4f}".format(*last))
    if dev.type == "cuda":
        print(f"  peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB allocated")
    else:
        print(f"  peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
