"""How good a model is: SSIM, PSNR and MAE of reconstructions, codebook use, a prior's bits per code, and the
Frechet distance of two sets of features; evaluating a VQ-VAE or a prior over a whole split."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from modules import VQVAE, VQVAE2, as_levels, count_codes
from sampling import mixture_level_bits, unstack_levels
from utils import all_reduce_sum, autocast, progress_bar


SSIM_WINDOW = 7  # skimage.metrics.structural_similarity defaults: 7x7 uniform window, sample covariance
SSIM_K1, SSIM_K2 = 0.01, 0.03


def ssim_per_image(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of each image in a [B, C, H, W] batch (or volume in a [B, C, D, H, W] one), as skimage computes it
    (channels averaged; volumes with a 7x7x7 window, as skimage on 3D arrays).

    A valid (unpadded) 7x7 box filter equals skimage's reflect-padded filter followed by its border crop,
    so the mean over the valid region is exactly skimage's mean SSIM.
    """
    x, y = images.float(), references.float()
    spatial = x.shape[2:]
    if min(spatial) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs sides of at least {SSIM_WINDOW}, got {tuple(spatial)}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    count = SSIM_WINDOW ** len(spatial)
    covariance_norm = count / (count - 1)
    pool = F.avg_pool3d if len(spatial) == 3 else F.avg_pool2d

    def box(t: torch.Tensor) -> torch.Tensor:
        return pool(t, SSIM_WINDOW, stride=1)

    mean_x, mean_y = box(x), box(y)
    var_x = covariance_norm * (box(x * x) - mean_x * mean_x)
    var_y = covariance_norm * (box(y * y) - mean_y * mean_y)
    cov_xy = covariance_norm * (box(x * y) - mean_x * mean_y)
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=1)


def psnr_per_image(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    mse = (images.float() - references.float()).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return 10 * torch.log10(data_range**2 / mse)


def mae_per_image(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each image (or volume) in a batch (in the [0, 1] intensity scale)."""
    return (images.float() - references.float()).abs().flatten(1).mean(dim=1)


def seam_jumps(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Sums and counts of the absolute differences between neighbouring pixels (or voxels), those that straddle the
    border of two p-sided patches apart from those inside one: [across sum, across count, inside sum, inside
    count], along every spatial axis."""
    totals = torch.zeros(4, device=images.device)
    for dim in range(2, images.ndim):
        jumps = images.float().diff(dim=dim).abs().movedim(dim, -1)  # jump i lies between pixels i and i + 1
        # a 0/1 weight rather than a boolean index, which would wait for the GPU to count the chosen entries
        across = (torch.arange(jumps.shape[-1], device=jumps.device) % patch == patch - 1).float()
        across_sum, positions = (jumps * across).sum(), jumps.numel() // max(jumps.shape[-1], 1)
        totals += torch.stack([across_sum, across.sum() * positions, jumps.sum() - across_sum,
                               (jumps.shape[-1] - across.sum()) * positions])
    return totals


def seam_ratio(jumps: torch.Tensor) -> float:
    """From seam_jumps: how much larger the mean jump across patch borders is than inside patches. About 1 for
    images without seams (their jumps do not care where the grid falls), above 1 where each patch was made on its
    own (a ViT decoder's linear pixel head)."""
    across, inside = jumps[0] / jumps[1].clamp_min(1), jumps[2] / jumps[3].clamp_min(1)
    return float(across / inside.clamp_min(1e-12))


def codebook_usage(code_counts: torch.Tensor) -> float:
    """Fraction of the codebook used at least once in the counted codes."""
    return (code_counts > 0).float().mean().item()


def perplexity(code_counts: torch.Tensor) -> float:
    """exp(entropy) of the code distribution: the effective number of codes in use."""
    total = code_counts.sum()
    if total == 0:
        return 0.0
    probabilities = code_counts.double() / total
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-30))).sum()
    return entropy.exp().item()


