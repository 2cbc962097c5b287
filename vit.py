"""The vision-transformer encoder and decoder of a VQ-VAE (ViT-VQGAN, Yu et al. 2022): an image cut into patches of
2**downsamples pixels, one token per patch, so the code map has the convolutional model's shape and every job that
reads codes works unchanged. Positions are fixed 2D sine-cosine embeddings, made for each map's own height and
width, so one model takes 256x128 HipMRI slices, 256x256 OASIS ones and the 128x64 demo alike."""
from __future__ import annotations

import torch
import torch.nn as nn

from transformer import Block, initialise_weights

PIXEL_HEADS = ("linear", "conv")
PIXEL_FEATURES = 16  # features per pixel that the conv pixel head's 3x3 convolutions mix across patch borders


def sincos_positions(height: int, width: int, channels: int, device: torch.device) -> torch.Tensor:
    """Fixed 2D position embeddings [H W, C] in raster order (MAE's): half the channels encode the row, half the
    column, each as sines and cosines at geometric frequencies, so any map size has its own without training."""
    if channels % 4:
        raise ValueError(f"2D sine-cosine positions need a width divisible by 4, got {channels}")
    quarter = channels // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)

    def encode(count: int) -> torch.Tensor:
        angles = torch.arange(count, device=device, dtype=torch.float32)[:, None] * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [count, C / 2]

    rows, columns = encode(height), encode(width)
    return torch.cat([rows[:, None].expand(-1, width, -1), columns[None].expand(height, -1, -1)],
                     dim=2).reshape(height * width, channels)


class _Tokens(nn.Module):
    """Positions added to a map's tokens, the blocks (attending both ways) and a final LayerNorm."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, 0.0, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """tokens [B, H W, C] of an H x W map -> the blocks' output [B, H W, C]."""
        x = tokens + sincos_positions(height, width, tokens.shape[-1], tokens.device).to(tokens.dtype)
        for block in self.blocks:
            x = block(x, causal=False)
        return self.norm(x)


class ViTEncoder(nn.Module):
    """Images [B, C, H, W] -> latents [B, D, H/p, W/p]: a linear embedding of each p x p patch (a p-strided p x p
    convolution), transformer blocks, and a linear map to D."""

    def __init__(self, in_channels: int, patch: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 out_channels: int):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.transformer = _Tokens(width, depth, heads, mlp_ratio)
        self.out = nn.Linear(width, out_channels)
        self.apply(initialise_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images)
        batch, _, height, width = tokens.shape
        x = self.out(self.transformer(tokens.flatten(2).transpose(1, 2), height, width))
        return x.transpose(1, 2).reshape(batch, -1, height, width)


class ViTDecoder(nn.Module):
    """Latents [B, D, h, w] -> images [B, C, h p, w p], the encoder's mirror: a linear map from D, transformer
    blocks, and a pixel head. "linear" maps each token to its own p x p patch of pixels (ViT-VQGAN); "conv" maps it
    to PIXEL_FEATURES features a pixel and lets two 3x3 convolutions mix them across patch borders, so that
    neighbouring patches agree where they meet."""

    def __init__(self, in_channels: int, patch: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 out_channels: int, pixel_head: str = "conv"):
        super().__init__()
        if pixel_head not in PIXEL_HEADS:
            raise ValueError(f"pixel_head must be one of {PIXEL_HEADS}, got {pixel_head!r}")
        self.patch = patch
        self.embed = nn.Linear(in_channels, width)
        self.transformer = _Tokens(width, depth, heads, mlp_ratio)
        pixel_channels = out_channels if pixel_head == "linear" else PIXEL_FEATURES
        self.to_pixels = nn.Linear(width, patch * patch * pixel_channels)
        self.smooth = None if pixel_head == "linear" else nn.Sequential(
            nn.GELU(), nn.Conv2d(pixel_channels, pixel_channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(pixel_channels, out_channels, 3, padding=1))
        self.apply(initialise_weights)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        height, width = latents.shape[-2:]
        return self.pixels(self.transformer(self.embed(latents.flatten(2).transpose(1, 2)), height, width), height,
                           width)

    def pixels(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pixel head: the blocks' output [B, H W, C] for an H x W map -> the image [B, C, H p, W p]."""
        pixels = unpatchify(self.to_pixels(tokens), height, width, self.patch)
        return pixels if self.smooth is None else self.smooth(pixels)


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """[B, H W, p p C] patch values in raster order -> the image [B, C, H p, W p]."""
    batch = tokens.shape[0]
    channels = tokens.shape[-1] // (patch * patch)
    x = tokens.reshape(batch, height, width, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height * patch, width * patch)
