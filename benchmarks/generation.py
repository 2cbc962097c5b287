"""How good each prior's samples are, at equal training time on the codes of one VQ-VAE.

    python benchmarks/generation.py --data DIR                      # trains the CPU recipe's VQ-VAE first (180 s)
    python benchmarks/generation.py --data DIR --vqvae checkpoints/<run>.pth --budget 300 --priors transformer

Every prior is trained by the same loop (training.prior_epoch, Adam, the default learning rate and batch) for
--budget seconds on the same cached codes, its best epoch kept by its validation score, as train_prior.py does.
Then it draws --count class-conditional samples (classes in turn), --batch at a time, and the benchmark reports:

- validation NLL in bits per code and per image (the masked prior has none: its masked-code score instead);
- seconds to draw the samples;
- FID in the feature space of a judge, a small CNN the benchmark trains itself (no downloaded weights) on a fixed 80%
  of the training split, against the validation split, every set at the same size (the smallest of the sets);
- how often the judge names the class asked for;
- diversity: mean SSIM of random pairs of samples (beside that of real slices: lower is more varied);
- memorisation: the share of samples whose nearest training slice by SSIM is above 0.9 (beside the validation
  slices' own share).
Floors on the same scale: the judge's held-back 20% of the training split, and the VQ-VAE's reconstructions of the
validation split. Peer: MONAI's DecoderOnlyTransformer at the transformer's size (`pip install monai`; sampled as
MONAI's inferer does, one full forward pass per code).

Writes <out>/generation.json, <out>/<first prior>_samples_with_nearest.png (its samples beside their nearest
training slices) and one line per prior: prior=<name> nll=<bits per code> fid=<x> agreement=<x> seconds=<s>
"""
from __future__ import annotations

import argparse
import copy
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import checkpoints  # noqa: E402
import figures  # noqa: E402
import metrics  # noqa: E402
import training  # noqa: E402
from training import CPU_TRANSFORMER, CPU_VQVAE_FLAGS  # noqa: E402
import utils  # noqa: E402
from codes import code_loader, encode_split, prior_evaluation_loaders  # noqa: E402
from dataset import SliceSet, load_split  # noqa: E402
from pixelcnn import PixelCNNConfig  # noqa: E402
from priors import PRIOR_KINDS, build_prior, sampling_options  # noqa: E402
from readers import Preprocessing  # noqa: E402
from sampling import CodePrior, PriorObjective, draw_codes, stack_levels  # noqa: E402
from transformer import TransformerConfig  # noqa: E402

PRIORS = {  # name -> (kind, config values besides the data's)
    "transformer": ("transformer", CPU_TRANSFORMER),
    "masked": ("masked", CPU_TRANSFORMER),
    "pixelcnn-64x8": ("pixelcnn", {"hidden_channels": 64, "num_layers": 8}),
    "pixelcnn-128x12": ("pixelcnn", {}),
    "monai": ("monai", CPU_TRANSFORMER),  # MONAI's DecoderOnlyTransformer at the transformer's size
}
MEMORISED = 0.9  # nearest-training-slice SSIM above which a sample counts as a copy


# ----------------------------------------------------------------------------- the judge

class Judge(nn.Module):
    """A small CNN classifier whose penultimate features [B, 256] are the space FID is measured in."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        layers, width = [], channels
        for out in (32, 64, 128, 256):
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            width = out
        self.features_net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classify = nn.Linear(width, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_net(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))


def kept_model(path: Path, train, build) -> torch.nn.Module:
    """A model saved in an earlier run of the benchmark (its weights only), or trained now and saved."""
    if path.exists():
        model = build()
        model.load_state_dict(torch.load(path, weights_only=True)["model"])
        return model.eval()
    model = train()
    utils.atomic_write(path, lambda tmp: torch.save({"model": model.state_dict()}, tmp))
    return model


def judge_split(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed 80% / 20% split of the training slices (by a seeded permutation)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * count)
    return order[:cut], order[cut:]


def train_judge(images: torch.Tensor, labels: torch.Tensor, classes: int, epochs: int, seed: int) -> Judge:
    torch.manual_seed(seed)
    judge = Judge(images.shape[1], classes)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(images) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in utils.progress_bar(range(epochs), desc="judge", unit="epoch"):
        judge.train()
        for batch in torch.randperm(len(images), generator=generator).split(64):
            loss = F.cross_entropy(judge(augmented(images[batch].float() / 255, generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return judge.eval()


def augmented(images: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Left-right flips and shifts of up to `shift` pixels: without them the judge learns its 4,000 slices by heart
    (57% on the held-back fifth after 8 plain epochs) and its features tell little apart."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    rows, columns = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
    return torch.roll(images, (rows, columns), dims=(-2, -1))


@torch.no_grad()
def judged(judge: Judge, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, predicted classes) of float images in [0, 1]."""
    features = torch.cat([judge.features(batch) for batch in images.float().split(256)])
    return features, judge.classify(features).argmax(1)