@torch.no_grad()
def evaluate_vqvae(model: VQVAE | VQVAE2, loader, description: str = "validate", ssim_weight: float = 0.0,
                   precision: str = "fp32") -> dict:
    """Loss (the training objective), SSIM, PSNR, MAE and code use of each level over a whole split, summed over
    all processes (see code_use for the keys of code use).

    Nothing is read back to the host until the end (a process whose share of the split is empty adds zeros)."""
    model.eval()
    device = loader.device
    sums = torch.zeros(4, device=device)  # loss, ssim, psnr, mae
    seams = torch.zeros(2, 4, device=device)  # seam_jumps of the reconstructions and of the images
    count, ssims = 0, []
    code_counts = torch.zeros(len(model.levels), model.config.num_embeddings, device=device)
    for images, _ in progress_bar(loader, desc=description, unit="batch"):
        with autocast(device, precision):
            reconstruction, codes, vq_loss = model(images)
        reconstruction = reconstruction.float().clamp(0, 1)
        ssim = ssim_per_image(reconstruction, images)
        loss = F.mse_loss(reconstruction, images, reduction="none").flatten(1).mean(dim=1) + ssim_weight * (1 - ssim)
        sums += torch.stack([(loss + vq_loss).sum(), ssim.sum(), psnr_per_image(reconstruction, images).sum(),
                             mae_per_image(reconstruction, images).sum()])
        seams += torch.stack([seam_jumps(reconstruction, model.config.scale), seam_jumps(images, model.config.scale)])
        count += len(images)
        ssims.append(ssim)
        code_counts += level_code_counts(codes, model.config.num_embeddings)
    totals = all_reduce_sum(torch.cat([sums, torch.tensor([float(count)], device=device), seams.flatten(),
                                       code_counts.flatten()]))
    loss, ssim_sum, psnr, mae, total = totals[:5].tolist()
    seams, code_counts = totals[5:13].view(2, 4), totals[13:].view_as(code_counts)
    total = max(total, 1.0)
    # seams: the reconstructions' ratio over the images' own, so 1 means no more seams than the data has
    return {"loss": loss / total, "ssim": ssim_sum / total, "psnr": psnr / total, "mae": mae / total,
            "seam_ratio": seam_ratio(seams[0]) / max(seam_ratio(seams[1]), 1e-12),
            "ssim_per_image": torch.cat(ssims).cpu() if ssims else torch.zeros(0),
            **code_use(code_counts, model.levels), "code_counts": code_counts.cpu()}


def level_code_counts(codes: torch.Tensor | Sequence[torch.Tensor], num_codes: int) -> torch.Tensor:
    """How often each code occurs, per level [L, K], from a model's codes (one map or one per level)."""
    return torch.stack([count_codes(level, num_codes) for level in as_levels(codes)])


def level_suffixes(levels: Sequence[str]) -> list[str]:
    """Metric-name suffixes per level: none for one level (names as they always were), _top and _bottom for two."""
    return [""] if len(levels) == 1 else [f"_{name}" for name in levels]


def level_names(levels: Sequence[str]) -> list[tuple[str, str]]:
    """(metric-name suffix, label for printing) per level: ("", "") for one level, ("_top", "top ") and so on."""
    return [(suffix, f"{suffix[1:]} " if suffix else "") for suffix in level_suffixes(levels)]


def format_level_bits(report: dict, levels: Sequence[str]) -> str:
    """"; top 3.292; bottom 5.542" from a prior_report of several levels, "" for one."""
    return "".join(f"; {level} {report[f'bits_per_code_{level}']:.3f}" for level in levels
                   if f"bits_per_code_{level}" in report)


def code_use(code_counts: torch.Tensor, levels: Sequence[str]) -> dict:
    """perplexity and codebook_usage of each level, from counts [L, K] (suffixed per level: level_suffixes)."""
    use = {}
    for suffix, counts in zip(level_suffixes(levels), code_counts):
        use[f"perplexity{suffix}"] = perplexity(counts)
        use[f"codebook_usage{suffix}"] = codebook_usage(counts)
    return use


