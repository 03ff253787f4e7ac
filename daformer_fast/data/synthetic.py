"""Synthetic domain-shift benchmark: street-scene-like images over the 19 Cityscapes classes, in two domains.

`make_synthetic(root, ...)` (command line: `python -m daformer_fast.tools.make_synthetic`) writes,
deterministically (same arguments → same bytes):
- `ROOT/source`: the GTA layout (`images/*.png`, `labels/*.png` palette PNGs of Cityscapes label ids, converted to
  `labels/*_labelTrainIds.png` plus the three RCS JSON files by the GTA converter);
- `ROOT/target`: the Cityscapes layout (`leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`,
  `gtFine/{train,val}/<city>/*_gtFine_labelIds.png` → `*_gtFine_labelTrainIds.png` by the Cityscapes converter).

Geometry: sky above a horizon, a road narrowing to a vanishing point, sidewalks, buildings, vegetation, terrain,
walls and fences, poles carrying signs and lights, cars, people, and rarely trucks, buses, trains, riders on
bicycles or motorcycles, so rare classes are genuinely rare and rare class sampling matters. Both domains share
the geometry generator; they differ in appearance: the source has flat, saturated "rendered" colours, the target
a different palette (hue rotated, desaturated), texture, an illumination gradient, sensor noise and blur. A
source-only model sees colours it never saw in training on the target.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from daformer_fast.config import CITYSCAPES_PALETTE
from daformer_fast.tools.convert_datasets import CITYSCAPES_ID_TO_TRAINID, convert

__all__ = ["draw_scene", "ensure_synthetic", "make_synthetic", "render"]

log = logging.getLogger("daformer_fast.data")

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)
_TRAINID_TO_ID = np.full(256, 0, dtype=np.uint8)  # label id 0 = "unlabeled" → 255 after conversion
for _id, _tid in CITYSCAPES_ID_TO_TRAINID.items():
    _TRAINID_TO_ID[_tid] = _id
_CITIES = ("alpha", "beta")


def _rect(lbl: np.ndarray, x0: float, y0: float, x1: float, y1: float, c: int) -> None:
    h, w = lbl.shape
    xa, xb = int(np.clip(round(x0), 0, w)), int(np.clip(round(x1), 0, w))
    ya, yb = int(np.clip(round(y0), 0, h)), int(np.clip(round(y1), 0, h))
    lbl[ya:yb, xa:xb] = c


def draw_scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A street-scene train-id map (uint8, 255 = unlabelled) drawn from `rng`."""
    lbl = np.full((h, w), SKY, np.uint8)
    hz = int(h * rng.uniform(0.38, 0.5))  # horizon row
    vx = w * rng.uniform(0.4, 0.6)  # vanishing point column
    lbl[hz:] = TERRAIN if rng.random() < 0.5 else VEG
    # Road and sidewalks: trapezoids from the bottom edge to the vanishing point.
    half = w * rng.uniform(0.35, 0.55)
    walk = w * rng.uniform(0.12, 0.25)
    for c, spread in ((SIDEWALK, half + walk), (ROAD, half)):
        pts = np.array([[vx - 2, hz], [vx + 2, hz], [vx + spread, h], [vx - spread, h]], np.int32)
        cv2.fillPoly(lbl, [pts], c)
    # Buildings standing on the horizon, some covered by vegetation.
    x = rng.uniform(-0.1, 0.05) * w
    while x < w:
        bw = w * rng.uniform(0.08, 0.25)
        if abs(x + bw / 2 - vx) > w * 0.08:
            _rect(lbl, x, hz - h * rng.uniform(0.1, 0.35), x + bw, hz + h * 0.03, BUILDING)
        x += bw + w * rng.uniform(0.0, 0.05)
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0, w), hz - h * rng.uniform(0.0, 0.15)
        cv2.ellipse(lbl, (int(cx), int(cy)), (int(w * rng.uniform(0.04, 0.1)), int(h * rng.uniform(0.05, 0.12))),
                    0, 0, 360, VEG, -1)  # fmt: skip
    # Walls and fences along the sidewalk edge.
    for c, p in ((WALL, 0.3), (FENCE, 0.3)):
        if rng.random() < p:
            x0 = rng.uniform(0, w * 0.7)
            _rect(lbl, x0, hz - h * 0.06, x0 + w * rng.uniform(0.1, 0.3), hz + h * 0.02, c)
    # Poles with signs or lights on the sidewalks.
    for _ in range(rng.integers(0, 4)):
        side = rng.choice([-1, 1])
        y_base = rng.uniform(hz + 0.1 * (h - hz), h * 0.95)
        depth = (y_base - hz) / (h - hz)  # 0 at the horizon, 1 at the bottom edge
        px = vx + side * (half + walk * 0.5) * depth
        ph, pw = h * 0.45 * depth + 4, max(1.0, w * 0.006 * depth + 1)
        _rect(lbl, px - pw, y_base - ph, px + pw, y_base, POLE)
        r = rng.random()
        if r < 0.45:
            s = max(2.0, w * 0.02 * depth)
            _rect(lbl, px - s, y_base - ph - s, px + s, y_base - ph + s, SIGN)
        elif r < 0.8:
            s = max(2.0, w * 0.012 * depth)
            _rect(lbl, px - s, y_base - ph - 3 * s, px + s, y_base - ph, LIGHT)
    # Vehicles and people, nearer ones drawn later (and bigger).
    objects = []
    for _ in range(rng.integers(0, 5)):
        objects.append(CAR)
    for c, p in ((TRUCK, 0.12), (BUS, 0.08), (TRAIN, 0.04), (MOTORCYCLE, 0.07), (BICYCLE, 0.12)):
        if rng.random() < p:
            objects.append(c)
    objects += [PERSON] * int(rng.integers(0, 4))
    placed = sorted((rng.uniform(0.1, 1.0), c) for c in objects)
    for depth, c in placed:
        y = hz + depth * (h - hz)
        scale = depth * h
        if c in (CAR, TRUCK, BUS, TRAIN):
            ow, oh = {CAR: (0.5, 0.28), TRUCK: (0.7, 0.5), BUS: (0.9, 0.55), TRAIN: (2.0, 0.45)}[c]
            lane = rng.uniform(-0.8, 0.8) * half * depth
            _rect(lbl, vx + lane - ow * scale / 2, y - oh * scale, vx + lane + ow * scale / 2, y, c)
        elif c == PERSON:
            side = rng.choice([-1, 1])
            px = vx + side * (half + walk * rng.uniform(0.2, 0.8)) * depth
            cv2.ellipse(lbl, (int(px), int(y - 0.12 * scale)), (max(1, int(0.03 * scale)), max(2, int(0.12 * scale))),
                        0, 0, 360, PERSON, -1)  # fmt: skip
        else:  # a rider on a bicycle or motorcycle
            px = vx + rng.uniform(-0.6, 0.6) * half * depth
            _rect(lbl, px - 0.09 * scale, y - 0.1 * scale, px + 0.09 * scale, y, c)
            cv2.ellipse(lbl, (int(px), int(y - 0.2 * scale)), (max(1, int(0.03 * scale)), max(2, int(0.1 * scale))),
                        0, 0, 360, RIDER, -1)  # fmt: skip
    # A thin unlabelled border at the bottom (ego vehicle), as in real datasets.
    lbl[h - max(1, h // 64):] = 255
    return lbl


def _palette(domain: str) -> np.ndarray:
    """Per-class base colours of a domain (float32, 0..255)."""
    base = np.asarray(CITYSCAPES_PALETTE, np.float32)
    if domain == "source":
        return np.clip(base * 1.1 + 10, 0, 255)  # flat, saturated rendering
    hsv = cv2.cvtColor(base.astype(np.uint8)[None], cv2.COLOR_RGB2HSV).astype(np.float32)[0]
    hsv[:, 0] = (hsv[:, 0] + 25) % 180  # hue rotated
    hsv[:, 1] *= 0.55  # desaturated
    hsv[:, 2] = hsv[:, 2] * 0.7 + 30  # lower contrast
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0].astype(np.float32)


def render(lbl: np.ndarray, rng: np.random.Generator, domain: str) -> np.ndarray:
    """RGB uint8 image of a train-id map in the appearance of `domain` ("source" or "target")."""
    h, w = lbl.shape
    pal = _palette(domain)
    # Per-image colour variation of every class, so colour alone is not a perfect cue.
    pal = pal + rng.normal(0, 12, pal.shape).astype(np.float32)
    img = pal[np.where(lbl == 255, ROAD, lbl)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if domain == "source":
        img += rng.normal(0, 3, (h, w, 1)).astype(np.float32)
        win = ((yy.astype(int) // 6 + xx.astype(int) // 5) % 2 == 0) & (lbl == BUILDING)
        img[win] *= 0.85  # window grid on buildings
    else:
        tex = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 2.0)
        img += 18 * tex[..., None]
        light = 0.55 + 0.6 * (1 - yy / h) * rng.uniform(0.7, 1.0) + 0.25 * np.sin(xx / w * np.pi) * rng.uniform(0, 1)
        img *= light[..., None]
        img += rng.normal(0, 8, img.shape).astype(np.float32)  # sensor noise
        img = cv2.GaussianBlur(img, (0, 0), 0.8)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _write_label_ids(path: Path, trainids: np.ndarray, palette_png: bool) -> None:
    ids = _TRAINID_TO_ID[trainids]
    im = Image.fromarray(ids, mode="L")
    if palette_png:
        # GTA ships palette PNGs whose indices are label ids: store ids as indices with a colour palette.
        im = im.convert("P")
        colours = np.zeros((256, 3), np.uint8)
        for tid, rgb in enumerate(CITYSCAPES_PALETTE):
            colours[_TRAINID_TO_ID[tid]] = rgb
        im.putpalette(colours.ravel().tolist())
    im.save(path)


def make_synthetic(
    root: str | Path, n_source: int = 200, n_target: int = 100, n_val: int = 40, size: tuple[int, int] = (512, 256),
    seed: int = 0, quiet: bool = False,
) -> Path:  # fmt: skip
    """Write the benchmark under `root` (see module docstring) and return `root`.

    `n_target = n_val = 0` writes the source domain only (no `ROOT/target`), e.g. for a custom-dataset example.

    Raises:
        ValueError: `n_source` < 1 (every benchmark needs a labelled source) or a negative count.
    """
    if n_source < 1 or n_target < 0 or n_val < 0:
        raise ValueError(f"need n_source >= 1 and n_target, n_val >= 0; got {n_source}, {n_target}, {n_val}")
    root = Path(root)
    w, h = size
    src, tgt = root / "source", root / "target"
    (src / "images").mkdir(parents=True, exist_ok=True)
    (src / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n_source):
        rng = np.random.default_rng([seed, 0, i])
        lbl = draw_scene(rng, h, w)
        cv2.imwrite(str(src / "images" / f"{i:05d}.png"), render(lbl, rng, "source")[..., ::-1])
        _write_label_ids(src / "labels" / f"{i:05d}.png", lbl, palette_png=True)
    for split, n, stream in (("train", n_target, 1), ("val", n_val, 2)):
        for i in range(n):
            rng = np.random.default_rng([seed, stream, i])
            lbl = draw_scene(rng, h, w)
            city = _CITIES[i % len(_CITIES)]
            name = f"{city}_{i // len(_CITIES):06d}_000019"
            img_dir, gt_dir = tgt / "leftImg8bit" / split / city, tgt / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(img_dir / f"{name}_leftImg8bit.png"), render(lbl, rng, "target")[..., ::-1])
            _write_label_ids(gt_dir / f"{name}_gtFine_labelIds.png", lbl, palette_png=False)
    convert("gta", src, quiet=True)
    if n_target + n_val > 0:  # the Cityscapes converter rightly refuses a dataset without any label file
        convert("cityscapes", tgt, quiet=True)
    if not quiet:
        print(f"synthetic benchmark: {n_source} source, {n_target}+{n_val} target images at {w}x{h} in {root}")
    return root


def ensure_synthetic(root: str | Path, **kwargs) -> bool:
    """Generate the benchmark under `root` with `make_synthetic(root, **kwargs)` unless
    `root/source/sample_class_stats.json` exists; True when it generated it.

    That file is written once every source image and label is; a generation interrupted before it is redone
    from scratch (same bytes).
    """
    root = Path(root)
    if (root / "source" / "sample_class_stats.json").exists():
        return False
    log.info("generating the synthetic benchmark in %s", root)
    make_synthetic(root, **kwargs)
    return True
