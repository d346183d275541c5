"""CAML (caml3d_v1) and one CAML training iteration in plain PyTorch, as /work/shared/SPEC.md
sections 1 and 2 describe them: the yardstick caml-wgpu's speed and numerics are compared against.

Parameter names follow the reference's state_dict (data/state_dict_keys.txt), so that
`model.load_state_dict(safetensors.torch.load_file("model_final.safetensors"))` loads a checkpoint
written by caml-wgpu, strictly.

Tensors are N, C, X, Y, Z.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


# ---- network (SPEC section 1) -----------------------------------------------------------------


class ConvBlock(nn.Module):
    """n stages of [Conv3d k3 p1, BatchNorm3d, ReLU] at conv.{3i}, conv.{3i+1}."""

    def __init__(self, n, cin, cout):
        super().__init__()
        ops = []
        for i in range(n):
            ops += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU()]
        self.conv = nn.Sequential(*ops)

    def forward(self, x):
        return self.conv(x)


class Down(nn.Module):
    """[Conv3d k2 s2 p0, BatchNorm3d, ReLU]."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU())

    def forward(self, x):
        return self.conv(x)


class UpDeconv(nn.Module):
    """Decoder 1: [ConvTranspose3d k2 s2, BatchNorm3d, ReLU]."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU())

    def forward(self, x):
        return self.conv(x)


class UpLinear(nn.Module):
    """Decoder 2: [trilinear x2 (align_corners=True), Conv3d k3 p1, BatchNorm3d, ReLU]; the conv
    sits at conv.1."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
            nn.Conv3d(cin, cout, 3, padding=1),
            nn.BatchNorm3d(cout),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.conv(x)


class IntraSampleAttention(nn.Module):
    """Tokens = the voxels of one sample: the sequence-first layer sees [XYZ, N, C]."""

    def __init__(self, d, ff):
        super().__init__()
        self.encoder_layers = nn.TransformerEncoderLayer(d, 4, ff, 0.5)

    def forward(self, x):
        n, c = x.shape[:2]
        t = x.reshape(n, c, -1).permute(2, 0, 1)
        t = self.encoder_layers(t)
        return t.permute(1, 2, 0).reshape(x.shape)


class InterSampleAttention(nn.Module):
    """Tokens = the samples of the batch at one voxel: the sequence-first layer sees [N, XYZ, C]."""

    def __init__(self, d, ff):
        super().__init__()
        self.encoder_layers = nn.TransformerEncoderLayer(d, 4, ff, 0.5)

    def forward(self, x):
        n, c = x.shape[:2]
        t = x.reshape(n, c, -1).permute(0, 2, 1)
        t = self.encoder_layers(t)
        return t.permute(0, 2, 1).reshape(x.shape)


class Encoder(nn.Module):
    def __init__(self, f, cma=False):
        super().__init__()
        self.block_one = ConvBlock(1, 1, f)
        self.block_one_dw = Down(f, 2 * f)
        self.block_two = ConvBlock(2, 2 * f, 2 * f)
        self.block_two_dw = Down(2 * f, 4 * f)
        self.block_three = ConvBlock(3, 4 * f, 4 * f)
        self.block_three_dw = Down(4 * f, 8 * f)
        self.block_four = ConvBlock(3, 8 * f, 8 * f)
        self.block_four_dw = Down(8 * f, 16 * f)
        self.block_five = ConvBlock(3, 16 * f, 16 * f)
        self.dropout = nn.Dropout3d(p=0.5)
        self.cma = cma
        if cma:
            self.intra_attention = IntraSampleAttention(8 * f, 32 * f)
            self.inter_attention = InterSampleAttention(8 * f, 32 * f)

    def forward(self, x):
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        # CMA runs in training mode only; in eval mode x4 passes through unchanged.
        if self.cma and self.training:
            x4 = self.inter_attention(self.intra_attention(x4))
        x5 = self.dropout(self.block_five(self.block_four_dw(x4)))
        return x1, x2, x3, x4, x5


class Decoder(nn.Module):
    def __init__(self, f, classes, deconv):
        super().__init__()
        up = UpDeconv if deconv else UpLinear
        self.block_five_up = up(16 * f, 8 * f)
        self.block_six = ConvBlock(3, 8 * f, 8 * f)
        self.block_six_up = up(8 * f, 4 * f)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f)
        self.block_seven_up = up(4 * f, 2 * f)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f)
        self.block_eight_up = up(2 * f, f)
        self.block_nine = ConvBlock(1, f, f)
        self.out_conv = nn.Conv3d(f, classes, 1)
        self.dropout = nn.Dropout3d(p=0.5)

    def forward(self, feats):
        x1, x2, x3, x4, x5 = feats
        x = self.block_five_up(x5) + x4
        x = self.block_six_up(self.block_six(x)) + x3
        x = self.block_seven_up(self.block_seven(x)) + x2
        x = self.block_eight_up(self.block_eight(x)) + x1
        x9 = self.dropout(self.block_nine(x))
        return self.out_conv(x9), x9


