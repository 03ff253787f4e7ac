"""Reading weights into our models, and writing our own training checkpoints.

`load_weights(model, path)` detects the file layout and maps it onto an encoder (`MixVisionTransformer`,
`CNNEncoder`) or a `Segmentor`:

- "segformer-mit": SegFormer's ImageNet `mit_b*.pth`, a flat encoder dict (+ ImageNet `head.*`, ignored), possibly
  wrapped under `state_dict` / `model` (the order the original's `init_weights` looks them up in);
- "daformer": official DAFormer checkpoints (`state_dict` with `model.` student, `ema_model.` teacher and
  `imnet_model.` keys, or a published file with `model.*` only; a leading `module.` is dropped);
- "mmcv-resnet": OpenMMLab's ImageNet ResNetV1c / ResNeSt / ResNeXt files (`open-mmlab://resnet101_v1c`, ...), a
  flat encoder dict in mmseg naming (+ ImageNet `fc.*`, ignored), possibly under `state_dict`; a bare state dict of
  our `CNNEncoder` (timm's names) has the same layout and loads the same way;
- "hf-mit": HF transformers `nvidia/mit-b*` weights (`segformer.encoder.*`, `.bin`/`.pth`/`.safetensors`); the
  separate key/value projections are concatenated into our `attn.kv` = [key; value];
- "daformer_fast": what `save_checkpoint` writes (`student` / `teacher` segmentor state dicts, optimizer, ...).

Files are always read with `weights_only=True` first: a checkpoint is untrusted input, and a pickle can run code.
Only `trust=True` (CLI `--trust-checkpoint`) falls back to full unpickling. Everything is mapped to segmentor keys
(`backbone.*`, `decode_head.*`) before being compared with the target, so there is one comparison path for all formats.
The key mapping of each format lives beside the model it maps to: `models.mit.from_segformer_mit` / `from_hf_mit`
and `models.resnet.from_mmseg_resnet` for the encoder formats, `models.segmentor.from_daformer` /
`from_daformer_fast` for the segmentor formats; this module reads, detects, validates and compares. A file whose
encoder family differs from the model's (MiT weights for a ResNet, or the reverse) fails with one short line.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from daformer_fast.config import config_to_dict
from daformer_fast.models.mit import MIT_SIZES, MixVisionTransformer, from_hf_mit, from_segformer_mit
from daformer_fast.models.resnet import CNNEncoder, from_mmseg_resnet, guess_cnn
from daformer_fast.models.segmentor import from_daformer, from_daformer_fast

__all__ = ["CheckpointError", "LoadReport", "detect_format", "load_weights", "read_checkpoint", "save_checkpoint"]

FORMAT = "daformer_fast"
_SHOW = 10  # keys listed per category in error messages


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model. The message is meant for the user as is."""


