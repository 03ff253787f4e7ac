"""Fault tolerance: exact resume after kill -9 (also mid-write), damaged checkpoints, SIGTERM, torchrun
elastic restarts, non-finite steps, bad input through the CLI, and the security rules for checkpoints, YAML and
the work dir.

Runs that are compared bit for bit with the uninterrupted one are subprocesses with one thread each (CPU kernels may
reduce in a thread-count-dependent order); the rest run in-process through `train.main`.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from daformer_fast.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from daformer_fast.run_state import save_run_state
from daformer_fast.data.synthetic import make_synthetic
from daformer_fast.train import main
from tiny_run import write_config

REPO = Path(__file__).resolve().parents[1]
MAX_ITERS = 8
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process runs like the subprocesses: one thread (also far faster on a loaded two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_source=12, n_target=6, n_val=3, size=(128, 64), quiet=True)


def _config(tmp_path: Path, syn: Path, source: Path | None = None, **train) -> Path:
    """A tiny full-recipe config checkpointing every iteration; evaluation only at the end."""
    t = {"max_iters": MAX_ITERS, "log_interval": 1, "eval_interval": 1000, "checkpoint_interval": 1,
         "keep_checkpoints": 2, **train}  # fmt: skip
    return write_config(tmp_path, syn, t, source=source)


def _spawn(cfg: Path, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """`python [LAUNCHER] -m daformer_fast.train CFG --resume auto ARGS` in its own process group, output to files."""
    log = open(cfg.parent / f"out_{time.monotonic_ns()}.txt", "w")
    cmd = [sys.executable, *launcher, "-m", "daformer_fast.train", str(cfg), "--resume", "auto", *args]
    p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    p.out_path = Path(log.name)  # type: ignore[attr-defined]
    log.close()
    return p


def _output(p: subprocess.Popen) -> str:
    return p.out_path.read_text()  # type: ignore[attr-defined]


def _iters(work: Path) -> list[int]:
    return sorted(int(n[5:11]) for n in os.listdir(work) if n.startswith("iter_") and n.endswith(".pth")) if (
        work.is_dir()) else []  # fmt: skip


def _wait(cond, p: subprocess.Popen, timeout: float = 240.0, poll: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert p.poll() is None, f"the run ended (rc {p.returncode}) before the awaited moment:\n{_output(p)[-3000:]}"
        assert time.monotonic() < end, "timed out"
        time.sleep(poll)


def _finish(p: subprocess.Popen, timeout: float = 300.0) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise


def _assert_same_state(a_path: Path, b_path: Path) -> None:
    a, b = read_checkpoint(a_path), read_checkpoint(b_path)
    assert a["iteration"] == b["iteration"]
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i, s in sa.items():
        for k, v in s.items():
            assert torch.equal(v, sb[i][k]), f"optimizer state {i}.{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, syn) -> Path:
    """The uninterrupted run's final checkpoint."""
    cfg = _config(tmp_path_factory.mktemp("ref"), syn)
    p = _spawn(cfg)
    assert _finish(p) == 0, _output(p)[-3000:]
    return cfg.parent / "work" / f"iter_{MAX_ITERS:06d}.pth"


# ---------------------------------------------------------------------------------------------------------------
# Resume after kill -9, damaged checkpoints, SIGTERM, elastic restarts