# ----------------------------------------------------------------------------- MONAI's transformer, as a peer

class MonaiPrior(CodePrior):
    """monai.networks.nets.DecoderOnlyTransformer over code maps in raster order, the class as the first token (a
    vocabulary of K codes and one start token per class), sampled as MONAI's VQVAETransformerInferer does: one full
    forward pass per code, no key-value cache."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        from monai.networks.nets import DecoderOnlyTransformer

        self.config = config
        self.network = DecoderOnlyTransformer(
            num_tokens=config.num_embeddings + max(1, config.num_classes), max_seq_len=config.rows * config.columns,
            attn_layers_dim=config.width, attn_layers_depth=config.depth, attn_layers_heads=config.heads,
            embedding_dropout_rate=config.dropout, use_flash_attention=True)

    def _start(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        labels = torch.zeros(batch, dtype=torch.long, device=device) if labels is None else labels
        return (self.config.num_embeddings + labels)[:, None]

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None, condition=None) -> torch.Tensor:
        flat = codes.flatten(1)
        sequence = torch.cat([self._start(labels, len(codes), codes.device), flat[:, :-1]], dim=1)
        logits = self.network(sequence)[..., : self.config.num_embeddings]
        return logits.transpose(1, 2).reshape(len(codes), -1, *codes.shape[1:])

    @torch.inference_mode()
    def sample(self, batch_size: int, shape, labels=None, temperature: float = 1.0, generator=None, condition=None,
               top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
        device = self.network.to_logits.weight.device
        sequence = self._start(labels, batch_size, device)
        for _ in range(shape[0] * shape[1]):
            logits = self.network(sequence)[:, -1, : self.config.num_embeddings]
            sequence = torch.cat([sequence, draw_codes(logits, temperature, generator, top_k, top_p)[:, None]], 1)
        return sequence[:, 1:].reshape(batch_size, *shape)


# ----------------------------------------------------------------------------- training and sampling a prior

@dataclass
class CodeSplits:
    train: SliceSet
    validate: SliceSet
    codes: dict[str, torch.Tensor]
    shapes: list[list[int]]
    num_embeddings: int


def prior_values(flags: list[str]) -> dict[str, dict]:
    """--prior-flags as {prior name: {field: value}} (numbers as numbers)."""
    values: dict[str, dict] = {}
    for flag in flags:
        name, _, setting = flag.partition(":")
        field, _, value = setting.partition("=")
        if name not in PRIORS or not field or not value:
            raise utils.UsageError(f"--prior-flags {flag}: expected NAME:FIELD=VALUE, NAME one of {', '.join(PRIORS)}")
        values.setdefault(name, {})[field] = float(value) if "." in value or "e" in value else int(value)
    return values


def build(name: str, data: CodeSplits, classes: int, overrides: dict | None = None) -> torch.nn.Module:
    kind, values = PRIORS[name]
    values = {**values, **(overrides or {})}
    configs = []
    for level, (rows, columns) in enumerate(data.shapes):
        common = {"num_embeddings": data.num_embeddings, "num_classes": classes,
                  "condition_embeddings": data.num_embeddings if level else 0, **values}
        if kind == "pixelcnn":
            configs.append(PixelCNNConfig(**common))
        else:
            configs.append((TransformerConfig if kind == "monai" else PRIOR_KINDS[kind][0])(rows=rows, columns=columns,
                                                                                           **common))
    if kind == "monai":
        if len(configs) > 1:
            raise utils.UsageError("the MONAI peer is measured on one-level codes")
        return MonaiPrior(configs[0])
    return build_prior(configs)


def train_for(prior: torch.nn.Module, data: CodeSplits, seconds: float, log_prior, device: torch.device,
              seed: int, lr: float = 1e-3) -> tuple[dict, int]:
    """Train as train_prior.py does (batch 16, Adam, 100 warm-up steps, constant rate) for `seconds`; the prior
    ends with its best epoch's weights. Returns that epoch's validation report and the steps made."""
    args = argparse.Namespace(time_limit=seconds, max_steps=0, lr=lr, lr_schedule="constant", warmup_steps=100)
    torch.manual_seed(seed)
    train_loader = code_loader(data.codes["train"], data.train.labels, 16, True, device, seed)
    val_loader, _ = prior_evaluation_loaders(data.codes["validate"], data.validate.labels, 32, device, True)
    optimizer = torch.optim.Adam(prior.parameters(), lr=args.lr)
    clock = training.TrainingClock(args, 10**9, device=device)
    objective, levels, score = PriorObjective(prior), len(data.shapes), getattr(prior, "score", "bits_per_code")
    best, best_state, epoch = {score: math.inf}, None, 0
    while not clock.out_of_time:
        epoch += 1
        training.prior_epoch(epoch, train_loader, objective, optimizer, clock, levels, True,
                             training.PriorTotals.zeros(device))
        report = metrics.evaluate_prior(prior, val_loader, log_prior)
        if report[score] < best[score]:
            best, best_state = report, copy.deepcopy(prior.state_dict())
    prior.load_state_dict(best_state)
    return best, clock.step


def draw(prior: torch.nn.Module, data: CodeSplits, vqvae, count: int, batch: int, classes: int,
         device: torch.device, temperature: float = 1.0, top_k: int = 0,
         guidance: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`count` samples, the classes in turn: (uint8 images, requested labels, seconds of sampling)."""
    labels = torch.arange(count) % classes
    generator = torch.Generator(device=device).manual_seed(0)
    images, seconds = [], 0.0
    drawing = sampling_options(prior, top_k=top_k, guidance=guidance)
    for start in utils.progress_bar(range(0, count, batch), desc="sampling", unit="batch"):
        wanted = labels[start: start + batch].to(device)
        began = time.perf_counter()
        maps = prior.sample_levels(len(wanted), data.shapes, wanted, temperature, generator, **drawing)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - began
        with torch.inference_mode():
            decoded = vqvae.decode_code_maps(maps).float().clamp(0, 1)
        images.append((decoded * 255).round().to(torch.uint8).cpu())
    return torch.cat(images), labels, seconds


