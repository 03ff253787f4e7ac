"""mmseg's PhotoMetricDistortion, the supervised baselines' loader augmentation (docs/architectures.md §3).

Two halves, so that the sample plan owns every random decision (`plan`) and the loaders only execute them:

- `draw_photometric(rng)` makes the draws in the original's order: brightness switch (and β), the contrast-position
  mode, the contrast switch (and α) when the mode is 1, saturation switch (and α), hue switch (and δ), the contrast
  switch (and α) when the mode is 0. Every switch costs one draw whether or not its branch fires; a parameter is
  drawn only when its branch fires. The draws come from the sample's own Generator (`plan.photometric_rng`), not
  NumPy's global one (docs/architectures.md §3: a documented deviation).
- `apply_photometric(img, draw)` applies them to a uint8 H×W×3 RGB crop, as the original does to its BGR crop.

Brightness and contrast treat the three channels alike, so they do not care about the channel order. Saturation and
hue go through OpenCV's 8-bit HSV (H in [0, 180)); the RGB conversions on an RGB image give exactly the H, S, V
that the BGR conversions give on the same pixels in BGR order (tests/test_photometric.py checks it), so the result
is the original's, channel-swapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

__all__ = [
    "BRIGHTNESS_DELTA",
    "CONTRAST_RANGE",
    "HUE_DELTA",
    "SATURATION_RANGE",
    "PhotometricDraw",
    "apply_photometric",
    "draw_photometric",
]

BRIGHTNESS_DELTA = 32
"""β is uniform in [−32, 32) (the original's default `brightness_delta`)."""
CONTRAST_RANGE = (0.5, 1.5)
"""Contrast α is uniform in [0.5, 1.5) (default `contrast_range`)."""
SATURATION_RANGE = (0.5, 1.5)
"""Saturation α is uniform in [0.5, 1.5) (default `saturation_range`)."""
HUE_DELTA = 18
"""δ is an integer in [−18, 18): the original's `randint(-18, 18)` excludes its upper bound, so δ ≤ 17."""


class _Draws(Protocol):
    """What `draw_photometric` needs of a Generator (tests pass a recorder with the same two methods)."""

    def integers(self, low: int, high: int | None = None) -> int: ...

    def uniform(self, low: float, high: float) -> float: ...


@dataclass(frozen=True)
class PhotometricDraw:
    """The random decisions of one PhotoMetricDistortion; None = that step's switch came up 0."""

    brightness: float | None
    """β added to every channel."""
    contrast_first: bool
    """The original's mode == 1: contrast right after brightness; else (mode 0) after hue."""
    contrast: float | None
    """α multiplying every channel (no mean subtraction, as the original)."""
    saturation: float | None
    """α multiplying S."""
    hue: int | None
    """δ added to H modulo 180."""


def _switch(rng: _Draws) -> bool:
    return int(rng.integers(2)) == 1


def draw_photometric(rng: _Draws) -> PhotometricDraw:
    """The draws of one distortion, in the original's order (module docstring)."""
    beta = float(rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)) if _switch(rng) else None
    contrast_first = int(rng.integers(2)) == 1

    def contrast() -> float | None:
        return float(rng.uniform(*CONTRAST_RANGE)) if _switch(rng) else None

    alpha = contrast() if contrast_first else None
    sat = float(rng.uniform(*SATURATION_RANGE)) if _switch(rng) else None
    hue = int(rng.integers(-HUE_DELTA, HUE_DELTA)) if _switch(rng) else None
    if not contrast_first:
        alpha = contrast()
    return PhotometricDraw(beta, contrast_first, alpha, sat, hue)


def _affine(a: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """a · α + β in float32, clipped to [0, 255], truncated (not rounded) to uint8: the original's `convert`.
    NumPy computes a float32 array with a Python float in float32, which is what the original's arithmetic is."""
    out = a.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


def apply_photometric(img: np.ndarray, draw: PhotometricDraw) -> np.ndarray:
    """`img` (uint8 H×W×3 RGB) distorted by `draw`; a new array. Every enabled HSV step is its own round trip
    through uint8 HSV, as in the original, so each re-quantises the image."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {img.dtype} {img.shape}")
    out = np.ascontiguousarray(img)
    if draw.brightness is not None:
        out = _affine(out, beta=draw.brightness)
    if draw.contrast_first and draw.contrast is not None:
        out = _affine(out, alpha=draw.contrast)
    if draw.saturation is not None:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _affine(hsv[..., 1], alpha=draw.saturation)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if draw.hue is not None:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + draw.hue) % 180
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not draw.contrast_first and draw.contrast is not None:
        out = _affine(out, alpha=draw.contrast)
    return out if out is not img else out.copy()
