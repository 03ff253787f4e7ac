"""Golden losses: the tiny CPU run's per-step losses, both paths, against numbers recorded in `golden/`.

The parity tests compare the fast path with the original-order path; a change both paths share (the HSV code of
the colour jitter, the normalisation, the loss) moves both alike and passes them. These numbers catch it. After a
change that is meant to move them, regenerate the file and say why in the commit:

    python tests/test_golden_losses.py --update
"""

import json
import sys
from pathlib import Path

import pytest

from daformer_fast.data.synthetic import make_synthetic
from daformer_fast.train import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_run import write_config  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_run_losses.json"
KEYS = ("loss_src", "loss_fd", "loss_mix", "pseudo_weight")
STEPS = 6


def _losses(directory: Path, syn: Path, path: str) -> list[dict[str, float]]:
    # A low confidence threshold, so that the young teacher's pseudo-labels carry weight and loss_mix (ClassMix,
    # colour jitter, blur) is non-zero from the first step; a low purity threshold, so that the feature distance finds
    # thing cells in the 2×2 grid of a 64² crop.
    cfg = write_config(directory, syn, {"max_iters": STEPS, "log_interval": 1, "eval_interval": 1000, "path": path})
    assert main([str(cfg), "--set", "uda.pseudo_threshold=0.06", "uda.fd_scale_min_ratio=0.3",
                 "uda.debug_img_interval=0"]) == 0
    rows = [json.loads(line) for line in (directory / "work" / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in KEYS} for row in rows if "loss_src" in row]


def _syn(directory: Path) -> Path:
    return make_synthetic(directory, n_source=12, n_target=6, n_val=3, size=(128, 64), quiet=True)


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return _syn(tmp_path_factory.mktemp("syn"))


@pytest.mark.parametrize("path", ["fast", "original"])
def test_tiny_run_reproduces_golden_losses(tmp_path, syn, path):
    golden = json.loads(GOLDEN.read_text())[path]
    got = _losses(tmp_path, syn, path)
    assert len(got) == len(golden) == STEPS
    # Every stage is exercised: the mixed loss and its weight at every step, the feature distance at some.
    assert all(step["loss_mix"] > 0 and step["pseudo_weight"] > 0 for step in golden)
    assert any(step["loss_fd"] > 0 for step in golden)
    for t, (g, want) in enumerate(zip(got, golden)):
        for k in KEYS:
            # Float32 on one CPU kind: the same numbers to rounding noise; a shared change moves them far more.
            assert g[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), f"step {t + 1} {k}: {g[k]} != golden {want[k]}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_golden_losses.py --update")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        syn_root = _syn(Path(tmp) / "syn")
        out = {path: _losses(Path(tmp) / path, syn_root, path) for path in ("fast", "original")}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
