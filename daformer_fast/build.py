"""Everything a training run needs from its config, built in one place and one order:

    student, step, optimizer = build_training(cfg, device)

used by the trainer, the benchmarks and the tests alike. The transforms are applied in this order, each for a reason:

1. build the student from `cfg.model`, seeded with `train.seed` (the same initial weights on every rank and after
   every restart; the ImageNet copy is rebuilt from them, never saved);
2. load `model.pretrained` (ImageNet encoder weights), or the caller's `initial_state`;
3. move to the device;
4. copy the student into the EMA teacher and the frozen ImageNet encoder (`uda.mode: dacs`, `uda.fd_lambda` > 0),
   and into the separate MIC teacher when `uda.mic` asks for one;
5. the optimizer over the student: fused AdamW on the fast path (it also skips non-finite updates on the device),
   torch's per-parameter loop on the original path, as the original;
6. `train.compile`: each network (`full`) or each of its repeated units (`regional`, `compile_regions`) compiled in
   place (`nn.Module.compile`), after the copies (a copy of a compiled module would keep calling the original's
   forward), so the EMA update, checkpoints and DDP see the same modules;
7. DDP around the student when several processes train, the outermost wrapper;
8. the step over all of it, in training mode;
9. the first-use checks of what no CPU test proves: `train.cuda_graphs` replays the step from a CUDA graph
   (`graphs.CapturedStep`), `kernels.impl: triton` forces the kernels (`graphs.KernelCheck`); each is compared with
   the validated eager path at first use and falls back to it, with one logged reason, on a mismatch.

The kernel choice (`kernels.impl`) is the ops' process default (`ops.dispatch.set_default_impl`), set here; the
step runs its ops under its own choice (`train.path: original` always runs the plain-PyTorch references).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from daformer_fast.checkpoint import load_weights
from daformer_fast.graphs import CapturedStep, KernelCheck
from daformer_fast.config import Config
from daformer_fast.models import Segmentor, build_segmentor
from daformer_fast.models.mit import Block, OverlapPatchEmbed
from daformer_fast.models.resnet import CNNEncoder
from daformer_fast.ops.dispatch import set_default_impl, triton_available
from daformer_fast.step import UDAStep, build_optimizer, frozen_copy

__all__ = ["build_training", "compile_regions", "set_fp32_precision"]

# Dynamo keeps one compiled graph per (code, guards): a MiT block's forward is entered with 4 stage shapes by the
# student (autograd on), the teachers (no autograd) and the ImageNet encoder (eval mode), ~12 variants of one code
# object, beyond the default limit of 8 (past which dynamo silently runs the frame eagerly).
_REGIONAL_RECOMPILE_LIMIT = 64


def compile_regions(net: nn.Module) -> list[nn.Module]:
    """`train.compile: regional`: compile, in place, each repeated unit of `net` (a Segmentor, or the ImageNet
    feature model): every MiT block (its DropPath factors are inputs, `MixVisionTransformer.drop_factors`, so the
    blocks' different drop rates are not constants of the graph) and patch embedding, every CNN bottleneck, and the
    decode head. Modules of one class share their code object, so dynamo compiles one graph per distinct (shape,
    autograd, train/eval) and the other blocks, the teacher and the ImageNet copy reuse it (parameters are graph
    inputs), where compiling the network whole unrolls MiT-B5's 52 blocks into one graph. Shapes stay static
    (`dynamic=False`): one graph per stage, as CUDA-graph capture and inductor's kernel choice want. Returns the
    compiled modules."""
    units = [m for m in net.modules() if isinstance(m, Block | OverlapPatchEmbed)]
    for enc in (m for m in net.modules() if isinstance(m, CNNEncoder)):
        units += [blk for stage in (enc.layer1, enc.layer2, enc.layer3, enc.layer4) for blk in stage]
    units += [net.decode_head] if isinstance(net, Segmentor) else []
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _REGIONAL_RECOMPILE_LIMIT)
    for unit in units:
        unit.compile(dynamic=False)
    return units


def set_fp32_precision(precision: str) -> None:
    """What an fp32 matmul or cuDNN convolution computes, process-wide: IEEE fp32 for `train.precision: fp32` (torch
    runs cuDNN convolutions in TF32 by default on Ampere and newer, so without this the paper's fp32 recipe would
    silently convolve in TF32 on an H100), TF32 tensor cores for `tf32` and for the fp32 ops left outside `bf16`
    autocast. A no-op for CPU kernels, which have no TF32."""
    mode = "ieee" if precision == "fp32" else "tf32"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def build_training(
    cfg: Config,
    device: torch.device | str,
    *,
    rank: int = 0,
    ddp: bool = False,
    initial_state: dict[str, torch.Tensor] | None = None,
    trust: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[Segmentor, UDAStep | CapturedStep | KernelCheck, torch.optim.Optimizer]:
    """(student, step, optimizer) for `cfg` on `device`, the step in training mode.

    rank: this process's rank (the step's random streams differ by rank). ddp: wrap the student in
    DistributedDataParallel (a process group must be initialised). initial_state: student weights to start from
    instead of the seeded initialisation and `model.pretrained`. trust, log: passed to `checkpoint.load_weights`
    for `model.pretrained`.
    """
    device = torch.device(device)
    set_default_impl(cfg.kernels.impl)
    set_fp32_precision(cfg.train.precision)
    torch.manual_seed(cfg.train.seed)
    student = build_segmentor(cfg.model)  # 1
    if initial_state is not None:  # 2
        student.load_state_dict(initial_state)
    elif cfg.model.pretrained:
        load_weights(student, cfg.model.pretrained, trust=trust, log=log or (lambda msg: None))
    student.to(device)  # 3
    dacs = cfg.uda.mode == "dacs"
    teacher = frozen_copy(student) if dacs else None  # 4
    # The ImageNet model computes what the student's features are (encoder, then the neck if any), in eval mode.
    imnet = frozen_copy(student.encoder()).eval() if dacs and cfg.uda.fd_lambda > 0 else None
    mic_teacher = frozen_copy(student) if dacs and cfg.uda.mic.separate_teacher else None
    optimizer = build_optimizer(cfg.optim, student, fused=cfg.train.path == "fast")  # 5
    if cfg.train.compile != "off":  # 6
        # Probe Triton once before anything is traced: probed inside the first compiled forward, its cache would
        # become a guard and the second step would recompile.
        triton_available()
        for net in (student, teacher, imnet, mic_teacher):
            if net is not None:
                compile_regions(net) if cfg.train.compile == "regional" else net.compile()
    # broadcast_buffers=False as the original's multi-GPU runs (`train_segmentor`, mmseg/apis/train.py): each rank's
    # BatchNorm running statistics follow its own batches; forward passes use batch statistics either way.
    student_fwd = DDP(student, device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False) if ddp else None  # 7  # fmt: skip
    step = UDAStep(
        student, teacher, imnet, optimizer, uda=cfg.uda, schedule=cfg.schedule, train=cfg.train,
        num_classes=cfg.model.num_classes, device=device, impl=cfg.kernels.impl, rank=rank, student_fwd=student_fwd,
        mic_teacher=mic_teacher,
    )  # 8  # fmt: skip
    step.train()
    if cfg.train.cuda_graphs:  # 9
        step = CapturedStep(step, log)
    if cfg.kernels.impl == "triton":
        step = KernelCheck(step, log)
    return student, step, optimizer
