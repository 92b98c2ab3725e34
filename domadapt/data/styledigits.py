"""styledigits: the embedded default dataset, generated offline from `sklearn.datasets.load_digits`.

The 1,797 bundled 8x8 digits are rendered four times, once per domain, as 32x32 RGB PNG files
``<root>/<domain>/<digit>/<index>.png`` (same ``index`` = same source digit in every domain).
Each image gets its own geometric jitter (rotation, scale, shift, stroke weight), drawn from a
generator seeded by (seed, domain, index), so the output is a pure function of the seed. The
domains differ in style the way Office-Home's do, while sharing the content:

- ``gray``    (G): light digit on a dark background, grayscale, like MNIST.
- ``color``   (C): flat random foreground and background colours with luminance contrast.
- ``texture`` (T): coloured digit on a random stripe / checker / blob texture with pixel noise.
- ``sketch``  (S): dark pencil outline (edge map) of the digit on light paper.

Bump `VERSION` whenever the output changes: the on-demand cache folder is named after it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from domadapt.errors import UserError
from domadapt.io import NO_SPACE, atomic_directory, require_absent, write_fully
from domadapt.progress import progress

VERSION = 1
SIZE = 32
NUM_IMAGES = 1797  # len(load_digits().images); every digit appears in every domain
CLASSES = tuple(str(d) for d in range(10))
MARKER = ".styledigits.json"

Render = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Style:
    """A domain: how a [0, 1] glyph mask becomes an HxWx3 RGB image in [0, 1]."""

    name: str
    short: str
    render: Render


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _contrasting_colours(
    rng: np.random.Generator, min_contrast: float
) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours whose luminances differ by at least `min_contrast`."""
    while True:
        a, b = rng.uniform(0.0, 1.0, size=(2, 3))
        if abs(_luma(a) - _luma(b)) >= min_contrast:
            return a, b


