"""The provenance mark: an invisible, learned watermark in every face facegan hands out.

A small encoder adds a residual to a face that carries 32 bits; a decoder reads them back after
the face was saved as JPEG (quality 50-95), halved and enlarged again, cropped by 10%, shifted
in colour, or mirrored (the decoder also reads the mirror image). It is HiDDeN (Zhu et al.
2018) at 64 px, trained with those distortions in the loop (``benchmarks/watermark.py``), with
real JPEG (Pillow) in the forward pass and the identity in the backward pass. Why not a library
mark: ``invisible-watermark`` refuses images under 256x256, and its DWT-DCT marks embedded in an
upscaled face do not survive the downscale (the measurement is in docs/provenance.md).

The 32 bits: a 16-bit payload (``source_id``: the first 4 hex digits of the run id, shown by
``jobs.verify`` and tagged on the run as ``facegan.watermark``) and its CRC-16. An image counts
as marked when the CRC of the decoded payload matches: a face without the mark decodes to
random bits, which pass 1 time in 65,536; the reader also tries the image mirrored and with
up to 3 of its least certain bits flipped (16 tries: 0.02% of unmarked images pass by chance). Faces of any
size are marked at 64 px: the residual is computed on the face shrunk to 64 px and enlarged to
its size, and the decoder reads faces shrunk to 64 px.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

BITS, PAYLOAD_BITS = 32, 16
SIZE = 64
WEIGHTS = Path(__file__).with_name("watermark.pt")


class Encoder(nn.Module):
    def __init__(self, ch: int = 24, bits: int = BITS):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU())
        self.message = nn.Linear(bits, 16 * 16)  # the message as a 16x16 plane, enlarged to the face
        self.mix = nn.Sequential(nn.Conv2d(ch + 1 + 3, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(ch, 3, 1))

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1] (N, 3, 64, 64), m in {0, 1} (N, 32) -> the residual (before the strength)."""
        plane = self.message(m * 2 - 1).view(-1, 1, 16, 16)
        plane = F.interpolate(plane, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.tanh(self.mix(torch.cat([self.features(x), plane, x], 1)))


class Decoder(nn.Module):
    def __init__(self, ch: int = 32, bits: int = BITS):
        super().__init__()
        layers, cin = [], 3
        for cout, stride in ((ch, 2), (ch, 1), (2 * ch, 2), (2 * ch, 1), (2 * ch, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(2 * ch * 8 * 8, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def crc16(bits: np.ndarray) -> np.ndarray:
    """CRC-16/CCITT of a bit vector (MSB first) -> 16 bits."""
    reg = 0xFFFF
    for b in bits.astype(int):
        top = ((reg >> 15) & 1) ^ b
        reg = ((reg << 1) & 0xFFFF) ^ (0x1021 if top else 0)
    return np.array([(reg >> (15 - i)) & 1 for i in range(16)], np.uint8)


def message_of(source_id: str) -> np.ndarray:
    """A 4-hex-digit source id -> the 32 message bits (payload + CRC)."""
    value = int(source_id[:4], 16)
    payload = np.array([(value >> (15 - i)) & 1 for i in range(PAYLOAD_BITS)], np.uint8)
    return np.concatenate([payload, crc16(payload)])


def source_id_of(run_id: str) -> str:
    """The payload for a run: the first 4 hex digits of its id (MLflow ids are hex)."""
    digits = "".join(c for c in run_id.lower() if c in "0123456789abcdef")
    if len(digits) < 4:
        raise ValueError(f"{run_id!r}: a source id needs 4 hex digits")
    return digits[:4]


@dataclass
class Reading:
    marked: bool
    source_id: str | None  # the payload, when marked
    confidence: float  # mean |p - 0.5| * 2 of the decoded bits, 0 (chance) .. 1 (certain)
    flipped: bool  # read from the mirror image


def to_unit(faces: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(faces, np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_u8(x: torch.Tensor) -> np.ndarray:
    return x.add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def resized(faces: np.ndarray, size: int) -> np.ndarray:
    if faces.shape[1] == size and faces.shape[2] == size:
        return faces
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in faces])


class Watermark:
    """``mark(uint8 NHWC faces, source_id) -> marked faces``; ``read(faces) -> [Reading]``."""

    def __init__(self, path: str | Path = WEIGHTS):
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.encoder, self.decoder = Encoder(), Decoder()
        self.encoder.load_state_dict(state["encoder"])
        self.decoder.load_state_dict(state["decoder"])
        self.encoder.eval(), self.decoder.eval()
        self.strength = float(state["strength"])
        self.version = str(state.get("version", "1"))

    @torch.no_grad()
    def mark(self, faces: np.ndarray, source_id: str) -> np.ndarray:
        n, h, w, _ = faces.shape
        m = torch.from_numpy(np.tile(message_of(source_id), (n, 1))).float()
        small = to_unit(resized(faces, SIZE))
        residual = self.encoder(small, m) * self.strength
        if (h, w) != (SIZE, SIZE):
            residual = F.interpolate(residual, size=(h, w), mode="bicubic", align_corners=False)
        # Headroom: pixels at the ends of the range would clip the residual away (saturated
        # generators draw many), so they are pulled in by the residual's bound first.
        x = to_unit(faces).clamp(-1 + self.strength, 1 - self.strength)
        return to_u8((x + residual).clamp(-1, 1))

    @torch.no_grad()
    def bits(self, faces: np.ndarray) -> np.ndarray:
        """P(bit = 1) for each face, (N, 32)."""
        return torch.sigmoid(self.decoder(to_unit(resized(faces, SIZE)))).numpy()

    def read(self, faces: np.ndarray) -> list[Reading]:
        out = []
        for p, pf in zip(self.bits(faces), self.bits(np.ascontiguousarray(faces[:, :, ::-1]))):
            a, b = decide(p, False), decide(pf, True)
            out.append(a if (a.marked, a.confidence) >= (b.marked, b.confidence) else b)
        return out


# Soft decoding: the CRC may also pass after flipping some of the SOFT least certain bits, fewest
# flips first. Each image is tried as is and mirrored, so a random image has 2 * 2**SOFT chances
# in 65,536 to pass (0.02%).
SOFT = 3
_FLIPS = sorted(range(2 ** SOFT), key=lambda m: bin(m).count("1"))


def decide(probs: np.ndarray, flipped: bool) -> Reading:
    bits = (probs > 0.5).astype(np.uint8)
    conf = float(np.abs(probs - 0.5).mean() * 2)
    weakest = np.argsort(np.abs(probs - 0.5))[:SOFT]
    for m in _FLIPS:
        b = bits.copy()
        for k in range(SOFT):
            if m >> k & 1:
                b[weakest[k]] ^= 1
        if (crc16(b[:PAYLOAD_BITS]) == b[PAYLOAD_BITS:]).all():
            return Reading(True, f"{int(''.join(map(str, b[:PAYLOAD_BITS])), 2):04x}", conf, flipped)
    return Reading(False, None, conf, flipped)


def jpeg(face: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))
