"""End-to-end training runs on the synthetic benchmark: outputs, checkpoints, exact resume, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from daformer_fast.checkpoint import read_checkpoint
from daformer_fast.config import load_config
from daformer_fast.data.synthetic import make_synthetic
from daformer_fast.train import main
from tiny_run import write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_source=12, n_target=6, n_val=3, size=(128, 64), quiet=True)


def _config(tmp_path: Path, syn: Path, **train) -> Path:
    """A tiny full-recipe config; `train` entries override the train section."""
    t = {"max_iters": 4, "log_interval": 2, "eval_interval": 4, "checkpoint_interval": 2, "keep_checkpoints": 1,
         **train}  # fmt: skip
    return write_config(tmp_path, syn, t, debug_img_interval=3)


def _rows(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def test_full_run_writes_everything(tmp_path, syn, capsys):
    cfg = _config(tmp_path, syn)
    assert main([str(cfg)]) == 0
    work = tmp_path / "work"
    assert load_config(work / "config.yaml") == load_config(cfg)  # the resolved config round-trips
    rows = _rows(work)
    train_rows = [r for r in rows if "loss_src" in r]
    eval_rows = [r for r in rows if "mIoU" in r]
    assert [r["step"] for r in train_rows] == [2, 4] and [r["step"] for r in eval_rows] == [4]
    for key in ("lr", "lr_head", "loss_src", "loss_fd", "loss_mix", "pseudo_weight", "step_ms", "img_s",
                "data_wait_pct", "mem_gib"):  # fmt: skip
        assert isinstance(train_rows[0][key], float), key
    assert train_rows[0]["lr_head"] == pytest.approx(10 * train_rows[0]["lr"])
    # The first row says which loader ran (the torch loader on CPU: the DALI self-check is not run there).
    assert train_rows[0]["loader"]["loader"] == "torch" and "loader" not in train_rows[1]
    assert set(eval_rows[0]["IoU"]) == set(load_config(cfg).data.classes)
    assert f"final mIoU on {syn / 'target'}: {eval_rows[0]['mIoU']:.2f}" in capsys.readouterr().out
    # Checkpoints: keep_checkpoints=1 leaves the last one, pointed to by latest.pth.
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_000004.pth"]
    assert (work / "latest.pth").resolve() == (work / "iter_000004.pth").resolve()
    state = read_checkpoint(work / "latest.pth")  # weights_only load
    assert state["iteration"] == 4 and {"student", "teacher", "optimizer", "config"} <= set(state)
    assert sorted(p.name for p in (work / "class_mix_debug").iterdir()) == ["000001_0.png", "000001_1.png",
                                                                           "000004_0.png", "000004_1.png"]
    assert any((work / "tb").iterdir())


def test_resume_is_exact(tmp_path, syn):
    """Resuming from the iteration-2 checkpoint gives the uninterrupted run's iteration-4 state bit for bit."""
    full = _config(tmp_path / "a", syn, keep_checkpoints=2)
    assert main([str(full)]) == 0
    resumed = _config(tmp_path / "b", syn)
    work_b = tmp_path / "b" / "work"
    work_b.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "work" / "iter_000002.pth", work_b)
    assert main([str(resumed), "--resume", "auto"]) == 0
    a = read_checkpoint(tmp_path / "a" / "work" / "iter_000004.pth")
    b = read_checkpoint(work_b / "iter_000004.pth")
    for part_name in ("student", "teacher"):
        for k, v in a[part_name].items():
            assert torch.equal(v, b[part_name][k]), f"{part_name}.{k}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, s in a["optimizer"]["state"].items():
        assert all(torch.equal(s[k], b["optimizer"]["state"][i][k]) for k in s)
    # The resumed run logged iterations 3-4 only.
    assert [r["step"] for r in _rows(work_b) if "loss_src" in r] == [4]


@pytest.mark.parametrize("mode", ["source_only", "target_only"])
def test_baselines_train(tmp_path, syn, mode):
    cfg = _config(tmp_path, syn, max_iters=2, eval_interval=2)
    assert main([str(cfg), "--set", f"uda.mode={mode}"]) == 0
    rows = _rows(tmp_path / "work")
    assert "loss_mix" not in rows[0] and rows[0]["loss_src"] > 0 and "mIoU" in rows[-1]


def test_bad_inputs_short_errors(tmp_path, syn, capsys):
    cfg = _config(tmp_path, syn)
    assert main([str(cfg), "--set", "train.max_iter=3"]) == 2
    assert "did you mean train.max_iters" in capsys.readouterr().err
    assert main([str(cfg), "--set", f"data.source.root={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main([str(cfg), "--set", f"model.pretrained={tmp_path / 'missing.pth'}"]) == 2
    assert "missing.pth" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, syn):
    """DDP on CPU (gloo): two ranks train on different batches, evaluate their shards, rank 0 writes."""
    cfg = _config(tmp_path, syn, max_iters=2, eval_interval=2, deterministic=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "daformer_fast.train", str(cfg)]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    work = tmp_path / "work"
    rows = _rows(work)
    assert [r["step"] for r in rows if "loss_src" in r] == [2]
    assert rows[0]["img_s"] > 0 and "mIoU" in rows[-1]
    assert "2 process(es)" in (work / "train.log").read_text()
    shutil.rmtree(work)


@pytest.mark.slow
def test_two_node_rendezvous(tmp_path, syn):
    """Two torchrun launches (one process each) meet through c10d rendezvous on 127.0.0.1, as two nodes would."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(tmp_path, syn, max_iters=2, eval_interval=2, deterministic=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=daformer-test",
           "-m", "daformer_fast.train", str(cfg)]  # fmt: skip
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [n.communicate(timeout=600) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]
    rows = _rows(tmp_path / "work")
    assert [r["step"] for r in rows if "loss_src" in r] == [2] and "mIoU" in rows[-1]
    assert "2 process(es)" in (tmp_path / "work" / "train.log").read_text()
