"""Repair damaged faces with a trained generator: latent search (gan/inpaint.py), then Poisson blending.

    python -m jobs.repair --model runs/<run>/checkpoint_000005700 --photos me.jpg --mask lower --out repaired/
    python -m jobs.repair --model runs:/<run_id> --photos photos/ --mask masks/ --out repaired/   # a mask per photo
    python -m jobs.repair --model models:/facegan@champion --photos faces/ --aligned --mask strokes --out r/ --mlflow

Each photo goes through the aligner (datasets/align.py: its largest face, cropped as the model's
training faces were) unless ``--aligned`` says it already is such a crop. ``--mask`` is a named
mask in the crop (centre, lower, eyes, strokes: ``--mask-seed``), a mask image the size of the
photo (white = damaged; carried into the crop with the face), or a folder with one mask image
per photo, by file stem. Writes to ``--out``: ``repaired/`` (the blended faces), ``generated/``
(the generator's face, unblended), ``masked/`` (the input, hole in grey), ``photos/`` (the
repair pasted back into the photo, when it was aligned here), ``sheet.png`` (per row: face,
masked, generated, repaired) and ``repair.json``; ``--mlflow`` also logs them as a run. The
repaired, generated and pasted images carry the provenance mark (``python -m jobs.verify``).

Latent search needs the discriminator, and the published MLflow model is the generator alone:
``--model`` takes a training checkpoint (file or folder: G, its EMA and D), or a run
(``runs:/<id>``) or registered model (``models:/<name>/<version>``, ``models:/<name>@champion``)
whose run folder (the run's ``facegan.run_dir`` tag) holds checkpoints: the latest one is used.
Every input is checked before any search starts; a bad one is one line, exit 2, nothing written.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image, ImageOps

from datasets.align import AlignError, Aligner, blend, paste_back, warp_mask
from evaluation.watermark import Watermark
from gan.checkpoint import generator_from_state, load_state
from gan.config import from_flat
from gan.context import CHECKPOINT_FILE
from gan.images import grid
from gan.inpaint import MASKS, SearchConfig, fill, latent_search, named_mask
from gan.models import discriminator
from jobs.cli import Parser, positive_int, write_json
from jobs.specs import SpecError, run_id_of, source_id
from jobs.tracking import RUN_DIR_TAG, resolve_tracking_uri

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NO_D = ("latent search needs the discriminator, which only training checkpoints hold: pass one "
        "(--model runs/<run>/checkpoint_NNN), or a run or registered model whose run folder holds them "
        "(runs:/<id>, models:/<name>@champion)")


@dataclass
class Pair:
    G: torch.nn.Module
    D: torch.nn.Module
    size: int
    source: str  # the checkpoint file used


def _checkpoint(path: Path, spec: str) -> Pair:
    state = load_state(path)
    if state.get("D") is None or "config" not in state:
        raise SpecError(f"{spec}: a generator without its discriminator; {NO_D}")
    cfg = from_flat(state["config"])
    D = discriminator(cfg.model)
    D.load_state_dict({k.removeprefix("_module."): v for k, v in state["D"].items()})
    return Pair(generator_from_state(state, cfg.model), D.eval(), cfg.model.size, str(path))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    return found[-1] if found else None


def load_pair(spec: str) -> Pair:
    """G (its EMA when kept) and D from a checkpoint, a run or a registered model (see the docstring)."""
    try:
        if spec.startswith(("runs:/", "models:/")):
            client = MlflowClient(resolve_tracking_uri())
            run_id = run_id_of(spec, client)
            run_dir = client.get_run(run_id).data.tags.get(RUN_DIR_TAG)
            ckpt = latest_checkpoint(Path(run_dir)) if run_dir and "://" not in run_dir else None
            if ckpt is None:
                raise SpecError(f"{spec}: run {run_id}'s folder {run_dir or '(not recorded)'} holds no checkpoint "
                                f"on this machine; {NO_D}")
            return _checkpoint(ckpt, spec)
        path = Path(spec)
        if path.is_dir():
            path = path / CHECKPOINT_FILE if (path / CHECKPOINT_FILE).is_file() else latest_checkpoint(path) or path
        if not path.is_file():
            raise SpecError(f"{spec}: no such checkpoint; expected a checkpoint file or folder, runs:/<id> or "
                            f"models:/<name>@<alias>")
        return _checkpoint(path, spec)
    except SpecError:
        raise
    except Exception as e:  # unknown run or model, a truncated file: one line
        raise SpecError(f"{spec}: cannot load G and D ({str(e).splitlines()[0][:200]})") from None


def photo_files(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise SpecError(f"--photos {p}: no such file or folder")
    if not out:
        raise SpecError(f"--photos {' '.join(paths)}: no image files")
    return out


def read_image(path: Path, what: str) -> np.ndarray:
    try:
        im = Image.open(path)
        im.load()
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except Exception as e:  # Pillow raises many types for bad files
        raise SpecError(f"{what} {path}: not a readable image ({type(e).__name__})") from None


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(Image.open(path).convert("L")) if path.is_file() else None
    if m is None:
        raise SpecError(f"--mask {path}: no such mask image")
    if m.shape != shape:
        raise SpecError(f"--mask {path}: {m.shape[1]}x{m.shape[0]} px, but its photo is {shape[1]}x{shape[0]}: "
                        "a mask image must have its photo's size (white = damaged)")
    return m >= 128


@dataclass
class Job:
    name: str
    photo: np.ndarray
    face: np.ndarray  # uint8 (size, size, 3): the aligned crop
    hole: np.ndarray  # bool (size, size)
    matrix: np.ndarray | None  # photo -> crop, when aligned here


def prepare(files: list[Path], mask: str, size: int, aligned: bool, mask_seed: int) -> list[Job]:
    """Every photo read, aligned and masked, or a SpecError naming the first bad one."""
    aligner = None if aligned else Aligner(size, min_face=16)
    mask_path = Path(mask) if mask not in MASKS else None
    jobs = []
    for i, f in enumerate(files):
        photo = read_image(f, "--photos")
        if aligned:
            if photo.shape[:2] != (size, size):
                raise SpecError(f"--photos {f}: {photo.shape[1]}x{photo.shape[0]} px; with --aligned every photo "
                                f"must be the model's {size}x{size} crop")
            face, matrix = photo, None
        else:
            found, _ = aligner(photo)
            if not found:
                raise SpecError(f"--photos {f}: no face found (dlib HOG); pass a clearer photo, or an aligned "
                                f"{size}x{size} crop with --aligned")
            face, matrix = found[0].image, found[0].matrix
        if mask_path is None:
            hole = named_mask(mask, size, mask_seed + i).numpy()
        else:
            m = read_mask(mask_path / f"{f.stem}.png" if mask_path.is_dir() else mask_path, photo.shape[:2])
            hole = m if matrix is None else warp_mask(m, matrix, size)
        share = hole.mean()
        if share == 0:
            raise SpecError(f"--mask {mask}: marks nothing damaged in {f.name}'s face (white = damaged)")
        if share > 0.9:
            raise SpecError(f"--mask {mask}: covers {share:.0%} of {f.name}'s face; latent search matches the "
                            "intact part, so at least 10% must be left")
        jobs.append(Job(f.stem, photo, face, hole, matrix))
    return jobs


def to_tensor(faces: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(faces).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


def repair(pair: Pair, faces: np.ndarray, holes: np.ndarray, cfg: SearchConfig, seed: int = 0,
           device="cpu", blended: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """uint8 faces (N, S, S, 3) and bool holes (N, S, S) -> (repaired, generated, stats)."""
    G, D = pair.G.to(device), pair.D.to(device)
    y, h = to_tensor(faces, device), torch.from_numpy(holes).to(device)
    _, g, stats = latent_search(G, D, y, h, cfg, seed)
    generated = to_uint8(g)
    if blended:
        out = np.stack([blend(gen, face, hole) for gen, face, hole in zip(generated, faces, holes)])
    else:
        out = to_uint8(fill(y, g, h))
    return out, generated, stats


def masked_view(face: np.ndarray, hole: np.ndarray) -> np.ndarray:
    return np.where(hole[..., None], np.uint8(128), face)


def main(argv: list[str] | None = None) -> int:
    p = Parser("jobs.repair", __doc__)
    p.model("a training checkpoint (file or folder), runs:/<id> or models:/<name>/<version>|@<alias>: "
            "latent search needs G and D")
    p.add_argument("--photos", nargs="+", required=True, help="photo files or folders")
    p.add_argument("--mask", required=True, help=f"{', '.join(MASKS)}, a mask image (white = damaged) or a folder of them")
    p.add_argument("--mask-seed", type=int, default=0, help="strokes: the first photo's seed (the next photo's is +1)")
    p.add_argument("--aligned", action="store_true", help="the photos are already the model's aligned crops")
    p.add_argument("--out", required=True, help="folder for the results (created)")
    p.add_argument("--steps", type=positive_int, default=SearchConfig.steps, help="latent-search iterations")
    p.add_argument("--lam", type=float, default=SearchConfig.lam, help="weight of D's prior loss")
    p.add_argument("--lr", type=float, default=SearchConfig.lr, help="Adam's step on z")
    p.add_argument("--restarts", type=positive_int, default=1, help="latents searched per face; the best is kept")
    p.add_argument("--no-blend", action="store_true", help="paste the generated pixels as they are")
    p.add_argument("--mlflow", metavar="EXPERIMENT", nargs="?", const="facegan-repair",
                   help="also log the repair as an MLflow run")
    p.seed()
    p.device()
    p.batch(64)
    a = p.parse_args(argv)
    try:
        pair = load_pair(a.model)
        jobs = prepare(photo_files(a.photos), a.mask, pair.size, a.aligned, a.mask_seed)
    except (SpecError, AlignError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = SearchConfig(a.steps, a.lr, a.lam, a.restarts)
    sid, what = source_id(a.model)
    mark = Watermark()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, sheet = [], []
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as tmp:
        tmp = Path(tmp)
        for k in ("repaired", "generated", "masked", "photos"):
            (tmp / k).mkdir()
        for start in range(0, len(jobs), a.batch):
            part = jobs[start:start + a.batch]
            t0 = time.perf_counter()
            fixed, gen, stats = repair(pair, np.stack([j.face for j in part]), np.stack([j.hole for j in part]),
                                       cfg, a.seed + start, a.device, not a.no_blend)
            per = (time.perf_counter() - t0) / len(part)
            fixed, gen = mark.mark(fixed, sid), mark.mark(gen, sid)  # generated pixels leave facegan marked
            for j, r, g, ctx, pri in zip(part, fixed, gen, stats["context"], stats["prior"]):
                for k, img in (("repaired", r), ("generated", g), ("masked", masked_view(j.face, j.hole))):
                    Image.fromarray(img).save(tmp / k / f"{j.name}.png")
                if j.matrix is not None:
                    # the marked face goes back in: jobs.verify finds it through the aligner
                    Image.fromarray(paste_back(j.photo, r, j.matrix)).save(tmp / "photos" / f"{j.name}.png")
                row = {"photo": j.name, "hole": round(float(j.hole.mean()), 4),
                       "context_per_px": round(float(ctx) / max(1, (~j.hole).sum()), 5),
                       "d_real": round(float(np.exp(-float(pri))), 4), "seconds": round(per, 3)}
                rows.append(row)
                print(f"{j.name}: hole {row['hole']:.0%} of the face, context {row['context_per_px']:.4f}/px, "
                      f"D(G(z)) {row['d_real']:.2f}, {per:.2f} s/face", flush=True)
                if len(sheet) < 4 * 16:
                    sheet += [j.face, masked_view(j.face, j.hole), g, r]
        grid(np.stack(sheet), nrow=4).save(tmp / "sheet.png")
        write_json(tmp / "repair.json", {"model": a.model, "checkpoint": pair.source, "mask": a.mask,
                                         "watermark": {"source_id": sid, "names": what},
                                         "search": cfg.__dict__, "blend": not a.no_blend, "faces": rows})
        for item in sorted(tmp.iterdir()):  # complete results only, each moved into place
            if item.is_dir() and not any(item.iterdir()):
                continue  # photos/: nothing was aligned here
            dst = out / item.name
            if dst.is_dir():
                shutil.rmtree(dst)
            os.replace(item, dst)
    if a.mlflow:  # through a client: no process-wide active run or experiment is left behind
        client = MlflowClient(resolve_tracking_uri())
        exp = client.get_experiment_by_name(a.mlflow)
        run = client.create_run(exp.experiment_id if exp else client.create_experiment(a.mlflow),
                                run_name=f"repair-{a.mask}", tags={"facegan.watermark": sid})
        rid = run.info.run_id
        for k, v in {"model": a.model, "checkpoint": pair.source, "mask": a.mask, "steps": a.steps, "lam": a.lam,
                     "lr": a.lr, "restarts": a.restarts, "blend": not a.no_blend}.items():
            client.log_param(rid, k, str(v))
        for k in ("context_per_px", "d_real"):
            client.log_metric(rid, k, float(np.mean([r[k] for r in rows])))
        client.log_metric(rid, "seconds_per_face", float(np.mean([r["seconds"] for r in rows])))
        client.log_artifacts(rid, str(out), artifact_path="repair")
        client.set_terminated(rid)
        print(f"mlflow: run {rid} in experiment {a.mlflow}")
    print(f"repaired {len(rows)} face(s) into {out} (sheet.png, repaired/, repair.json); marked with source id "
          f"{sid} ({what}; python -m jobs.verify {out / 'repaired'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