def class_log_prior(class_counts: Sequence[int]) -> list[float]:
    """log p(class) from the classes' training counts."""
    total = sum(max(count, 1) for count in class_counts)
    return [math.log(max(count, 1) / total) for count in class_counts]


def level_positions(stacked: torch.Tensor, levels: int) -> list[int]:
    """Codes per map of each level, from a batch (possibly empty) of stacked code maps."""
    return [maps.shape[-2] * maps.shape[-1] for maps in unstack_levels(stacked, levels)]


def prior_report(bits_per_level: Sequence[float], positions: Sequence[int], maps: float,
                 names: Sequence[str]) -> dict:
    """NLL in bits per code (over all levels, and per level when there are several) and in bits per image."""
    report = {"bits_per_code": sum(bits_per_level) / max(maps * sum(positions), 1.0),
              "bits_per_image": sum(bits_per_level) / max(maps, 1.0)}
    if len(names) > 1:
        report.update({f"bits_per_code_{name}": bits / max(maps * count, 1.0)
                       for name, bits, count in zip(names, bits_per_level, positions)})
    return report


@torch.no_grad()
def evaluate_prior(prior: torch.nn.Module, loader, log_prior: Sequence[float] | None = None,
                   unlabelled=None, precision: str = "fp32") -> dict:
    """A split's negative log-likelihood under a prior, over all processes (see prior_report for the keys); for a
    masked-token prior, which has none, its masked-code cross-entropy (evaluate_masked_prior).

    Batches hold stacked code maps (stack_levels). For a class-conditional prior (log_prior = log p(class) given)
    the maps of `loader` are scored under their label, and those of `unlabelled` (maps with no class folder) under
    the class mixture (mixture_level_bits)."""
    if hasattr(prior, "evaluation_bits"):
        return evaluate_masked_prior(prior, loader, log_prior, unlabelled, precision)
    prior.eval()
    device, names = loader.device, prior.levels
    totals, count = torch.zeros(len(names), device=device), 0
    for source, mixture in ((loader, False), (unlabelled, True)):
        for stacked, labels in progress_bar(source or [], desc="prior NLL", unit="batch"):
            maps = unstack_levels(stacked, len(names))
            with autocast(device, precision):
                if mixture:
                    bits = mixture_level_bits([prior.level_bits(maps, torch.full_like(labels, label))
                                               for label in range(len(log_prior))], log_prior)
                else:
                    bits = prior.level_bits(maps, None if log_prior is None else labels)
            totals += torch.stack([level.sum() for level in bits])
            count += len(labels)
    summed = all_reduce_sum(torch.cat([totals, torch.tensor([float(count)], device=device)])).tolist()
    return prior_report(summed[:-1], level_positions(loader.data, len(names)), summed[-1], names)




@torch.no_grad()
def evaluate_masked_prior(prior: torch.nn.Module, loader, log_prior: Sequence[float] | None = None,
                          unlabelled=None, precision: str = "fp32") -> dict:
    """A masked-token prior's score over a split: the bits of masked codes given the rest, at the prior's fixed mask
    ratios, with masks drawn from a fixed seed (the same every epoch, so scores compare). Maps without a class
    folder are scored under the "no class" token. Key: masked_bits_per_code."""
    prior.eval()
    device = loader.device
    generator = torch.Generator(device=device).manual_seed(0)
    total, count = torch.zeros((), device=device), 0
    for source in (loader, unlabelled):
        for codes, labels in progress_bar(source or [], desc="prior masked bits", unit="batch"):
            with autocast(device, precision):
                bits = prior.evaluation_bits(codes, None if log_prior is None else labels, generator)
            total += bits.sum()
            count += len(labels)
    summed, maps = all_reduce_sum(torch.stack([total, total.new_tensor(float(count))])).tolist()
    return {"masked_bits_per_code": summed / max(maps, 1.0)}


# ----------------------------------------------------------------------------- samples

