"""A whole CAML training run in PyTorch on a caml-wgpu dataset folder (case folders with
image.nii.gz / label.nii.gz, train.list and test.list), evaluated like `caml-wgpu eval`: the
counterpart of `caml-wgpu train --preset P ... && caml-wgpu eval --split test`, to tell the
method's behaviour at a configuration from our engine's.

    python benches/reference/train_torch.py --data data/synth --preset small

Sampling and augmentation follow SPEC section 2, with the small preset's intensity augmentation
(not caml-wgpu's random streams, so single runs differ; compare distributions over seeds).
Prints the final model's mean test Dice.
"""

import argparse
import dataclasses
import gzip
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from caml_torch import PRESETS, Caml, MemoryBank, clip_gradients, dice_loss, make_optimizer, train_step  # noqa: E402

NIFTI_DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8,
                512: np.uint16, 768: np.uint32}


def read_nifti(path):
    """A NIfTI-1 volume as a float32 array indexed [x, y, z]."""
    raw = open(path, "rb").read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    endian = "<" if int.from_bytes(raw[:4], "little") == 348 else ">"
    dim = np.frombuffer(raw, dtype=endian + "i2", count=8, offset=40)
    dtype = np.dtype(NIFTI_DTYPES[int(np.frombuffer(raw, dtype=endian + "i2", count=1, offset=70)[0])])
    offset = int(np.frombuffer(raw, dtype=endian + "f4", count=1, offset=108)[0])
    slope, inter = np.frombuffer(raw, dtype=endian + "f4", count=2, offset=112)
    shape = tuple(int(d) for d in dim[1 : 1 + dim[0]])
    n = int(np.prod(shape))
    data = np.frombuffer(raw, dtype=dtype.newbyteorder(endian), count=n, offset=offset).astype(np.float32)
    if slope not in (0.0, 1.0) or inter != 0.0:
        data = data * (slope if slope != 0 else 1.0) + inter
    return data.reshape(shape[::-1]).transpose(2, 1, 0).copy()


def load_split(root, split):
    names = [n.strip() for n in open(os.path.join(root, f"{split}.list")) if n.strip()]
    return [
        (read_nifti(os.path.join(root, n, "image.nii.gz")), read_nifti(os.path.join(root, n, "label.nii.gz")))
        for n in names
    ]


def intensity(img, rng):
    """Contrast around the mean and a shift, gamma on the patch's range, noise half the time
    (the engine's IntensityParams; its own random stream, so not the same draws)."""
    c, b, g, u = rng.uniform(0.7, 1.4), rng.uniform(-0.3, 0.3), rng.uniform(0.7, 1.5), rng.uniform()
    img = (img - img.mean()) * c + img.mean() + b
    lo, r = img.min(), img.max() - img.min()
    if r > 0:
        img = lo + r * np.clip((img - lo) / r, 0, 1) ** g
    if u < 0.5:
        img = img + rng.normal(0, 0.2 * u, img.shape)
    return np.ascontiguousarray(img, dtype=np.float32)


