"""What keeps a GAN's D from memorising a small data set, beside DiffAugment (gen/augment.py):
LeCam's regulariser, FastGAN's reconstruction loss, and ADA's adaptive augmentation strength.
Their running state lives in buffers of D (so checkpoints carry it) and is updated from every
rank's batch (so it stays the same on every rank under DDP)."""
import torch
import torch.nn.functional as F

LECAM_EMA_WEIGHT = 0.01  # the paper's decay 0.99
ADA_IMAGES = 256  # ADA adjusts its strength every 4 batches of 64 real images (all ranks together)


def sum_over_ranks(t):
    """t summed over the DDP ranks (in place; t itself without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def lecam(means, real_logits, fake_logits):
    """LeCam (Tseng et al. 2021): each set's logits pulled toward the EMA (0.99) of the other's,
    `means` = (real, fake) before this batch; then the EMA takes this batch (every rank's)."""
    mean_real, mean_fake = means.clone()
    reg = (real_logits - mean_fake).pow(2).mean() + (fake_logits - mean_real).pow(2).mean()
    with torch.no_grad():
        batch = sum_over_ranks(torch.stack([real_logits.mean(), fake_logits.mean()]))
        means.lerp_(batch / _world_size(), LECAM_EMA_WEIGHT)
    return reg


def reconstruction(rebuilt, seen):
    """FastGAN's self-supervised D (Liu et al. 2021): the MSE of D's decoder output against the
    images D saw, average-pooled to the decoder's size."""
    return F.mse_loss(rebuilt.float(), F.interpolate(seen.float(), size=rebuilt.shape[-2:], mode="area"))


def adapt_strength(ada, real_logits, target, kimg):
    """ADA's heuristic (Karras et al. 2020): r = E[sign(D(real))] over the last ADA_IMAGES real
    images; the strength p moves by (images / kimg thousand) up when r > target (D too sure of
    the reals: it overfits), down otherwise, within [0, 1]. `ada` = (p, sum of signs, images)."""
    with torch.no_grad():
        ada[1:] += sum_over_ranks(torch.stack([real_logits.detach().float().sign().sum(),
                                               torch.tensor(float(real_logits.numel()), device=ada.device)]))
        due = ada[2] >= ADA_IMAGES  # on the device: no host sync
        r = ada[1] / ada[2].clamp(min=1)
        ada[0] = torch.where(due, (ada[0] + torch.sign(r - target) * ada[2] / (kimg * 1000)).clamp(0, 1), ada[0])
        ada[1:] = torch.where(due, torch.zeros_like(ada[1:]), ada[1:])


def _world_size():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1