def frechet_distance(features: torch.Tensor, references: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two sets of feature vectors [N, D] (FID's formula:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))), in float64, the matrix square root by eigenvalues."""
    a, b = features.double(), references.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.t()), torch.cov(b.t())
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.t()
    # tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), whose matrix is symmetric: eigenvalues suffice
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def mean_pairwise_ssim(images: torch.Tensor, pairs: int = 2000, seed: int = 0) -> float:
    """Mean SSIM between `pairs` random pairs of different images of a set [N, C, H, W]: lower is more varied."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(images), (pairs,), generator=generator)
    second = (first + torch.randint(1, len(images), (pairs,), generator=generator)) % len(images)
    return float(torch.cat([ssim_per_image(images[first[start:start + 256]], images[second[start:start + 256]])
                            for start in range(0, pairs, 256)]).mean())


def nearest_ssim(queries: torch.Tensor, references: torch.Tensor, candidates: int = 32,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image, the highest SSIM it reaches with any reference image [M, C, H, W] (a training set) and
    that reference's index, searched among its `candidates` nearest references in pixel distance (a copy is near in
    both)."""
    flat_references = references.flatten(1).float()
    best, index = [], []
    for start in range(0, len(queries), 64):
        batch = queries[start:start + 64].float()
        nearest = torch.cdist(batch.flatten(1), flat_references).topk(min(candidates, len(references)), dim=1,
                                                                       largest=False).indices
        repeated = batch.repeat_interleave(nearest.shape[1], dim=0)
        ssim = ssim_per_image(repeated, references[nearest.flatten()].float()).view(len(batch), -1)
        values, position = ssim.max(dim=1)
        best.append(values)
        index.append(nearest.gather(1, position[:, None])[:, 0])
    return torch.cat(best), torch.cat(index)


# ----------------------------------------------------------------------------- detection

def _ranked_counts(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """True and false positives [T] at each distinct score taken as the threshold, highest first (tied scores are
    decided together), and the numbers of positives and negatives."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    order = scores.argsort(descending=True)
    scores, labels = scores[order], labels[order]
    true_positives, false_positives = labels.cumsum(0), (~labels).cumsum(0)
    last_of_tie = torch.cat([scores[1:] != scores[:-1], scores.new_ones(1, dtype=torch.bool)])
    positives = int(labels.sum())
    return true_positives[last_of_tie].double(), false_positives[last_of_tie].double(), positives, len(labels) - positives


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a positive scores above a negative (ties count half)."""
    true_positives, false_positives, positives, negatives = _ranked_counts(scores, labels)
    if not positives or not negatives:
        return float("nan")
    tpr = torch.cat([true_positives.new_zeros(1), true_positives / positives])
    fpr = torch.cat([false_positives.new_zeros(1), false_positives / negatives])
    return float(torch.trapezoid(tpr, fpr))


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the precision-recall curve as average precision: sum over thresholds of (recall gained) x
    precision (scikit-learn's definition; no interpolation)."""
    true_positives, false_positives, positives, _ = _ranked_counts(scores, labels)
    if not positives:
        return float("nan")
    precision = true_positives / (true_positives + false_positives)
    recall_gained = torch.diff(true_positives, prepend=true_positives.new_zeros(1)) / positives
    return float((recall_gained * precision).sum())


def best_dice(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The highest Dice of (scores >= t) with the labels over every threshold t, counted over all pixels at once
    (Baur et al.'s best possible Dice), and that threshold."""
    true_positives, false_positives, positives, _ = _ranked_counts(scores, labels)
    dice = 2 * true_positives / (true_positives + false_positives + positives)
    best = int(dice.argmax())
    thresholds = scores.flatten().double().sort(descending=True).values
    ends = (true_positives + false_positives).long() - 1
    return float(dice[best]), float(thresholds[ends[best]])


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The mean over classes of each class's recall (classes absent from `labels` left out)."""
    recalls = [(predictions[labels == label] == label).float().mean().item() for label in range(num_classes)
               if bool((labels == label).any())]
    return sum(recalls) / len(recalls)


def classification_scores(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and balanced accuracy of predicted classes."""
    return {"accuracy": (predictions == labels).float().mean().item(),
            "balanced_accuracy": balanced_accuracy(predictions, labels, num_classes)}