@pytest.mark.slow
def test_kill9_mid_write_and_at_random_moments_resumes_exactly(tmp_path, syn, reference):
    cfg = _config(tmp_path, syn)
    work = tmp_path / "work"
    tmps = lambda: [n for n in os.listdir(work) if n.endswith(".pth.tmp") and n.startswith("iter_")]  # noqa: E731

    # 1. SIGKILL while a checkpoint is being written: kill as soon as a `.tmp` appears after a complete checkpoint.
    for _attempt in range(3):
        p = _spawn(cfg)
        _wait(lambda: bool(_iters(work)), p)
        _wait(lambda: bool(tmps()), p, poll=0.0005)
        os.killpg(p.pid, signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
        if tmps():  # the write was cut short (else it finished between the poll and the kill: try again)
            break
    partial = tmps()
    assert partial, "could not kill the run during a checkpoint write"
    newest = max(_iters(work))
    assert int(partial[0][5:11]) > newest  # the interrupted file is the next one; the complete ones are intact
    read_checkpoint(work / f"iter_{newest:06d}.pth")

    # 2. SIGKILL at random moments (mid-step, mid-write or between) after some progress; the leftover .tmp stays.
    rng = random.Random(1234)
    for _kill in range(2):
        done = max(_iters(work))
        p = _spawn(cfg)
        _wait(lambda done=done: max(_iters(work)) > done, p)
        time.sleep(rng.uniform(0.0, 0.8))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        assert max(_iters(work)) < MAX_ITERS

    # 3. The last resume completes; bit-for-bit the uninterrupted run.
    p = _spawn(cfg)
    assert _finish(p) == 0, _output(p)[-3000:]
    assert "resumed from" in _output(p)
    assert not tmps(), "leftover partial checkpoints are removed by the next save"
    _assert_same_state(reference, work / f"iter_{MAX_ITERS:06d}.pth")
    assert (work / "train.log").read_text().count("resumed from") >= 3


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, syn, reference):
    cfg = _config(tmp_path, syn)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("iter_000007.pth", "iter_000008.pth"):
        shutil.copy(reference.parent / name, work)
    os.symlink("iter_000008.pth", work / "latest.pth")
    data = (work / "iter_000008.pth").read_bytes()
    (work / "iter_000008.pth").write_bytes(data[: len(data) // 2])  # truncated, as after a disk failure
    p = _spawn(cfg)
    assert _finish(p) == 0, _output(p)[-3000:]
    out = _output(p)
    assert "skipping damaged checkpoint" in out and "iter_000008.pth" in out
    assert "resumed from" in out and "iter_000007.pth at iteration 7" in out
    _assert_same_state(reference, work / "iter_000008.pth")


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_0_then_resumes_exactly(tmp_path, syn, reference):
    """SIGTERM to the whole process group (as schedulers send it), with a DataLoader worker in the group."""
    cfg = _config(tmp_path, syn)
    work = tmp_path / "work"
    p = _spawn(cfg, "--set", "data.workers=1", "train.checkpoint_interval=3")
    _wait(lambda: 3 in _iters(work), p)
    os.killpg(p.pid, signal.SIGTERM)
    assert _finish(p) == 0, _output(p)[-3000:]
    out = _output(p)
    assert "SIGTERM: checkpointing at iteration" in out and "Traceback" not in out
    stopped = max(_iters(work))
    assert 3 < stopped < MAX_ITERS and f"SIGTERM: checkpointing at iteration {stopped}" in out
    p = _spawn(cfg)
    assert _finish(p) == 0, _output(p)[-3000:]
    assert f"at iteration {stopped}" in _output(p)
    _assert_same_state(reference, work / f"iter_{MAX_ITERS:06d}.pth")


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _torchrun(cfg: Path, *torchrun_args: str) -> subprocess.Popen:
    """Two CPU (gloo) ranks of the training CLI under torchrun."""
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *torchrun_args)
    return _spawn(cfg, launcher=launcher)


def _logged_steps(work: Path) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines() if line]
    except (OSError, json.JSONDecodeError):
        return []


@pytest.mark.slow
def test_torchrun_elastic_restart_after_a_rank_is_killed(tmp_path, syn):
    """--max-restarts=1: SIGKILL of rank 1 mid-run → torchrun restarts both ranks, which resume and finish."""
    cfg = _config(tmp_path, syn, max_iters=6, deterministic=False)
    work = tmp_path / "work"
    p = _torchrun(cfg, "--max-restarts=1")
    _wait(lambda: 2 in _iters(work), p)
    rank1 = [c for c in _children(p.pid) if _env_of(c).get("RANK") == "1"]
    assert len(rank1) == 1 and _env_of(rank1[0]).get("TORCHELASTIC_RESTART_COUNT") == "0"
    os.kill(rank1[0], signal.SIGKILL)
    assert _finish(p) == 0, _output(p)[-4000:]
    train_log = (work / "train.log").read_text()
    assert "resumed from" in train_log and train_log.count("2 process(es)") == 2
    assert _iters(work)[-1] == 6 and read_checkpoint(work / "latest.pth")["iteration"] == 6


