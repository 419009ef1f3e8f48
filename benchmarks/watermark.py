"""The provenance mark (evaluation/watermark.py): train it, and measure what it survives.

    python -m benchmarks.watermark --train --steps 3000 --image-weight 100 --weights runs/wm/a.pt
    python -m benchmarks.watermark --train --init runs/wm/a.pt --warmup 0 --lr 3e-4 --steps 2000 \
        --image-weight 100 --weights runs/wm/b.pt
    python -m benchmarks.watermark --train --init runs/wm/b.pt --extra data/generated64/train --warmup 0 \
        --lr 3e-4 --steps 1200 --image-weight 100 --weights runs/wm/c.pt
    python -m benchmarks.watermark --train --init runs/wm/c.pt --extra data/generated64/train data/wm-smoke \
        data/wm-faces64 --warmup 0 --lr 3e-4 --steps 1200 --image-weight 100 \
        --weights evaluation/watermark.pt    # the shipped weights: 4 phases
    python -m benchmarks.watermark --model runs/repair64/faces64-seed0.pt   # the table

Training: real 64 px faces of the CelebA sample's training split (later phases add ``--extra``
faces: the procedural faces of the default preset, and 3,000 samples each of a smoke-preset and a
faces64 generator, drawn on latents other than the table's), random 32-bit messages, and
per batch one distortion drawn from those the table lists (JPEG is Pillow's, straight-through;
every image is rounded to 8 bits). Loss: the bits' cross-entropy plus ``--image-weight`` times
the residual's mean square; the residual is bounded by ``--strength`` (tanh).

The table: faces the generator draws (``--n``, the evaluation's latents), marked with a payload,
then distorted: PNG (none), JPEG 90/75/50, halved and enlarged, a 10% crop (90% of the side,
kept at that size), mirrored, a screenshot-like colour shift (gamma 0.9, contrast 0.95,
brightness +6, saturation 0.9). Per distortion: bit accuracy, the detection rate (marked with
the right payload) and wrong payloads. False alarms: every face of the sample (its 6,000 crops
at 64 px) and every photo as it is (178x218). The cost: PSNR marked vs unmarked, and the FID
of both against the validation faces.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from datasets.shards import ShardSet
from evaluation.fid import Evaluator, build_extractor
from evaluation.watermark import BITS, WEIGHTS, Decoder, Encoder, Watermark, jpeg, message_of, resized, to_u8, \
    to_unit
from jobs.repair import load_pair
from jobs.specs import sample_faces

ROOT = Path(__file__).resolve().parents[1]


def all_faces(path: Path) -> np.ndarray:
    s = ShardSet(path)
    return np.concatenate([s.read(rg) for rg in s.row_groups])


def _jpeg_st(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    q = int(rng.integers(35, 96))
    y = to_unit(np.stack([jpeg(f, q) for f in to_u8(x.detach())]))
    return x + (y - x).detach()


def distort(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One training distortion for the whole batch (differentiable, or straight-through)."""
    k = rng.integers(0, 8)
    n, _, h, w = x.shape
    if k == 1:
        x = _jpeg_st(x, rng)
    elif k == 2:
        x = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), size=(h, w),
                          mode="bilinear")
    elif k == 3:
        side = int(h * rng.uniform(0.85, 0.95))
        i, j = rng.integers(0, h - side + 1, 2)
        x = F.interpolate(x[:, :, i:i + side, j:j + side], size=(h, w), mode="bilinear")
    elif k == 4:
        gain = torch.from_numpy(rng.uniform(0.85, 1.15, (n, 3, 1, 1))).float()
        bias = torch.from_numpy(rng.uniform(-0.1, 0.1, (n, 1, 1, 1))).float()
        x = ((x + 1) / 2).clamp(1e-4, 1) ** float(rng.uniform(0.8, 1.25)) * 2 - 1
        x = x * gain + bias
    elif k == 5:
        x = _jpeg_st(F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True),
                                   size=(h, w), mode="bilinear").clamp(-1, 1), rng)
    elif k == 6:
        x = x + torch.randn_like(x) * 0.02
    elif k == 7:  # a crop, turned a little, then JPEG: what a re-aligned, re-saved face goes through
        side = int(h * rng.uniform(0.85, 0.97))
        i, j = rng.integers(0, h - side + 1, 2)
        angle = float(rng.uniform(-4, 4)) * np.pi / 180
        theta = torch.tensor([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0]],
                             dtype=x.dtype).expand(n, 2, 3)
        x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="reflection",
                          align_corners=False)
        x = _jpeg_st(F.interpolate(x[:, :, i:i + side, j:j + side], size=(h, w), mode="bilinear").clamp(-1, 1), rng)
    x = x.clamp(-1, 1)
    return x + ((x + 1).mul(127.5).round().div(127.5).sub(1) - x).detach()  # 8 bits


