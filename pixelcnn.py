"""The gated PixelCNN prior over code maps (van den Oord et al. 2016), and its sampler that computes each layer's
output once per position."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from sampling import CodePrior, draw_codes
from utils import Config, option


@dataclass
class PixelCNNConfig(Config):
    """A gated PixelCNN over one level's code maps. The fields with help are train_prior.py's options."""

    KIND: ClassVar[str] = "pixelcnn"
    num_embeddings: int = 512  # K of the VQ-VAE whose codes are modelled
    hidden_channels: int = option(128, "pixelcnn: channels of the gated layers")
    num_layers: int = option(12, "pixelcnn: gated layers", flag="--layers")
    kernel_size: int = option(3, "pixelcnn: odd kernel width of the gated layers")
    num_classes: int = 0  # > 0: condition on a class label
    output_channels: int = 256
    condition_embeddings: int = 0  # > 0: also condition on a coarser code map (VQ-VAE-2's top codes) with this K


CONDITION_DILATIONS = (1, 2, 4)  # a conditioned prior's view of the coarser map: 15x15 codes around each position


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel is multiplied by a fixed 0/1 mask (so masked taps never learn or leak)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], padding: tuple[int, int],
                 mask: torch.Tensor):
        super().__init__(in_channels, out_channels, kernel, padding=padding)
        self.register_buffer("mask", mask.view(1, 1, *kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def _gate(x: torch.Tensor) -> torch.Tensor:
    value, gate = x.chunk(2, dim=1)
    return torch.tanh(value) * torch.sigmoid(gate)


class GatedLayer(nn.Module):
    """One gated layer with a vertical stack (rows above) and a horizontal stack (left in the row).

    The vertical convolution covers rows i - k//2 .. i and is cropped to the input's height; in the first layer its
    last kernel row is masked, so it sees only rows above, and so does every later vertical output. The horizontal
    convolution covers columns j - k//2 .. j; in the first layer its last tap is masked so the current position is
    never seen. The vertical stack feeds the horizontal one through a 1x1 convolution: no blind spot.
    """

    def __init__(self, channels: int, kernel_size: int, first: bool, num_classes: int, spatial: bool = False):
        super().__init__()
        half = kernel_size // 2
        vertical_mask = torch.ones(half + 1, kernel_size)
        horizontal_mask = torch.ones(1, half + 1)
        if first:
            vertical_mask[-1] = 0
            horizontal_mask[0, -1] = 0
        self.first = first
        self.vertical = MaskedConv2d(channels, 2 * channels, (half + 1, kernel_size), (half, half), vertical_mask)
        self.horizontal = MaskedConv2d(channels, 2 * channels, (1, half + 1), (0, half), horizontal_mask)
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.condition = nn.Embedding(num_classes, 4 * channels) if num_classes > 0 else None
        # A location-dependent condition (features of a coarser code map, known in full) enters every gated layer
        # through a 1x1 convolution, as the class does through its embedding.
        self.spatial = nn.Conv2d(channels, 4 * channels, 1) if spatial else None

    def conditions(self, labels: torch.Tensor | None, spatial: torch.Tensor | None,
                   ) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """What the class and the spatial condition add before the vertical and the horizontal gates."""
        vertical = horizontal = 0.0
        if self.condition is not None and labels is not None:
            vertical, horizontal = self.condition(labels)[:, :, None, None].chunk(2, dim=1)
        if self.spatial is not None and spatial is not None:
            spatial_vertical, spatial_horizontal = self.spatial(spatial).chunk(2, dim=1)
            vertical, horizontal = vertical + spatial_vertical, horizontal + spatial_horizontal
        return vertical, horizontal

    def vertical_step(self, x_vertical: torch.Tensor, conditions: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (vertical output, pre-gate vertical features that feed the horizontal stack)."""
        features = self.vertical(x_vertical)[:, :, : x_vertical.shape[2]]
        return _gate(features + conditions[0]), features

    def horizontal_step(self, x_horizontal: torch.Tensor, vertical_features: torch.Tensor,
                        conditions: tuple) -> torch.Tensor:
        features = self.horizontal(x_horizontal)[:, :, :, : x_horizontal.shape[3]]
        out = self.horizontal_out(_gate(features + self.vertical_to_horizontal(vertical_features) + conditions[1]))
        return out if self.first else out + x_horizontal  # residual (the first layer's input is the current code)