# ----------------------------------------------------------------------------- scoring image sets

def score(images: torch.Tensor, labels: torch.Tensor, judge: Judge, reference: torch.Tensor, size: int,
          train: torch.Tensor) -> dict:
    """FID (the first `size` images against the reference features), class agreement, diversity, memorisation."""
    floats = images.float() / 255
    features, predicted = judged(judge, floats)
    nearest, _ = metrics.nearest_ssim(floats, train.float() / 255)
    return {"fid": metrics.frechet_distance(features[:size], reference),
            "agreement": float((predicted == labels).float().mean()),
            "diversity_ssim": metrics.mean_pairwise_ssim(floats),
            "memorised": float((nearest > MEMORISED).float().mean()), "images": len(images)}


def save_samples_figure(path: Path, images: torch.Tensor, labels: torch.Tensor, train: torch.Tensor,
                        class_names: list[str], name: str, per_class: int = 2) -> None:
    """Samples of each class beside the training slice nearest each by SSIM."""
    chosen = torch.cat([torch.nonzero(labels == label).flatten()[:per_class] for label in range(len(class_names))])
    shown = images[chosen].float() / 255
    similarity, nearest = metrics.nearest_ssim(shown, train.float() / 255, candidates=64)
    figures.save_image_rows(path, {"generated": shown, "nearest training slice": train[nearest].float() / 255},
                            title=f"{name}: samples beside their nearest training slice by SSIM (mean "
                            f"{similarity.mean():.2f})",
                            row_labels=[class_names[label] for label in labels[chosen].tolist()])


