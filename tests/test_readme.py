"""The README's two commands are the lines CI runs (.ci/run), to the letter."""
from __future__ import annotations

import re

from tests.conftest import ROOT


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_both_readme_commands_as_written():
    main_job, tests = _readme_commands()
    assert "python -m jobs.train" in main_job and "pytest" in tests
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "echo"))]
    runs = [line for line in ci if line.startswith("python3 -m venv")]
    assert runs == [tests, main_job], "CI runs command 2, then command 1, exactly as the README writes them"
