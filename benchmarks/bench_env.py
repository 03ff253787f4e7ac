"""What every benchmark record carries: device, versions, git revision, date, machine load, and the device peaks that
MFU and bandwidth fractions are taken against.

Peaks are the vendors' datasheet dense values (no sparsity), looked up by a substring of the CUDA device
name. They are leads, not ceilings measured here: a report should say which was used. CPUs have no entry (no MFU).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["Peak", "cpu_name", "device_name", "environment", "git_revision", "peak_for"]

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Peak:
    """Dense datasheet rates: TFLOP/s of bf16 tensor cores, TF32 tensor cores and plain FP32; memory TB/s."""

    name: str
    bf16_tflops: float
    tf32_tflops: float | None
    fp32_tflops: float
    mem_tb_s: float

    def tflops(self, precision: str) -> float:
        # fp32 runs are taken against the non-tensor FP32 rate: PyTorch keeps fp32 matmuls in IEEE fp32 by default
        # (cuDNN convolutions may still use TF32, so an fp32 MFU can read high).
        return self.bf16_tflops if precision == "bf16" else self.fp32_tflops


# Order matters: the first substring found in the device name wins (H100 PCIe before the SXM default).
_PEAKS = (
    ("H200", Peak("H200 (same compute as H100 SXM; 4.8 TB/s HBM3e)", 989.4, 494.7, 66.9, 4.8)),
    ("H100 PCIe", Peak("H100 PCIe", 756.0, 378.0, 51.0, 2.0)),
    ("H100", Peak("H100 SXM5", 989.4, 494.7, 66.9, 3.35)),
    ("A100", Peak("A100 SXM 80 GB", 312.0, 156.0, 19.5, 2.039)),
    ("2080 Ti", Peak("RTX 2080 Ti", 26.9, None, 13.45, 0.616)),
)


def peak_for(device: torch.device) -> Peak | None:
    """The datasheet peaks of this CUDA device, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAKS:
        if key in name:
            return peak
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def git_revision() -> str | None:
    """Short HEAD, with "+dirty" when tracked files differ from it (numbers then belong to uncommitted code)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:  # not installed, or a broken install raising at import
        return None


def _dali_version() -> str | None:
    try:
        import nvidia.dali

        return nvidia.dali.__version__
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """Device, versions, revision, date and the machine's load (CPU numbers on a shared host depend on it)."""
    peak = peak_for(device)
    env = {
        "device": device_name(device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "dali": _dali_version(), "git": git_revision(),
        },  # fmt: skip
        "peak": asdict(peak) if peak else None,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}"}  # fmt: skip
    return env
