"""What every ``python -m jobs.X`` shares: a parser whose errors are one line and exit 2, and
the flags that mean the same thing in every job (one vocabulary):

    --model SPEC   a generator: runs:/<id>/generator, models:/<name>/<version>|@<alias>, a checkpoint
                   (file or folder); jobs.fid and jobs.audit also take faces (a shard set, an image folder)
    --n N          how many faces         --seed S    the latents' seed (the evaluation's latents)
    --device D     cpu, cuda, cuda:1      --batch B   faces per forward pass
    --out DIR      where files are written (created)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SPEC = "runs:/<id>/generator, models:/<name>/<version>|@<alias>, or a checkpoint (file or folder)"


class Parser(argparse.ArgumentParser):
    """argparse with its defaults shown in ``--help`` and a bad argument reported as one line
    (``error: argument --n: ...``) instead of the usage block, exit status 2."""

    def __init__(self, prog: str, doc: str | None, renamed: dict[str, str] | None = None):
        super().__init__(prog=f"python -m {prog}", description=doc,
                         formatter_class=_Help)
        self.renamed = renamed or {}  # an old flag -> its new name: a one-line error says which

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        for a in args:
            if (old := a.split("=", 1)[0]) in self.renamed:
                self.error(f"{old} was renamed to {self.renamed[old]}")
        return super().parse_known_args(args, namespace)

    def model(self, what: str = SPEC, required: bool = True) -> None:
        self.add_argument("--model", required=required, metavar="SPEC", help=what)

    def n(self, default: int, what: str = "faces") -> None:
        self.add_argument("--n", type=positive_int, default=default, help=what)

    def seed(self) -> None:
        self.add_argument("--seed", type=int, default=0,
                          help="the latents' seed: the same seed and --n draw the same faces in every job "
                               "(a run's in-training evaluation uses train.seed)")

    def device(self) -> None:
        self.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                          help="where the networks run: cpu, cuda, cuda:1")

    def batch(self, default: int = 100) -> None:
        self.add_argument("--batch", type=positive_int, default=default, help="faces per forward pass")

    def exclusion(self) -> None:
        """The sampling-time identity filter (evaluation/leak.py, docs/privacy.md)."""
        self.add_argument("--exclude-training-identities", action="store_true",
                          help="drop each face within the calibrated distance of a training person's photo and draw "
                               "again (needs --train and --heldout shard sets with identities, and the privacy extra)")
        self.add_argument("--filter-fpir", type=fraction, default=0.05,
                          help="the filter's threshold: the distance within which this fraction of held-out people's "
                               "photos find a training photo (the strangers it also drops)")

    def error(self, message: str):
        print(f"error: {message} (python -m {self.prog.split()[-1]} --help)", file=sys.stderr)
        sys.exit(2)


def write_json(path: Path, value) -> None:
    """Written whole or not at all: a temporary name, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


class _Help(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; each option's default after its help, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is not None and d is not False and d != argparse.SUPPRESS and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value
