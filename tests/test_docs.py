"""Every ``python -m jobs.X``/``datasets.X``/``benchmarks.X`` command written in the README and
docs/ uses flags its parser knows (and ``--section.field`` names the config knows), and every
docs/ page is linked from the README."""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys

import pytest

from gan.config import Config, flatten
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python -m ((?:jobs|datasets|benchmarks)\.[a-z_]+)((?:[^\n`]|\\\n)*)")
CONFIG_JOBS = {"jobs.train", "jobs.tune"}  # these take --section.field=value


def commands() -> list[tuple[str, str, str]]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in COMMAND.finditer(text):
            args = m.group(2).replace("\\\n", " ")
            args = re.split(r"\s#|\s\|\s|&&|;|\)", args)[0]  # up to a comment, a pipe, the next command
            out.append((page.name, m.group(1), args))
    return out


@functools.cache
def known_flags(module: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"{module} --help: {out.stderr[-500:]}"
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out.stdout))


def flags(args: str) -> list[str]:
    try:
        words = shlex.split(args.replace("[", " ").replace("]", " ").replace("|", " "))
    except ValueError:
        words = args.split()
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


FIELDS = {f"--{k}" for k in flatten(Config())}


@pytest.mark.parametrize("page, module, args", commands(), ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_each_documented_command_uses_flags_its_cli_knows(page, module, args):
    unknown = []
    for flag in flags(args):
        if "." in flag and module in CONFIG_JOBS:
            if flag not in FIELDS:
                unknown.append(f"{flag} (no such config field)")
        elif flag not in known_flags(module):
            unknown.append(flag)
    assert not unknown, f"{page}: python -m {module}{args}: unknown {', '.join(unknown)}"


def test_the_extractor_finds_the_commands():
    found = {m for _, m, _ in commands()}
    assert {"jobs.train", "jobs.tune", "jobs.sample", "jobs.fid", "jobs.audit", "datasets.celeba"} <= found


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not missing, f"not linked from README.md: {missing}"
    assert len(readme.splitlines()) <= 200