def prepare(args: argparse.Namespace, device: torch.device):
    if args.vqvae is None:
        args.vqvae = str(Path(args.out) / "vqvae.pth")
        if not Path(args.vqvae).exists():
            command = [sys.executable, str(ROOT / "train.py"), "--data", args.data, *CPU_VQVAE_FLAGS,
                       *args.vqvae_flags, "--run-name", "vqvae", "--checkpoint-dir", args.out, "--resources-dir",
                       args.out, "--cache-dir", args.cache_dir]
            if subprocess.run(command, check=False).returncode:
                raise utils.UsageError("training the VQ-VAE failed (its message is above)")
    vqvae, checkpoint = checkpoints.load_vqvae(args.vqvae, device)
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    source = checkpoints.checkpoint_data(checkpoint, args.data)
    splits = {split: load_split(source, split, prep, args.cache_dir, min_side=vqvae.config.image_multiple)
              for split in ("train", "validate")}
    levels = {split: encode_split(vqvae, slices, device, args.cache_dir) for split, slices in splits.items()}
    stacked = {split: stack_levels(maps) for split, maps in levels.items()}
    shapes = [list(level.shape[1:]) for level in levels["train"]]
    data = CodeSplits(splits["train"], splits["validate"], stacked, shapes, vqvae.config.num_embeddings)
    return vqvae, source, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--data", required=True, help="a data folder with class folders")
    parser.add_argument("--vqvae", help="a VQ-VAE checkpoint (default: train the CPU recipe's into --out)")
    parser.add_argument("--vqvae-flags", nargs=argparse.REMAINDER, default=[],
                        help="more train.py flags for that VQ-VAE (last on the line), e.g. --levels 2")
    parser.add_argument("--priors", nargs="+", choices=tuple(PRIORS), default=list(PRIORS))
    parser.add_argument("--budget", type=float, default=600, help="training seconds per prior")
    parser.add_argument("--count", type=int, default=1000, help="samples per prior")
    parser.add_argument("--batch", type=int, default=250, help="samples drawn at once")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every prior")
    parser.add_argument("--top-k", type=int, default=0, help="draw among the k likeliest codes only; 0 = all")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance weight of the "
                        "transformer priors (the others have none)")
    parser.add_argument("--prior-flags", nargs="+", default=[], metavar="NAME:FIELD=VALUE",
                        help="config values of a prior, e.g. transformer:width=128 transformer:dropout=0")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of every prior (3e-3: the best of "
                        "1e-3, 2e-3 and 3e-3 for the transformer, level with 2e-3 for the PixelCNN, at 300 s)")
    parser.add_argument("--judge-epochs", type=int, default=30)
    parser.add_argument("--reuse", action="store_true", help="score the priors saved in --out by an earlier run "
                        "again (with other sampling settings) instead of training them (the judge is always reused)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache/slices"))
    parser.add_argument("--out", default=str(ROOT / "resources/generation"))
    args = parser.parse_args()
    device = utils.pick_device(args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    vqvae, source, data = prepare(args, device)
    classes = len(source.class_names)
    if classes < 2 or bool((data.train.labels < 0).any()):
        raise utils.UsageError(f"{args.data}: the benchmark needs class folders (the judge names the class)")
    kept, held = judge_split(len(data.train), args.seed)
    judge = kept_model(Path(args.out) / "judge.pth",
                       lambda: train_judge(data.train.images[kept], data.train.labels[kept], classes, args.judge_epochs,
                                           args.seed),
                       lambda: Judge(data.train.images.shape[1], classes))
    reference, _ = judged(judge, data.validate.as_float(slice(None)))
    with torch.inference_mode():
        reconstructions = torch.cat([(vqvae(batch.to(device))[0].float().clamp(0, 1) * 255).round().to(torch.uint8)
                                     .cpu() for batch in data.validate.as_float(slice(None)).split(128)])
    size = min(args.count, len(held), len(data.validate))
    train_images = data.train.images
    rows = {"real (held-back 20% of train)": score(data.train.images[held], data.train.labels[held], judge,
                                                   reference, size, train_images[kept]),  # itself excluded
            "VQ-VAE reconstructions (validation)": score(reconstructions, data.validate.labels, judge, reference,
                                                         size, train_images),
            "validation slices": {"memorised": float((metrics.nearest_ssim(data.validate.as_float(slice(None)),
                                                                           train_images.float() / 255)[0]
                                                      > MEMORISED).float().mean())}}
    overrides = prior_values(args.prior_flags)  # MONAI's peer takes the transformer's size
    log_prior = metrics.class_log_prior([int((data.train.labels == c).sum()) for c in range(classes)])
    for name in args.priors:
        def fresh(name: str = name) -> torch.nn.Module:
            return build(name, data, classes, overrides.get(name, overrides.get("transformer") if name == "monai"
                                                            else None)).to(device)

        saved = Path(args.out) / f"prior-{name}.pth"
        if saved.exists() and args.reuse:  # scored again, with other sampling settings, without training again
            stored, prior = torch.load(saved, weights_only=True), fresh()
            prior.load_state_dict(stored["model"])
            best, steps = stored["report"], stored["steps"]
        else:
            prior = fresh()
            best, steps = train_for(prior, data, args.budget, log_prior, device, args.seed, args.lr)
            utils.atomic_write(saved, lambda tmp: torch.save({"model": prior.state_dict(), "report": best,
                                                              "steps": steps}, tmp))
        images, labels, seconds = draw(prior.eval(), data, vqvae, args.count, args.batch, classes, device,
                                       args.temperature, args.top_k, args.guidance)
        rows[name] = {**score(images, labels, judge, reference, size, train_images), **best, "steps": steps,
                      "sample_seconds": seconds,
                      "parameters": sum(p.numel() for p in prior.parameters())}
        print(f"prior={name} nll={best.get('bits_per_code', math.nan):.3f} fid={rows[name]['fid']:.2f} "
              f"agreement={rows[name]['agreement']:.3f} seconds={seconds:.1f}")
        if name == args.priors[0]:
            save_samples_figure(Path(args.out) / f"{name}_samples_with_nearest.png", images, labels, train_images,
                                source.class_names, name)
    rows["settings"] = {"budget_seconds": args.budget, "count": args.count, "fid_images": size, "lr": args.lr,
                        "prior_flags": args.prior_flags, "temperature": args.temperature, "top_k": args.top_k,
                        "guidance": args.guidance,
                        "vqvae": args.vqvae, "device": str(device), "judge_epochs": args.judge_epochs,
                        "judge_accuracy_held_back": rows["real (held-back 20% of train)"]["agreement"]}
    utils.write_json(Path(args.out) / "generation.json", rows)
    print_table(rows)


def print_table(rows: dict) -> None:
    print(f"{'':>36} {'NLL':>6} {'bits/img':>8} {'FID':>7} {'agree':>6} {'pair SSIM':>9} {'copies':>6} "
          f"{'draw s':>7} {'steps':>6}")
    for name, row in rows.items():
        if name == "settings":
            continue
        nll = row.get("bits_per_code", row.get("masked_bits_per_code", math.nan))

        def cell(key: str, width: int, digits: int) -> str:
            return f"{row[key]:>{width}.{digits}f}" if key in row else " " * (width - 1) + "-"

        print(f"{name:>36} {nll:>6.3f} {cell('bits_per_image', 8, 0)} {cell('fid', 7, 2)} {cell('agreement', 6, 3)} "
              f"{cell('diversity_ssim', 9, 3)} {cell('memorised', 6, 3)} {cell('sample_seconds', 7, 1)} "
              f"{cell('steps', 6, 0)}")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