def _paint(mask: np.ndarray, background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    return background * (1.0 - m) + foreground * m


def _gray(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bg, fg = rng.uniform(0.0, 0.25), rng.uniform(0.75, 1.0)
    v = bg + (fg - bg) * mask + rng.normal(0.0, 0.02, mask.shape)
    return np.repeat(v[..., None], 3, axis=2)


def _color(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bg, fg = _contrasting_colours(rng, 0.3)
    return _paint(mask, bg, fg)


def _pattern(rng: np.random.Generator) -> np.ndarray:
    """A [0, 1] SIZE x SIZE texture: oriented stripes, a rotated checkerboard or smooth blobs."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    kind = rng.integers(3)
    theta = rng.uniform(0.0, math.pi)
    u, v = x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta)
    freq = rng.uniform(3.0, 8.0)
    if kind == 0:
        return 0.5 + 0.5 * np.sin(2 * math.pi * freq * u + rng.uniform(0, 2 * math.pi))
    if kind == 1:
        return ((np.floor(freq * u) + np.floor(freq * v)) % 2).astype(float)
    coarse = rng.uniform(0.0, 1.0, size=(5, 5)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((SIZE, SIZE), Image.BICUBIC), dtype=float)


def _texture(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c1 = rng.uniform(0.0, 1.0, size=3)
    c2 = np.clip(c1 + rng.uniform(-0.4, 0.4, size=3), 0.0, 1.0)
    background = _paint(np.clip(_pattern(rng), 0.0, 1.0), c1, c2)
    while True:
        fg = rng.uniform(0.0, 1.0, size=3)
        if min(abs(_luma(fg) - _luma(c1)), abs(_luma(fg) - _luma(c2))) >= 0.3:
            break
    return _paint(mask, background, fg) + rng.normal(0.0, 0.05, (*mask.shape, 3))


def _sketch(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gy, gx = np.gradient(mask)
    edges = np.hypot(gx, gy)
    lines = np.clip(edges / max(edges.max(), 1e-6) * rng.uniform(1.2, 2.0), 0.0, 1.0)
    paper = np.array([1.0, 0.98, 0.93]) * rng.uniform(0.85, 1.0)
    ink = np.full(3, rng.uniform(0.0, 0.3))
    grain = rng.normal(0.0, 0.03, mask.shape)[..., None]
    return _paint(lines, paper, ink) + grain


STYLES: tuple[Style, ...] = (
    Style("gray", "G", _gray),
    Style("color", "C", _color),
    Style("texture", "T", _texture),
    Style("sketch", "S", _sketch),
)


def glyph_mask(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A jittered SIZE x SIZE [0, 1] mask of an 8x8 digit (values 0..16).

    Inverse affine map output -> input: random rotation (+-15 deg), scale (2.4..3.4 output
    pixels per input pixel), shift (+-2 px); then a random stroke gain (thicker when > 1).
    """
    angle = math.radians(rng.uniform(-15.0, 15.0))
    scale = rng.uniform(2.4, 3.4)
    cx, cy = SIZE / 2 + rng.uniform(-2.0, 2.0, size=2)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # input = R(-angle) (output - centre) / scale + 4   (the 8x8 glyph's centre)
    coeffs = (cos, sin, 4 - cos * cx - sin * cy, -sin, cos, 4 + sin * cx - cos * cy)
    src = Image.fromarray((digit / 16.0).astype(np.float32), "F")
    out = src.transform((SIZE, SIZE), Image.AFFINE, coeffs, resample=Image.BICUBIC)
    return np.clip(np.asarray(out, dtype=float) * rng.uniform(1.0, 1.8), 0.0, 1.0)


def render(digit: np.ndarray, style_index: int, image_index: int, seed: int) -> np.ndarray:
    """The uint8 SIZE x SIZE x 3 rendering of one digit in one style (pure function)."""
    rng = np.random.default_rng([seed, style_index, image_index])
    rgb = STYLES[style_index].render(glyph_mask(digit, rng), rng)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def generate(out: Path, *, seed: int = 0, quiet: bool = True) -> None:
    """Write all domains into the (empty or missing) folder `out`, then the completion marker."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if len(digits.images) != NUM_IMAGES:
        raise RuntimeError(
            f"sklearn's digits changed: {len(digits.images)} images, expected {NUM_IMAGES}"
        )
    bar = progress(total=len(STYLES) * NUM_IMAGES, quiet=quiet, desc="styledigits", unit="img")
    for s, style in enumerate(STYLES):
        for c in CLASSES:
            (out / style.name / c).mkdir(parents=True, exist_ok=True)
        for i, (digit, target) in enumerate(zip(digits.images, digits.target)):
            path = out / style.name / CLASSES[target] / f"{i:04d}.png"
            buf = io.BytesIO()
            Image.fromarray(render(digit, s, i, seed), "RGB").save(buf, format="PNG")
            write_fully(path, buf.getvalue())
            bar.update()
    bar.close()
    write_fully(out / MARKER, (json.dumps({"version": VERSION, "seed": seed}) + "\n").encode())


def content_digest(root: Path, style: str) -> str:
    """sha256 of the decoded pixels of one domain, in file order (independent of PNG encoder)."""
    h = hashlib.sha256()
    for path in sorted(
        (Path(root) / style).glob("*/*.png"), key=lambda p: p.relative_to(root).as_posix()
    ):
        with Image.open(path) as image:
            h.update(path.relative_to(root).as_posix().encode() + image.convert("RGB").tobytes())
    return h.hexdigest()


def is_complete(root: Path, seed: int = 0) -> bool:
    """True when `root` holds a finished generation of this version and seed."""
    try:
        meta = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta == {"version": VERSION, "seed": seed}


def write_styledigits(out: str | Path, *, seed: int = 0, quiet: bool = True) -> bool:
    """Generate into `out` atomically (temp folder + rename). False if it was already there."""
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    out = Path(out).expanduser().absolute()
    if is_complete(out, seed):
        return False
    require_absent(out)
    try:
        with atomic_directory(out) as tmp:
            generate(tmp, seed=seed, quiet=quiet)
    except OSError as e:
        if is_complete(out, seed):  # a concurrent generation finished first: same bytes
            return False
        if e.errno in NO_SPACE:
            raise UserError(f"no space left to write {out} ({e.strerror}); it was not "
                            f"created: free space and re-run") from None
        raise
    return True


def ensure_styledigits(cache_dir: Path) -> Path:
    """The root of the default styledigits (seed 0) in `cache_dir`, generated if absent."""
    root = Path(cache_dir).expanduser().absolute() / f"styledigits-v{VERSION}"
    if not is_complete(root):
        if root.exists() and any(root.iterdir()):
            raise UserError(f"incomplete styledigits cache (no {MARKER}); delete it: {root}")
        write_styledigits(root)
    return root