def train(a) -> int:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    faces = all_faces(Path(a.data) / "train")
    for extra in a.extra:  # other kinds of faces facegan draws (the smoke preset's procedural ones)
        more = all_faces(Path(extra))
        faces = np.concatenate([faces, more[rng.permutation(len(more))[:len(faces)]]])
    faces = to_unit(faces)
    enc, dec = Encoder(), Decoder()
    if a.init:  # continue from trained weights (a second, harder phase)
        state = torch.load(a.init, weights_only=True)
        enc.load_state_dict(state["encoder"])
        dec.load_state_dict(state["decoder"])
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=a.lr)
    t0, log = time.perf_counter(), []
    for step in range(1, a.steps + 1):
        x = faces[torch.from_numpy(rng.integers(0, len(faces), a.batch))]
        x = torch.where(torch.from_numpy(rng.random(a.batch) < 0.5)[:, None, None, None], x.flip(-1), x)
        m = torch.from_numpy(rng.integers(0, 2, (a.batch, BITS))).float()
        r = enc(x, m) * a.strength
        xw = (x + r).clamp(-1, 1)
        noised = distort(xw, rng) if step > a.warmup else xw
        logits = dec(noised)
        bit_loss = F.binary_cross_entropy_with_logits(logits, m)
        img_loss = r.pow(2).mean()
        ramp = min(1.0, max(0.0, (step - a.warmup) / max(a.warmup, 1)))  # bits first, then the image's cost
        loss = bit_loss + a.image_weight * ramp * img_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == a.steps:
            acc = float(((logits > 0).float() == m).float().mean())
            psnr = float(10 * torch.log10(4 / img_loss.clamp_min(1e-10)))
            log.append({"step": step, "bit_loss": round(float(bit_loss), 4), "bit_acc": round(acc, 4),
                        "psnr": round(psnr, 2), "s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    enc.eval(), dec.eval()
    tmp = Path(a.weights).with_suffix(".tmp")
    torch.save({"encoder": enc.state_dict(), "decoder": dec.state_dict(), "strength": a.strength,
                "version": "1", "trained": {"steps": a.steps, "batch": a.batch, "lr": a.lr,
                                            "image_weight": a.image_weight, "log": log[-5:]}}, tmp)
    tmp.replace(a.weights)
    print(f"wrote {a.weights}")
    return 0


def shift_colour(face: np.ndarray) -> np.ndarray:
    im = Image.fromarray(face)
    im = ImageEnhance.Contrast(ImageEnhance.Color(im).enhance(0.9)).enhance(0.95)
    x = np.asarray(im).astype(np.float32) / 255
    return np.clip((x ** 0.9) * 255 + 6, 0, 255).round().astype(np.uint8)


def crop10(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h = face.shape[0]
    side = round(h * 0.9)
    i, j = rng.integers(0, h - side + 1, 2)
    return face[i:i + side, j:j + side]


DISTORTIONS = {
    "png": lambda f, rng: f,
    "jpeg90": lambda f, rng: jpeg(f, 90),
    "jpeg75": lambda f, rng: jpeg(f, 75),
    "jpeg50": lambda f, rng: jpeg(f, 50),
    "half-and-back": lambda f, rng: np.asarray(Image.fromarray(f).resize((f.shape[1] // 2, f.shape[0] // 2),
                                                                          Image.LANCZOS).resize(f.shape[1::-1], Image.BICUBIC)),
    "crop10": crop10,
    "mirror": lambda f, rng: np.ascontiguousarray(f[:, ::-1]),
    "colour-shift": lambda f, rng: shift_colour(f),
}


def read_all(wm: Watermark, images: list[np.ndarray]) -> list:
    """Readings of images of any size, each shrunk to 64 px as jobs.verify does."""
    return wm.read(np.concatenate([resized(i[None], 64) for i in images]))


def table(a) -> int:
    wm = Watermark(a.weights)
    rng = np.random.default_rng(0)
    pair = load_pair(a.model)
    plain = np.concatenate(list(sample_faces(pair.G, a.n, 0, 100, "cpu")))
    sid = "a3f9"
    truth = message_of(sid)
    marked = wm.mark(plain, sid)
    rows = []
    mse = ((marked.astype(np.float64) - plain) ** 2).mean(axis=(1, 2, 3))
    psnr = float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))
    for name, fn in DISTORTIONS.items():
        small = np.stack([resized(fn(f, rng)[None], 64)[0] for f in marked])
        readings = wm.read(small)
        probs = wm.bits(np.ascontiguousarray(small[:, :, ::-1]) if name == "mirror" else small)
        acc = float(((probs > 0.5) == truth).mean())
        images = small
        found = np.array([r.marked and r.source_id == sid for r in readings])
        wrong = np.array([r.marked and r.source_id != sid for r in readings])
        rows.append({"distortion": name, "bit_accuracy": round(acc, 4), "detected": round(float(found.mean()), 4),
                     "wrong_payload": round(float(wrong.mean()), 4), "n": len(images)})
        print(json.dumps(rows[-1]), flush=True)
    data = Path(a.data)
    crops = np.concatenate([all_faces(data / s) for s in ("train", "val", "test")])
    false_crops = sum(r.marked for r in wm.read(crops))
    z = zipfile.ZipFile(a.zip)
    photos = [np.asarray(Image.open(io.BytesIO(z.read(m))).convert("RGB")) for m in sorted(z.namelist()) if m.endswith(".jpg")]
    false_photos = sum(r.marked for r in read_all(wm, photos))
    ev = Evaluator(build_extractor("inception"), ShardSet(data / "val"), a.n, 0, 1, torch.device("cpu"), a.cache, seed=0)
    fid_plain = ev.score_faces(torch.from_numpy(b).permute(0, 3, 1, 2) for b in np.array_split(plain, 8))
    fid_marked = ev.score_faces(torch.from_numpy(b).permute(0, 3, 1, 2) for b in np.array_split(marked, 8))
    summary = {"method": "learned residual (HiDDeN-style), 16-bit payload + CRC-16", "payload": sid, "n": a.n,
               "psnr_db": round(psnr, 2), "fid_unmarked": round(fid_plain["fid"], 2), "fid_marked": round(fid_marked["fid"], 2),
               "kid_unmarked": fid_plain.get("kid"), "kid_marked": fid_marked.get("kid"),
               "false_positive_crops": f"{false_crops}/{len(crops)}", "false_positive_photos": f"{false_photos}/{len(photos)}",
               "model": a.model, "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "watermark.json").write_text(json.dumps(summary, indent=2) + "\n")
    strip = np.concatenate([np.concatenate(list(plain[:8]), 1), np.concatenate(list(marked[:8]), 1),
                            np.clip((marked[:8].astype(int) - plain[:8]) * 10 + 128, 0, 255).astype(np.uint8).transpose(1, 0, 2, 3)
                            .reshape(64, -1, 3)], 0)
    Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST).save(out / "marked.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train the mark and write --weights")
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--data", default=str(ROOT / "data" / "celeba64"))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--warmup", type=int, default=300, help="steps without distortions first")
    p.add_argument("--init", help="start from these weights")
    p.add_argument("--extra", nargs="*", default=[], help="more shard sets to train on (as many faces as --data's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--strength", type=float, default=0.08, help="the residual's bound, in [-1, 1] units")
    p.add_argument("--image-weight", type=float, default=20.0)
    p.add_argument("--model", help="the table: a checkpoint whose generator draws the marked faces")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--zip", default=str(ROOT.parent / "shared" / "data" / "celeba-sample" / "img_align_celeba.zip"))
    p.add_argument("--cache", default=str(ROOT / "runs" / "feature_cache"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "watermark"))
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return train(a) if a.train else table(a)


if __name__ == "__main__":
    sys.exit(main())