@pytest.mark.slow
def test_sigterm_to_one_ddp_rank_stops_both_at_the_same_iteration(tmp_path, syn):
    """Only rank 1 gets SIGTERM; rank 0 must learn of it through the all-reduced flag, both checkpoint at the same
    iteration and exit 0 (so torchrun reports success), and the run then resumes from there to the end."""
    max_iters = 12
    cfg = _config(tmp_path, syn, max_iters=max_iters, deterministic=False, checkpoint_interval=100)
    work = tmp_path / "work"
    p = _torchrun(cfg)
    _wait(lambda: any(s >= 2 for s in _logged_steps(work)), p)
    rank1 = [c for c in _children(p.pid) if _env_of(c).get("RANK") == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGTERM)
    assert _finish(p) == 0, _output(p)[-4000:]
    assert len(_iters(work)) == 1, f"one checkpoint expected, got {_iters(work)}"
    stopped = _iters(work)[0]
    assert 2 <= stopped < max_iters
    assert f"SIGTERM: checkpointing at iteration {stopped}" in (work / "train.log").read_text()  # logged by rank 0
    assert read_checkpoint(work / "latest.pth")["iteration"] == stopped
    p = _torchrun(cfg)
    assert _finish(p) == 0, _output(p)[-4000:]
    assert f"at iteration {stopped}" in (work / "train.log").read_text()
    assert read_checkpoint(work / "latest.pth")["iteration"] == max_iters


# ---------------------------------------------------------------------------------------------------------------
# Non-finite steps


@pytest.fixture
def poison(monkeypatch):
    """Make every loss of the iterations in the returned set NaN (as a diverging run would)."""
    from daformer_fast import step as dacs

    bad: set[int] = set()
    current = {"t": -1}
    prepare, loss = dacs.UDAStep.prepare, dacs.seg_ce_loss

    def _prepare(self, t, *args):
        current["t"] = t
        return prepare(self, t, *args)

    def _loss(*args, **kwargs):
        value = loss(*args, **kwargs)
        return value * float("nan") if current["t"] in bad else value

    monkeypatch.setattr(dacs.UDAStep, "prepare", _prepare)
    monkeypatch.setattr(dacs, "seg_ce_loss", _loss)
    return bad


def _all_finite(path: Path) -> bool:
    state = read_checkpoint(path)
    tensors = [*state["student"].values(), *state["teacher"].values()]
    tensors += [v for s in state["optimizer"]["state"].values() for v in s.values()]
    return all(torch.isfinite(v).all() for v in tensors if v.is_floating_point())


def test_nonfinite_step_is_skipped_and_logged(tmp_path, syn, poison, capsys):
    poison.add(2)
    cfg = _config(tmp_path, syn, max_iters=3, keep_checkpoints=3)
    assert main([str(cfg)]) == 0
    work = tmp_path / "work"
    assert "iterations 3-3: 1 step(s) skipped, non-finite loss or gradient" in capsys.readouterr().err
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows if "skipped" in r] == [0.0, 0.0, 1.0]
    a, b = read_checkpoint(work / "iter_000002.pth"), read_checkpoint(work / "iter_000003.pth")
    params = [k for k in a["student"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in params)  # no update at iteration 2
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 2
    assert all(_all_finite(work / f"iter_{i:06d}.pth") for i in (1, 2, 3))


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, syn, poison, capsys):
    poison.update(range(2, 100))
    cfg = _config(tmp_path, syn, max_nonfinite=3)
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error: 3 consecutive steps with a non-finite loss or gradient (up to iteration 5)" in err
    assert "Traceback" not in err
    work = tmp_path / "work"
    assert _iters(work) == [3, 4] and all(_all_finite(work / f"iter_{i:06d}.pth") for i in (3, 4))


