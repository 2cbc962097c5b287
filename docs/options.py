"""Writes docs/OPTIONS.md, every option of every job with its default and help, from the jobs' own parsers.

    python docs/options.py          # after adding or changing an option (a test fails until the file is current)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOBS = ("train", "train_prior", "predict", "extract_features", "anomaly", "finetune")
OUT = ROOT / "docs" / "OPTIONS.md"


def rows(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for group in parser._action_groups:
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            names = ", ".join(f"`{name}`" for name in action.option_strings)
            default = "" if action.default in (None, argparse.SUPPRESS) or action.default is False else \
                f"`{' '.join(map(str, action.default)) if isinstance(action.default, list) else action.default}`"
            choices = f" ({', '.join(map(str, action.choices))})" if action.choices else ""
            text = (action.help or "").replace("|", "/").replace("\n", " ")
            lines.append(f"| {group.title} | {names} | {default} | {text}{choices} |")
    return lines


def document() -> str:
    import importlib

    parts = ["# Options", "", "Every option of every job, from its own parser (`python docs/options.py` writes this "
             "file; `--help` prints the same).", ""]
    for job in JOBS:
        parser = importlib.import_module(job).build_parser()
        parts += [f"## {job}.py", "", "| group | option | default | what it does |", "|---|---|---|---|",
                  *rows(parser), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(document())
    print(f"wrote {OUT}")
