"""The networks: Encoder, VectorQuantizer, Decoder and the VQVAE that joins them; the PixelCNN prior."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQVAEConfig:
    in_channels: int = 1
    hidden_channels: int = 64
    residual_channels: int = 32
    num_residual_layers: int = 2
    downsamples: int = 2  # each halves height and width: codes are 2**downsamples times smaller per side
    num_embeddings: int = 512  # K, the codebook size
    embedding_dim: int = 64  # D, the length of each code vector
    beta: float = 0.25  # weight of the commitment loss
    quantizer: str = "ema"  # "ema" (moving-average codebook) or "gradient" (codebook trained by its loss)
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    dead_code_threshold: float = 1.0  # re-seed codes whose moving-average use per step falls below this; 0 = never
    normalization: str = "none"  # "none" or "group": GroupNorm in the convolutional blocks
    code_distance: str = "euclidean"  # "euclidean", or "cosine": latents and codes l2-normalised for the search
    lookup_dim: int = 0  # > 0: search the codebook in this many dimensions, projected from and back to D
    estimator: str = "straight_through"  # how gradients pass the quantizer: "straight_through" or "rotation"

    # What checkpoints written before an option existed were trained with: they load as they were trained, whatever
    # today's defaults are.
    LEGACY = {"code_distance": "euclidean", "lookup_dim": 0, "estimator": "straight_through"}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "VQVAEConfig":
        known = {field.name for field in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model settings: {sorted(unknown)}")
        return cls(**{**cls.LEGACY, **values})

    @property
    def scale(self) -> int:
        return 2**self.downsamples


DISTANCE_ELEMENTS = 2**24  # the most entries of the vector-to-code distance matrix held at once (64 MB)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_first_process() -> bool:
    return not _distributed() or torch.distributed.get_rank() == 0


def count_codes(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How often each code occurs. Unlike torch.bincount this never waits for the GPU (no max to read back)."""
    flat = indices.flatten()
    return torch.zeros(num_codes, device=flat.device).index_add_(0, flat, torch.ones(len(flat), device=flat.device))


def weights_fingerprint(model: nn.Module) -> str:
    """Identifies a model's weights, so that caches and priors can tell whether its codes still mean the same.
    The quantizer's restart candidates never change a code and are left out (so fingerprints made before they
    existed still match)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith("restart_candidates"):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def rotate_onto(latents: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024): each latent row is carried onto its code by the rotation R that turns
    its direction u into the code's direction v, and by the ratio of their lengths. Forward, that is the code
    itself; backward, the encoder's gradient is the decoder's, rotated and rescaled by the same (fixed) map, rather
    than copied. R = I - 2 r r^T + 2 v u^T with r = (u + v) / |u + v|, applied without forming the matrix."""
    latent_norms = latents.norm(dim=1, keepdim=True).clamp_min(1e-8)
    code_norms = codes.norm(dim=1, keepdim=True).clamp_min(1e-8)
    u, v = (latents / latent_norms).detach(), (codes / code_norms).detach()
    r = F.normalize(u + v, dim=1, eps=1e-8)
    rotated = latents - 2 * r * (r * latents).sum(1, keepdim=True) + 2 * v * (u * latents).sum(1, keepdim=True)
    rotated = rotated * (code_norms / latent_norms).detach()
    return codes.detach() + (rotated - rotated.detach())  # exactly the code forward, the rotation's gradient back


def _draw(population: int, count: int, device: torch.device) -> torch.Tensor:
    """count indices below population, without repeats where there are enough."""
    if population >= count:
        return torch.randperm(population, device=device)[:count]
    return torch.randint(0, population, (count,), device=device)


def _norm(channels: int, kind: str) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


