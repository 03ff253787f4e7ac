"""Kernel microbenchmarks at the shapes the model produces: every kernel found in `kernels/` that has a spec here,
against its eager reference and `torch.compile` of the reference, forward and backward.

    python benchmarks/kernels.py [--backbone mit_b5] [--crop 512] [--batch 2] [--dtype bf16|fp32|both]
                                 [--csv benchmarks/results/kernels.csv] [--interpret-smoke]

Per (kernel, shape, dtype, provider, mode): median, p20 and p80 time (`triton.testing.do_bench`), achieved GB/s
over the fewest bytes the op must move (each input read once, each output written once) and its fraction of the
device's peak bandwidth, achieved TFLOP/s and its fraction of the dtype's peak (bench_env.py), and the forward's
relative error against an fp32 evaluation of the reference (a fast wrong kernel must not pass as a result). Rows
are appended to the CSV with device, versions and git revision.

Triton kernels need CUDA: without a GPU the script says so and exits 0. `--interpret-smoke` instead runs each
kernel once at a tiny shape in Triton's CPU interpreter (correctness plumbing only; nothing is timed or written).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if "--interpret-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit runs, i.e. before a kernel module is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import environment, peak_for  # noqa: E402

from daformer_fast.models.mit import MIT_SIZES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Case:
    """One kernel call: inputs (tensors needing grad, then static arguments), the FLOPs and minimal elements moved
    of each mode, and an id. Ops on data (no gradients) take tensors that need none and time the forward only."""

    shape_id: str
    inputs: Callable[[torch.device, torch.dtype], tuple[tuple[torch.Tensor, ...], tuple]]
    flops: dict[str, int]
    bytes_per_elem: dict[str, int]  # elements moved per mode; times the element size gives bytes
    fixed_bytes: dict[str, int] = field(default_factory=dict)  # bytes of tensors whose dtype does not vary (labels)


@dataclass
class Spec:
    reference: Callable
    triton: Callable
    sdpa: Callable | None
    cases: Callable[[str, int, int], list[Case]]
    smoke: Case
    differentiable: bool = True


# ---------------------------------------------------------------------------------------------------------------
# attention: softmax(q·kᵀ·scale)·v of MiT's efficient self-attention.


def _attention_case(b: int, m: int, n: int, kv: int, d: int, tag: str) -> Case:
    def inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        # Random data, never zeros: zeros hide unwritten outputs and can run faster than real data.
        leaves = tuple(torch.randn(b, m, s, d, device=device, dtype=dtype, generator=g).requires_grad_()
                       for s in (n, kv, kv))  # fmt: skip
        return leaves, (d**-0.5,)

    bm = b * m
    # Forward reads q, k, v and writes o; backward reads q, k, v, o, dO and writes dq, dk, dv.
    elems = {"forward": bm * (2 * n * d + 2 * kv * d), "backward": bm * (4 * n * d + 4 * kv * d)}
    # Forward: q·kᵀ and p·v. Backward: dV = pᵀ·dO, dP = dO·vᵀ, dQ = dS·k, dK = dSᵀ·q (no recomputation counted).
    flops = {"forward": 4 * bm * n * kv * d, "backward": 8 * bm * n * kv * d}
    return Case(f"{tag}-B{b}-M{m}-N{n}-L{kv}-D{d}", inputs, flops, elems)


def _attention_cases(backbone: str, crop: int, batch: int) -> list[Case]:
    """One case per MiT stage at `crop`²: N tokens at stride 4·2^i, keys reduced by the stage's sr ratio."""
    spec = MIT_SIZES[backbone.removeprefix("mit_")]
    cases = []
    for i, (dim, heads, sr) in enumerate(zip(spec.embed_dims, spec.num_heads, spec.sr_ratios)):
        side = crop // (4 * 2**i)
        n = side * side
        cases.append(_attention_case(batch, heads, n, n // (sr * sr), dim // heads, f"{backbone}-stage{i + 1}"))
    return cases


def _attention_spec() -> Spec:
    import torch.nn.functional as F

    from daformer_fast.kernels.attention import attention_triton
    from daformer_fast.ops.attention import attention_ref

    def sdpa(q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return Spec(attention_ref, attention_triton, sdpa, _attention_cases, _attention_case(1, 2, 100, 70, 32, "smoke"))


# ---------------------------------------------------------------------------------------------------------------
# mixffn: gelu(depthwise 3×3 conv + bias) in the middle of MiT's Mix-FFN, on the (B, N, C) token layout.


def _mixffn_case(b: int, side: int, c: int, tag: str) -> Case:
    def inputs(device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(b, side * side, c, device=device, dtype=dtype, generator=g)
        w = torch.randn(c, 1, 3, 3, device=device, dtype=dtype, generator=g) / 3
        bias = torch.randn(c, device=device, dtype=dtype, generator=g)
        return (x.requires_grad_(), w.requires_grad_(), bias.requires_grad_()), (side, side)

    e = b * side * side * c
    # Forward reads x and writes y; backward reads x and dy and writes dx (weights and bias are ~C, negligible).
    return Case(f"{tag}-B{b}-N{side * side}-C{c}", inputs, {"forward": 18 * e, "backward": 36 * e},
                {"forward": 2 * e, "backward": 3 * e})  # fmt: skip


def _mixffn_cases(backbone: str, crop: int, batch: int) -> list[Case]:
    spec = MIT_SIZES[backbone.removeprefix("mit_")]
    return [_mixffn_case(batch, crop // (4 * 2**i), spec.mlp_ratio * dim, f"{backbone}-stage{i + 1}")
            for i, dim in enumerate(spec.embed_dims)]  # fmt: skip


def _mixffn_spec() -> Spec:
    from daformer_fast.kernels.mixffn import dwconv_gelu_triton
    from daformer_fast.ops.mixffn import dwconv_gelu_ref

    return Spec(dwconv_gelu_ref, dwconv_gelu_triton, None, _mixffn_cases, _mixffn_case(1, 10, 48, "smoke"))


# ---------------------------------------------------------------------------------------------------------------
# classmix_aug and blur: DACS's mixed batch (data only, forward only), at the training crop.


def _classmix_case(b: int, side: int, jitter: bool, tag: str) -> Case:
    def inputs(device, dtype):
        from daformer_fast.config import UDAConfig
        from daformer_fast.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
        from daformer_fast.uda.augment import draw_strong_params
        from daformer_fast.uda.classmix import chosen_classes, draw_class_keys

        g = torch.Generator().manual_seed(0)
        img, tgt = (torch.randn(b, 3, side, side, generator=g).to(device, dtype) for _ in range(2))
        # 18 classes, 9 chosen per sample: about half the pixels pasted (m ≈ ½ in the byte count).
        gt, pl = (torch.randint(0, 18, (b, side, side), generator=g).to(device) for _ in range(2))
        pw = torch.rand(b, side, side, generator=g).to(device)
        chosen = chosen_classes(gt, draw_class_keys(b, g))
        params = draw_strong_params(b, g, UDAConfig()).jitter_params if jitter else None
        return (img, tgt, gt, pl, pw, chosen), (params, IMAGENET_MEAN, IMAGENET_STD)

    px = b * side * side
    # Image: 3 values of the side that shows read, 3 written. Fixed: gt read (8), pseudo-label and weight read
    # where the target shows (12·½), label, weight and mask written (8 + 4 + 1). FLOPs: kernels/classmix_aug.py.
    return Case(f"{tag}-B{b}-{side}x{side}-{'jitter' if jitter else 'mix'}", inputs,
                {"forward": 200 * px if jitter else 0}, {"forward": 6 * px}, {"forward": 27 * px})  # fmt: skip


def _classmix_spec() -> Spec:
    from functools import partial

    from daformer_fast.ops.classmix_aug import mix_and_jitter, mix_and_jitter_ref

    def cases(backbone: str, crop: int, batch: int) -> list[Case]:
        return [_classmix_case(batch, crop, jitter, "mixed-batch") for jitter in (True, False)]

    triton = partial(mix_and_jitter, impl="triton")
    return Spec(mix_and_jitter_ref, triton, None, cases, _classmix_case(2, 20, True, "smoke"), differentiable=False)


def _blur_case(b: int, h: int, w: int, tag: str) -> Case:
    from daformer_fast.ops.augment import blur_kernel_size

    def inputs(device, dtype):
        g = torch.Generator().manual_seed(0)
        sigma = 0.15 + torch.rand(b, generator=g, dtype=torch.float64)  # the training range of σ
        return (torch.randn(b, 3, h, w, generator=g).to(device, dtype),), (sigma,)

    e = b * 3 * h * w
    # A multiply-add per tap in each direction; the floor reads the image once and writes the result once.
    flops = 2 * (blur_kernel_size(h) + blur_kernel_size(w)) * e
    return Case(f"{tag}-B{b}-3x{h}x{w}", inputs, {"forward": flops}, {"forward": 2 * e})


def _blur_spec() -> Spec:
    from functools import partial

    from daformer_fast.ops.classmix_aug import gaussian_blur, gaussian_blur_ref

    def cases(backbone: str, crop: int, batch: int) -> list[Case]:
        return [_blur_case(batch, crop, crop, "mixed-batch")]

    triton = partial(gaussian_blur, impl="triton")
    return Spec(gaussian_blur_ref, triton, None, cases, _blur_case(2, 25, 45, "smoke"), differentiable=False)


# ---------------------------------------------------------------------------------------------------------------
# pseudo_label and seg_ce: the decode head's 1/4-resolution logits consumed at the crop size (19 Cityscapes classes)
# without storing them there. FLOPs and bytes per label pixel: the kernel modules' docstrings.


def _logits_case(b: int, k: int, side: int, crop: int, tag: str, for_loss: bool) -> Case:
    def inputs(device, dtype):
        g = torch.Generator().manual_seed(0)
        logits = (4 * torch.randn(b, k, side, side, generator=g)).to(device, dtype)
        if not for_loss:
            return (logits,), ((crop, crop), 0.968)
        labels = torch.randint(0, k, (b, crop, crop), generator=g)
        labels[torch.rand(b, crop, crop, generator=g) < 0.1] = 255
        weight = torch.rand(b, crop, crop, generator=g)
        return (logits.requires_grad_(),), (labels.to(device), weight.to(device), 255)

    px, logit_elems = b * crop * crop, b * k * side * side
    if for_loss:
        # Forward reads the logits, labels (int64) and weights (fp32); backward reads them again and writes the
        # logits' gradient. The kernel's saved log-sum-exp (4 B written, 4 B read per pixel) is above this floor.
        flops = {"forward": 12 * k * px, "backward": 48 * k * px}
        elems = {"forward": logit_elems, "backward": 2 * logit_elems}
        return Case(f"{tag}-B{b}-K{k}-{side}to{crop}", inputs, flops, elems, {"forward": 12 * px, "backward": 12 * px})
    # Reads the logits once and writes the int64 labels (the count is one number).
    return Case(f"{tag}-B{b}-K{k}-{side}to{crop}", inputs, {"forward": (11 * k + 1) * px}, {"forward": logit_elems},
                {"forward": 8 * px})  # fmt: skip


def _pseudo_label_spec() -> Spec:
    from daformer_fast.kernels.pseudo_label import pseudo_label_triton
    from daformer_fast.ops.pseudo_label import pseudo_label_argmax_ref

    def cases(backbone: str, crop: int, batch: int) -> list[Case]:
        return [_logits_case(batch, 19, crop // 4, crop, "teacher", for_loss=False)]

    smoke = _logits_case(2, 19, 6, 21, "smoke", for_loss=False)
    return Spec(pseudo_label_argmax_ref, pseudo_label_triton, None, cases, smoke, differentiable=False)


def _seg_ce_spec() -> Spec:
    from daformer_fast.kernels.seg_ce import seg_ce_triton
    from daformer_fast.ops.seg_ce import seg_ce_ref

    def cases(backbone: str, crop: int, batch: int) -> list[Case]:
        return [_logits_case(batch, 19, crop // 4, crop, "student", for_loss=True)]

    return Spec(seg_ce_ref, seg_ce_triton, None, cases, _logits_case(2, 19, 5, 17, "smoke", for_loss=True))


# Kernel module name → spec factory. A kernel in kernels/ without an entry is listed as not benchmarked.
SPECS: dict[str, Callable[[], Spec]] = {
    "attention": _attention_spec, "blur": _blur_spec, "classmix_aug": _classmix_spec, "mixffn": _mixffn_spec,
    "pseudo_label": _pseudo_label_spec, "seg_ce": _seg_ce_spec,
}  # fmt: skip


def discover() -> list[str]:
    """Kernel modules present in kernels/ (the daformer_fast.kernels package)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(REPO / "kernels")]) if not m.name.startswith("_"))


# ---------------------------------------------------------------------------------------------------------------


def _rel_err(out: torch.Tensor | tuple, ref: torch.Tensor | tuple) -> float:
    """Relative L2 error; the largest over the outputs of a multi-output op (labels and masks as numbers)."""
    if isinstance(out, tuple):
        return max(_rel_err(o, r) for o, r in zip(out, ref, strict=True))
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _double(x: torch.Tensor) -> torch.Tensor:
    """fp64 copy of a floating input for the reference evaluation; integer and bool inputs stay as they are."""
    return x.detach().double() if x.is_floating_point() else x


def _bench(fn: Callable[[], object]) -> tuple[float, float, float]:
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
    return p20, p50, p80


def _providers(spec: Spec) -> dict[str, Callable]:
    # One compiled reference serves every stage shape and dtype: keep them all compiled instead of falling back.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    providers = {"reference": spec.reference, "compiled": torch.compile(spec.reference, dynamic=False)}
    if spec.sdpa is not None:
        providers["sdpa"] = spec.sdpa  # what kernels.impl=auto runs today for attention (ops/attention.py)
    providers["triton"] = spec.triton
    return providers


def run_kernel(name: str, spec: Spec, args, device: torch.device, env: dict, writer) -> list[dict]:
    peak = peak_for(device)
    rows = []
    for dtype_name in ("bf16", "fp32") if args.dtype == "both" else (args.dtype,):
        dtype = DTYPES[dtype_name]
        for case in spec.cases(args.backbone, args.crop, args.batch):
            leaves, extra = case.inputs(device, dtype)
            with torch.no_grad():
                ref = spec.reference(*(_double(x) for x in leaves), *extra)
            for provider, fn in _providers(spec).items():
                row = {"kernel": name, "shape": case.shape_id, "dtype": dtype_name, "provider": provider}
                try:
                    out = fn(*leaves, *extra)
                    err = _rel_err(out, ref)
                    times = {"forward": _bench(lambda fn=fn, leaves=leaves, extra=extra: fn(*leaves, *extra))}
                    grad = None
                    if spec.differentiable:
                        grad = torch.randn_like(out)
                        times["backward"] = _bench(lambda out=out, grad=grad, leaves=leaves: torch.autograd.grad(
                            out, leaves, grad, retain_graph=True))  # fmt: skip
                except Exception as e:  # e.g. a shape the kernel rejects: record it, keep going
                    rows.append({**row, "mode": "both", "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                for mode, (p20, p50, p80) in times.items():
                    moved = case.bytes_per_elem[mode] * leaves[0].element_size() + case.fixed_bytes.get(mode, 0)
                    gb_s = moved / (p50 * 1e-3) / 1e9
                    tflops = case.flops[mode] / (p50 * 1e-3) / 1e12
                    rows.append({
                        **row, "mode": mode, "ms_p20": round(p20, 4), "ms_p50": round(p50, 4),
                        "ms_p80": round(p80, 4), "gb_s": round(gb_s, 1),
                        "bw_frac": round(gb_s / (peak.mem_tb_s * 1e3), 4) if peak else None,
                        "tflops": round(tflops, 2),
                        "flop_frac": round(tflops / peak.tflops(dtype_name), 4) if peak else None,
                        "fwd_rel_err": f"{err:.2e}",
                    })  # fmt: skip
                del out, grad
    for r in rows:
        writer(r)
    return rows


def smoke(name: str, spec: Spec) -> bool:
    """One forward (and backward, if the op has one) of the kernel in the Triton interpreter against the reference."""
    case = spec.smoke
    leaves, extra = case.inputs(torch.device("cpu"), torch.float32)
    out = spec.triton(*leaves, *extra)
    ref_leaves = [_double(x).requires_grad_(spec.differentiable) for x in leaves]
    ref = spec.reference(*ref_leaves, *extra)
    errs = [_rel_err(out, ref)]
    if spec.differentiable:
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
        errs += [_rel_err(a, b) for a, b in zip(grads, ref_grads)]
    ok = all(e < 1e-4 for e in errs)
    print(f"{name} {case.shape_id}: forward/backward relative errors {', '.join(f'{e:.1e}' for e in errs)} "
          f"({'ok' if ok else 'FAIL'})")  # fmt: skip
    return ok


CSV_FIELDS = ["date", "device", "torch", "triton", "git", "kernel", "shape", "dtype", "provider", "mode", "ms_p20",
              "ms_p50", "ms_p80", "gb_s", "bw_frac", "tflops", "flop_frac", "fwd_rel_err", "error"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="mit_b5")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="images per forward pass (2 source or 2 target)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "both"], default="both")
    p.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "kernels.csv"))
    p.add_argument("--kernels", nargs="*", help="only these kernel modules (default: all found)")
    p.add_argument("--interpret-smoke", action="store_true", help="tiny CPU run in the Triton interpreter")
    args = p.parse_args(argv)

    found = discover()
    names = [k for k in found if not args.kernels or k in args.kernels]
    print(f"kernels in kernels/: {', '.join(found) or 'none'}")
    for k in names:
        if k not in SPECS:
            print(f"  {k}: no benchmark spec in benchmarks/kernels.py yet; not benchmarked")
    names = [k for k in names if k in SPECS]

    if args.interpret_smoke:
        importlib.import_module("triton")
        ok = all(smoke(k, SPECS[k]()) for k in names)
        return 0 if ok else 1
    if not torch.cuda.is_available():
        print("kernels.py: no CUDA device here; the Triton kernels need CUDA, so nothing was measured. "
              "On a GPU machine run it there (benchmarks/gpu_check.sh does); `--interpret-smoke` runs a tiny "
              "correctness check in Triton's CPU interpreter.")  # fmt: skip
        return 0

    device = torch.device("cuda")
    env = environment(device)
    base = {"date": env["date"], "device": env["device"], "torch": env["versions"]["torch"],
            "triton": env["versions"]["triton"], "git": env["versions"]["git"]}  # fmt: skip
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()

        def write(row: dict) -> None:
            w.writerow({**base, **row})
            f.flush()  # rows survive a timeout of the caller

        print(f"{env['device']} | torch {base['torch']} | triton {base['triton']} | {args.backbone} {args.crop}² "
              f"batch {args.batch}")  # fmt: skip
        print(f"{'kernel':<10}{'shape':<34}{'dtype':<6}{'provider':<10}{'mode':<9}{'ms p50':>9}{'GB/s':>8}"
              f"{'%BW':>6}{'TFLOP/s':>9}{'err':>9}")  # fmt: skip
        for k in names:
            for r in run_kernel(k, SPECS[k](), args, device, env, write):
                if "error" in r:
                    print(f"{r['kernel']:<10}{r['shape']:<34}{r['dtype']:<6}{r['provider']:<10}error: {r['error']}")
                    continue
                bw = f"{100 * r['bw_frac']:.0f}" if r["bw_frac"] is not None else "-"
                print(f"{r['kernel']:<10}{r['shape']:<34}{r['dtype']:<6}{r['provider']:<10}{r['mode']:<9}"
                      f"{r['ms_p50']:>9.4f}{r['gb_s']:>8.0f}{bw:>6}{r['tflops']:>9.1f}"
                      f"{r['fwd_rel_err']:>9}")  # fmt: skip
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
