"""Sample faces from a trained generator.

    python -m jobs.sample --model runs:/<run_id>/generator --out samples/ [--n 64] [--seed 0] [--interpolate 8]
    python -m jobs.sample --model models:/facegan/3 --out samples/
    python -m jobs.sample --model runs/<run>/checkpoint_000001000 --out samples/   # or .../checkpoint.pt
    python -m jobs.sample --model SPEC --out samples/ --exclude-training-identities \
        --train data/celeba64/train --heldout data/celeba64/val     # no face of a training person

Writes ``grid.png`` (all samples), ``sample_NNN.png`` (each one) and, with --interpolate K,
``interpolation.gif``: K frames along the straight line between two latents per row of the
grid. MLflow URIs need MLFLOW_TRACKING_URI (or the default ./mlflow.db). Checkpoints give the
EMA generator when the run kept one.

Every face written carries the provenance mark (evaluation/watermark.py): an invisible
watermark whose payload is the source id (the first 4 hex digits of the run's id, or of the
checkpoint file's sha256); ``python -m jobs.verify FOLDER`` reads it back.

``--exclude-training-identities`` drops each face whose nearest training photo (face-matcher
distance, evaluation/faceid.py) is within the threshold calibrated on the held-out people
(``--filter-fpir``: the fraction of strangers' photos that threshold also catches), draws again
until ``--n`` faces are kept, says how many it dropped and writes ``filter.json``. It needs the
training shards with identities, the held-out people and the privacy extra. The generator
served from MLflow has no such filter: it would have to carry the training people's face
embeddings, which are themselves their biometric data (docs/privacy.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

from datasets.shards import ShardError
from evaluation.faceid import FaceIDError
from evaluation.fid import eval_latents
from evaluation.identity import IdentityAuditError
from evaluation.leak import IdentityLeak, draw_excluding
from evaluation.watermark import Watermark
from gan.images import grid, to_uint8
from gan.models import sample_z
from jobs.cli import Parser, write_json
from jobs.specs import SpecError, source_id
from jobs.specs import load_generator as load_or_explain


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = Parser("jobs.sample", __doc__)
    p.model()
    p.add_argument("--out", required=True, help="folder for grid.png and sample_NNN.png (created)")
    p.n(64, "faces to draw (the grid is 8 wide)")
    p.seed()
    p.device()
    p.batch()
    p.add_argument("--interpolate", type=int, default=0, help="frames per interpolation (0: none)")
    p.exclusion()
    p.add_argument("--train", help="--exclude-training-identities: the training shard set (with identities)")
    p.add_argument("--heldout", help="--exclude-training-identities: held-out people's shard set (with identities)")
    p.add_argument("--cache", default="runs/feature_cache", help="--exclude-training-identities: face-vector cache")
    a = p.parse_args(argv)
    if a.exclude_training_identities and not (a.train and a.heldout):
        p.error("--exclude-training-identities needs --train and --heldout: shard sets with identities")

    try:
        G = load_or_explain(a.model)  # an unknown run, a text file, a truncated checkpoint: one line
    except SpecError as e:
        print(f"error: --model {e}", file=sys.stderr)
        return 2
    G = G.to(a.device)
    # The evaluation's latents: --seed S --n N draws the faces `jobs.fid --seed S --n N` scores.
    z = eval_latents(a.n, G.z_dim, a.seed)
    raw = torch.cat([G(chunk.to(a.device)).cpu() for chunk in z.split(a.batch)])
    if not torch.isfinite(raw).all():  # would save as black squares
        print(f"error: --model {a.model}: the generator outputs NaN/inf; it was saved from a diverged run",
              file=sys.stderr)
        return 1
    images, filtered = to_uint8(raw), None
    if a.exclude_training_identities:
        try:
            leak = IdentityLeak(a.train, a.heldout, a.n, cache_dir=a.cache)
            images, filtered, _ = draw_excluding(G, leak, a.n, a.seed, a.filter_fpir, a.device, a.batch)
        except (ShardError, IdentityAuditError, FaceIDError, ValueError) as e:
            print(f"error: --exclude-training-identities: {e}", file=sys.stderr)
            return 2
    sid, what = source_id(a.model)
    mark = Watermark()
    images = mark.mark(images, sid)  # every face that leaves facegan carries its source (jobs.verify)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if filtered is not None:
        write_json(out / "filter.json", filtered)
        print(f"filter: dropped {filtered['dropped']} of {filtered['drawn']} drawn faces within "
              f"{filtered['threshold']:.3f} of a training person's photo (fpir {filtered['fpir']:g}); kept {a.n}")
    grid(images).save(out / "grid.png")

    for i, img in enumerate(images):
        Image.fromarray(img).save(out / f"sample_{i:03d}.png")
    if a.interpolate > 1:
        rows = 8
        gen = torch.Generator().manual_seed(a.seed)
        start, end = sample_z(rows, G.z_dim, gen), sample_z(rows, G.z_dim, gen)
        frames = []
        for t in torch.linspace(0, 1, a.interpolate):
            frames.append(grid(mark.mark(to_uint8(G(torch.lerp(start, end, t).to(a.device)).cpu()), sid), nrow=rows))
        frames += frames[-2:0:-1]  # there and back, so the loop has no jump
        frames[0].save(out / "interpolation.gif", save_all=True, append_images=frames[1:], duration=120, loop=0)
    print(f"wrote {a.n} samples to {out}" + (" and interpolation.gif" if a.interpolate > 1 else "")
          + f", each marked with source id {sid} ({what}; python -m jobs.verify {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
