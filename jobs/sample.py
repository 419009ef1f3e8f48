"""Sample faces from a trained generator.

    python -m jobs.sample --model runs:/<run_id>/generator --out samples/ [--n 64] [--seed 0] [--interpolate 8]
    python -m jobs.sample --model models:/facegan/3 --out samples/
    python -m jobs.sample --model runs/<run>/checkpoint_000001000 --out samples/   # or .../checkpoint.pt

Writes ``grid.png`` (all samples), ``sample_NNN.png`` (each one) and, with --interpolate K,
``interpolation.gif``: K frames along the straight line between two latents per row of the
grid. MLflow URIs need MLFLOW_TRACKING_URI (or the default ./mlflow.db). Checkpoints give the
EMA generator when the run kept one.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from gan.checkpoint import generator_from_state, load_state
from gan.config import from_flat
from gan.context import CHECKPOINT_FILE
from gan.images import grid, to_uint8
from gan.models import sample_z
from jobs.cli import Parser, positive_int


class Exported(torch.nn.Module):
    """A generator logged in the pt2 format: its traced graph (already in eval mode, which an
    exported graph cannot switch) with the ``z_dim`` the rest of the code asks a generator for."""

    def __init__(self, graph: torch.nn.Module, z_dim: int):
        super().__init__()
        self.graph, self.z_dim = graph, int(z_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.graph(z)

    def train(self, mode: bool = True):
        return self


def load_generator(source: str) -> torch.nn.Module:
    if source.startswith(("runs:/", "models:/")):
        import mlflow

        from jobs.tracking import resolve_tracking_uri

        mlflow.set_tracking_uri(resolve_tracking_uri())
        model = mlflow.pytorch.load_model(source, map_location="cpu")
        if isinstance(model, torch.fx.GraphModule):  # pt2: an exported graph, not our module
            z_dim = mlflow.models.get_model_info(source).signature.inputs.inputs[0].shape[-1]
            return Exported(model, z_dim)
        return model.eval()  # a generator logged in the pickle format before pt2
    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--model {source}: expected runs:/…, models:/… or a checkpoint (file or folder)")
    state = load_state(path)
    return generator_from_state(state, from_flat(state["config"]).model)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = Parser("jobs.sample", __doc__)
    p.add_argument("--model", required=True, help="runs:/…/generator, models:/name/version|@alias, or a checkpoint")
    p.add_argument("--out", required=True, help="folder for grid.png and sample_NNN.png (created)")
    p.add_argument("--n", type=positive_int, default=64, help="faces to draw")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents")
    p.add_argument("--interpolate", type=int, default=0, help="frames per interpolation (0: none)")
    a = p.parse_args(argv)
    from jobs.specs import SpecError, load_generator as load_or_explain

    try:
        G = load_or_explain(a.model)  # an unknown run, a text file, a truncated checkpoint: one line
    except SpecError as e:
        print(f"error: --model {e}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(a.seed)
    z = sample_z(a.n, G.z_dim, gen)
    raw = G(z)
    if not torch.isfinite(raw).all():  # would save as black squares
        print(f"error: --model {a.model}: the generator outputs NaN/inf; it was saved from a diverged run",
              file=sys.stderr)
        return 1
    images = to_uint8(raw)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    grid(images).save(out / "grid.png")
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img).save(out / f"sample_{i:03d}.png")
    if a.interpolate > 1:
        rows = 8
        start, end = sample_z(rows, G.z_dim, gen), sample_z(rows, G.z_dim, gen)
        frames = []
        for t in torch.linspace(0, 1, a.interpolate):
            frames.append(grid(to_uint8(G(torch.lerp(start, end, t))), nrow=rows))
        frames += frames[-2:0:-1]  # there and back, so the loop has no jump
        frames[0].save(out / "interpolation.gif", save_all=True, append_images=frames[1:], duration=120, loop=0)
    print(f"wrote {a.n} samples to {out}" + (" and interpolation.gif" if a.interpolate > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