@dataclass
class LoadReport:
    format: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _needs_unpickling(path: Path) -> list[str] | None:
    """Globals a torch.save file needs beyond weights_only's allow-list; None if it is not a readable torch file.
    Needed because torch reports random bytes and custom classes with the same "Weights only load failed"."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        # Legacy (pre-zip) torch.save files cannot be inspected; they start with the pickle PROTO opcode.
        with open(path, "rb") as f:
            return ["<legacy pickle>"] if f.read(2) == b"\x80\x02" else None


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle stream (legacy torch.save)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:2] == b"\x80\x02"


def read_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict:
    """The file's top-level dict (on CPU). Raises CheckpointError with a short message on any failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot read checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _needs_unpickling(path)
        if unsafe is None:
            raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint or corrupt") from None
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} needs full unpickling (it holds {', '.join(unsafe[:5])}), which can run "
                "arbitrary code; pass trust=True (CLI --trust-checkpoint) only for files you trust"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e2).__name__}: {e2}") from None
    except Exception as e:  # EOFError, zip errors, OSError, ...
        if not _looks_like_torch_file(path):  # random bytes raise anything from IndexError to OverflowError
            raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint or corrupt") from None
        msg = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {msg}") from None
    if isinstance(obj, nn.Module):  # a whole pickled model (trusted files only reach here)
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise CheckpointError(f"cannot read checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Format detection and mapping to segmentor keys (`backbone.*`, `decode_head.*`)


def _unwrap(obj: dict) -> dict:
    """The original's init_weights order: `state_dict`, else `model`, else the dict; then drop DDP's `module.`."""
    for name in ("state_dict", "model"):
        if isinstance(obj.get(name), dict):
            obj = obj[name]
            break
    return {k.removeprefix("module."): v for k, v in obj.items()}


def detect_format(state: dict) -> str:
    """One of "daformer_fast", "hf-mit", "daformer", "segformer-mit", "mmcv-resnet" for a file's top-level dict."""
    if state.get("format") == FORMAT:
        return FORMAT
    keys = list(_unwrap(state))
    if any(k.startswith(("segformer.encoder.", "encoder.patch_embeddings.")) for k in keys):
        return "hf-mit"  # before "daformer": HF segmentation models also have `decode_head.*`
    if any(k.startswith(("model.", "ema_model.", "imnet_model.", "backbone.")) for k in keys):
        return "daformer"
    if any(k.startswith(("patch_embed1.", "block1.")) for k in keys):
        return "segformer-mit"
    if any(k.startswith(("stem.", "layer1.")) for k in keys):
        return "mmcv-resnet"
    raise CheckpointError(f"unrecognised checkpoint layout; first keys: {', '.join(map(str, keys[:5])) or 'none'}")


def _convert(obj: dict, key: str) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """(format, segmentor-keyed state, ignored keys) of a file's top-level dict; encoder formats give `backbone.*`."""
    fmt = detect_format(obj)
    part = "teacher" if key == "teacher" else "student"
    try:
        if fmt == FORMAT:
            return fmt, *from_daformer_fast(obj, part)
        if fmt == "daformer":
            return fmt, *from_daformer(_unwrap(obj), part)
    except ValueError as e:  # the file lacks the requested model; the message is written for the user
        raise CheckpointError(str(e)) from None
    if part == "teacher":
        raise CheckpointError(f"key='teacher' but the checkpoint ({fmt}) holds ImageNet encoder weights only")
    mapping = {"hf-mit": from_hf_mit, "segformer-mit": from_segformer_mit, "mmcv-resnet": from_mmseg_resnet}[fmt]
    enc, ignored = mapping(_unwrap(obj))
    return fmt, {"backbone." + k: v for k, v in enc.items()}, ignored


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _listing(label: str, items: list[str]) -> str:
    more = f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"\n  {label} ({len(items)}): {', '.join(items[:_SHOW])}{more}"


def _guess_mit(state: dict) -> str | None:
    """Which MiT size a `backbone.*` state looks like (for a readable hint when sizes differ)."""
    depths = [len({k.split(".")[2] for k in state if k.startswith(f"backbone.block{i}.")}) for i in range(1, 5)]
    norms = [state.get(f"backbone.norm{i}.weight") for i in range(1, 5)]
    dims = [n.shape[0] if isinstance(n, torch.Tensor) else 0 for n in norms]
    sizes = (n for n, s in MIT_SIZES.items() if list(s.depths) == depths and list(s.embed_dims) == dims)
    return next((f"mit_{n}" for n in sizes), None)


_ENCODERS = (MixVisionTransformer, CNNEncoder)


def _encoder_name(enc: nn.Module) -> str | None:
    """"mit_b5", "resnet101_v1c", ...: an encoder as the hints and errors name it."""
    if isinstance(enc, CNNEncoder):
        return enc.name
    return next((f"mit_{n}" for n, s in MIT_SIZES.items() if s == getattr(enc, "spec", None)), None)


def _file_encoder(state: dict) -> tuple[str | None, str | None]:
    """(family "MiT" / "CNN" or None, the size it looks like or None) of a segmentor-keyed state's `backbone.*`."""
    enc = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if any(k.startswith(("patch_embed1.", "block1.")) for k in enc):
        return "MiT", _guess_mit(state)
    if any(k.startswith("layer1.") for k in enc):
        return "CNN", guess_cnn(enc)
    return None, None


def _group(keys: list[str]) -> str:
    return ", ".join(sorted({k.split(".")[0] + ".*" for k in keys}))


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    trust: bool = False,
    key: str = "auto",
    log: Callable[[str], Any] = print,
) -> LoadReport:
    """Load a checkpoint of any supported format into an encoder (MiT or CNN) or a Segmentor (in place).

    key: "auto"/"student" = the student of training checkpoints, "teacher" = the EMA teacher.
    strict: any missing / unexpected / shape-mismatched tensor raises CheckpointError; otherwise the matching
    tensors are loaded, the rest left at init, and a warning lists them. A file whose encoder is of the other
    family (MiT weights for a CNN encoder, or the reverse) always raises: no encoder tensor could match.
    """
    if key not in ("auto", "student", "teacher"):
        raise ValueError(f"key must be 'auto', 'student' or 'teacher', got {key!r}")
    path = Path(path)
    fmt, state, ignored = _convert(read_checkpoint(path, trust=trust), key)
    ignored += [k for k, v in state.items() if not isinstance(v, torch.Tensor)]  # e.g. stray metadata entries
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    encoder_only = not any(k.startswith("decode_head.") for k in state)
    if isinstance(model, _ENCODERS):
        prefix = "backbone."
        ignored += [k for k in state if k.startswith("decode_head.")]  # a full checkpoint feeding an encoder only
        state = {k: v for k, v in state.items() if not k.startswith("decode_head.")}
    elif isinstance(getattr(model, "backbone", None), _ENCODERS) and hasattr(model, "decode_head"):
        prefix = ""
    else:
        raise TypeError(f"load_weights expects an encoder (MiT, CNN) or a Segmentor, got {type(model).__name__}")
    encoder = model if prefix else model.backbone
    have = _encoder_name(encoder)
    family, guess = _file_encoder(state)
    if family is not None and family != ("CNN" if isinstance(encoder, CNNEncoder) else "MiT"):
        what = f"a {family} encoder" + (f" ({guess})" if guess else "")
        raise CheckpointError(
            f"checkpoint {path} ({fmt}) does not fit the model: the file holds {what}, the model has {have}"
        )
    own = {prefix + k: v for k, v in model.state_dict().items()}
    # Encoder weights into a segmentor: the head is legitimately not in the file.
    expected = [k for k in own if not (encoder_only and k.startswith("decode_head."))]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    ok = {k.removeprefix(prefix): v for k, v in state.items() if k in own and v.shape == own[k].shape}
    rel = lambda ks: [k.removeprefix(prefix) for k in ks]  # noqa: E731  (report keys relative to the model)
    report = LoadReport(fmt, len(ok), rel(missing), rel(unexpected), rel(mismatched), ignored)
    problems = (
        (_listing("missing", report.missing) if missing else "")
        + (_listing("unexpected", report.unexpected) if unexpected else "")
        + (_listing("shape mismatch", report.mismatched) if mismatched else "")
    )
    if problems:
        if guess and have and guess != have:
            problems = f"\n  hint: the file holds a {guess} encoder, the model is {have}" + problems
        if strict:
            raise CheckpointError(
                f"checkpoint {path} ({fmt}) does not match the model:{problems}\n"
                "pass strict=False to load only the matching tensors"
            )
        warnings.warn(f"checkpoint {path} ({fmt}): loading only the matching tensors:{problems}", stacklevel=2)
    with torch.no_grad():
        model.load_state_dict(ok, strict=False)  # copy_ into the existing tensors (casts dtype, keeps device)
    what = "encoder tensors" if encoder_only or prefix else "tensors"
    msg = f"loaded {path.name} ({fmt}{', teacher' if key == 'teacher' else ''}): {len(ok)}/{len(expected)} {what}"
    if encoder_only and not prefix:
        msg += "; decode head left at its init"
    if problems:
        msg += f"; {len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched (strict=False)"
    if ignored:
        msg += f"; ignored {len(ignored)} ({_group(ignored)})"
    log(msg)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Saving