def head(inp, e):
    """Linear, BatchNorm1d, ReLU, Linear at 0, 1, 3."""
    return nn.Sequential(nn.Linear(inp, e), nn.BatchNorm1d(e), nn.ReLU(), nn.Linear(e, e))


class Caml(nn.Module):
    """caml3d_v1 with base width F, embedding width E, 1 input channel, 2 classes. `cma=False`
    builds the network without attention (caml-wgpu's `mutual` and `labeled-only` methods)."""

    def __init__(self, width=16, embed=32, cma=True, dropout=0.5):
        super().__init__()
        self.width, self.embed = width, embed
        self.encoder1 = Encoder(width)
        self.encoder2 = Encoder(width, cma=cma)
        self.decoder1 = Decoder(width, 2, deconv=True)
        self.decoder2 = Decoder(width, 2, deconv=False)
        for m in (self.encoder1, self.encoder2, self.decoder1, self.decoder2):
            m.dropout.p = dropout
        self.projection_head1 = head(width, embed)
        self.prediction_head1 = head(embed, embed)
        self.projection_head2 = head(width, embed)
        self.prediction_head2 = head(embed, embed)

    def forward(self, x):
        """(out_v, out_a, emb_v, emb_a): the logits and x9 embeddings of decoders 1 and 2."""
        out_v, emb_v = self.decoder1(self.encoder1(x))
        out_a, emb_a = self.decoder2(self.encoder2(x))
        return out_v, out_a, emb_v, emb_a


def has_cma(state_dict):
    return any("intra_attention" in k for k in state_dict)


# ---- configuration (src/config.rs presets) ----------------------------------------------------


@dataclass
class Config:
    labeled: int = 8
    patch: tuple = (112, 112, 80)
    width: int = 16
    embed: int = 32
    batch: int = 4
    labeled_bs: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    ramp_every: int = 150
    consistency: float = 1.0
    omni: float = 0.05
    memory_num: int = 256
    num_filtered: int = 12800
    temperature: float = 0.1
    corr_temperature: float = 0.1
    fix_memory_view: bool = False
    detach_targets: bool = False
    dropout: float = 0.5
    intensity_aug: bool = False
    clip: float = 0.0

    def ramp_length(self):
        return 40.0 if self.labeled <= 4 else 20.0 if self.labeled <= 8 else 15.0


PRESETS = {
    "paper": Config(),
    "small": Config(labeled=4, patch=(48, 48, 32), width=4, ramp_every=5, memory_num=64, num_filtered=1600,
                    detach_targets=True, dropout=0.0, intensity_aug=True),
}


# ---- one training iteration (SPEC section 2) --------------------------------------------------


def dice_loss(p, g):
    """1 - (2 sum(p g) + 1e-8) / (sum(p) + sum(g) + 1e-8), sums over the whole labeled sub-batch."""
    return 1 - (2 * (p * g).sum() + 1e-8) / (p.sum() + g.sum() + 1e-8)


def sharpen(p, t):
    a, b = p ** (1 / t), (1 - p) ** (1 / t)
    return a / (a + b)