def test_nonfinite_buffers_are_never_written(tmp_path):
    """Even with every update skipped, a NaN input poisons BatchNorm statistics: such a state is not saved."""
    student, teacher = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), None
    student(torch.full((2, 3, 4, 4), float("nan")))
    opt = torch.optim.AdamW(student.parameters())
    with pytest.raises(FloatingPointError, match=r"student 1\.running_mean is not finite at iteration 5"):
        save_run_state(tmp_path, 5, student=student, teacher=teacher, optimizer=opt, config=None, extra={}, keep=1)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Bad input through the CLI: a short error, non-zero exit, existing checkpoints untouched


def _copy_source(syn: Path, dst: Path, edit) -> Path:
    """A copy of the synthetic source dataset with `edit(image_path, label_path)` applied to every sample."""
    shutil.copytree(syn / "source", dst)
    for img in sorted((dst / "images").glob("*.png")):
        edit(img, dst / "labels" / f"{img.stem}_labelTrainIds.png")
    return dst


def _corrupt(img: Path, lbl: Path) -> None:
    img.write_bytes(img.read_bytes()[:40])  # a truncated PNG


def _shrink_label(img: Path, lbl: Path) -> None:
    Image.open(lbl).resize((64, 32), Image.NEAREST).save(lbl)


def _bad_label_values(img: Path, lbl: Path) -> None:
    a = np.array(Image.open(lbl))
    a[0, :5] = 50
    Image.fromarray(a).save(lbl)


def _checksums(work: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(work.iterdir()) if p.suffix == ".pth"}