class ResidualLayer(nn.Module):
    """x + 1x1(ReLU(3x3(ReLU(x))))."""

    def __init__(self, channels: int, residual_channels: int, normalization: str):
        super().__init__()
        self.block = nn.Sequential(
            _norm(channels, normalization), nn.ReLU(),
            nn.Conv2d(channels, residual_channels, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(residual_channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualStack(nn.Sequential):
    def __init__(self, channels: int, residual_channels: int, num_layers: int, normalization: str):
        layers = [ResidualLayer(channels, residual_channels, normalization) for _ in range(num_layers)]
        super().__init__(*layers, nn.ReLU())


class Encoder(nn.Module):
    """Strided 4x4 convolutions (each halves the size), a 3x3 convolution, a residual stack, a 1x1 to D channels."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        hidden = config.hidden_channels
        widths = [max(hidden // 2 ** (config.downsamples - 1 - step), 16) for step in range(config.downsamples)]
        layers: list[nn.Module] = []
        channels = config.in_channels
        for step, width in enumerate(widths):
            layers.append(nn.Conv2d(channels, width, 4, stride=2, padding=1))
            if step < len(widths) - 1:
                layers += [_norm(width, config.normalization), nn.ReLU()]
            channels = width
        layers += [
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            ResidualStack(hidden, config.residual_channels, config.num_residual_layers, config.normalization),
            nn.Conv2d(hidden, config.embedding_dim, 1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class Decoder(nn.Module):
    """The encoder's mirror: a 3x3 convolution, a residual stack, then 4x4 transposed convolutions back to pixels."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        hidden = config.hidden_channels
        widths = [max(hidden // 2 ** (step + 1), 16) for step in range(config.downsamples - 1)]
        layers: list[nn.Module] = [
            nn.Conv2d(config.embedding_dim, hidden, 3, padding=1),
            ResidualStack(hidden, config.residual_channels, config.num_residual_layers, config.normalization),
        ]
        channels = hidden
        for width in widths:
            layers += [nn.ConvTranspose2d(channels, width, 4, stride=2, padding=1),
                       _norm(width, config.normalization), nn.ReLU()]
            channels = width
        layers.append(nn.ConvTranspose2d(channels, config.in_channels, 4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.layers(latents)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation: forward(latents [B, D, H, W]) -> (quantized [B, D, H, W], indices [B, H, W], loss).

    With quantizer="ema" the codebook follows moving averages of the encoder outputs assigned to each code
    (Laplace-smoothed cluster sizes) and the loss is only beta * commitment; with "gradient" the loss is
    codebook loss + beta * commitment. Either way, codes whose moving-average use falls below
    dead_code_threshold are re-seeded from encoder outputs of the previous training step. Computes in float32.

    Options from the recent literature:
    - code_distance="cosine": latents and codes are l2-normalised before the search, and the moving averages run on
      unit vectors (ViT-VQGAN; Yu et al. 2022).
    - lookup_dim=d: the search runs in d dimensions: latents are projected from D to d, the codebook holds d-vectors,
      and the chosen code is projected back to D (factorised codes, same paper).
    - estimator="rotation": gradients reach the encoder through the rotation and rescaling that carries each latent
      onto its code, instead of a straight-through copy (Fifty et al. 2024).

    Under torch.distributed every process holds the same codebook: each training step makes exactly one
    collective call, an all-reduce of the code counts, the sums of the vectors assigned to each code and the first
    process's restart candidates, so every process applies the same update.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 0.25, quantizer: str = "ema",
                 ema_decay: float = 0.99, ema_epsilon: float = 1e-5, dead_code_threshold: float = 1.0,
                 code_distance: str = "euclidean", lookup_dim: int = 0, estimator: str = "straight_through"):
        super().__init__()
        for name, value, allowed in (("quantizer", quantizer, ("ema", "gradient")),
                                     ("code_distance", code_distance, ("euclidean", "cosine")),
                                     ("estimator", estimator, ("straight_through", "rotation"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.beta, self.use_ema = beta, quantizer == "ema"
        self.ema_decay, self.ema_epsilon = ema_decay, ema_epsilon
        self.dead_code_threshold = dead_code_threshold
        self.cosine, self.rotation = code_distance == "cosine", estimator == "rotation"
        self.code_dim = lookup_dim or embedding_dim
        if lookup_dim:
            self.project_in = nn.Linear(embedding_dim, lookup_dim)
            self.project_out = nn.Linear(lookup_dim, embedding_dim)
        initial = torch.empty(num_embeddings, self.code_dim).uniform_(-1 / num_embeddings, 1 / num_embeddings)
        self.embedding = nn.Parameter(initial, requires_grad=not self.use_ema)
        # Moving-average use of each code per step. Starting at zero makes every code "dead", so the codebook is
        # seeded from real encoder outputs (by initialise(), or by the restarts of the second training step).
        self.register_buffer("cluster_size", torch.zeros(num_embeddings))
        # Moving-average sum of the vectors assigned to each code: zero, like the counts, until a code is used.
        self.register_buffer("embedding_sum", torch.zeros(num_embeddings, self.code_dim))
        # Encoder outputs of the last training step (the same on every process), for codes that die.
        self.register_buffer("restart_candidates", initial.clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before restart candidates were kept: start from the codebook itself.
        state_dict.setdefault(prefix + "restart_candidates", state_dict.get(prefix + "embedding", self.embedding))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def codebook(self) -> torch.Tensor:
        """The code vectors [K, d] the search compares with (unit vectors with cosine codes)."""
        codebook = self.embedding.float()
        return F.normalize(codebook, dim=1) if self.cosine else codebook

    def to_code_space(self, flat: torch.Tensor) -> torch.Tensor:
        """Encoder outputs [N, D] as the search sees them: projected to lookup_dim, l2-normalised for cosine."""
        if self.code_dim != self.embedding_dim:
            flat = self.project_in(flat)
        return F.normalize(flat, dim=1) if self.cosine else flat

    def from_code_space(self, codes: torch.Tensor) -> torch.Tensor:
        return self.project_out(codes) if self.code_dim != self.embedding_dim else codes

    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of flat [N, d] (vectors in code space)."""
        codebook = self.codebook()
        squared_norms = codebook.pow(2).sum(1)[None, :]
        # |x|^2 is the same for every code, so argmin needs only |e|^2 - 2 x.e: one fused matrix product per chunk
        # of rows, so that the distance matrix stays small however many vectors come at once (a training batch is
        # one chunk).
        rows = max(1, DISTANCE_ELEMENTS // self.num_embeddings)
        return torch.cat([torch.addmm(squared_norms, chunk, codebook.t(), alpha=-2.0).argmin(dim=1)
                          for chunk in flat.split(rows)])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for indices [B, H, W] as a [B, D, H, W] tensor, channels-last in memory (as the
        convolutions around it prefer: no copy)."""
        return self.from_code_space(F.embedding(indices, self.codebook())).permute(0, 3, 1, 2)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=latents.device.type, enabled=False):
            batch, _, height, width = latents.shape
            flat = self.to_code_space(latents.float().permute(0, 2, 3, 1).reshape(-1, self.embedding_dim))
            if self.training:
                self._restart_dead_codes()
            indices = self.nearest_codes(flat.detach())
            if self.training:
                self._update(flat.detach(), indices)
            codes = F.embedding(indices, self.codebook())
            loss = self.beta * F.mse_loss(flat, codes.detach())
            if not self.use_ema:
                loss = loss + F.mse_loss(codes, flat.detach())
            passed = rotate_onto(flat, codes) if self.rotation else flat + (codes - flat).detach()
            quantized = self.from_code_space(passed).view(batch, height, width, self.embedding_dim)
        return quantized.permute(0, 3, 1, 2), indices.view(batch, height, width), loss

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """Code use, the EMA codebook and the restart candidates, from one all-reduce over all processes."""
        statistics = [count_codes(indices, self.num_embeddings)[:, None]]
        if self.use_ema:
            statistics.append(torch.zeros_like(self.embedding_sum).index_add_(0, indices, flat))
        if self.dead_code_threshold > 0:
            candidates = flat[torch.randint(0, flat.shape[0], (self.num_embeddings,), device=flat.device)]
            statistics.append(candidates if _is_first_process() else torch.zeros_like(candidates))
        packed = torch.cat(statistics, dim=1)
        if _distributed():
            torch.distributed.all_reduce(packed)
        counts = packed[:, 0]
        self.cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        if self.use_ema:
            self.embedding_sum.mul_(self.ema_decay).add_(packed[:, 1:1 + self.code_dim], alpha=1 - self.ema_decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.ema_epsilon) / (total + self.num_embeddings * self.ema_epsilon) * total
            # A code never assigned anything has no mean to move to: it keeps its vector (dividing its zero sum
            # would pull it to the origin, and a sum out of step with its count would blow it up).
            updated = self.embedding_sum / smoothed.unsqueeze(1)
            if self.cosine:  # the mean of unit vectors, back on the sphere
                updated = F.normalize(updated, dim=1)
            self.embedding.data.copy_(torch.where((self.cluster_size > 0)[:, None], updated, self.embedding.data))
        if self.dead_code_threshold > 0:
            self.restart_candidates.copy_(packed[:, -self.code_dim:])

    @torch.no_grad()
    def _restart_dead_codes(self) -> None:
        """Re-seed codes whose use fell below the threshold. Written without a host sync (no count of the dead)."""
        if self.dead_code_threshold <= 0:
            return
        dead = self.cluster_size < self.dead_code_threshold
        self.embedding.data.copy_(torch.where(dead[:, None], self.restart_candidates, self.embedding.data))
        # A restarted code starts at the threshold so it survives a few steps to win vectors of its own.
        threshold = torch.full_like(self.cluster_size, self.dead_code_threshold)
        self.embedding_sum.copy_(torch.where(dead[:, None], self.restart_candidates * self.dead_code_threshold,
                                             self.embedding_sum))
        self.cluster_size.copy_(torch.where(dead, threshold, self.cluster_size))

    @torch.no_grad()
    def initialise(self, vectors: torch.Tensor, kmeans_iterations: int = 0, steps: float = 1) -> None:
        """Seed the codebook from encoder outputs [N, D] of `steps` training steps (a fraction of a step when each
        process seeds from its own share of the first batches): K of them drawn at random, refined by k-means when
        kmeans_iterations > 0."""
        vectors = self.to_code_space(vectors.float())
        centres = vectors[_draw(len(vectors), self.num_embeddings, vectors.device)].clone()
        for _ in range(kmeans_iterations):
            self.embedding.data.copy_(centres)
            assignment = self.nearest_codes(vectors)
            counts = count_codes(assignment, self.num_embeddings)
            sums = torch.zeros_like(centres).index_add_(0, assignment, vectors)
            used = counts > 0
            centres[used] = sums[used] / counts[used, None]
            if self.cosine:  # spherical k-means
                centres = F.normalize(centres, dim=1)
        self.embedding.data.copy_(centres)
        # k-means knows each code's share of the data; a random draw does not, and counts every code as used at the
        # threshold, so that a code the encoder soon leaves behind is restarted within a step or two.
        use_per_step = count_codes(self.nearest_codes(vectors), self.num_embeddings) / steps if kmeans_iterations \
            else torch.zeros_like(self.cluster_size)
        self.cluster_size.copy_(use_per_step.clamp_min(self.dead_code_threshold))
        self.embedding_sum.copy_(centres * self.cluster_size[:, None])
        self.restart_candidates.copy_(vectors[_draw(len(vectors), self.num_embeddings, vectors.device)])


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(
            config.num_embeddings, config.embedding_dim, beta=config.beta, quantizer=config.quantizer,
            ema_decay=config.ema_decay, ema_epsilon=config.ema_epsilon, dead_code_threshold=config.dead_code_threshold,
            code_distance=config.code_distance, lookup_dim=config.lookup_dim, estimator=config.estimator)
        self.decoder = Decoder(config)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latents [B, D, H/s, W/s] (s = 2**downsamples)."""
        return self.encoder(images)

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.quantizer(latents)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized)

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Images from a map of code indices [B, h, w]."""
        return self.decode(self.quantizer.lookup(indices))

    def code_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.encode(images))[1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, code indices, vq loss)."""
        quantized, indices, vq_loss = self.quantize(self.encode(images))
        return self.decode(quantized), indices, vq_loss


# ----------------------------------------------------------------------------- the prior over code maps

@dataclass
class PriorConfig:
    num_embeddings: int = 512  # K of the VQ-VAE whose codes are modelled
    hidden_channels: int = 128
    num_layers: int = 12
    kernel_size: int = 3  # odd; the vertical stack sees kernel_size // 2 rows more per layer
    num_classes: int = 0  # > 0: condition on a class label
    output_channels: int = 256

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PriorConfig":
        unknown = set(values) - {field.name for field in fields(cls)}
        if unknown:
            raise ValueError(f"unknown prior settings: {sorted(unknown)}")
        return cls(**values)


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

    def __init__(self, channels: int, kernel_size: int, first: bool, num_classes: int):
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

    def _conditions(self, labels: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        if self.condition is None or labels is None:
            return 0.0, 0.0
        vertical, horizontal = self.condition(labels)[:, :, None, None].chunk(2, dim=1)
        return vertical, horizontal

    def vertical_step(self, x_vertical: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (vertical output, pre-gate vertical features that feed the horizontal stack)."""
        features = self.vertical(x_vertical)[:, :, : x_vertical.shape[2]]
        condition, _ = self._conditions(labels)
        return _gate(features + condition), features

    def horizontal_step(self, x_horizontal: torch.Tensor, vertical_features: torch.Tensor,
                        labels: torch.Tensor | None) -> torch.Tensor:
        features = self.horizontal(x_horizontal)[:, :, :, : x_horizontal.shape[3]]
        _, condition = self._conditions(labels)
        out = self.horizontal_out(_gate(features + self.vertical_to_horizontal(vertical_features) + condition))
        return out if self.first else out + x_horizontal  # residual (the first layer's input is the current code)


class GatedPixelCNN(nn.Module):
    """Autoregressive prior over code maps (van den Oord et al. 2016, gated PixelCNN with two stacks).

    forward(codes [B, H, W] long, labels [B] long or None) -> logits [B, K, H, W]; logits at (i, j) depend only on
    codes before (i, j) in raster order.
    """

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        channels = config.hidden_channels
        self.embedding = nn.Embedding(config.num_embeddings, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, config.kernel_size, index == 0, config.num_classes)
                                    for index in range(config.num_layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, config.output_channels, 1), nn.ReLU(),
                                  nn.Conv2d(config.output_channels, config.num_embeddings, 1))

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embedding(codes).permute(0, 3, 1, 2)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x_vertical = x_horizontal = self._embed(codes)
        for layer in self.layers:
            x_vertical, features = layer.vertical_step(x_vertical, labels)
            x_horizontal = layer.horizontal_step(x_horizontal, features, labels)
        return self.head(x_horizontal)

    def bits_per_code(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """-log2 p(codes | label) / (H W) of each code map [B, H, W]."""
        return bits_per_code(self(codes, labels), codes)

    def mixture_bits_per_code(self, codes: torch.Tensor, class_log_prior: Sequence[float]) -> torch.Tensor:
        """-log2 sum_c p(c) p(codes | c) / (H W): the likelihood of code maps that have no label under a
        class-conditional prior, with p(c) the classes' share of the training data (class_log_prior: natural logs,
        as plain numbers, so that nothing is read back from the GPU)."""
        positions = codes.shape[1] * codes.shape[2]
        log_joint = [log_share - math.log(2) * positions * self.bits_per_code(codes, torch.full_like(codes[:, 0, 0],
                                                                                                     label))
                     for label, log_share in enumerate(class_log_prior)]
        return -torch.logsumexp(torch.stack(log_joint, dim=1), dim=1) / (math.log(2) * positions)

    @torch.inference_mode()
    def sample(self, batch_size: int, shape: tuple[int, int], labels: torch.Tensor | None = None,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Code maps [B, H, W] drawn in raster order, all B at once, computing each layer's output once.

        Every layer keeps the rows (vertical stack) and columns (horizontal stack) it has already computed, so a
        new position costs one column of each layer, done with small matrix products: about one forward pass
        for the whole map.
        """
        height, width = shape
        device = self.embedding.weight.device
        codes = torch.zeros(batch_size, height, width, dtype=torch.long, device=device)
        channels = self.config.hidden_channels
        layers = [_SamplingLayer(layer, labels) for layer in self.layers]
        head = [module for module in self.head if isinstance(module, nn.Conv2d)]
        # vertical_inputs[l]: what layer l's vertical convolution reads, filled row by row
        vertical_inputs = [torch.zeros(batch_size, channels, height, width, device=device) for _ in layers]
        for i in range(height):
            to_horizontal = []  # per layer: row i's vertical contribution to the horizontal stack, as [W, B, 2C]
            for index, layer in enumerate(layers):
                features = layer.vertical_row(vertical_inputs[index], i)
                if index + 1 < len(layers):
                    vertical_inputs[index + 1][:, :, i: i + 1] = _gate(layer.add_vertical_condition(features))
                to_horizontal.append(layer.to_horizontal(features))
            # horizontal_inputs[l][j]: what layer l's horizontal stack reads at column j of row i, as [B, C]
            horizontal_inputs = torch.zeros(len(layers), width, batch_size, channels, device=device)
            for j in range(width):
                for index, layer in enumerate(layers):
                    out = layer.column(horizontal_inputs[index], j, to_horizontal[index][j])
                    if index + 1 < len(layers):
                        horizontal_inputs[index + 1, j] = out
                hidden = F.linear(F.relu(out), head[0].weight[:, :, 0, 0], head[0].bias)
                logits = F.linear(F.relu(hidden), head[1].weight[:, :, 0, 0], head[1].bias)
                chosen = draw_codes(logits, temperature, generator)
                codes[:, i, j] = chosen
                embedded = self.embedding(chosen)
                horizontal_inputs[0, j] = embedded
                vertical_inputs[0][:, :, i, j] = embedded
        return codes


def bits_per_code(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [B, K, H, W] against codes [B, H, W] in bits, one mean value per code map."""
    return F.cross_entropy(logits.float(), codes, reduction="none").mean(dim=(1, 2)) / math.log(2)


def draw_codes(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None,
               ) -> torch.Tensor:
    """One code per row of logits [B, K], drawn from softmax(logits / temperature) by inverting the cumulative
    distribution: one uniform number per row (torch.multinomial draws K per row: 4x slower on [64, 512] here)."""
    probabilities = torch.softmax(logits.float() / max(temperature, 1e-6), dim=1)
    cumulative = probabilities.cumsum(dim=1)
    uniform = torch.rand(len(logits), 1, device=logits.device, generator=generator) * cumulative[:, -1:]
    return (cumulative < uniform).sum(dim=1).clamp_max(logits.shape[1] - 1)


class _SamplingLayer:
    """One gated layer with its masks, biases and class condition folded in, computing one row of the vertical
    stack and then one column at a time of the horizontal stack while sampling."""

    def __init__(self, layer: GatedLayer, labels: torch.Tensor | None):
        self.half = layer.vertical.kernel_size[1] // 2
        self.vertical_weight, self.vertical_bias = layer.vertical.weight * layer.vertical.mask, layer.vertical.bias
        condition_vertical, condition_horizontal = layer._conditions(labels)
        self.vertical_condition = condition_vertical if torch.is_tensor(condition_vertical) else None
        # The horizontal convolution's bias joins the vertical-to-horizontal one, so a column adds neither.
        self.to_horizontal_weight = layer.vertical_to_horizontal.weight
        self.to_horizontal_bias = layer.vertical_to_horizontal.bias + layer.horizontal.bias
        self.horizontal_condition = condition_horizontal if torch.is_tensor(condition_horizontal) else None
        weight = layer.horizontal.weight * layer.horizontal.mask  # [2C, C, 1, taps]
        self.taps = [weight[:, :, 0, tap].t() for tap in range(weight.shape[-1])]
        self.out_weight, self.out_bias = layer.horizontal_out.weight[:, :, 0, 0].t(), layer.horizontal_out.bias
        self.first = layer.first

    def vertical_row(self, inputs: torch.Tensor, i: int) -> torch.Tensor:
        """Pre-gate vertical features [B, 2C, 1, W] of row i, from inputs [B, C, H, W] filled up to row i."""
        # Exactly the kernel's rows i - half .. i (zeros above the map), so only row i is computed.
        window = F.pad(inputs[:, :, max(0, i - self.half): i + 1], (0, 0, max(0, self.half - i), 0))
        return F.conv2d(window, self.vertical_weight, self.vertical_bias, padding=(0, self.half))

    def add_vertical_condition(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.vertical_condition is None else features + self.vertical_condition

    def to_horizontal(self, features: torch.Tensor) -> torch.Tensor:
        """The vertical stack's contribution [W, B, 2C] to each column of the horizontal stack in this row."""
        row = F.conv2d(features, self.to_horizontal_weight, self.to_horizontal_bias)
        if self.horizontal_condition is not None:
            row = row + self.horizontal_condition
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
