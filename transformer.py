"""Transformer priors over code maps: a decoder-only transformer in raster order that samples with a key-value cache
(as the autoregressive transformer of Taming Transformers, Esser et al. 2021), and a bidirectional masked-token
transformer that fills a map in a few parallel steps (MaskGIT, Chang et al. 2022)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sampling import CodePrior, draw_codes, truncate_logits
from utils import Config, option


@dataclass
class TransformerConfig(Config):
    """A transformer over one level's code maps. The fields with help are train_prior.py's options; the others come
    from the codes it models (K, the map's shape, the classes, a coarser level's K)."""

    KIND: ClassVar[str] = "transformer"
    LEGACY: ClassVar[dict] = {"class_dropout": 0.0}  # configs saved before guidance: trained without it
    num_embeddings: int = 512  # K of the VQ-VAE whose codes are modelled
    rows: int = 16  # the code map's height and width: each position has a learned row and a column embedding
    columns: int = 16
    width: int = option(256, "transformer: width of the token embeddings and of every block")
    depth: int = option(8, "transformer: blocks (attention and MLP)")
    heads: int = option(8, "transformer: attention heads (--width must divide by them)")
    dropout: float = option(0.1, "transformer: dropout on the embeddings and the residual branches")
    class_dropout: float = option(0.1, "transformer: share of training maps shown without their class (the no-class "
                                  "token), so that sampling can be guided by the class (predict.py --guidance)")
    num_classes: int = 0  # > 0: the class's embedding starts the sequence and is added at every position
    condition_embeddings: int = 0  # > 0: also condition on a coarser code map (VQ-VAE-2's top codes) with this K

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} does not divide by {self.heads} heads")


@dataclass
class MaskedConfig(TransformerConfig):
    """The masked-token transformer: the same network, attending both ways."""

    KIND: ClassVar[str] = "masked"


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x)) (GELU, mlp_ratio x wide). The
    priors' and the ViT encoder's and decoder's (vit.py)."""

    def __init__(self, width: int, heads: int, dropout: float, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.attention_norm, self.mlp_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = round(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.residual_dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """q, k, v of x [B, N, C], each [B, heads, N, C / heads]."""
        batch, length, _ = x.shape
        return [part.view(batch, length, self.heads, -1).transpose(1, 2)
                for part in self.qkv(self.attention_norm(x)).chunk(3, dim=-1)]

    def _merge(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        attended = attended.transpose(1, 2).reshape(x.shape)
        x = x + self.residual_dropout(self.out(attended))
        return x + self.residual_dropout(self.mlp(self.mlp_norm(x)))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        q, k, v = self._split(x)
        # No dropout on the attention weights: on CPUs drawing that mask ([B, heads, N, N]) took a third of a step.
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self._merge(x, attended)

    def step(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], position: int) -> torch.Tensor:
        """One new position x [B, 1, C] attending to itself and every position before it, whose keys and values
        are in the cache ([B, heads, N, C / heads] each, filled up to `position`, which this call writes)."""
        q, k, v = self._split(x)
        keys, values = cache
        keys[:, :, position], values[:, :, position] = k[:, :, 0], v[:, :, 0]
        attended = F.scaled_dot_product_attention(q, keys[:, :, : position + 1], values[:, :, : position + 1])
        return self._merge(x, attended)


class _Transformer(nn.Module):
    """What both transformer priors share: token, class and 2D position embeddings, the coarser level's condition,
    the blocks and the head over the K codes."""

    def __init__(self, config: TransformerConfig, extra_tokens: int = 0):
        super().__init__()
        self.config = config
        width = config.width
        self.token = nn.Embedding(config.num_embeddings + extra_tokens, width)
        # One vector per class and one for "no class" (unlabelled maps, class dropout, the unguided half of guidance);
        # an unconditional prior has only the latter.
        self.no_class = config.num_classes
        self.start = nn.Embedding(config.num_classes + 1, width)
        self.row, self.column = nn.Embedding(config.rows, width), nn.Embedding(config.columns, width)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(width, config.heads, config.dropout) for _ in range(config.depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, config.num_embeddings)
        if config.condition_embeddings:  # the coarser map (known in full): embedded, mixed by 3x3s, upsampled
            self.condition_embedding = nn.Embedding(config.condition_embeddings, width)
            self.condition_network = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                                   nn.Conv2d(width, width, 3, padding=1))
        self.apply(initialise_weights)

    def positions(self, shape: Sequence[int]) -> torch.Tensor:
        """Each position's embedding [H W, C] in raster order: its row's plus its column's."""
        height, width = shape
        if height > self.config.rows or width > self.config.columns:
            raise ValueError(f"code maps of {height}x{width}; this prior was built for "
                             f"{self.config.rows}x{self.config.columns}")
        rows = self.row.weight[:height, None] + self.column.weight[None, :width]
        return rows.reshape(height * width, -1)

    def condition_features(self, condition: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor | float:
        """The coarser map's features at each position [B, H W, C] (0 without a condition)."""
        if condition is None or not self.config.condition_embeddings:
            return 0.0
        features = self.condition_network(self.condition_embedding(condition).permute(0, 3, 1, 2))
        return F.interpolate(features, size=tuple(shape), mode="nearest").flatten(2).transpose(1, 2)

    def class_vectors(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """The class embedding [B, C] of each map: no class for None or -1 (a map without a class folder), and for a
        random `class_dropout` share of them while training."""
        no_class = torch.full((batch,), self.no_class, dtype=torch.long, device=device)
        if labels is None:
            return self.start(no_class)
        labels = torch.where(labels < 0, no_class, labels)
        if self.training and self.config.class_dropout > 0:
            labels = torch.where(torch.rand(batch, device=device) < self.config.class_dropout, no_class, labels)
        return self.start(labels)

    def guided_labels(self, labels: torch.Tensor | None, guidance: float) -> torch.Tensor | None:
        """With classifier-free guidance (Ho and Salimans 2022), every map is drawn twice, with its class and without:
        the labels of that doubled batch."""
        if not guidance or labels is None or not self.config.num_classes or not self.config.class_dropout:
            return labels  # a prior trained without class dropout never learnt the class-free prediction
        return torch.cat([labels, torch.full_like(labels, self.no_class)])

    @staticmethod
    def guide(logits: torch.Tensor, guidance: float, batch: int) -> torch.Tensor:
        """Logits moved away from the no-class half of a doubled batch: cond + w (cond - uncond)."""
        if len(logits) == batch:
            return logits
        conditional, unconditional = logits[:batch], logits[batch:]
        return conditional + guidance * (conditional - unconditional)

    def logits(self, hidden: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Logits [B, K, H, W] from the blocks' output at each position [B, H W, C]."""
        return self.head(self.norm(hidden)).transpose(1, 2).reshape(len(hidden), -1, *shape)


def initialise_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class TransformerPrior(_Transformer, CodePrior):
    """Decoder-only transformer over a code map in raster order.

    forward(codes [B, H, W], labels [B] or None, condition [B, H/2, W/2] or None) -> logits [B, K, H, W]. The input
    at position i is the code before it (the class's start token at position 0) plus position i's row and column
    embeddings (and the condition's features there); causal attention lets logits at i see codes before i only.
    sample() keeps every block's keys and values, so each new code costs one position's pass."""

    def _inputs(self, codes: torch.Tensor, labels: torch.Tensor | None, condition: torch.Tensor | None,
                ) -> torch.Tensor:
        batch, shape = len(codes), codes.shape[1:]
        classes = self.class_vectors(labels, batch, codes.device)[:, None]
        sequence = torch.cat([classes, self.token(codes.flatten(1)[:, :-1])], dim=1) + classes
        return self.embedding_dropout(sequence + self.positions(shape) + self.condition_features(condition, shape))

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(codes, labels, condition), codes.shape[1:])

    def hidden_states(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                      condition: torch.Tensor | None = None, blocks: int | None = None) -> torch.Tensor:
        """The hidden states [B, H W, C] after the first `blocks` blocks (all by default), in raster order: position
        i has seen the codes before i (what iGPT's and ViT-VQGAN's linear probes read, averaged over positions)."""
        hidden = self._inputs(codes, labels, condition)
        for block in self.blocks[:blocks]:
            hidden = block(hidden, causal=True)
        return hidden

    @torch.inference_mode()
    def sample(self, batch_size: int, shape: tuple[int, int], labels: torch.Tensor | None = None,
               temperature: float = 1.0, generator: torch.Generator | None = None,
               condition: torch.Tensor | None = None, top_k: int = 0, top_p: float = 1.0,
               guidance: float = 0.0) -> torch.Tensor:
        """Code maps [B, H, W] drawn in raster order, with a key-value cache: about one forward pass per map (two
        with guidance > 0, which moves each draw away from the class-free prediction: cond + w (cond - uncond))."""
        return self._raster(batch_size, shape, labels, condition, guidance,
                            lambda _, logits: draw_codes(logits, temperature, generator, top_k, top_p))

    @torch.inference_mode()
    def restore(self, codes: torch.Tensor, threshold: float, labels: torch.Tensor | None = None,
                condition: torch.Tensor | None = None, generator: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Code maps [B, H, W] with every code the prior finds unlikely replaced, in raster order: a code whose
        probability, given the codes before it as restored so far, is below `threshold` is redrawn among the codes
        whose probability is not (the "healed" map of Pinaya et al. 2022 and Naval Marimont and Tarroni's latent
        spatial restoration). Returns the restored maps and bool [B, H, W]: which codes were replaced."""
        flat = codes.flatten(1)
        replaced = torch.zeros_like(flat, dtype=torch.bool)

        def keep_or_redraw(position: int, logits: torch.Tensor) -> torch.Tensor:
            probabilities = logits.float().softmax(dim=1)
            current = flat[:, position]
            unlikely = probabilities.gather(1, current[:, None])[:, 0] < threshold
            replaced[:, position] = unlikely
            # Most positions have nothing to redraw: skip the draw, on a CPU only (asking a GPU would make the CPU
            # wait for it at every position).
            if current.device.type == "cpu" and not bool(unlikely.any()):
                return current
            rare = (probabilities < threshold) & (probabilities < probabilities.amax(dim=1, keepdim=True))
            redrawn = draw_codes(logits.masked_fill(rare, -math.inf), 1.0, generator)
            return torch.where(unlikely, redrawn, current)

        restored = self._raster(len(codes), tuple(codes.shape[1:]), labels, condition, 0.0, keep_or_redraw)
        return restored, replaced.view_as(codes)

    def _raster(self, batch_size: int, shape: tuple[int, int], labels: torch.Tensor | None,
                condition: torch.Tensor | None, guidance: float, choose) -> torch.Tensor:
        """Code maps [B, H, W] chosen one position at a time in raster order, each new code costing one position's
        pass through the blocks (their keys and values are cached): choose(position, logits [B, K]) -> codes [B]."""
        device = self.token.weight.device
        labels = self.guided_labels(labels, guidance)
        rows = batch_size if labels is None else len(labels)
        if condition is not None and rows > batch_size:
            condition = torch.cat([condition, condition])
        length, heads = shape[0] * shape[1], self.config.heads
        positions, conditions = self.positions(shape), self.condition_features(condition, shape)
        cache_shape = (rows, heads, length, self.config.width // heads)
        caches = [(positions.new_empty(cache_shape), positions.new_empty(cache_shape)) for _ in self.blocks]
        codes = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        classes = self.class_vectors(labels, rows, device)
        hidden = classes
        for position in range(length):
            hidden = hidden + classes + positions[position]
            if torch.is_tensor(conditions):
                hidden = hidden + conditions[:, position]
            hidden = hidden[:, None]
            for block, cache in zip(self.blocks, caches):
                hidden = block.step(hidden, cache, position)
            logits = self.guide(self.head(self.norm(hidden[:, 0])), guidance, batch_size)
            codes[:, position] = choose(position, logits)
            hidden = self.token(codes[:, position].repeat(rows // batch_size))
        return codes.view(batch_size, *shape)


class MaskedPrior(_Transformer):
    """Bidirectional masked-token transformer (MaskGIT): forward(codes [B, H, W] where the mask token K stands for
    unknown codes, labels) -> logits [B, K, H, W] of every position given the known ones and the class.

    Trained to predict codes hidden at a cosine-scheduled ratio; samples by filling the map in `steps` parallel
    steps, each keeping the most confident new codes. It has no exact likelihood: its score is the cross-entropy of
    masked codes at fixed mask ratios (masked_bits)."""

    levels = ("codes",)
    score = "masked_bits_per_code"  # what picks its best checkpoint
    EVALUATION_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the mask ratios of its validation score

    def __init__(self, config: MaskedConfig):
        super().__init__(config, extra_tokens=1)  # the mask token
        self.mask_token = config.num_embeddings

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        batch, shape = len(codes), codes.shape[1:]
        classes = self.class_vectors(labels, batch, codes.device)[:, None]
        tokens = self.token(codes.flatten(1)) + self.positions(shape) + classes
        hidden = self.embedding_dropout(torch.cat([classes, tokens], dim=1))
        for block in self.blocks:
            hidden = block(hidden, causal=False)
        return self.logits(hidden[:, 1:], shape)

    def masked_bits(self, codes: torch.Tensor, labels: torch.Tensor | None, masked: torch.Tensor) -> torch.Tensor:
        """Mean bits of the masked codes of each map [B], given the others (masked: bool [B, H, W])."""
        logits = self(codes.masked_fill(masked, self.mask_token), labels)
        bits = F.cross_entropy(logits.float(), codes, reduction="none") / math.log(2)
        return (bits * masked).flatten(1).sum(1) / masked.flatten(1).sum(1).clamp_min(1)

    def loss(self, levels: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        """Bits per masked code, a ratio cos(pi/2 r) of each map hidden, r uniform in [0, 1) (MaskGIT's cosine)."""
        codes = levels[0]
        ratios = torch.cos(0.5 * math.pi * torch.rand(len(codes), device=codes.device))
        return self.masked_bits(codes, labels, random_mask(codes.shape, ratios)).mean()

    def evaluation_bits(self, codes: torch.Tensor, labels: torch.Tensor | None,
                        generator: torch.Generator) -> torch.Tensor:
        """masked_bits averaged over EVALUATION_RATIOS, the hidden positions drawn from `generator` [B]."""
        return torch.stack([self.masked_bits(codes, labels, random_mask(codes.shape, torch.full(
            (len(codes),), ratio, device=codes.device), generator)) for ratio in self.EVALUATION_RATIOS]).mean(0)

    @staticmethod
    def schedule(steps: int, length: int) -> list[int]:
        """Positions still masked after each of `steps` steps: length cos(pi/2 step/steps), always at least one
        fewer than before while any are left, and none after the last step."""
        counts, masked = [], length
        for step in range(1, steps + 1):
            masked = 0 if step == steps else max(0, min(int(length * math.cos(0.5 * math.pi * step / steps)),
                                                         masked - 1))
            counts.append(masked)
        return counts

    @torch.inference_mode()
    def sample(self, batch_size: int, shape: tuple[int, int], labels: torch.Tensor | None = None,
               temperature: float = 1.0, generator: torch.Generator | None = None, top_k: int = 0,
               top_p: float = 1.0, steps: int = 12, choice_temperature: float = 4.5,
               guidance: float = 0.0) -> torch.Tensor:
        """Maps [B, H, W] filled in `steps` steps: each draws a code for every masked position and keeps the most
        confident draws (their log-probability plus Gumbel noise that fades over the steps), re-masking the rest
        on the cosine schedule."""
        device = self.token.weight.device
        length = shape[0] * shape[1]
        codes = torch.full((batch_size, length), self.mask_token, dtype=torch.long, device=device)
        labels = self.guided_labels(labels, guidance)
        for step, still_masked in enumerate(self.schedule(steps, length), start=1):
            masked = codes == self.mask_token
            both = codes.repeat(1 if labels is None else len(labels) // batch_size, 1).view(-1, *shape)
            logits = self.guide(self(both, labels), guidance, batch_size).flatten(2).transpose(1, 2)
            logits = truncate_logits(logits.reshape(-1, logits.shape[-1]).float() / max(temperature, 1e-6),
                                     top_k, top_p)
            drawn = draw_codes(logits, 1.0, generator).view(batch_size, length)
            confidence = torch.log_softmax(logits, dim=-1).gather(1, drawn.view(-1, 1)).view(batch_size, length)
            uniform = torch.rand(batch_size, length, device=device, generator=generator).clamp(1e-10, 1 - 1e-10)
            confidence = confidence + choice_temperature * (1 - step / steps) * -torch.log(-torch.log(uniform))
            confidence = confidence.masked_fill(~masked, math.inf)  # known codes stay
            codes = torch.where(masked, drawn, codes)
            if still_masked:
                codes.scatter_(1, confidence.topk(still_masked, dim=1, largest=False).indices, self.mask_token)
        return codes.view(batch_size, *shape)

    def sample_levels(self, batch_size: int, shapes: Sequence[Sequence[int]], labels: torch.Tensor | None = None,
                      temperature: float = 1.0, generator: torch.Generator | None = None,
                      **drawing) -> list[torch.Tensor]:
        return [self.sample(batch_size, tuple(shapes[0]), labels, temperature, generator, **drawing)]


def random_mask(shape: Sequence[int], ratios: torch.Tensor, generator: torch.Generator | None = None,
                ) -> torch.Tensor:
    """bool [B, H, W]: ceil(ratio H W) positions of each map chosen at random (at least one)."""
    batch, length = shape[0], math.prod(shape[1:])
    scores = torch.rand(batch, length, device=ratios.device, generator=generator)
    counts = (ratios * length).ceil().clamp(1, length).long()
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < counts[:, None]).view(*shape)
