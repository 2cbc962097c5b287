"""Lay out a download of the public "Brain Tumor MRI" collection as this repository's brain MRI results used it.

    python benchmarks/brain_mri.py --download ~/Downloads/brain-tumor-mri --out data/brain-mri

The results in docs/RESULTS.md come from the collection's Training part (its folders glioma, meningioma, notumor
and pituitary, 224x224 JPEG slices), exact duplicates removed and split into train (4,953) and validate (548) by a
hash. docs/brain_mri_manifest.csv names each file kept, its split and class and the SHA-1 of its bytes; this script
finds those files anywhere under --download (by content, so renamed copies count), copies them to
<out>/{train,validate}/<class>/<name> and reports what is missing. The numbers are reproduced only with every file.

Last line: found=<n> missing=<n> out=<folder>
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402

MANIFEST = ROOT / "docs" / "brain_mri_manifest.csv"
FIELDS = ("split", "class", "name", "sha1")


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def read_manifest(path: Path = MANIFEST) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_manifest(folder: Path, path: Path = MANIFEST) -> int:
    """The manifest of a laid-out copy (<folder>/<split>/<class>/<name>), for the maintainers."""
    rows = [{"split": image.parts[-3], "class": image.parts[-2], "name": image.name, "sha1": sha1(image)}
            for image in sorted(folder.glob("*/*/*.jpg"))]
    utils.write_csv_rows(path, rows)
    return len(rows)


def lay_out(download: Path, out: Path, manifest: list[dict]) -> tuple[int, list[dict]]:
    """Copy every manifest file found under `download` (matched by its bytes' hash) into `out`."""
    wanted = {row["sha1"]: row for row in manifest}
    found: set[str] = set()
    for path in utils.progress_bar(sorted(download.rglob("*")), desc="hashing", unit="file"):
        if not path.is_file() or path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        row = wanted.get(sha1(path))
        if row is None or row["sha1"] in found:
            continue
        target = out / row["split"] / row["class"] / row["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        found.add(row["sha1"])
    return len(found), [row for row in manifest if row["sha1"] not in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--download", help="the unpacked download (any layout)")
    parser.add_argument("--out", default="data/brain-mri", help="where the train and validate folders go")
    parser.add_argument("--write-manifest", metavar="FOLDER", help="(maintainers) write the manifest of a laid-out "
                        "copy instead")
    args = parser.parse_args()
    if args.write_manifest:
        print(f"wrote {write_manifest(Path(args.write_manifest))} rows to {MANIFEST}")
        return
    if not args.download or not Path(args.download).is_dir():
        raise utils.UsageError(f"--download {args.download}: not a folder (unpack the collection first)")
    count, missing = lay_out(Path(args.download).expanduser(), Path(args.out), read_manifest())
    for row in missing[:10]:
        print(f"missing: {row['split']}/{row['class']}/{row['name']} (sha1 {row['sha1'][:12]})")
    if len(missing) > 10:
        print(f"... and {len(missing) - 10} more")
    print(f"found={count} missing={len(missing)} out={args.out}")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
