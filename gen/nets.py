"""Networks, in dependency order: the seed ports, then the deep nets that adapt to the image size.

Seed nets are layer-for-layer ports of the Keras originals; TF's 'valid' convolutions and
'same' transposed convolutions are reproduced with the matching PyTorch padding."""
import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from .errors import UserError


# ----------------------------------------------------------------------------- seed ports (28x28x1)

def _seed_upsampler(latent_dim, c0, channels):
    """Both originals' decoders: dense 7x7xc0, deconv 64 s2, deconv 32 s2, deconv `channels` s1
    (Keras 'same' padding; stride 2 doubles 7 -> 14 -> 28)."""
    return [nn.Linear(latent_dim, 7 * 7 * c0), nn.ReLU(), nn.Unflatten(1, (c0, 7, 7)),
            nn.ConvTranspose2d(c0, 64, 3, 2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 3, 2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, channels, 3, 1, padding=1)]


def _seed_downsampler(channels, size, widen=False):
    """Both originals' encoders: conv 32 s2, conv 64 s2 (Keras 'valid' padding), flattened.
    Returns (features, flat size): 28 -> 13 -> 6, so 6x6x64. `widen` (D at other sizes) adds
    doubling convs until the map is at most 8 px: 64 -> 31 -> 15 -> 7, so 7x7x128."""
    layers, c, s = [nn.Conv2d(channels, 32, 3, 2), nn.ReLU(), nn.Conv2d(32, 64, 3, 2), nn.ReLU()], 64, size
    s = ((size - 3) // 2 + 1 - 3) // 2 + 1
    while widen and s > 8:
        layers += [nn.Conv2d(c, 2 * c, 3, 2), nn.ReLU()]
        c, s = 2 * c, (s - 3) // 2 + 1
    return nn.Sequential(*layers, nn.Flatten()), c * s * s


def _widened_seed_upsampler(latent_dim, channels, size):
    """The notebook's recipe (dense to a small map, stride-2 deconvs with ReLU, no norm, a
    stride-1 deconv to the image) for other sizes: 8x8x256, then 128, 64, 32, ... up to `size`."""
    layers, c, s = [nn.Linear(latent_dim, 8 * 8 * 256), nn.ReLU(), nn.Unflatten(1, (256, 8, 8))], 256, 8
    while s < size:
        layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, padding=1, output_padding=1), nn.ReLU()]
        c, s = c // 2, s * 2
    return layers + [nn.ConvTranspose2d(c, channels, 3, 1, padding=1)]


class SeedGenerator(nn.Module):
    """timsainb 2.0-GAN-fashion-mnist: dense 7x7x64, deconv 64 s2, deconv 32 s2, deconv 1 s1, sigmoid.
    At other sizes (a power-of-two multiple of 8) the same recipe widened: the baseline for 64 px RGB."""

    def __init__(self, latent_dim=64, channels=1, num_classes=0, size=28):
        super().__init__()
        self.label_embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        up = _seed_upsampler(latent_dim, 64, channels) if size == 28 else _widened_seed_upsampler(latent_dim, channels, size)
        self.net = nn.Sequential(*up, nn.Sigmoid())

    def forward(self, z, labels=None):
        if self.label_embed is not None:
            z = z + self.label_embed(labels)
        return self.net(z) * 2 - 1  # the notebook's [0, 1] images, mapped to the shards' [-1, 1]


class SeedDiscriminator(nn.Module):
    """conv 32 s2, conv 64 s2 (valid padding), dense 1 (logits)."""

    def __init__(self, channels=1, num_classes=0, size=28):
        super().__init__()
        self.features, flat = _seed_downsampler(channels, size, widen=size != 28)
        self.out = nn.Linear(flat, 1)
        self.label_embed = nn.Embedding(num_classes, flat) if num_classes else None

    def forward(self, x, labels=None):
        h = self.features((x + 1) / 2)  # the notebook fed D images in [0, 1]
        out = self.out(h).squeeze(1)
        if self.label_embed is not None:
            out = out + (self.label_embed(labels) * h).sum(1)  # projection discriminator
        return out