class GatedPixelCNN(CodePrior):
    """Autoregressive prior over code maps (van den Oord et al. 2016, gated PixelCNN with two stacks).

    forward(codes [B, H, W] long, labels [B] long or None, condition [B, H/2, W/2] long or None) -> logits
    [B, K, H, W]; logits at (i, j) depend only on codes before (i, j) in raster order, and on the class and the
    condition map (a coarser level's codes, when config.condition_embeddings > 0), of which every position sees the
    15x15 coarse codes around it (dilated convolutions), and more through the stacks.
    """

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        self.config = config
        channels = config.hidden_channels
        spatial = config.condition_embeddings > 0
        self.embedding = nn.Embedding(config.num_embeddings, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, config.kernel_size, index == 0, config.num_classes, spatial)
                                    for index in range(config.num_layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, config.output_channels, 1), nn.ReLU(),
                                  nn.Conv2d(config.output_channels, config.num_embeddings, 1))
        if spatial:  # the coarser map's codes (all known): embedded, mixed by dilated 3x3 convolutions, upsampled
            self.condition_embedding = nn.Embedding(config.condition_embeddings, channels)
            self.condition_network = nn.Sequential(*(module for dilation in CONDITION_DILATIONS for module in (
                nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation), nn.ReLU())))

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embedding(codes).permute(0, 3, 1, 2)

    def spatial_features(self, condition: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
        """Features [B, C, H, W] of the condition map at the size of the modelled map."""
        if condition is None or self.config.condition_embeddings == 0:
            return None
        features = self.condition_network(self.condition_embedding(condition).permute(0, 3, 1, 2))
        return F.interpolate(features, size=shape, mode="nearest")

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        spatial = self.spatial_features(condition, codes.shape[-2:])
        x_vertical = x_horizontal = self._embed(codes)
        for layer in self.layers:
            conditions = layer.conditions(labels, spatial)
            x_vertical, features = layer.vertical_step(x_vertical, conditions)
            x_horizontal = layer.horizontal_step(x_horizontal, features, conditions)
        return self.head(x_horizontal)

    @torch.inference_mode()
    def sample(self, batch_size: int, shape: tuple[int, int], labels: torch.Tensor | None = None,
               temperature: float = 1.0, generator: torch.Generator | None = None,
               condition: torch.Tensor | None = None, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
        """Code maps [B, H, W] drawn in raster order, all B at once, computing each layer's output once.

        Every layer keeps the rows (vertical stack) and columns (horizontal stack) it has already computed, so a
        new position costs one column of each layer, done with small matrix products: about one forward pass
        for the whole map. A spatial condition is known in full before the first draw, so each layer's share of
        it is computed once and read row by row.
        """
        height, width = shape
        device = self.embedding.weight.device
        codes = torch.zeros(batch_size, height, width, dtype=torch.long, device=device)
        channels = self.config.hidden_channels
        spatial = self.spatial_features(condition, (height, width))
        layers = [_SamplingLayer(layer, layer.conditions(labels, spatial)) for layer in self.layers]
        head = [module for module in self.head if isinstance(module, nn.Conv2d)]
        # vertical_inputs[l]: what layer l's vertical convolution reads, filled row by row
        vertical_inputs = [torch.zeros(batch_size, channels, height, width, device=device) for _ in layers]
        for i in range(height):
            to_horizontal = []  # per layer: row i's vertical contribution to the horizontal stack, as [W, B, 2C]
            for index, layer in enumerate(layers):
                features = layer.vertical_row(vertical_inputs[index], i)
                if index + 1 < len(layers):
                    vertical_inputs[index + 1][:, :, i: i + 1] = _gate(layer.add_vertical_condition(features, i))
                to_horizontal.append(layer.to_horizontal(features, i))
            # horizontal_inputs[l][j]: what layer l's horizontal stack reads at column j of row i, as [B, C]
            horizontal_inputs = torch.zeros(len(layers), width, batch_size, channels, device=device)
            for j in range(width):
                for index, layer in enumerate(layers):
                    out = layer.column(horizontal_inputs[index], j, to_horizontal[index][j])
                    if index + 1 < len(layers):
                        horizontal_inputs[index + 1, j] = out
                hidden = F.linear(F.relu(out), head[0].weight[:, :, 0, 0], head[0].bias)
                logits = F.linear(F.relu(hidden), head[1].weight[:, :, 0, 0], head[1].bias)
                chosen = draw_codes(logits, temperature, generator, top_k, top_p)
                codes[:, i, j] = chosen
                embedded = self.embedding(chosen)
                horizontal_inputs[0, j] = embedded
                vertical_inputs[0][:, :, i, j] = embedded
        return codes


class _SamplingLayer:
    """One gated layer with its masks, biases and conditions folded in, computing one row of the vertical stack and
    then one column at a time of the horizontal stack while sampling. A condition is [B, 2C, 1, 1] (a class) or
    [B, 2C, H, W] (a coarser code map: its row i is read for row i)."""

    def __init__(self, layer: GatedLayer, conditions: tuple):
        self.half = layer.vertical.kernel_size[1] // 2
        self.vertical_weight, self.vertical_bias = layer.vertical.weight * layer.vertical.mask, layer.vertical.bias
        self.vertical_condition, self.horizontal_condition = (
            condition if torch.is_tensor(condition) else None for condition in conditions)
        # The horizontal convolution's bias joins the vertical-to-horizontal one, so a column adds neither.
        self.to_horizontal_weight = layer.vertical_to_horizontal.weight
        self.to_horizontal_bias = layer.vertical_to_horizontal.bias + layer.horizontal.bias
        weight = layer.horizontal.weight * layer.horizontal.mask  # [2C, C, 1, taps]
        self.taps = [weight[:, :, 0, tap].t() for tap in range(weight.shape[-1])]
        self.out_weight, self.out_bias = layer.horizontal_out.weight[:, :, 0, 0].t(), layer.horizontal_out.bias
        self.first = layer.first

    @staticmethod
    def _row(condition: torch.Tensor | None, i: int) -> torch.Tensor | float:
        if condition is None:
            return 0.0
        return condition if condition.shape[-2] == 1 else condition[:, :, i: i + 1]

    def vertical_row(self, inputs: torch.Tensor, i: int) -> torch.Tensor:
        """Pre-gate vertical features [B, 2C, 1, W] of row i, from inputs [B, C, H, W] filled up to row i."""
        # Exactly the kernel's rows i - half .. i (zeros above the map), so only row i is computed.
        window = F.pad(inputs[:, :, max(0, i - self.half): i + 1], (0, 0, max(0, self.half - i), 0))
        return F.conv2d(window, self.vertical_weight, self.vertical_bias, padding=(0, self.half))

    def add_vertical_condition(self, features: torch.Tensor, i: int) -> torch.Tensor:
        return features + self._row(self.vertical_condition, i)

    def to_horizontal(self, features: torch.Tensor, i: int) -> torch.Tensor:
        """The vertical stack's contribution [W, B, 2C] to each column of the horizontal stack in row i."""
        row = F.conv2d(features, self.to_horizontal_weight, self.to_horizontal_bias)
        row = row + self._row(self.horizontal_condition, i)
        return row[:, :, 0].permute(2, 0, 1).contiguous()

    def column(self, inputs: torch.Tensor, j: int, from_vertical: torch.Tensor) -> torch.Tensor:
        """Output at column j from inputs [W, B, C] of columns <= j and the vertical stack's [B, 2C] there."""
        features = from_vertical
        for tap, matrix in enumerate(self.taps):
            source = j - self.half + tap
            if source >= 0 and not (self.first and tap == self.half):  # the first layer never sees column j itself
                features = torch.addmm(features, inputs[source], matrix)
        gated = _gate(features)
        if self.first:
            return torch.addmm(self.out_bias, gated, self.out_weight)
        return torch.addmm(inputs[j], gated, self.out_weight).add_(self.out_bias)  # residual