def _plain(obj: Any, where: str) -> Any:
    """CPU tensors and plain Python values only, so that the file loads with weights_only=True."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):  # torch.Size / namedtuples become plain tuples
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"save_checkpoint: {where} is a {type(obj).__name__}; only tensors and plain values are stored")


def _state(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") and callable(obj.state_dict) else obj


def save_checkpoint(
    path: str | os.PathLike,
    *,
    student: nn.Module | dict,
    teacher: nn.Module | dict | None = None,
    mic_teacher: nn.Module | dict | None = None,
    optimizer: torch.optim.Optimizer | dict | None = None,
    iteration: int = 0,
    config: Any = None,
    extra: dict | None = None,
) -> Path:
    """Write a "daformer_fast" checkpoint atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = config_to_dict(config)
    obj = {"format": FORMAT, "version": 1, "iteration": int(iteration), "student": _plain(_state(student), "student")}
    parts = (("teacher", teacher), ("mic_teacher", mic_teacher), ("optimizer", optimizer), ("config", config),
             ("extra", extra))  # fmt: skip
    for name, value in parts:
        if value is not None:
            obj[name] = _plain(_state(value), name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # same directory, so os.replace is an atomic rename
    # A leftover of a killed write is replaced; O_EXCL | O_NOFOLLOW never writes through a symlink planted there.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with open(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # persist the rename itself (POSIX); not possible on every platform / filesystem
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path
