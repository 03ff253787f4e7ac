"""Rare Class Sampling (docs/recipe.md §3.1-3.2): class probabilities, candidate lists and empirical sampling
frequencies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from daformer_fast.data.datasets import DatasetError, Sample
from daformer_fast.data.rcs import RareClassSampler, class_probabilities, load_class_stats

# Totals: class 0: 650, 1: 300, 2: 40, 5: 10 of 1000 labelled pixels -> f = .65, .30, .04, .01.
STATS = [
    {"0": 600, "1": 300, "file": "labels/x1_labelTrainIds.png"},
    {"0": 50, "2": 40, "5": 10, "file": "labels/x2_labelTrainIds.png"},
]


def test_probabilities_match_softmax_by_hand():
    classes, p = class_probabilities(STATS, 0.1)
    assert classes.tolist() == [5, 2, 1, 0]  # ascending frequency
    # P(c) = exp(-f_c / T) / sum, computed with math.exp outside this code base.
    np.testing.assert_allclose(p, [0.5563273057716, 0.4121374047784, 0.0306109197689, 0.0009243696812], rtol=1e-9)
    classes, p = class_probabilities(STATS, 0.01)
    np.testing.assert_allclose(p, [0.9525741268222, 0.0474258731776, 2.4230300829777e-13, 1.5277487586523e-28],
                               rtol=1e-9)  # fmt: skip
    assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_probabilities_equal_softmax_of_one_minus_f_over_t():
    rng = np.random.default_rng(3)
    stats = []
    for i in range(20):
        classes = rng.choice(19, 6, replace=False)
        stats.append({str(c): int(n) for c, n in zip(classes, rng.integers(1, 5000, 6))} | {"file": f"{i}.png"})
    totals = np.zeros(19)
    for s in stats:
        for c, n in s.items():
            if c != "file":
                totals[int(c)] += n
    present = np.flatnonzero(totals)
    f = totals[present] / totals[present].sum()
    for T in (0.01, 0.05, 1.0):
        z = (1 - f) / T
        expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        classes, p = class_probabilities(stats, T)
        order = np.argsort(classes)
        assert sorted(classes.tolist()) == present.tolist()
        np.testing.assert_allclose(p[order], expected, rtol=1e-10, atol=1e-300)
        assert np.all(np.diff(totals[classes]) >= 0)  # ordered by ascending frequency
        assert np.all(np.diff(p) <= 1e-15)  # hence by descending probability


def test_huge_temperature_is_uniform():
    classes, p = class_probabilities(STATS, 1e9)
    np.testing.assert_allclose(p, 0.25, atol=1e-9)


def test_frequency_ties_are_ordered_by_class_id():
    classes, _ = class_probabilities([{"3": 5, "1": 5, "2": 1, "file": "a.png"}], 0.01)
    assert classes.tolist() == [2, 1, 3]


def test_no_labelled_pixel_is_an_error():
    with pytest.raises(DatasetError, match="no labelled pixel"):
        class_probabilities([{"file": "a.png"}], 0.01)


# 0.999 quantiles of the chi-square distribution by degrees of freedom (no scipy dependency).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def _chi2_ok(observed: np.ndarray, expected: np.ndarray) -> bool:
    """Pearson's goodness-of-fit test at the 0.1 % level."""
    stat = float((((observed - expected) ** 2) / expected).sum())
    return stat < CHI2_999[len(observed) - 1]


def _samples(tmp_path: Path, names: list[str]) -> list[Sample]:
    return [Sample(img=tmp_path / "images" / f"{n}.png", label=tmp_path / "labels" / f"{n}_labelTrainIds.png", name=n)
            for n in names]  # fmt: skip


def test_candidates_strict_min_pixels_basename_matching_and_renormalisation(tmp_path):
    # The statistics were written for the dataset at another location: only base names must match.
    stats = [
        {"0": 600, "1": 300, "file": "/elsewhere/gta/labels/x1_labelTrainIds.png"},
        {"0": 50, "1": 41, "2": 40, "5": 10, "file": "/elsewhere/gta/labels/x2_labelTrainIds.png"},
    ]
    samples = _samples(tmp_path, ["x0", "x1", "x2"])
    rcs = RareClassSampler.from_stats(stats, samples, temperature=0.1, min_pixels=40, min_crop_ratio=0.5)
    # Class 2 has exactly 40 pixels (not > 40) and class 5 only 10: both dropped; 1 (341 px) is rarer than 0 (650).
    assert rcs.classes.tolist() == [1, 0]
    full_classes, full_p = class_probabilities(stats, 0.1)
    keep = [full_classes.tolist().index(c) for c in (1, 0)]
    np.testing.assert_allclose(rcs.probs, full_p[keep] / full_p[keep].sum(), rtol=1e-12)
    assert rcs.probs.sum() == pytest.approx(1.0)
    assert {c: v.tolist() for c, v in rcs.images_with_class.items()} == {0: [1, 2], 1: [1, 2]}
    assert rcs.min_crop_pixels == 20.0
    # One pixel less and class 1 of x2 no longer qualifies; one more pixel allowed and class 2 does.
    rcs = RareClassSampler.from_stats(stats, samples, temperature=0.1, min_pixels=41, min_crop_ratio=0.5)
    assert {c: v.tolist() for c, v in rcs.images_with_class.items()} == {0: [1, 2], 1: [1]}
    rcs = RareClassSampler.from_stats(stats, samples, temperature=0.1, min_pixels=39, min_crop_ratio=0.5)
    assert rcs.classes.tolist() == [2, 1, 0]
    assert rcs.images_with_class[2].tolist() == [2]


