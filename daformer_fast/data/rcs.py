"""Rare Class Sampling (DAFormer, Sec. 3.3; docs/recipe.md §3.1–3.2).

From the source dataset's `sample_class_stats.json` (per-image pixel counts at the original label resolution):

    f_c  = n_c / Σ_c' n_c'               (normalised by all labelled pixels, as the original code does)
    P(c) ∝ exp((1 − f_c) / T)  ≡  exp(−f_c / T)

Sampling one source item: draw c ~ P, then an image uniformly among those with more than `min_pixels` pixels of
c; the crop of that image is re-drawn (same image) up to `plan.RCS_CHECKS` = 10 times until it holds more
than `min_pixels · min_crop_ratio` pixels of c (checked by the sample plan, `plan.draw_crop`). Only classes that
occur at least once enter P (Synthia has no terrain, truck or train). JSON entries are matched to dataset
samples by the label file's base name only (the Cityscapes city folder is ignored), as in the original.

`min_pixels` counts pixels at the label's original resolution; the original's 3000 is tuned to GTA's 1914×1052
labels (0.15 % of an image). For other image sizes `suggest_min_pixels` keeps that fraction:
round(3000 · mean label area / (1914 · 1052)), at least 1. `convert_datasets folder` prints it, and the error
raised when no image passes the threshold names it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from daformer_fast.data.datasets import DatasetError, Sample, read_label

__all__ = [
    "GTA_LABEL_AREA",
    "PAPER_MIN_PIXELS",
    "RareClassSampler",
    "class_probabilities",
    "load_class_stats",
    "suggest_min_pixels",
]

log = logging.getLogger("daformer_fast.data")
PAPER_MIN_PIXELS = 3000
GTA_LABEL_AREA = 1914 * 1052


def suggest_min_pixels(mean_label_area: float) -> int:
    """The original's 3000-pixel RCS threshold scaled from GTA's label area to `mean_label_area` (module docstring)."""
    return max(1, round(PAPER_MIN_PIXELS * mean_label_area / GTA_LABEL_AREA))


def _min_pixels_hint(samples: list[Sample], limit: int = 32) -> str:
    """The suggested min_pixels for these samples' labels (mean area of the first `limit`, read as training reads
    them: an image or a `.npy` of the npy cache), as advice to append to a message; empty if no label reads."""
    areas = []
    for s in samples[:limit]:
        if s.label is None:
            continue
        try:
            areas.append(read_label(s.label).size)  # only on a warning or error path: decoding is affordable
        except (OSError, ValueError):  # DatasetError is a ValueError
            continue
    if not areas:
        return ""
    area = float(np.mean(areas))
    return (f"; for labels of {area:.0f} pixels on average use --set data.rcs.min_pixels={suggest_min_pixels(area)} "
            f"(3000 scaled by area from GTA's 1914x1052)")  # fmt: skip


def load_class_stats(root: str | Path) -> list[dict]:
    """The per-image statistics list written by `tools.convert_datasets` (or `make_synthetic`)."""
    path = Path(root) / "sample_class_stats.json"
    if not path.is_file():
        raise DatasetError(
            f"rare class sampling needs {path}; run `python -m daformer_fast.tools.convert_datasets` on {root} "
            f"or set data.rcs.enabled=false"
        )
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    if not isinstance(stats, list) or not all(isinstance(s, dict) and "file" in s for s in stats):
        raise DatasetError(f"{path}: expected a list of {{class: pixels, ..., 'file': path}} objects")
    return stats


def class_probabilities(stats: list[dict], temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(classes, P) over the classes present in `stats`, classes ordered by ascending frequency (the original's
    order)."""
    totals: dict[int, int] = {}
    for s in stats:
        for c, n in s.items():
            if c != "file":
                totals[int(c)] = totals.get(int(c), 0) + int(n)
    if not totals:
        raise DatasetError("rare class sampling: the class statistics contain no labelled pixel")
    classes = np.array(sorted(totals, key=lambda c: (totals[c], c)), dtype=np.int64)
    freq = np.array([totals[c] for c in classes], dtype=np.float64)
    freq /= freq.sum()
    logits = (1.0 - freq) / temperature
    p = np.exp(logits - logits.max())  # stable softmax; identical to exp(-f/T) normalised
    return classes, p / p.sum()


@dataclass
class RareClassSampler:
    """Class and image choice of RCS over a list of dataset samples."""

    classes: np.ndarray
    probs: np.ndarray
    images_with_class: dict[int, np.ndarray]
    """class → indices into the dataset's sample list of the images with > min_pixels pixels of that class."""
    min_pixels: int
    min_crop_ratio: float

    @classmethod
    def from_stats(
        cls, stats: list[dict], samples: list[Sample], temperature: float, min_pixels: int, min_crop_ratio: float
    ) -> RareClassSampler:
        index_of = {Path(s.label).name: i for i, s in enumerate(samples) if s.label is not None}
        candidates: dict[int, list[int]] = {}
        for s in stats:
            i = index_of.get(Path(s["file"]).name)
            if i is None:
                continue  # a statistics entry for a file that is not in this dataset (e.g. a filtered split)
            for c, n in s.items():
                if c != "file" and int(n) > min_pixels:  # strict, as the original
                    candidates.setdefault(int(c), []).append(i)
        classes, probs = class_probabilities(stats, temperature)
        # Classes present in the data but never above min_pixels in one image cannot be sampled; drop them and
        # renormalise (the original would fail on an empty candidate list).
        keep = np.array([int(c) in candidates for c in classes])
        if not keep.any():
            raise DatasetError(
                f"rare class sampling: no image has more than data.rcs.min_pixels={min_pixels} pixels of any class "
                f"(counted at the label's original resolution){_min_pixels_hint(samples)}, or set "
                f"data.rcs.enabled=false"
            )
        if not keep.all():
            # Legitimate for a rare class in big images, but on small images it usually means min_pixels is too
            # high and RCS quietly samples only the frequent classes: say so once, at construction.
            log.warning(
                "rare class sampling: classes %s never cover more than data.rcs.min_pixels=%d pixels of one image "
                "and are not sampled%s", ", ".join(str(int(c)) for c in classes[~keep]), min_pixels,
                _min_pixels_hint(samples),
            )  # fmt: skip
        classes, probs = classes[keep], probs[keep] / probs[keep].sum()
        images = {int(c): np.array(sorted(candidates[int(c)]), dtype=np.int64) for c in classes}
        return cls(classes, probs, images, min_pixels, min_crop_ratio)

    def sample(self, rng: np.random.Generator) -> tuple[int, int]:
        """(class, sample index): c ~ P, then an image uniformly among those rich in c."""
        c = int(self.classes[rng.choice(len(self.classes), p=self.probs)])
        idx = self.images_with_class[c]
        return c, int(idx[rng.integers(len(idx))])

    @property
    def min_crop_pixels(self) -> float:
        return self.min_pixels * self.min_crop_ratio
