"""The VQ-VAE networks: Encoder, VectorQuantizer and Decoder, the one-level VQVAE and the two-level VQVAE2 that
join them, and the config dataclass that describes them. One definition serves 2D and 3D (spatial_dims); a one-level
2D model may take vit.py's transformer encoder and decoder instead of the convolutional ones (architecture)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import Config, UsageError, option
from vit import PIXEL_HEADS, ViTDecoder, ViTEncoder

ARCHITECTURES = ("conv", "vit")


@dataclass
class VQVAEConfig(Config):
    """Everything that makes a VQ-VAE; saved in every checkpoint. The fields with help are train.py's options."""

    in_channels: int = option(1, "1 = grayscale, 3 = RGB", flag="--channels", choices=(1, 3))
    hidden_channels: int = option(192, "channels of the encoder/decoder at the code resolution")
    residual_channels: int = option(96, "bottleneck channels inside each residual layer")
    num_residual_layers: int = option(2, "residual layers in the encoder and in the decoder",
                                      flag="--residual-layers")
    downsamples: int = option(2, "each halves height and width (2 = 4x smaller code map per side)")
    num_embeddings: int = option(512, "codebook size K")
    embedding_dim: int = option(64, "code vector length D")
    beta: float = option(0.25, "commitment loss weight")
    quantizer: str = option("ema", "codebook updated by moving averages, or trained by its gradient",
                            choices=("ema", "gradient"))
    ema_decay: float = option(0.99, "moving-average decay of the EMA codebook")
    ema_epsilon: float = 1e-5
    dead_code_threshold: float = option(1.0, "re-seed codes used less than this per step (moving average; a top "
                                        "level: this / 2^spatial-dims); 0 = never")
    normalization: str = option("none", "GroupNorm in the convolutional blocks, or none", choices=("none", "group"))
    code_distance: str = option("euclidean", "cosine: latents and codes l2-normalised before the nearest-code "
                                "search (ViT-VQGAN)", choices=("euclidean", "cosine"))
    lookup_dim: int = option(16, "search the codebook in this many dimensions, projected from D and back "
                             "(factorised codes); 0 = search in D")
    estimator: str = option("straight_through", "how gradients pass the quantizer: copied straight through, or by "
                            "the rotation trick", choices=("straight_through", "rotation"))
    levels: int = option(1, "2: VQ-VAE-2, a top code map one halving above the bottom one (at --downsamples); each "
                         "level has its own codebook of --num-embeddings codes", choices=(1, 2))
    top_image_weight: float = option(1.0, "two levels: weight of the top level's own loss, the MSE of the image "
                                     "mean-pooled to the bottom map's size, read from the top's decoded features by "
                                     "a 1x1; 0 = off")
    spatial_dims: int = option(2, "2: 2D slices (3D files are cut into slices); 3: whole 3D NIfTI volumes, brought "
                               "to RAS orientation and fitted in physical proportion (voxel spacing from the header)",
                               choices=(2, 3))
    architecture: str = option("conv", "the encoder and decoder: conv, strided convolutions and residual stacks; vit, "
                               "a vision transformer over patches of 2**downsamples pixels (ViT-VQGAN; 2D, one level)",
                               choices=ARCHITECTURES)
    vit_width: int = option(256, "vit: width of the tokens and of every block")
    vit_depth: int = option(4, "vit: transformer blocks in the encoder, and as many in the decoder")
    vit_heads: int = option(8, "vit: attention heads (--vit-width must divide by them)")
    vit_mlp_ratio: float = option(4.0, "vit: each block's MLP width, in multiples of --vit-width")
    vit_pixel_head: str = option("conv", "vit: the decoder's way from tokens to pixels: linear, each token to its own "
                                 "patch; conv, each token to 16 features a pixel, then two 3x3 convolutions across "
                                 "the patch borders (against seams)", choices=PIXEL_HEADS)

    LEGACY: ClassVar[dict] = {"code_distance": "euclidean", "lookup_dim": 0, "estimator": "straight_through",
                              "levels": 1, "spatial_dims": 2, "top_image_weight": 0.0, "architecture": "conv"}

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UsageError(f"--architecture {self.architecture}: one of {', '.join(ARCHITECTURES)}")
        if self.architecture != "vit":
            return
        if self.spatial_dims != 2:
            raise UsageError("--architecture vit models 2D slices: 3D volumes train with --architecture conv")
        if self.levels != 1:
            raise UsageError("--architecture vit has one level of codes: --levels 2 trains with --architecture conv")
        if self.vit_width % self.vit_heads or self.vit_width % 4:
            raise UsageError(f"--vit-width {self.vit_width} does not divide by --vit-heads {self.vit_heads} and by 4 "
                             "(the 2D positions' sines and cosines)")

    @property
    def scale(self) -> int:
        """How many pixels per side one code of the finest (bottom) level covers."""
        return 2**self.downsamples

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this: the coarsest level's code size."""
        return 2 ** (self.downsamples + self.levels - 1)

    @property
    def memory_format(self) -> torch.memory_format:
        """Channels-last layout of the model's inputs and weights: faster convolutions on CPU and GPU."""
        return torch.channels_last if self.spatial_dims == 2 else torch.channels_last_3d


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