def sigmoid_rampup(t, length):
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(t, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


class MemoryBank:
    """One entry per labeled case (projected features [rows, E] and their labels), replaced
    whenever the case is in a batch."""

    def __init__(self, cases):
        self.feats = [None] * cases
        self.labels = [None] * cases

    def update(self, case, feats, labels):
        self.feats[case], self.labels[case] = feats.detach(), labels

    def sample(self, per_class, generator):
        """Per class, `per_class` rows drawn uniformly without replacement from every filled
        entry; None where the bank holds fewer."""
        filled = [i for i, f in enumerate(self.feats) if f is not None]
        feats = torch.cat([self.feats[i] for i in filled])
        labels = torch.cat([self.labels[i] for i in filled])
        out = []
        for c in range(2):
            fc = feats[labels == c]
            if per_class == 0 or fc.shape[0] < per_class:
                out.append(None)
            else:
                pick = torch.randperm(fc.shape[0], generator=generator)[:per_class].to(fc.device)
                out.append(fc[pick])
        return out


def correlation(feats, conf, cls, memory, num_filtered, temperature):
    """Per class (0 then 1): the class's rows sorted by confidence (descending, ties in voxel
    order), the first `num_filtered`, correlated with each present memory class; the softmax of
    the joined logits / temperature. None when no class has a matrix."""
    out = []
    for c in range(2):
        idx = torch.nonzero(cls == c).flatten()
        order = torch.sort(conf[idx], descending=True, stable=True).indices[:num_filtered]
        f = feats[idx[order]]
        logits = [f @ m.t() for m in memory if m is not None and f.shape[0] > 1 and m.shape[0] > 1]
        if logits:
            out.append(torch.softmax(torch.cat(logits, dim=1) / temperature, dim=1))
    return torch.cat(out) if out else None


def train_step(model, opt, bank, cfg, x, label, cases, iteration, generator):
    """One iteration on x [B, 1, X, Y, Z] whose first labeled_bs samples are the labeled cases
    `cases` with labels `label` [labeled_bs, X, Y, Z] (int64). Returns the loss parts as floats."""
    l = cfg.labeled_bs
    model.train()
    out_v, out_a, emb_v, emb_a = model(x)
    p_v, p_a = torch.softmax(out_v, dim=1), torch.softmax(out_a, dim=1)

    # 1. supervised dice on the labeled samples' foreground probabilities
    g = (label == 1).float()
    loss_s = dice_loss(p_v[:l, 1], g) + dice_loss(p_a[:l, 1], g)

    # 2. mutual consistency; the sharpened targets are not detached (the reference's quirk) unless
    #    detach_targets
    t = cfg.temperature
    if cfg.detach_targets:
        loss_c = F.mse_loss(p_v, sharpen(p_a, t).detach()) + F.mse_loss(p_a, sharpen(p_v, t).detach())
    else:
        loss_c = F.mse_loss(p_v, sharpen(p_a, t)) + F.mse_loss(p_a, sharpen(p_v, t))

    # 3. memory bank: the labeled voxels both decoders get right, projected in eval mode
    f = emb_v.shape[1]
    with torch.no_grad():
        correct = (out_v[:l].argmax(1) == label) & (out_a[:l].argmax(1) == label)
        rows_v = emb_v[:l].permute(0, 2, 3, 4, 1).reshape(l, -1, f)
        if cfg.fix_memory_view:
            rows_a = emb_a[:l].permute(0, 2, 3, 4, 1).reshape(l, -1, f)
        else:
            # The reference flattens emb_a without moving channels last: rows of F consecutive
            # values of the N, C, X, Y, Z memory, matched to voxels in channels-last order.
            rows_a = emb_a[:l].reshape(l, -1, f)
        model.projection_head1.eval()
        model.projection_head2.eval()
        for i, case in enumerate(cases):
            m = correct[i].flatten()
            proj = (model.projection_head1(rows_v[i][m]) + model.projection_head2(rows_a[i][m])) / 2
            bank.update(case, proj, label[i].flatten()[m])
        model.projection_head1.train()
        model.projection_head2.train()
    memory = bank.sample(cfg.memory_num, generator)

    # 4. omni-correlation on the unlabeled voxels where both decoders agree
    loss_o = None
    with torch.no_grad():
        conf, cls = p_v[l:].max(1)
        consistent = cls == p_a[l:].argmax(1)
        cls, conf = cls[consistent], conf[consistent]
    if cls.numel() > 1:  # BatchNorm1d in training mode needs more than one row
        u_v = emb_v[l:].permute(0, 2, 3, 4, 1)[consistent]
        u_a = emb_a[l:].permute(0, 2, 3, 4, 1)[consistent]
        feats_v = model.prediction_head1(model.projection_head1(u_v))
        feats_a = model.prediction_head2(model.projection_head2(u_a))
        corr_v = correlation(feats_v, conf, cls, memory, cfg.num_filtered, cfg.corr_temperature)
        corr_a = correlation(feats_a, conf, cls, memory, cfg.num_filtered, cfg.corr_temperature)
        if corr_v is not None and corr_a is not None:
            loss_o = torch.sum(-corr_a * torch.log(corr_v + 1e-8)) / corr_a.shape[0]

    # 5. weights ramped over iteration // ramp_every (the counter starts at 1)
    r = sigmoid_rampup(iteration // cfg.ramp_every, cfg.ramp_length())
    lambda_c, lambda_o = cfg.consistency * r, cfg.omni * r
    loss = 0.5 * loss_s + lambda_c * loss_c
    if loss_o is not None:
        loss = loss + lambda_o * loss_o

    # 6. SGD with momentum 0.9 and weight decay 1e-4 (torch.optim.SGD)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(model, cfg)
    opt.step()
    lo = loss_o.item() if loss_o is not None else 0.0
    return loss.item(), loss_s.item(), loss_c.item(), lo


def clip_gradients(model, cfg):
    """Clips the gradients' global norm to cfg.clip when it is positive; the norm before
    clipping is kept in clip_gradients.last."""
    if cfg.clip > 0:
        clip_gradients.last = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))


def make_optimizer(model, cfg):
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def synthetic_batch(cfg, generator):
    """Images uniform in [-1, 1] and, per sample, foreground where any of three slabs is (the
    label pattern of `caml-wgpu bench train-step`), so that every class and memory path runs."""
    x, y, z = cfg.patch
    img = torch.rand((cfg.batch, 1, x, y, z), generator=generator) * 2 - 1
    i = torch.arange(x).view(x, 1, 1) * 4 // x == 1
    j = torch.arange(y).view(1, y, 1) * 4 // y == 2
    k = torch.arange(z).view(1, 1, z) * 4 // z == 1
    lab = (i | j | k).long().expand(cfg.labeled_bs, x, y, z).contiguous()
    return img, lab