def test_entries_for_files_outside_the_dataset_give_no_candidates(tmp_path):
    stats = [{"0": 100, "file": "labels/x1_labelTrainIds.png"}, {"0": 100, "7": 900, "file": "labels/gone.png"}]
    rcs = RareClassSampler.from_stats(stats, _samples(tmp_path, ["x1"]), 0.01, 10, 0.5)
    assert rcs.classes.tolist() == [0] and rcs.probs.tolist() == [1.0]
    assert rcs.images_with_class[0].tolist() == [0]


def test_nothing_qualifies_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match=r"more than data\.rcs\.min_pixels=1000 pixels"):
        RareClassSampler.from_stats(STATS, _samples(tmp_path, ["x1", "x2"]), 0.01, 1000, 0.5)
    with pytest.raises(DatasetError, match="min_pixels"):  # no stats entry matches any sample
        RareClassSampler.from_stats(STATS, _samples(tmp_path, ["y1"]), 0.01, 0, 0.5)


def test_empirical_frequencies_match_p(tmp_path):
    names = [f"x{i}" for i in range(6)]
    stats = [
        {"0": 5000, "10": 3000, "file": "labels/x0_labelTrainIds.png"},
        {"0": 4000, "13": 900, "file": "labels/x1_labelTrainIds.png"},
        {"0": 4500, "13": 600, "17": 120, "file": "labels/x2_labelTrainIds.png"},
        {"10": 2500, "13": 700, "file": "labels/x3_labelTrainIds.png"},
        {"0": 3000, "17": 150, "18": 60, "file": "labels/x4_labelTrainIds.png"},
        {"0": 3500, "18": 80, "file": "labels/x5_labelTrainIds.png"},
    ]
    rcs = RareClassSampler.from_stats(stats, _samples(tmp_path, names), temperature=0.2, min_pixels=50,
                                      min_crop_ratio=0.5)  # fmt: skip
    assert rcs.classes.tolist() == [18, 17, 13, 10, 0]
    n = 20000
    rng = np.random.default_rng(1234)
    draws = [rcs.sample(rng) for _ in range(n)]
    cls = np.array([c for c, _ in draws])
    counts = np.array([(cls == c).sum() for c in rcs.classes])
    expected = rcs.probs * n
    assert _chi2_ok(counts, expected)
    se = np.sqrt(rcs.probs * (1 - rcs.probs) / n)
    assert np.all(np.abs(counts / n - rcs.probs) < 4 * se + 1e-12)
    # Images are uniform among the candidates of the drawn class, and never a non-candidate.
    for c in rcs.classes.tolist():
        imgs = np.array([i for k, i in draws if k == c])
        cand = rcs.images_with_class[c]
        assert set(imgs.tolist()) == set(cand.tolist())
        per = np.array([(imgs == i).sum() for i in cand])
        if len(cand) > 1:
            assert _chi2_ok(per, np.full(len(cand), per.sum() / len(cand)))
    # Class 18 (train ids of x4, x5) > 50 pixels in both: rarest -> most likely.
    assert rcs.images_with_class[18].tolist() == [4, 5]
    assert counts[0] == counts.max()


def test_same_generator_state_gives_same_draws(tmp_path):
    rcs = RareClassSampler.from_stats(STATS, _samples(tmp_path, ["x1", "x2"]), 0.1, 5, 0.5)
    a = [rcs.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng1, rng2 = np.random.default_rng(9), np.random.default_rng(9)
    assert [rcs.sample(rng1) for _ in range(50)] == [rcs.sample(rng2) for _ in range(50)]


def test_load_class_stats(tmp_path):
    with pytest.raises(DatasetError, match=r"sample_class_stats\.json.*convert_datasets.*rcs\.enabled=false"):
        load_class_stats(tmp_path)
    (tmp_path / "sample_class_stats.json").write_text(json.dumps(STATS))
    assert load_class_stats(tmp_path) == STATS
    (tmp_path / "sample_class_stats.json").write_text(json.dumps([{"0": 1}]))
    with pytest.raises(DatasetError, match="expected a list"):
        load_class_stats(tmp_path)
    (tmp_path / "sample_class_stats.json").write_text("[{")
    with pytest.raises(DatasetError, match="cannot read"):
        load_class_stats(tmp_path)


def test_min_pixels_hint_reads_npy_labels_of_the_cache(tmp_path, caplog):
    # Labels as the npy cache stores them: 100x200 and 100x300 uint8 arrays, mean area 25000 pixels ->
    # round(3000 * 25000 / (1914 * 1052)) = round(37.25) = 37.
    (tmp_path / "labels").mkdir()
    samples = []
    for name, w in (("x1", 200), ("x2", 300)):
        np.save(tmp_path / "labels" / f"{name}_labelTrainIds.npy", np.zeros((100, w), np.uint8))
        samples.append(Sample(img=tmp_path / "images" / f"{name}.npy",
                              label=tmp_path / "labels" / f"{name}_labelTrainIds.npy", name=name))  # fmt: skip
    stats = [{**{k: v for k, v in s.items() if k != "file"}, "file": s["file"].replace(".png", ".npy")} for s in STATS]
    hint = "for labels of 25000 pixels on average use --set data.rcs.min_pixels=37"
    with caplog.at_level("WARNING", logger="daformer_fast.data"):
        rcs = RareClassSampler.from_stats(stats, samples, temperature=0.1, min_pixels=45, min_crop_ratio=0.5)
    assert rcs.classes.tolist() == [1, 0]  # classes 2 (40 px) and 5 (10 px) are dropped: the warning
    assert "classes 5, 2 never cover" in caplog.text and hint in caplog.text
    with pytest.raises(DatasetError, match=hint):
        RareClassSampler.from_stats(stats, samples, 0.1, 1000, 0.5)