def augment(img, lab, patch, rng):
    """Rotate k*90 degrees in X-Y, flip along X or Y, random crop (padding small sides)."""
    k = rng.integers(0, 4)
    img, lab = np.rot90(img, k, axes=(0, 1)), np.rot90(lab, k, axes=(0, 1))
    ax = rng.integers(0, 2)
    img, lab = np.flip(img, ax), np.flip(lab, ax)
    pads = [((p - s) // 2 + 3) if s <= p else 0 for s, p in zip(img.shape, patch)]
    if any(pads):
        img = np.pad(img, [(q, q) for q in pads])
        lab = np.pad(lab, [(q, q) for q in pads])
    o = [rng.integers(0, s - p) for s, p in zip(img.shape, patch)]
    sl = tuple(slice(a, a + p) for a, p in zip(o, patch))
    return np.ascontiguousarray(img[sl]), np.ascontiguousarray(lab[sl])


class Sampler:
    """Pairs of a fresh labeled permutation per epoch; unlabeled from endless permutations."""

    def __init__(self, n_train, labeled, labeled_bs, unlabeled_bs, rng):
        self.n, self.l, self.lbs, self.ubs, self.rng = n_train, labeled, labeled_bs, unlabeled_bs, rng
        self.lperm, self.lpos, self.uperm, self.upos = [], 0, [], 0

    def next(self):
        if not len(self.lperm) or self.lpos + self.lbs > len(self.lperm):
            self.lperm, self.lpos = self.rng.permutation(self.l), 0
            self.uperm, self.upos = [], 0
        lab = list(self.lperm[self.lpos : self.lpos + self.lbs])
        self.lpos += self.lbs
        unl = []
        while len(unl) < self.ubs:
            if self.upos == len(self.uperm):
                self.uperm, self.upos = self.rng.permutation(self.n - self.l), 0
            unl.append(self.l + int(self.uperm[self.upos]))
            self.upos += 1
        return lab, unl


@torch.no_grad()
def predict(model, img, patch):
    """Decoder 1's foreground probability averaged over windows (stride half the patch) > 0.5."""
    model.eval()
    pads = [max(p - s, 0) for s, p in zip(img.shape, patch)]
    vol = np.pad(img, [(q // 2, q - q // 2) for q in pads])
    size = vol.shape
    stride = [p // 2 for p in patch]
    starts = []
    for s, p, st in zip(size, patch, stride):
        n = math.ceil((s - p) / st) + 1
        starts.append(sorted({min(i * st, s - p) for i in range(n)}))
    prob = np.zeros(size, np.float32)
    count = np.zeros(size, np.float32)
    x = torch.from_numpy(vol)
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                win = x[a : a + patch[0], b : b + patch[1], c : c + patch[2]][None, None]
                out_v = model(win)[0]
                p = torch.softmax(out_v, 1)[0, 1].numpy()
                prob[a : a + patch[0], b : b + patch[1], c : c + patch[2]] += p
                count[a : a + patch[0], b : b + patch[1], c : c + patch[2]] += 1
    prob /= count
    crop = tuple(slice(q // 2, q // 2 + s) for q, s in zip(pads, img.shape))
    return prob[crop] > 0.5


def dice(a, b):
    a, b = a != 0, b != 0
    s = a.sum() + b.sum()
    return 2.0 * (a & b).sum() / s if s else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--method", choices=["caml", "mutual", "labeled-only"], default="caml",
                    help="mutual: loss_s + loss_c without the attention layers or the omni-correlation")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--lr-schedule", choices=["constant", "poly"],
                    help="learning-rate schedule (default: poly for the small preset, constant for the paper's)")
    ap.add_argument("--width", type=int)
    ap.add_argument("--patch", type=int, nargs=3)
    ap.add_argument("--labeled", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--labeled-bs", type=int)
    ap.add_argument("--ramp-every", type=int)
    ap.add_argument("--rampup", type=float, help="ramp length R (default: 40, 20 or 15 for 4, 8, 16 labels)")
    ap.add_argument("--consistency", type=float, help="weight of loss_c at the ramp's end (1.0)")
    ap.add_argument("--omni", type=float, help="weight of loss_o at the ramp's end (0.05)")
    ap.add_argument("--fix-memory-view", action="store_true", help="flatten emb_a channels-last for the bank")
    ap.add_argument("--detach-targets", action="store_true", help="detach the sharpened consistency targets")
    ap.add_argument("--dropout", type=float, help="Dropout3d probability (0.5; the small preset: 0)")
    ap.add_argument("--intensity-aug", choices=["true", "false"],
                    help="contrast, brightness, gamma and noise per patch (the small preset: true)")
    ap.add_argument("--clip", type=float, help="clip the gradient's global norm to this (0: never)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-every", type=int, default=0)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    over = {k: v for k, v in dict(lr=a.lr, width=a.width, labeled=a.labeled, ramp_every=a.ramp_every, batch=a.batch,
                                      labeled_bs=a.labeled_bs, clip=a.clip, consistency=a.consistency,
                                      omni=a.omni, fix_memory_view=a.fix_memory_view or None,
                                      detach_targets=a.detach_targets or None, dropout=a.dropout,
                                      intensity_aug=None if a.intensity_aug is None else a.intensity_aug == "true").items()
            if v is not None}
    if a.patch:
        over["patch"] = tuple(a.patch)
    cfg = dataclasses.replace(PRESETS[a.preset], **over)
    schedule = a.lr_schedule or ("poly" if a.preset == "small" else "constant")
    if a.lr is None and a.preset == "small":
        cfg = dataclasses.replace(cfg, lr=0.03)
    if a.method == "mutual":  # the omni-correlation's weight 0: its terms leave the gradient
        cfg = dataclasses.replace(cfg, omni=0.0)
    if a.rampup is not None:  # last: replace() would drop this instance's override
        cfg.ramp_length = lambda: a.rampup
    train, test = load_split(a.data, "train"), load_split(a.data, "test")
    rng = np.random.default_rng(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    ubs = 0 if a.method == "labeled-only" else cfg.batch - cfg.labeled_bs
    sampler = Sampler(len(train), cfg.labeled, cfg.labeled_bs, ubs, rng)
    model = Caml(cfg.width, cfg.embed, cma=a.method == "caml", dropout=cfg.dropout)
    opt = make_optimizer(model, cfg)
    bank = MemoryBank(cfg.labeled)
    t0 = time.time()
    for it in range(1, a.iters + 1):
        lr = cfg.lr * (1 - (it - 1) / a.iters) ** 0.9 if schedule == "poly" else cfg.lr
        for g in opt.param_groups:
            g["lr"] = lr
        lab, unl = sampler.next()
        pairs = [augment(*train[i], cfg.patch, rng) for i in lab + unl]
        if cfg.intensity_aug:
            pairs = [(intensity(im, rng), lb) for im, lb in pairs]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        y = torch.from_numpy(np.stack([p[1] for p in pairs[: len(lab)]])).long()
        if a.method != "labeled-only":
            loss, ls, lc, lo = train_step(model, opt, bank, cfg, x, y, lab, it, gen)
        else:
            model.train()
            out_v, out_a, _, _ = model(x)
            g = (y == 1).float()
            loss_s = dice_loss(torch.softmax(out_v, 1)[:, 1], g) + dice_loss(torch.softmax(out_a, 1)[:, 1], g)
            opt.zero_grad(set_to_none=True)
            (0.5 * loss_s).backward()
            clip_gradients(model, cfg)
            opt.step()
            loss, ls, lc, lo = 0.5 * loss_s.item(), loss_s.item(), 0.0, 0.0
        if it % 25 == 0 or it == 1:
            norm = f"|g| {clip_gradients.last:.3f} " if cfg.clip > 0 else ""
            print(f"{it} loss {loss:.4f} s {ls:.4f} c {lc:.4f} o {lo:.4f} lr {lr:.4f} {norm}{time.time() - t0:.0f}s",
                  flush=True)
        if a.val_every and it % a.val_every == 0 and it != a.iters:
            d = np.mean([dice(predict(model, im, cfg.patch), lb) for im, lb in test])
            print(f"iteration {it}: validation Dice {d:.4f}", flush=True)
    d = [dice(predict(model, im, cfg.patch), lb) for im, lb in test]
    print(f"final test Dice {np.mean(d):.4f} (min {np.min(d):.3f}) after {a.iters} iterations, "
          f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