class SeedEncoder(nn.Module):
    """TF CVAE tutorial: conv 32 s2, conv 64 s2 (valid), dense 2*latent."""

    def __init__(self, latent_dim=2, channels=1, num_classes=0, size=28):
        super().__init__()
        self.features, flat = _seed_downsampler(channels, size)
        self.label_embed = nn.Embedding(num_classes, flat) if num_classes else None
        self.out = nn.Linear(flat, 2 * latent_dim)

    def forward(self, x, labels=None):
        h = self.features((x + 1) / 2)  # the tutorial fed the encoder images in [0, 1]
        if self.label_embed is not None:
            h = h + self.label_embed(labels)
        return self.out(h).chunk(2, dim=1)


class SeedDecoder(nn.Module):
    """dense 7x7x32, deconv 64 s2, deconv 32 s2, deconv 1 s1 (logits)."""

    def __init__(self, latent_dim=2, channels=1, num_classes=0):
        super().__init__()
        self.label_embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.net = nn.Sequential(*_seed_upsampler(latent_dim, 32, channels))

    def forward(self, z, labels=None):
        if self.label_embed is not None:
            z = z + self.label_embed(labels)
        return self.net(z)


# ----------------------------------------------------------------------------- deep nets (28, 64, 128 px)

def pyramid(size):
    """(smallest feature map, number of x2 levels): 7 for 28 px, 4 for powers of two (64 -> 4x4)."""
    s = size
    while s > 7 and s % 2 == 0:
        s //= 2
    if s not in (4, 7) and s > 7:
        raise UserError(f"image size {size} is not 7 or 4 times a power of two (28, 32, 64, 128, ...)")
    return s, int(math.log2(size // s))


def _group_norm(c):
    return nn.GroupNorm(min(32, c // 4), c)  # batch-size independent, for the VAE


def _channels(width, level, levels):
    # widest at the smallest feature map, halving per level up, capped at 8x width
    return width * min(8, 2 ** (levels - level))


class UpBlock(nn.Module):
    def __init__(self, cin, cout, norm=nn.BatchNorm2d, act=nn.ReLU):
        super().__init__()
        self.net = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1),
                                 norm(cout), act(), nn.Conv2d(cout, cout, 3, 1, 1), norm(cout), act())

    def forward(self, x):
        return self.net(x)


class DownBlock(nn.Module):
    """Residual downsampling block (avg-pool shortcut) as in SNGAN/BigGAN discriminators, with
    the widening conv after the pool: a third of the FLOPs at the same depth."""

    def __init__(self, cin, cout, sn=True, norm=None):
        super().__init__()
        wrap = _sn if sn else (lambda m: m)
        self.conv1, self.conv2 = wrap(nn.Conv2d(cin, cin, 3, 1, 1)), wrap(nn.Conv2d(cin, cout, 3, 1, 1))
        self.skip = wrap(nn.Conv2d(cin, cout, 1))
        self.norm1 = norm(cin) if norm else nn.Identity()
        self.norm2 = norm(cout) if norm else nn.Identity()
        self.act, self.pool = nn.LeakyReLU(0.2), nn.AvgPool2d(2)

    def forward(self, x):
        h = self.pool(self.act(self.norm1(self.conv1(x))))
        h = self.act(self.norm2(self.conv2(h)))
        return h + self.skip(self.pool(x))


class Generator(nn.Module):
    def __init__(self, latent_dim, channels, size, width=64, num_classes=0):
        super().__init__()
        self.base, levels = pyramid(size)
        c0 = _channels(width, 0, levels)
        self.label_embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.fc = nn.Sequential(nn.Linear(latent_dim, c0 * self.base ** 2), nn.Unflatten(1, (c0, self.base, self.base)),
                                nn.BatchNorm2d(c0), nn.ReLU())
        self.blocks = nn.Sequential(*[UpBlock(_channels(width, i, levels), _channels(width, i + 1, levels))
                                      for i in range(levels)])
        self.out = nn.Sequential(nn.Conv2d(_channels(width, levels, levels), channels, 3, 1, 1), nn.Tanh())

    def forward(self, z, labels=None):
        if self.label_embed is not None:
            z = z * self.label_embed(labels)  # multiplicative conditioning keeps |z| statistics
        return self.out(self.blocks(self.fc(z)))


class Discriminator(nn.Module):
    def __init__(self, channels, size, width=64, num_classes=0, sn=True, batchnorm=False):
        super().__init__()
        base, levels = pyramid(size)
        wrap = _sn if sn else (lambda m: m)
        self.stem = wrap(nn.Conv2d(channels, _channels(width, levels, levels), 3, 1, 1))
        norm = nn.BatchNorm2d if batchnorm else None
        self.blocks = nn.Sequential(*[DownBlock(_channels(width, i + 1, levels), _channels(width, i, levels), sn, norm)
                                      for i in reversed(range(levels))])
        c0 = _channels(width, 0, levels)
        self.act = nn.LeakyReLU(0.2)
        self.out = wrap(nn.Linear(c0, 1))
        self.label_embed = wrap(nn.Embedding(num_classes, c0)) if num_classes else None

    def forward(self, x, labels=None):
        h = self.act(self.blocks(self.stem(x))).sum(dim=[2, 3])  # global sum pooling
        out = self.out(h).squeeze(1)
        if self.label_embed is not None:
            out = out + (self.label_embed(labels) * h).sum(1)
        return out


class SkipExcitation(nn.Module):
    """FastGAN's skip-layer excitation (Liu et al. 2021): a small feature map, pooled to 4x4 and
    squeezed to one weight per channel, gates a map 8x larger: a shortcut for the gradient and a
    style-like modulation of the fine layers by the coarse ones, at almost no cost."""

    def __init__(self, c_small, c_big):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Conv2d(c_small, c_big, 4, 1, 0, bias=False), nn.SiLU(),
                                  nn.Conv2d(c_big, c_big, 1, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, small, big):
        return big * self.gate(small)


class DCGenerator(nn.Module):
    """DCGAN generator (Radford et al. 2016): dense to the smallest map, stride-2 transposed
    convs with BatchNorm and ReLU, tanh. One conv per level: cheaper per image than `Generator`.
    `image_layer`: "conv", a 3x3 conv writes the image from a full-size map of `width` channels;
    "deconv", the last transposed conv writes it (DCGAN's own): no full-size feature map.
    `skip_excitation`: the two smallest maps gate the maps 8x larger (SkipExcitation)."""

    def __init__(self, latent_dim, channels, size, width=64, num_classes=0, image_layer="conv", skip_excitation=False):
        super().__init__()
        base, levels = pyramid(size)
        c0 = _channels(width, 0, levels)
        self.label_embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        layers = [nn.Linear(latent_dim, c0 * base ** 2), nn.Unflatten(1, (c0, base, base)), nn.BatchNorm2d(c0), nn.ReLU()]
        self.level_ends = {len(layers) - 1: 0}  # index of the layer that completes each level's map
        for i in range(levels):
            cin, cout = _channels(width, i, levels), _channels(width, i + 1, levels)
            if image_layer == "deconv" and i == levels - 1:
                layers.append(nn.ConvTranspose2d(cin, channels, 4, 2, 1))
                break
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.ReLU()]
            self.level_ends[len(layers) - 1] = i + 1
        else:
            layers.append(nn.Conv2d(_channels(width, levels, levels), channels, 3, 1, 1))
        self.net = nn.Sequential(*layers, nn.Tanh())
        last_map = max(self.level_ends.values())
        self.excite = nn.ModuleDict({str(small + 3): SkipExcitation(_channels(width, small, levels),
                                                                    _channels(width, small + 3, levels))
                                     for small in (0, 1) if skip_excitation and small + 3 <= last_map})

    def forward(self, z, labels=None):
        if self.label_embed is not None:
            z = z * self.label_embed(labels)
        if not self.excite:
            return self.net(z)
        h, maps = z, {}
        for index, layer in enumerate(self.net):
            h = layer(h)
            level = self.level_ends.get(index)
            if level is not None:
                if str(level) in self.excite:
                    h = self.excite[str(level)](maps[level - 3], h)
                maps[level] = h
        return h


class DCDiscriminator(nn.Module):
    """The SN-GAN paper's standard CNN discriminator (Miyato et al. 2018): per level a 3x3 conv
    and a stride-2 4x4 conv, a last 3x3 conv, spectral norm, LeakyReLU 0.1, a dense output (+
    projection). `convs_per_level=1`: no 3x3 conv before the stride-2 convs, as DCGAN's D (half
    the multiply-adds at 28 px). `batchnorm`: BatchNorm after each conv but the first, as DCGAN's D.
    `reconstruct`: a small decoder rebuilds the input at half size from D's second-smallest map
    (FastGAN's self-supervised D); `forward(x, reconstruct=True)` returns (logits, reconstruction)."""

    def __init__(self, channels, size, width=64, num_classes=0, sn=True, batchnorm=False, convs_per_level=2,
                 reconstruct=False):
        super().__init__()
        base, levels = pyramid(size)
        wrap = _sn if sn else (lambda m: m)

        def norm(c, first=False):
            return nn.BatchNorm2d(c) if batchnorm and not first else nn.Identity()
        layers, c = [], channels
        for i in reversed(range(levels)):
            cout, first = _channels(width, i, levels), i == levels - 1
            if convs_per_level == 2:
                layers += [wrap(nn.Conv2d(c, cout // 2, 3, 1, 1)), norm(cout // 2, first), nn.LeakyReLU(0.1)]
                c, first = cout // 2, False
            layers += [wrap(nn.Conv2d(c, cout, 4, 2, 1)), norm(cout, first), nn.LeakyReLU(0.1)]
            c = cout
            if i == 1:
                self.middle, c_middle = len(layers), c  # the map at twice the smallest size ends here
        self.features = nn.Sequential(*layers, wrap(nn.Conv2d(c, c, 3, 1, 1)), nn.LeakyReLU(0.1), nn.Flatten())
        flat = c * base * base
        self.out = wrap(nn.Linear(flat, 1))
        self.label_embed = wrap(nn.Embedding(num_classes, flat)) if num_classes else None
        self.decoder = None
        if reconstruct:
            if levels < 2:
                raise UserError(f"--model.d_reconstruct needs images of at least 4 x smallest map ({size}px is less)")
            ups = []
            for _ in range(levels - 2):  # from 2 x base px up to size / 2
                ups += [nn.Upsample(scale_factor=2), nn.Conv2d(c_middle, c_middle // 2, 3, 1, 1), nn.LeakyReLU(0.1)]
                c_middle //= 2
            self.decoder = nn.Sequential(*ups, nn.Conv2d(c_middle, channels, 3, 1, 1), nn.Tanh())

    def forward(self, x, labels=None, reconstruct=False):
        if reconstruct:
            middle = self.features[:self.middle](x)
            h = self.features[self.middle:](middle)
        else:
            h = self.features(x)
        out = self.out(h).squeeze(1)
        if self.label_embed is not None:
            out = out + (self.label_embed(labels) * h).sum(1)
        return (out, self.decoder(middle)) if reconstruct else out


class Encoder(nn.Module):
    def __init__(self, latent_dim, channels, size, width=64, num_classes=0):
        super().__init__()
        base, levels = pyramid(size)
        self.stem = nn.Conv2d(channels, _channels(width, levels, levels), 3, 1, 1)
        self.blocks = nn.Sequential(*[DownBlock(_channels(width, i + 1, levels), _channels(width, i, levels),
                                                sn=False, norm=_group_norm) for i in reversed(range(levels))])
        c0 = _channels(width, 0, levels)
        self.label_embed = nn.Embedding(num_classes, c0 * base * base) if num_classes else None
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(c0 * base * base, 2 * latent_dim))

    def forward(self, x, labels=None):
        h = self.blocks(self.stem(x)).flatten(1)
        if self.label_embed is not None:
            h = h + self.label_embed(labels)
        return self.out(h).chunk(2, dim=1)


class Decoder(nn.Module):
    def __init__(self, latent_dim, channels, size, width=64, num_classes=0):
        super().__init__()
        base, levels = pyramid(size)
        c0 = _channels(width, 0, levels)
        self.label_embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.fc = nn.Sequential(nn.Linear(latent_dim, c0 * base * base), nn.Unflatten(1, (c0, base, base)), nn.SiLU())
        self.blocks = nn.Sequential(*[UpBlock(_channels(width, i, levels), _channels(width, i + 1, levels), _group_norm, nn.SiLU)
                                      for i in range(levels)])
        self.out = nn.Conv2d(_channels(width, levels, levels), channels, 3, 1, 1)

    def forward(self, z, labels=None):
        if self.label_embed is not None:
            z = z + self.label_embed(labels)
        return self.out(self.blocks(self.fc(z)))


class VAE(nn.Module):
    """Encoder + decoder in one module (one optimizer, one DDP wrapper); `log_sigma` is the
    learned global scale of the Gaussian likelihood (sigma-VAE)."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, x, labels=None, eps=None):
        mean, logvar = self.encoder(x, labels)
        z = mean + torch.exp(0.5 * logvar) * (torch.randn_like(mean) if eps is None else eps)
        return self.decoder(z, labels), mean, logvar, z
