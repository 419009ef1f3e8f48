"""The project's import graph, read from the source (every import statement, at any depth):
the training core stays data-free, nothing imports in a circle, and imports sit at the top of
their module unless they load an optional dependency."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gan", "evaluation", "datasets", "compose", "jobs", "benchmarks")
# What each layer may import from the project (README, "Layout"): the core sees only itself.
ALLOWED = {
    "gan": {"gan"},
    "evaluation": {"gan", "evaluation", "datasets"},
    "datasets": {"datasets"},
    "compose": {"gan", "evaluation", "datasets", "compose"},
    "jobs": {"gan", "evaluation", "datasets", "compose", "jobs"},
    # jobs/ only for what measures a job's part (benchmarks/export.py: jobs.publish); the GPU
    # benchmarks (benchmarks/gpu.sh) run where Ray and MLflow are not installed.
    "benchmarks": {"gan", "evaluation", "datasets", "compose", "benchmarks", "jobs"},
}
# Imported inside a function because they are extras (pyproject's optional dependencies) or
# absent on some machines (the GPU benchmark machines train without torchmetrics, Ray or MLflow).
OPTIONAL = {"optuna", "dlib", "face_recognition_models", "boto3", "psycopg2", "moto", "torchmetrics", "opacus",
            "imwatermark"}  # benchmarks/watermark_library.py measures it; facegan does not depend on it
# Imported inside the one function that uses them because every Ray worker and CLI imports the
# module that holds it, and they are heavy: scipy.stats (the audits' p-values) and Matplotlib (their
# pictures) cost 1.3-4 s of each worker's start on 2 busy cores (pinned by
# test_the_training_processes_do_not_import_heavy_modules_they_do_not_use).
DEFERRED = {"scipy.stats", "matplotlib.figure"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("*/*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.parts[0] in PACKAGES:
            out[".".join(p for p in rel.parts if p != "__init__") or rel.parts[0]] = path
    return out


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level, line) for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    top = {id(n) for n in ast.walk(tree)} - inner  # module level, also under a top-level if/try
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in PACKAGES:  # from gan import bn: the module gan.bn
                out += [(f"{node.module}.{a.name}", id(node) in top, node.lineno) for a in node.names]
            else:
                out.append((node.module, id(node) in top, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, path in mods.items():
        targets = set()
        for target, _, _ in imports(path):
            while target and target not in mods:  # gan.bn.recalibrate -> gan.bn
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def test_layers_import_only_what_they_may():
    bad = [f"{m} imports {t}" for m, ts in graph().items() for t in ts
           if t.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, "\n".join(sorted(bad))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_are_at_the_top_unless_optional():
    bad = []
    for name, path in modules().items():
        for target, at_top, line in imports(path):
            if not at_top and target.split(".")[0] not in OPTIONAL and target not in DEFERRED:
                bad.append(f"{path.relative_to(ROOT)}:{line}: import {target} inside a function")
    assert not bad, f"{len(bad)} function-local imports:\n" + "\n".join(bad)


def test_the_gpu_benchmarks_import_without_ray_mlflow_or_torchmetrics(tmp_path):
    """benchmarks/gpu.sh runs on machines with torch, pyarrow, Pillow and tqdm only."""
    block = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('ray', 'mlflow', 'torchmetrics'):\n"
             "            raise ImportError(f'{name} is not on this machine')\n"
             "sys.meta_path.insert(0, Block())\n")
    mods = ["benchmarks.train_step", "benchmarks.loop", "benchmarks.graph_check", "benchmarks.profile_step",
            "benchmarks.checkpoint", "benchmarks.data", "compose"]
    code = block + "".join(f"import {m}\n" for m in mods)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_training_processes_do_not_import_heavy_modules_they_do_not_use():
    """Every Ray worker and every CLI imports the training loop. Only a DP run (gan/privacy.py,
    datasets/poisson.py) loads Opacus (without it, a tiny run's workers start ~0.6 s sooner); only
    an audit or a plot loads scipy.stats or Matplotlib (DEFERRED).
    On 2 busy cores (two training runs beside it), `import ray.train.torch, jobs.worker` took
    9.0-10.5 s, against 11.3-14.6 s with them; `import ray.train.torch` alone 6.4-7.5 s."""
    heavy = ("opacus", "scipy.stats", "matplotlib")
    code = ("import sys\nimport jobs.worker, jobs.train, jobs.tune, jobs.sample\n"
            f"print(sorted(m for m in sys.modules if m.startswith({heavy!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout[-500:] + proc.stderr[-2000:]
