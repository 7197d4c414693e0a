"""The synthetic demo data: textures and objects with painted defects, small ones included."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vpdm.errors import ConfigError, DataError
from vpdm.io import new_file_mode

__all__ = [
    "demo_root",
    "make_demo_dataset",
]


DEMO_VERSION = 1
DEMO_MARKER = ".vpdm_demo.json"
DEMO_DEFECTS: tuple[str, ...] = ("scratch", "spot", "hole", "stain")


def demo_root(kind: str = "demo") -> Path:
    """Where ``"demo"`` generates its data: ``$VPDM_DEMO_DIR`` or ``~/.cache/vpdm/demo-v1``;
    ``"demo-small"`` beside it (``<that>-small``)."""
    env = os.environ.get("VPDM_DEMO_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "vpdm" / f"demo-v{DEMO_VERSION}"
    return root.with_name(root.name + "-small") if kind == "demo-small" else root


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy, xx


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, (size, size, 1))


def _gen_grid(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Regular line texture, random phase/brightness."""
    yy, xx = _coords(size)
    period = size / 8.0
    py, px = rng.uniform(0, period, 2)
    thick = 0.14 * period
    lines = (((yy + py) % period) < thick) | (((xx + px) % period) < thick)
    bg = np.array([190.0, 185.0, 170.0]) * rng.uniform(0.9, 1.1)
    fg = np.array([70.0, 75.0, 90.0]) * rng.uniform(0.9, 1.1)
    img = np.where(lines[..., None], fg, bg) + _noise(rng, size, 6.0)
    return img, np.ones((size, size), dtype=bool)


def _gen_blobs(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random-wave noise mapped between two colours."""
    yy, xx = _coords(size)
    f = np.zeros((size, size))
    for _ in range(6):
        u, v = rng.uniform(-3.0, 3.0, 2)
        f += rng.uniform(0.5, 1.0) * np.cos(2 * np.pi * (u * xx + v * yy) / size + rng.uniform(0, 2 * np.pi))
    f = (f - f.min()) / (np.ptp(f) + 1e-9)
    c0, c1 = np.array([60.0, 120.0, 70.0]), np.array([170.0, 200.0, 120.0])
    img = c0 + f[..., None] * (c1 - c0) + _noise(rng, size, 4.0)
    return img, np.ones((size, size), dtype=bool)


def _gen_disc(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shaded centred disc (an 'object') with position/radius jitter on a dark background."""
    yy, xx = _coords(size)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    r = size * rng.uniform(0.30, 0.34)
    d = np.hypot(yy - cy, xx - cx)
    obj = d < r
    shade = 1.0 - 0.35 * (d / r) ** 2
    base = np.array([200.0, 160.0, 90.0]) * rng.uniform(0.92, 1.08)
    bg = np.array([25.0, 25.0, 30.0])
    img = np.where(obj[..., None], base * shade[..., None], bg) + _noise(rng, size, 4.0)
    return img, obj


def _gen_stripes(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal sinusoidal stripes, random phase."""
    yy, xx = _coords(size)
    s = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + yy) / (size / 6.0) + rng.uniform(0, 2 * np.pi))
    c0, c1 = np.array([40.0, 60.0, 140.0]), np.array([150.0, 170.0, 230.0])
    img = c0 + s[..., None] * (c1 - c0) + _noise(rng, size, 5.0)
    return img, np.ones((size, size), dtype=bool)


def _gen_ring(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A washer-like annulus object with jitter."""
    yy, xx = _coords(size)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    r_out = size * rng.uniform(0.33, 0.37)
    d = np.hypot(yy - cy, xx - cx)
    obj = (d < r_out) & (d > 0.45 * r_out)
    base = np.array([170.0, 175.0, 185.0]) * rng.uniform(0.92, 1.08)
    bg = np.array([60.0, 40.0, 30.0])
    img = np.where(obj[..., None], base, bg) + _noise(rng, size, 4.0)
    return img, obj


def _shade(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """A gentle linear illumination gradient in a random direction (multiplicative, mean 1)."""
    yy, xx = _coords(size)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = ((yy - size / 2) * np.sin(ang) + (xx - size / 2) * np.cos(ang)) / size
    return (1.0 + strength * ramp)[..., None]


def _gen_screw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A small threaded part (shaft, thread, head) at a random place and angle on a plain background,
    as MVTec's screws: the part covers a few percent of the image and its look changes with the angle."""
    yy, xx = _coords(size)
    ang = rng.uniform(0, 2 * np.pi)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    length, half_width = size * rng.uniform(0.34, 0.38), size * 0.028
    u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)  # along the shaft
    v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)  # across it
    taper = np.clip((length / 2 - u) / (0.12 * length), 0.0, 1.0)  # pointed tip at u = +L/2
    shaft = (np.abs(u) < length / 2) & (np.abs(v) < half_width * (0.35 + 0.65 * taper))
    head = np.hypot(u + length / 2, v) < size * 0.055
    part = shaft | head
    period = size * 0.022
    thread = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + 0.6 * v / half_width)
    across = 1.0 - 0.45 * (v / (size * 0.055)) ** 2  # a cylinder lit from above
    metal = (95.0 + 70.0 * across * np.where(head, 0.8, 0.55 + 0.45 * thread))[..., None] * np.array([1.0, 1.0, 1.05])
    bg = np.array([205.0, 205.0, 200.0]) * rng.uniform(0.95, 1.05)
    img = np.where(part[..., None], metal, bg) * _shade(rng, size, 0.12) + _noise(rng, size, 3.0)
    return img, part


