"""Augmentations. DiffAugment (Zhao et al. 2020): differentiable augmentations applied to every
image D sees, real and fake alike, so D cannot memorise a small data set (the policy is a tuple of
names), each image every op, or (ADA's adaptive strength) each op with probability p.
random_mirror: the data set's own left-right mirror images (--data.hflip)."""
import torch
import torch.nn.functional as F

from .errors import UserError


def _brightness(x):
    return x + (torch.rand(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)


def _saturation(x):
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean


def _contrast(x):
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def _translation(x, ratio=0.125):
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    ty = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    gb, gx, gy = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return padded.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def _cutout(x, ratio=0.5):
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    oy = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    gb, gx, gy = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


AUGMENT_FNS = {
    "color": [_brightness, _saturation, _contrast],
    "translation": [_translation],
    "cutout": [_cutout],
}


def check_policy(policy):
    unknown = [p for p in policy if p not in AUGMENT_FNS]
    if unknown:
        raise UserError(f"unknown DiffAugment op(s) {unknown}; known: {sorted(AUGMENT_FNS)}")


def diff_augment(x, policy, p=None):
    """x through every op of the policy; with p (a 0-d tensor: ADA's strength, gen/regularisers.py)
    each op acts on each image with probability p, as in ADA's pipeline."""
    for name in policy:
        for fn in AUGMENT_FNS[name]:
            if p is None:
                x = fn(x)
            else:
                on = torch.rand(x.size(0), 1, 1, 1, device=x.device) < p
                x = torch.where(on, fn(x), x)
    return x


def random_mirror(x):
    """Each image of the batch flipped left-right with probability 1/2 (the training data, before
    any model sees it; drawn from the global torch RNG, which checkpoints restore)."""
    flip = torch.rand(x.size(0), device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