def conv(spatial_dims: int, *args, transposed: bool = False, **kwargs) -> nn.Module:
    """A 2D or 3D convolution (MONAI's spatial_dims): one network definition serves images and volumes."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    kinds = {2: (nn.Conv2d, nn.ConvTranspose2d), 3: (nn.Conv3d, nn.ConvTranspose3d)}
    return kinds[spatial_dims][transposed](*args, **kwargs)


def channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """[B, C, *S] as [B, *S, C]."""
    return tensor.movedim(1, -1)


def channels_first(tensor: torch.Tensor) -> torch.Tensor:
    """[B, *S, C] as [B, C, *S], a view: channels-last in memory, as the convolutions around it prefer."""
    return tensor.movedim(-1, 1)


def _norm(channels: int, kind: str) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


class ResidualLayer(nn.Module):
    """x + 1x1(ReLU(3x3(ReLU(x))))."""

    def __init__(self, channels: int, residual_channels: int, normalization: str, spatial_dims: int = 2):
        super().__init__()
        self.block = nn.Sequential(
            _norm(channels, normalization), nn.ReLU(),
            conv(spatial_dims, channels, residual_channels, 3, padding=1, bias=False),
            nn.ReLU(),
            conv(spatial_dims, residual_channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualStack(nn.Sequential):
    def __init__(self, config: VQVAEConfig):
        channels = config.hidden_channels
        layers = [ResidualLayer(channels, config.residual_channels, config.normalization, config.spatial_dims)
                  for _ in range(config.num_residual_layers)]
        super().__init__(*layers, nn.ReLU())


class Encoder(nn.Module):
    """Strided 4x4 convolutions (each halves the size), a 3x3 convolution, a residual stack, a 1x1 to D channels.

    The config sets every size; in_channels, downsamples and out_channels may differ from it (VQ-VAE-2's parts).
    out_channels=0 leaves the 1x1 out: the residual stack's hidden features are the output."""

    def __init__(self, config: VQVAEConfig, in_channels: int | None = None, downsamples: int | None = None,
                 out_channels: int | None = None):
        super().__init__()
        hidden = config.hidden_channels
        downsamples = config.downsamples if downsamples is None else downsamples
        out_channels = config.embedding_dim if out_channels is None else out_channels
        widths = [max(hidden // 2 ** (downsamples - 1 - step), 16) for step in range(downsamples)]
        layers: list[nn.Module] = []
        channels = config.in_channels if in_channels is None else in_channels
        for step, width in enumerate(widths):
            layers.append(conv(config.spatial_dims, channels, width, 4, stride=2, padding=1))
            if step < len(widths) - 1:
                layers += [_norm(width, config.normalization), nn.ReLU()]
            channels = width
        layers += [
            nn.ReLU(),
            conv(config.spatial_dims, channels, hidden, 3, padding=1),
            ResidualStack(config),
        ]
        if out_channels:
            layers.append(conv(config.spatial_dims, hidden, out_channels, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class Decoder(nn.Module):
    """The encoder's mirror: a 3x3 convolution, a residual stack, then 4x4 transposed convolutions back to pixels
    (or, with other in_channels, upsamples and out_channels, to another level's features)."""

    def __init__(self, config: VQVAEConfig, in_channels: int | None = None, upsamples: int | None = None,
                 out_channels: int | None = None):
        super().__init__()
        hidden = config.hidden_channels
        upsamples = config.downsamples if upsamples is None else upsamples
        widths = [max(hidden // 2 ** (step + 1), 16) for step in range(upsamples - 1)]
        in_channels = config.embedding_dim if in_channels is None else in_channels
        layers: list[nn.Module] = [
            conv(config.spatial_dims, in_channels, hidden, 3, padding=1),
            ResidualStack(config),
        ]
        channels = hidden
        for width in widths:
            layers += [conv(config.spatial_dims, channels, width, 4, stride=2, padding=1, transposed=True),
                       _norm(width, config.normalization), nn.ReLU()]
            channels = width
        out_channels = config.in_channels if out_channels is None else out_channels
        layers.append(conv(config.spatial_dims, channels, out_channels, 4, stride=2, padding=1, transposed=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.layers(latents)


def make_encoder(config: VQVAEConfig) -> nn.Module:
    """A one-level model's encoder, images -> latents [B, D, *S / scale], of the config's architecture."""
    if config.architecture == "vit":
        return ViTEncoder(config.in_channels, config.scale, config.vit_width, config.vit_depth, config.vit_heads,
                          config.vit_mlp_ratio, config.embedding_dim)
    return Encoder(config)


def make_decoder(config: VQVAEConfig) -> nn.Module:
    """make_encoder's mirror, latents -> images."""
    if config.architecture == "vit":
        return ViTDecoder(config.embedding_dim, config.scale, config.vit_width, config.vit_depth, config.vit_heads,
                          config.vit_mlp_ratio, config.in_channels, config.vit_pixel_head)
    return Decoder(config)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation: forward(latents [B, D, *S]) -> (quantized [B, D, *S], indices [B, *S], loss), for
    any number of spatial dimensions S (an image's H, W or a volume's D, H, W).

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

    def output_vectors(self) -> torch.Tensor:
        """The D-dimensional vector [K, D] the decoder receives for each code."""
        return self.from_code_space(self.codebook())

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

    def nearest_vectors(self, latents: torch.Tensor) -> torch.Tensor:
        """The quantized [B, D, *S] of latents, with nothing updated and no loss (for seeding and inspection)."""
        flat = self.to_code_space(_rows(latents.float()))
        return self.lookup(self.nearest_codes(flat).view(latents.shape[0], *latents.shape[2:]))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for indices [B, *S] as a [B, D, *S] tensor, channels-last in memory (as the convolutions
        around it prefer: no copy)."""
        return channels_first(self.from_code_space(F.embedding(indices, self.codebook())))

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=latents.device.type, enabled=False):
            batch, _, *spatial = latents.shape
            flat = self.to_code_space(_rows(latents.float()))
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
            quantized = self.from_code_space(passed).view(batch, *spatial, self.embedding_dim)
        return channels_first(quantized), indices.view(batch, *spatial), loss

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


def make_quantizer(config: VQVAEConfig, positions_per_code: float = 1) -> VectorQuantizer:
    """The quantizer of one level; positions_per_code: how many positions of the finest map one of its codes
    covers, so that a code holding the same share of the data is restarted at the same rate on every level."""
    return VectorQuantizer(
        config.num_embeddings, config.embedding_dim, beta=config.beta, quantizer=config.quantizer,
        ema_decay=config.ema_decay, ema_epsilon=config.ema_epsilon,
        dead_code_threshold=config.dead_code_threshold / positions_per_code,
        code_distance=config.code_distance, lookup_dim=config.lookup_dim, estimator=config.estimator)


def _rows(latents: torch.Tensor) -> torch.Tensor:
    """[B, D, *S] latents as [B prod(S), D] vectors."""
    return channels_last(latents).reshape(-1, latents.shape[1])


class _CodeLevels(nn.Module):
    """What VQVAE and VQVAE2 share: decoding one code map per level through the level's quantizer."""

    def decode_code_maps(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images from every level's code indices, in the order of `levels`."""
        return self.decode_levels([quantizer.lookup(level) for quantizer, level in zip(self.quantizers, codes)])


class VQVAE(_CodeLevels):
    """One map of codes: encoder, quantizer, decoder.

    forward(images) -> (reconstruction, code indices [B, h, w], vq loss). The level-generic methods (levels,
    quantizers, code_maps, decode_code_maps) let the same jobs serve VQVAE2, whose codes come in two maps."""

    levels = ("codes",)

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = make_encoder(config)
        self.quantizer = make_quantizer(config)
        self.decoder = make_decoder(config)

    @property
    def quantizers(self) -> list[VectorQuantizer]:
        return [self.quantizer]

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

    def code_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The code indices of every level, in the order of `levels`."""
        return [self.code_map(images)]

    def latent_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The continuous encoder output [B, D, h, w] of every level, before quantization."""
        return [self.encode(images)]

    def decode_levels(self, quantized: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images from every level's quantized vectors, in the order of `levels`."""
        return self.decode(quantized[0])

    @torch.no_grad()
    def initialise_codebooks(self, batches: Sequence[torch.Tensor], kmeans_iterations: int = 0,
                             steps: float = 1) -> None:
        """Seed each codebook from its encoder outputs for these image batches (see VectorQuantizer.initialise)."""
        latents = torch.cat([_rows(self.encode(images)) for images in batches])
        self.quantizer.initialise(latents, kmeans_iterations, steps)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, code indices, vq loss)."""
        quantized, indices, vq_loss = self.quantize(self.encode(images))
        return self.decode(quantized), indices, vq_loss


class VQVAE2(_CodeLevels):
    """Two levels of codes (VQ-VAE-2, Razavi et al. 2019): a top map one halving coarser than the bottom one.

    The top is quantized first; the top's decoder turns its codes into features at the bottom's size, which join
    the bottom encoder's own before the bottom quantization, so the bottom codes hold what the top ones leave out.
    The final decoder sees both levels, the top upsampled to the bottom's size.
    forward(images) -> (reconstruction, (top indices, bottom indices), vq loss of both + the top's image loss)."""

    levels = ("top", "bottom")

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        hidden, dim = config.hidden_channels, config.embedding_dim
        self.bottom_encoder = Encoder(config, out_channels=0)  # images -> hidden features at 1/s
        self.top_encoder = Encoder(config, in_channels=hidden, downsamples=1)  # -> top latents at 1/2s
        # The top map has 2**spatial_dims times fewer positions per step than the bottom one: at the bottom's
        # restart threshold most top codes counted as dead and were re-seeded every step (at 8x and 16x on 64x64,
        # 256 top vectors a step for 512 codes), and the top codes the decoder had just learnt kept changing.
        self.top_quantizer = make_quantizer(config, positions_per_code=2**config.spatial_dims)
        self.top_decoder = Decoder(config, upsamples=1, out_channels=dim)  # top codes -> features at 1/s
        # The top's decoded features must also give the image, mean-pooled to the bottom map's size, through a 1x1:
        # without that pull the bottom codes, which see the whole image, carried it all and the top bits were lost.
        self.top_image_head = (conv(config.spatial_dims, dim, config.in_channels, 1)
                               if config.top_image_weight > 0 else None)
        self.bottom_projection = conv(config.spatial_dims, hidden + dim, dim, 1)
        self.bottom_quantizer = make_quantizer(config)
        self.upsample_top = conv(config.spatial_dims, dim, dim, 4, stride=2, padding=1, transposed=True)
        self.decoder = Decoder(config, in_channels=2 * dim)

    @property
    def quantizers(self) -> list[VectorQuantizer]:
        return [self.top_quantizer, self.bottom_quantizer]

    def _bottom_latents(self, features: torch.Tensor, top_features: torch.Tensor) -> torch.Tensor:
        return self.bottom_projection(torch.cat([features, top_features], dim=1))

    def _nearest_top_features(self, top_latents: torch.Tensor) -> torch.Tensor:
        """The top decoder's features from the codes nearest to top latents, leaving the codebook as it is."""
        return self.top_decoder(self.top_quantizer.nearest_vectors(top_latents))

    def _quantize_levels(self, images: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
        """Each level's (quantized, indices, loss), top first, and the top's decoded features."""
        features = self.bottom_encoder(images)
        top = self.top_quantizer(self.top_encoder(features))
        top_features = self.top_decoder(top[0])
        return [top, self.bottom_quantizer(self._bottom_latents(features, top_features))], top_features

    def top_image(self, top_quantized: torch.Tensor) -> torch.Tensor | None:
        """The image the top's own loss reads from its codes, at the bottom map's size (None when that loss is off)."""
        return None if self.top_image_head is None else self.top_image_head(self.top_decoder(top_quantized))

    def top_image_loss(self, top_features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """MSE between the top's image (its decoded features through a 1x1) and the mean-pooled input."""
        pool = F.avg_pool3d if self.config.spatial_dims == 3 else F.avg_pool2d
        return F.mse_loss(self.top_image_head(top_features).float(), pool(images.float(), self.config.scale))

    def decode_levels(self, quantized: Sequence[torch.Tensor]) -> torch.Tensor:
        top, bottom = quantized
        return self.decoder(torch.cat([self.upsample_top(top), bottom], dim=1))

    def decode_codes(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decode_code_maps(codes)

    def code_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [indices for _, indices, _ in self._quantize_levels(images)[0]]

    def latent_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each level's continuous latents before quantization (the bottom one's given the top's codes)."""
        features = self.bottom_encoder(images)
        top = self.top_encoder(features)
        return [top, self._bottom_latents(features, self._nearest_top_features(top))]

    def code_map(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.code_maps(images))

    @torch.no_grad()
    def initialise_codebooks(self, batches: Sequence[torch.Tensor], kmeans_iterations: int = 0,
                             steps: float = 1) -> None:
        """The top codebook first, then the bottom one from latents that already see the seeded top codes."""
        features = [self.bottom_encoder(images) for images in batches]
        top_latents = [self.top_encoder(feature) for feature in features]
        self.top_quantizer.initialise(torch.cat([_rows(latents) for latents in top_latents]), kmeans_iterations,
                                      steps)
        bottom = [self._bottom_latents(feature, self._nearest_top_features(latents))
                  for feature, latents in zip(features, top_latents)]
        self.bottom_quantizer.initialise(torch.cat([_rows(latents) for latents in bottom]), kmeans_iterations, steps)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        levels, top_features = self._quantize_levels(images)
        (top, top_indices, top_loss), (bottom, bottom_indices, bottom_loss) = levels
        loss = top_loss + bottom_loss
        if self.top_image_head is not None:
            loss = loss + self.config.top_image_weight * self.top_image_loss(top_features, images)
        return self.decode_levels([top, bottom]), (top_indices, bottom_indices), loss


def build_vqvae(config: VQVAEConfig) -> VQVAE | VQVAE2:
    """The model a config describes: one level of codes, or two."""
    if config.levels not in (1, 2):
        raise ValueError(f"levels must be 1 or 2, got {config.levels}")
    return VQVAE(config) if config.levels == 1 else VQVAE2(config)


def as_levels(codes: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A model's codes as a list with one map per level (a one-level VQVAE returns a bare tensor)."""
    return [codes] if torch.is_tensor(codes) else list(codes)