def _gen_tread(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tyre tread: dark rubber with repeating zig-zag grooves and thin sipes at a random phase."""
    yy, xx = _coords(size)
    period = size / 5.0
    py, px = rng.uniform(0, period, 2)
    zig = np.abs(((xx + px) % period) / period - 0.5) * period * 0.6  # zig-zag offset of the groove
    groove = np.abs(((yy + py + zig) % period) - period / 2) < period * 0.09
    sipe = (np.abs(((xx + px + 0.5 * (yy + py)) % (period / 2)) - period / 4) < 0.9) & ~groove
    rubber = 62.0 * rng.uniform(0.92, 1.08)
    base = np.where(groove, rubber * 0.45, np.where(sipe, rubber * 0.7, rubber))
    img = base[..., None] * np.array([1.0, 1.0, 1.04]) * _shade(rng, size, 0.15) + _noise(rng, size, 3.0)
    return img, ~groove


def _gen_brushed(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Brushed metal: fine streaks along one direction (noise smoothed along rows), mid grey."""
    streaks = rng.normal(0.0, 1.0, (size, size + 32))
    kernel = np.ones(32) / 32.0
    streaks = np.stack([np.convolve(row, kernel, mode="valid")[:size] for row in streaks])
    streaks /= streaks.std() + 1e-9
    level = 150.0 * rng.uniform(0.93, 1.07)
    img = (level + 9.0 * streaks)[..., None] * np.array([1.0, 1.01, 1.03]) * _shade(rng, size, 0.2)
    return img + _noise(rng, size, 2.0), np.ones((size, size), dtype=bool)


def _gen_mesh(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A fine woven mesh: thin bright wires every few pixels over a dark backing, random phase."""
    yy, xx = _coords(size)
    period = size / 24.0
    py, px = rng.uniform(0, period, 2)
    wy = np.cos(2 * np.pi * (yy + py) / period) ** 8
    wx = np.cos(2 * np.pi * (xx + px) / period) ** 8
    wires = np.maximum(wy, wx)
    img = (45.0 + 150.0 * wires)[..., None] * np.array([1.0, 0.97, 0.9]) * rng.uniform(0.93, 1.07)
    return img * _shade(rng, size, 0.1) + _noise(rng, size, 3.0), np.ones((size, size), dtype=bool)


DEMO_CLASSES: tuple[tuple[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]], ...] = (
    ("grid", _gen_grid),
    ("blobs", _gen_blobs),
    ("disc", _gen_disc),
    ("stripes", _gen_stripes),
    ("ring", _gen_ring),
    ("screw", _gen_screw),
    ("tread", _gen_tread),
    ("brushed", _gen_brushed),
    ("mesh", _gen_mesh),
)
# Defects of a few pixels (at 256 px: 3-60 pixels of mask), painted on the small-defect classes.
SMALL_DEFECTS: tuple[str, ...] = ("pinhole", "thin_scratch", "chip")
# The small-defect development set (`demo-small`): small parts freely placed, fine textures.
SMALL_DEMO_CLASSES: tuple[str, ...] = ("screw", "tread", "brushed", "mesh")
SMALL_DEMO_PARAMS: dict[str, Any] = {
    "classes": list(SMALL_DEMO_CLASSES),
    "train_per_class": 80,
    "test_good_per_class": 30,
    "test_defect_per_class": 30,
    "size": 256,
}


# Beyond the named classes, ``classes=N`` makes variants ``<base>-<k>`` of them (k = 1, 2, ...), as many as
# asked: each a fixed transform of its base's images (a quarter turn or a mirror, a zoom of 1-1.9x, a channel
# mix near a permutation, a gain), so every class has its own orientation, scale and colour statistics while its
# defects stay those of its base. Most are told apart by colour and structure together, not by one cue alone.
MAX_DEMO_CLASSES = 999


def _base_of(name: str) -> str:
    """The named class a variant ``<base>-<k>`` is made from (the name itself for a named class)."""
    base, sep, k = name.rpartition("-")
    return base if sep and k.isdigit() else name


def _defects_of(name: str) -> tuple[str, ...]:
    return SMALL_DEFECTS if _base_of(name) in SMALL_DEMO_CLASSES else DEMO_DEFECTS


def _variant(
    gen: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]], name: str
) -> Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]:
    """The generator of class ``name``: its base's, transformed by the variant's fixed settings (see above)."""
    base, sep, k = name.rpartition("-")
    if not (sep and k.isdigit()):
        return gen
    params = np.random.default_rng([int(k), sum(map(ord, base))])
    turn = int(params.integers(0, 8))  # 4 rotations x mirror
    zoom = float(params.uniform(1.0, 1.9))
    mix = np.eye(3)[params.permutation(3)] * 0.8 + params.uniform(0.0, 0.2, (3, 3))
    gain = float(params.uniform(0.75, 1.2))

    def generate(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        big = int(round(size * zoom))
        img, region = gen(rng, big)
        top = (big - size) // 2
        img, region = img[top : top + size, top : top + size], region[top : top + size, top : top + size]
        if turn >= 4:
            img, region = img[:, ::-1], region[:, ::-1]
        img, region = np.rot90(img, turn % 4), np.rot90(region, turn % 4)
        img = np.clip(gain * (img @ mix.T) / mix.sum(axis=1).mean(), 0.0, 255.0)
        return np.ascontiguousarray(img), np.ascontiguousarray(region)

    return generate


def _paint_defect(
    rng: np.random.Generator, img: np.ndarray, region: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one visible defect inside ``region``; returns (image, bool mask of painted pixels)."""
    size = img.shape[0]
    yy, xx = _coords(size)
    ys, xs = np.nonzero(region[size // 8 : size - size // 8, size // 8 : size - size // 8])
    k = int(rng.integers(len(ys)))
    cy, cx = float(ys[k] + size // 8), float(xs[k] + size // 8)
    mean = img[region].mean(axis=0)
    contrast = np.where(mean > 128, 20.0, 235.0)  # dark on bright, bright on dark
    if kind == "scratch":
        ang = rng.uniform(0, np.pi)
        length = size * rng.uniform(0.25, 0.45)
        dy, dx = np.sin(ang), np.cos(ang)
        t = (yy - cy) * dy + (xx - cx) * dx
        dist = np.abs((yy - cy) * dx - (xx - cx) * dy)
        mask = (dist < max(1.0, size / 90)) & (np.abs(t) < length / 2)
        color: np.ndarray = contrast
    elif kind == "spot":
        r = size * rng.uniform(0.04, 0.08)
        mask = np.hypot(yy - cy, xx - cx) < r
        color = contrast
    elif kind == "hole":
        r = size * rng.uniform(0.07, 0.11)
        mask = np.hypot((yy - cy) / 1.3, xx - cx) < r
        color = np.array([5.0, 5.0, 5.0]) if mean.mean() > 60 else np.array([230.0, 230.0, 230.0])
    elif kind == "stain":
        r0 = size * rng.uniform(0.08, 0.12)
        ang = np.arctan2(yy - cy, xx - cx)
        wob = 1 + 0.25 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.15 * np.sin(5 * ang + rng.uniform(0, 6.3))
        mask = np.hypot(yy - cy, xx - cx) < r0 * wob
        color = np.array([200.0, 30.0, 30.0])
        out = img.copy()
        out[mask] = 0.35 * out[mask] + 0.65 * color
        mask &= region
        return np.where(region[..., None], out, img), mask
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    mask &= region
    out = img.copy()
    out[mask] = color
    return out, mask


def _paint_small_defect(
    rng: np.random.Generator, img: np.ndarray, region: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of a few pixels inside ``region``: a pin-hole (radius 1-2.5 px), a thin scratch
    (1 px wide, 6-8 % of the side long) or a chip (a bite of radius 1.5-3.5 px taken out of the
    region's edge, showing the background). Returns (image, bool mask of the changed pixels)."""
    size = img.shape[0]
    yy, xx = _coords(size)
    px = size / 256.0  # sizes are given at 256 px
    if kind == "chip":
        inner = region.copy()
        for axis in (0, 1):  # the region's edge: region pixels with a non-region 4-neighbour
            inner &= np.roll(region, 1, axis) & np.roll(region, -1, axis)
        edge = region & ~inner
        edge[: size // 8] = edge[size - size // 8 :] = False
        edge[:, : size // 8] = edge[:, size - size // 8 :] = False
        ys, xs = np.nonzero(edge if edge.any() else region)
    else:
        margin = size // 8
        ys, xs = np.nonzero(region[margin : size - margin, margin : size - margin])
        ys, xs = ys + margin, xs + margin
    k = int(rng.integers(len(ys)))
    cy, cx = float(ys[k]), float(xs[k])
    mean = img[region].mean(axis=0)
    contrast = np.where(mean.mean() > 110, mean * 0.35, np.minimum(mean * 2.2 + 40, 255.0))
    out = img.copy()
    if kind == "pinhole":
        mask = np.hypot(yy - cy, xx - cx) <= px * rng.uniform(1.0, 2.5)
        mask &= region
        out[mask] = contrast
    elif kind == "thin_scratch":
        ang = rng.uniform(0, np.pi)
        half = size * rng.uniform(0.03, 0.04)
        t = (yy - cy) * np.sin(ang) + (xx - cx) * np.cos(ang)
        dist = np.abs((yy - cy) * np.cos(ang) - (xx - cx) * np.sin(ang))
        mask = (dist < max(0.5, 0.6 * px)) & (np.abs(t) < half) & region
        out[mask] = 0.3 * out[mask] + 0.7 * contrast
    elif kind == "chip":
        mask = (np.hypot(yy - cy, xx - cx) <= px * rng.uniform(1.5, 3.5)) & region
        outside = ~region
        background = img[outside].mean(axis=0) if outside.any() else contrast
        out[mask] = background
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    return out, mask


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_png(path: Path, arr: np.ndarray) -> None:
    """Atomic write, so concurrent generators (e.g. DDP ranks) never expose half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0600: the demo is shared like any file open() makes
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(arr).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _demo_class_names(classes: int | Sequence[str]) -> list[str]:
    """The demo's class names: the first ``classes`` of :data:`DEMO_CLASSES` and, beyond them, their variants
    ``<base>-1``, ``<base>-2``, ... in turn; or the names given (named classes or variants)."""
    known = [name for name, _ in DEMO_CLASSES]
    if isinstance(classes, bool) or not isinstance(classes, (int, list, tuple)):
        raise ConfigError(
            f"demo classes must be an integer in 1..{MAX_DEMO_CLASSES} or a list of class names "
            f"({', '.join(known)}, or a variant <name>-<k>), got {classes!r}"
        )
    if isinstance(classes, int):
        if not 1 <= classes <= MAX_DEMO_CLASSES:
            raise ConfigError(f"demo classes must be an integer in 1..{MAX_DEMO_CLASSES}, got {classes!r}")
        n = len(known)
        return [known[i] if i < n else f"{known[i % n]}-{i // n}" for i in range(classes)]
    names = list(classes)
    unknown = [n for n in names if _base_of(n) not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(
            f"demo classes must be distinct names among {', '.join(known)} (or variants <name>-<k>), got {classes!r}"
        )
    return names


def _demo_files(params: dict[str, Any]) -> list[Path]:
    """Relative paths the demo with ``params`` consists of (for completeness checks)."""
    files: list[Path] = []
    for name in _demo_class_names(params["classes"]):
        c = Path(name)
        defects = _defects_of(name)
        files += [c / "train" / "good" / f"{i:03d}.png" for i in range(params["train_per_class"])]
        files += [c / "test" / "good" / f"{i:03d}.png" for i in range(params["test_good_per_class"])]
        for i in range(params["test_defect_per_class"]):
            d = defects[i % len(defects)]
            files += [c / "test" / d / f"{i:03d}.png", c / "ground_truth" / d / f"{i:03d}_mask.png"]
    return files


def _ensure_demo(root: Path, defaults: dict[str, Any] | None = None) -> None:
    """Use a demo dir as generated (any parameters), or generate one there with ``defaults`` (the
    default demo when None)."""
    try:
        old = json.loads((root / DEMO_MARKER).read_text(encoding="utf-8"))
        kwargs = {k: (list(v) if isinstance(v, list) else int(v)) for k, v in old.items() if k != "version"}
    except (OSError, ValueError, TypeError, AttributeError):
        kwargs = dict(defaults or {})
    try:
        make_demo_dataset(root, **kwargs)
    except TypeError:  # marker from an unknown future version: fall back to the defaults
        make_demo_dataset(root, **(defaults or {}))


def make_demo_dataset(
    root: Path,
    *,
    classes: int | Sequence[str] = 3,
    train_per_class: int = 24,
    test_good_per_class: int = 8,
    test_defect_per_class: int = 8,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a small synthetic multi-class dataset (MVTec layout) so everything runs without downloads.

    ``classes``: the first n of grid, blobs, disc, stripes, ring, screw, tread, brushed, mesh and, past
    nine, variants of them (``grid-1``, ...: each with its own orientation, scale and colours), or a list
    of such names. Defects cycle through scratch, spot, hole, stain (large: 4-20 % of the
    side), and on the small-defect classes (screw, tread, brushed, mesh: ``demo-small``) through
    pinhole, thin_scratch, chip (a few pixels). Deterministic in ``seed`` and idempotent: a marker
    file records the parameters and generation is skipped when it matches and all files exist.
    Returns ``root``.
    """
    root = Path(root).expanduser()
    names = _demo_class_names(classes)
    for name, v, lo in (
        ("train_per_class", train_per_class, 1),
        ("test_good_per_class", test_good_per_class, 0),
        ("test_defect_per_class", test_defect_per_class, 0),
        ("size", size, 32),
        ("seed", seed, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"demo {name} must be an integer >= {lo}, got {v!r}")
    if test_good_per_class + test_defect_per_class == 0:
        raise ConfigError("demo needs test images: test_good_per_class + test_defect_per_class must be > 0")
    params = {
        "version": DEMO_VERSION,
        "classes": classes if isinstance(classes, int) else names,
        "train_per_class": train_per_class,
        "test_good_per_class": test_good_per_class,
        "test_defect_per_class": test_defect_per_class,
        "size": size,
        "seed": seed,
    }
    marker = root / DEMO_MARKER
    if marker.is_file():
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old is not None and old != params:
            raise DataError(
                f"demo directory {str(root)!r} was generated with other parameters {old} "
                f"(wanted {params}): use another directory or delete it"
            )
        if old == params and all((root / p).is_file() for p in _demo_files(params)):
            return root
    if root.exists() and not root.is_dir():
        raise DataError(f"demo path {str(root)!r} exists and is not a directory")

    generators = dict(DEMO_CLASSES)
    for ci, name in enumerate(names):
        gen = _variant(generators[_base_of(name)], name)
        cdir = root / name
        defects = _defects_of(name)
        paint = _paint_small_defect if defects is SMALL_DEFECTS else _paint_defect

        def rng_for(split_code: int, i: int, _ci: int = ci) -> np.random.Generator:
            return np.random.default_rng([seed, _ci, split_code, i])

        for i in range(train_per_class):
            img, _ = gen(rng_for(0, i), size)
            _write_png(cdir / "train" / "good" / f"{i:03d}.png", _to_uint8(img))
        for i in range(test_good_per_class):
            img, _ = gen(rng_for(1, i), size)
            _write_png(cdir / "test" / "good" / f"{i:03d}.png", _to_uint8(img))
        for i in range(test_defect_per_class):
            d = defects[i % len(defects)]
            rng = rng_for(2, i)
            img, region = gen(rng, size)
            img, mask = paint(rng, img, region, d)
            _write_png(cdir / "test" / d / f"{i:03d}.png", _to_uint8(img))
            _write_png(cdir / "ground_truth" / d / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)

    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".json")
    os.fchmod(fd, new_file_mode())
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(params, f, sort_keys=True)
    os.replace(tmp, marker)
    return root
