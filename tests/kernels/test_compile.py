"""Ahead-of-time compilation of every Triton kernel for NVIDIA targets, on any machine (no GPU needed).

The other kernel tests run in Triton's CPU interpreter when there is no GPU, which never invokes the compiler:
a kernel can pass them and still fail to compile (a shape the layouts reject, a cast the backend lacks). Here each
launcher of `daformer_fast.kernels` is called with CPU tensors at the model's shapes (MiT-B5 at 512² crops,
batch 2, 19 classes) in fp32 and bf16; the launch is intercepted, specialised by Triton's own binder exactly as a
real launch would be (argument types, integers equal to 1 as constants, 16-byte divisibility) and compiled for
sm_90 (H100) all the way to a cubin (PTX, then the ptxas bundled with Triton). sm_80 compiles as well but would
double the ~80 s of CPU time the 38 distinct specialisations take; fp32 and bf16 compile in two concurrent
processes to keep the wall time near a minute on two cores.

It runs in a subprocess: the test conftest sets TRITON_INTERPRET=1 without a GPU, which turns every @triton.jit
into an interpreted function at import, and kernel modules read INTERPRETED at import to pick GPU-only settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CAPABILITY = 90  # H100
DTYPES = ("float32", "bfloat16")


def _capture_launches(dtype_names) -> list[tuple]:
    """(kernel, args, kwargs, case) of every launch the launchers make at the model's shapes."""
    import torch
    import triton

    launches = []

    def fake_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    triton.runtime.jit.JITFunction.run = fake_run

    from daformer_fast.kernels import attention, blur, classmix_aug, mixffn, pseudo_label, seg_ce

    assert not attention.INTERPRETED
    cases = []

    def record(case, fn, *args):
        start = len(launches)
        fn(*args)
        assert len(launches) > start, f"{case}: no launch"
        cases.extend([case] * (len(launches) - start))

    B, H, W, K = 2, 512, 512, 19
    for name in dtype_names:
        dt = getattr(torch, name)
        # MiT-B5 stages: tokens of an h×w map, heads, head dim 64, keys from an R×R reduction (L = 256 at 512²).
        for stage, (C, M, R) in enumerate(zip((64, 128, 320, 512), (1, 2, 5, 8), (8, 4, 2, 1))):
            h = w = H // 4 // 2**stage
            N, L, D = h * w, (h // R) * (w // R), C // M
            # The views EfficientSelfAttention makes of its Linear outputs.
            q = torch.empty(B, N, C, dtype=dt).reshape(B, N, M, D).transpose(1, 2)
            kv = torch.empty(B, L, 2 * C, dtype=dt).reshape(B, L, 2, M, D).permute(2, 0, 3, 1, 4)
            o, lse = attention.attention_fwd(q, kv[0], kv[1], D**-0.5)
            cases.extend([f"attention_fwd {name} stage{stage + 1}"] * (len(launches) - len(cases)))
            do = torch.empty(B, N, M, D, dtype=dt).transpose(1, 2)
            record(f"attention_bwd {name} stage{stage + 1}", attention.attention_bwd, do, None, q, kv[0], kv[1],
                   o.transpose(1, 2), lse, D**-0.5)
            # Mix-FFN: fc1 output (B, N, 4C) in the compute dtype; conv parameters stay fp32 under autocast.
            x = torch.empty(B, N, 4 * C, dtype=dt)
            wt, bias = torch.empty(4 * C, 1, 3, 3), torch.empty(4 * C)
            record(f"dwconv_gelu_fwd {name} stage{stage + 1}", mixffn.dwconv_gelu_fwd, x, wt, bias, h, w)
            record(f"dwconv_gelu_bwd {name} stage{stage + 1}", mixffn.dwconv_gelu_bwd, torch.empty_like(x), x, wt,
                   bias, h, w)
        img = torch.empty(B, 3, H, W, dtype=dt)
        taps = torch.full((B, 51), 1 / 51)  # 51 taps at 512² (ops.augment.blur_kernel_size)
        record(f"gaussian_blur {name}", blur.gaussian_blur_triton, img, taps, taps)
        gt, pl = torch.zeros(B, H, W, dtype=torch.int64), torch.zeros(B, H, W, dtype=torch.int64)
        pw, chosen = torch.empty(B, H, W), torch.zeros(B, 256, dtype=torch.bool)
        mean, std = torch.empty(3), torch.empty(3)
        record(f"classmix {name}", classmix_aug.classmix_jitter_triton, img, img.clone(), gt, pl, pw, chosen, None,
               None, mean, std)
        record(f"classmix+jitter {name}", classmix_aug.classmix_jitter_triton, img, img.clone(), gt, pl, pw, chosen,
               torch.ones(B, 4), torch.zeros(B, 4, dtype=torch.int32), mean, std)
        # Decode-head logits at 1/4 of the crop.
        logits = torch.empty(B, K, H // 4, W // 4, dtype=dt)
        record(f"pseudo_label {name}", pseudo_label.pseudo_label_fwd, logits, H, W, 0.968)
        for weight in (None, pw):
            tag = f"seg_ce {name} {'weighted' if weight is not None else 'unweighted'}"
            _, lse = seg_ce.seg_ce_fwd(logits, gt, weight, 255)
            cases.extend([tag + " fwd"] * (len(launches) - len(cases)))
            record(tag + " bwd", seg_ce.seg_ce_bwd, torch.ones(()), logits, gt, weight, lse, 255)
    # Every kernel a module defines (helpers are jitted too but never launched on their own, and carry no suffix).
    modules = (attention, blur, classmix_aug, mixffn, pseudo_label, seg_ce)
    defined = {name for m in modules for name, obj in vars(m).items()
               if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")}
    return [(k, a, kw, c) for (k, a, kw), c in zip(launches, cases)], defined


def _compile_all(capability: int, dtype_names) -> dict:
    """Compile each distinct specialisation for sm_`capability`: {"report": {case: stages produced}, ...} or raise."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    done, report = {}, {}
    launches, defined = _capture_launches(dtype_names)
    for i, (kernel, args, kwargs, case) in enumerate(launches):
        # What JITFunction.run does before compiling, minus the driver queries it would make for the current GPU.
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        key = (kernel.__name__, repr(signature), repr(constexprs), repr(attrs), repr(options))
        if key not in done:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            done[key] = [s for s in ("ttir", "ttgir", "llir", "ptx", "cubin") if compiled.asm.get(s)]
        report[f"{case} #{i} {kernel.__name__}"] = done[key]
    return {"report": report, "distinct": len(done), "defined": sorted(defined)}


@pytest.mark.slow
def test_kernels_compile_for_nvidia(tmp_path):
    # A fresh cache: with a warm one Triton would load earlier results instead of compiling.
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    procs = {
        name: subprocess.Popen([sys.executable, __file__, str(CAPABILITY), str(tmp_path / f"{name}.json"), name],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in DTYPES
    }
    report, defined = {}, set()
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}:\n{log[-6000:]}"
        result = json.loads((tmp_path / f"{name}.json").read_text())
        report.update(result["report"])
        defined.update(result["defined"])
    assert {case.split()[1] for case in report} == set(DTYPES)
    # Each kernel the modules define was launched and compiled (a new kernel without a case here fails).
    assert len(defined) == 11 and {case.rsplit(" ", 1)[1] for case in report} == defined
    incomplete = {case: stages for case, stages in report.items() if stages[-2:] != ["ptx", "cubin"]}
    assert not incomplete, incomplete


if __name__ == "__main__":
    with open(sys.argv[2], "w") as f:
        json.dump(_compile_all(int(sys.argv[1]), sys.argv[3:]), f, indent=1)