class Payload:
    """Unpickling this runs code: it touches `marker` (stands for anything a malicious checkpoint could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_cases(tmp: Path, syn: Path) -> list[tuple[str, list[str], str]]:
    """(name, extra CLI arguments, expected fragment of the error) per kind of bad input."""
    (tmp / "empty" / "images").mkdir(parents=True)
    (tmp / "empty" / "labels").mkdir()
    corrupt = _copy_source(syn, tmp / "corrupt", _corrupt)
    shrunk = _copy_source(syn, tmp / "shrunk", _shrink_label)
    ids = _copy_source(syn, tmp / "ids", _bad_label_values)
    (tmp / "garbage.pth").write_bytes(random.Random(0).randbytes(4096))
    torch.save({"student": Payload(tmp / "pwned"), "iteration": 1}, tmp / "payload.pth")
    (tmp / "evil.yaml").write_text("train: !!python/object/apply:os.getcwd []\n")
    return [
        ("typo", ["--set", "train.max_iter=3"], "did you mean train.max_iters?"),
        ("type", ["--set", "train.max_iters=many"], "train.max_iters: expected int, got 'many'"),
        ("no root", ["--set", f"data.source.root={tmp / 'nowhere'}"], "nowhere/images/**/*.png (folder does not"),
        ("empty", ["--set", f"data.source.root={tmp / 'empty'}"], f"no images found for gta dataset at root {tmp}"),
        ("corrupt strict", ["--set", f"data.source.root={corrupt}", "data.strict=true"],
         f"cannot read image {corrupt}/images/"),
        ("size", ["--set", f"data.source.root={shrunk}"], "image/label size mismatch"),
        ("size, worker", ["--set", f"data.source.root={shrunk}", "data.workers=1"], "image/label size mismatch"),
        ("label ids", ["--set", f"data.source.root={ids}"], "label values 50 outside 0..18 and 255"),
        ("pretrained", ["--set", f"model.pretrained={tmp / 'mit_b0.pth'}"], "mit_b0.pth: no such file"),
        ("resume garbage", ["--resume", str(tmp / "garbage.pth")], "garbage.pth: not a torch checkpoint or corrupt"),
        ("resume pickle", ["--resume", str(tmp / "payload.pth")], "needs full unpickling"),
        ("yaml tag", ["--config", str(tmp / "evil.yaml")], "could not determine a constructor for the tag"),
    ]  # fmt: skip


@pytest.mark.slow
def test_bad_inputs_give_short_errors_and_leave_checkpoints_untouched(tmp_path, syn, reference, capsys):
    cfg = _config(tmp_path, syn)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(reference.parent / "iter_000007.pth", work)  # the runs resume at iteration 7 and fail drawing it
    os.symlink("iter_000007.pth", work / "latest.pth")
    before = _checksums(work)
    for name, args, expected in _bad_cases(tmp_path / "inputs", syn):
        config = str(cfg)
        if args[0] == "--config":
            config, args = args[1], []
        argv = [config, *args] if "--resume" in args else [config, "--resume", "auto", *args]
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        error = err[err.index("error: ") :] if "error: " in err else err
        assert expected in error, f"{name}: {err[-2000:]}"
        assert "Traceback" not in err and len(error.strip().splitlines()) <= 3, f"{name}: {err[-2000:]}"
        assert _checksums(work) == before, name
    assert not (tmp_path / "inputs" / "pwned").exists()  # the payload never ran


@pytest.mark.slow
def test_cli_error_is_short_in_a_real_process(tmp_path, syn):
    cfg = _config(tmp_path, syn)
    res = subprocess.run([sys.executable, "-m", "daformer_fast.train", str(cfg), "--set", "data.crop=[64]"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip() == "error: data.crop: expected 2 values, got 1 ([64])"


def test_corrupt_images_are_skipped_with_a_warning(tmp_path, syn, capsys):
    broken = []

    def corrupt_some(img: Path, lbl: Path) -> None:
        if int(img.stem) % 3 == 0:
            _corrupt(img, lbl)
            broken.append(img.name)

    source = _copy_source(syn, tmp_path / "src", corrupt_some)
    cfg = _config(tmp_path, syn, source=source, max_iters=3)
    assert main([str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "skipping unreadable sample: cannot read image" in err
    assert any(f"{source}/images/{name}" in err for name in broken)
    rows = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-2]["failed_draws"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Security


def test_trusted_checkpoint_is_the_only_way_to_unpickle(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"student": Payload(marker), "iteration": 1}, tmp_path / "payload.pth")
    with pytest.raises(CheckpointError, match="needs full unpickling .*pathlib"):
        read_checkpoint(tmp_path / "payload.pth")
    assert not marker.exists()
    read_checkpoint(tmp_path / "payload.pth", trust=True)
    assert marker.exists()  # what weights_only=True protects against


def test_work_dir_symlinks_leading_outside_are_refused(tmp_path, syn, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious\n")
    cfg = _config(tmp_path, syn, max_iters=1)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("metrics.jsonl", "latest.pth", "iter_000001.pth.tmp"):
        os.symlink(victim, work / name)
        assert main([str(cfg), "--resume", "auto"]) == 2, name
        err = capsys.readouterr().err
        assert f"error: train.work_dir: {work / name} is a symlink to {victim}, outside the work dir" in err, err
        assert victim.read_text() == "precious\n"
        (work / name).unlink()
    # Links inside the work dir (latest.pth -> iter file) and a symlinked work dir itself are fine.
    real = tmp_path / "scratch"
    real.mkdir()
    work.rmdir()
    os.symlink(real, work)
    assert main([str(cfg)]) == 0
    assert (real / "iter_000001.pth").is_file() and os.readlink(real / "latest.pth") == "iter_000001.pth"


def test_checkpoint_write_never_follows_a_planted_tmp_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "ckpt.pth.tmp")
    save_checkpoint(tmp_path / "ckpt.pth", student={"w": torch.ones(2)})
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "ckpt.pth").is_symlink() and read_checkpoint(tmp_path / "ckpt.pth")["iteration"] == 0
