"""The shared CLI layer: one error→exit-code mapping, `--set` accumulating across repeats, and a device this host
lacks turned into exit 2 with a one-line message by every tool (train, evaluate, predict, experiments)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from daformer_fast import evaluate, experiments, predict, train
from daformer_fast.checkpoint import CheckpointError
from daformer_fast.cli import add_common_args, config_overrides, run_cli, short_message
from daformer_fast.config import ConfigError
from daformer_fast.data.datasets import DatasetError
from daformer_fast.distributed import resolve_device

# Devices no host of this test suite has: a GPU index far beyond any machine, a device type torch does not know,
# and plain CUDA where there is none.
BAD_DEVICES = ["cuda:99", "tpu"] + ([] if torch.cuda.is_available() else ["cuda"])


def _raise(e: BaseException):
    raise e


@pytest.mark.parametrize(
    "exc", [ConfigError("bad key"), DatasetError("bad key"), CheckpointError("bad key"), FloatingPointError("bad key")]
)
def test_user_errors_print_one_line_and_exit_2(exc, capsys):
    assert run_cli(_raise, exc) == 2
    assert capsys.readouterr().err == "error: bad key\n"


def test_return_value_interrupt_and_bugs():
    assert run_cli(lambda: None) == 0
    assert run_cli(lambda x: x, 3) == 3
    assert run_cli(_raise, KeyboardInterrupt()) == 130
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda: 1 / 0)


def test_dataloader_worker_error_is_shortened(capsys):
    # What torch's DataLoader re-raises: the worker's whole traceback inside the message.
    msg = 'Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n'
    msg += '  File "x.py", line 1, in f\ndaformer_fast.data.datasets.DatasetError: cannot read img.png\n'
    e = DatasetError(msg)
    assert short_message(e) == "daformer_fast.data.datasets.DatasetError: cannot read img.png"
    e2 = FloatingPointError(msg.replace("daformer_fast.data.datasets.DatasetError", "FloatingPointError"))
    assert short_message(e2) == "cannot read img.png"
    assert run_cli(_raise, e) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_repeated_set_accumulates_in_every_tool():
    argvs = {
        train: ["c.yaml", "--set", "a=1", "b=2", "--set", "a=3"],
        evaluate: ["c.yaml", "--checkpoint", "k.pth", "--set", "a=1", "b=2", "--set", "a=3"],
        predict: ["img.png", "--checkpoint", "k.pth", "--out", "o", "--set", "a=1", "b=2", "--set", "a=3"],
        experiments: ["--exp", "1", "--set", "a=1", "b=2", "--set", "a=3"],
    }
    for tool, argv in argvs.items():
        assert tool._parse_args(argv).set == ["a=1", "b=2", "a=3"], tool.__name__


def test_device_flag_comes_after_the_overrides():
    p = argparse.ArgumentParser()
    add_common_args(p)
    args = p.parse_args(["c.yaml", "--device", "cpu", "--set", "train.device=cuda"])
    assert config_overrides(args) == ["train.device=cuda", "train.device=cpu"]
    assert config_overrides(p.parse_args(["c.yaml"])) == []


@pytest.mark.parametrize("name", BAD_DEVICES)
def test_resolve_device_errors_are_config_errors(name):
    with pytest.raises(ConfigError, match=f"device '{name}'") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


def test_resolve_device_auto_and_local_rank():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == expected


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    config = tmp / "c.yaml"
    config.write_text(f"model: {{backbone: mit_b0, pretrained: null}}\ntrain: {{work_dir: {tmp / 'work'}}}\n")
    image = tmp / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    return {"tmp": tmp, "config": str(config), "image": str(image), "ckpt": str(tmp / "never_read.pth")}


def _argv(tool, f) -> list[str]:
    return {
        "train": [f["config"]],
        "evaluate": [f["config"], "--checkpoint", f["ckpt"]],
        "predict": [f["image"], "--checkpoint", f["ckpt"], "--out", str(f["tmp"] / "p"), "--config", f["config"]],
        "experiments": ["--exp", "101", "--out", str(f["tmp"] / "gen"), "--run"],
    }[tool]


@pytest.mark.parametrize("device", BAD_DEVICES)
@pytest.mark.parametrize("tool", ["train", "evaluate", "predict", "experiments"])
def test_every_tool_turns_a_missing_device_into_exit_2(tool, device, files, capsys):
    main = {"train": train.main, "evaluate": evaluate.main, "predict": predict.main, "experiments": experiments.main}
    # The device is checked before any data or checkpoint is read: none of the paths above exist but the config.
    assert main[tool](_argv(tool, files) + ["--set", f"train.device={device}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: device '{device}'") and len(err.strip().splitlines()) == 1, err
    if tool != "experiments":  # the same through --device
        assert main[tool](_argv(tool, files) + ["--device", device]) == 2
        assert capsys.readouterr().err == err
