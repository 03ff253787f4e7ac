"""Parameters and forward FLOPs of every (architecture, backbone) pair of the experiment sets, counted from the models.

    python benchmarks/arch_table.py [--exp 1 2 ... 101] [--size 512] [--json PATH] [--threads N]
    python benchmarks/arch_table.py --print PATH      # the markdown table of a written record, nothing counted

The pairs are those of `daformer_fast.experiments.experiment_runs` for the DAFormer sets 1–8, 100 and 101, in order
of first appearance, each turned into `model.*` by `experiments.build_config` exactly as its runs are. For each pair
the segmentor is built as a run builds it (19 classes, random weights: the counts do not depend on the values) and

- parameters: the trainable ones (`requires_grad`), split into encoder and decode head; `params_all` and
  `params_decoder_all` add the frozen ones (SegFormer's unused `conv_seg`, which the original's count includes);
- FLOPs: one forward of one size×size image in eval mode, fp32, with the plain-PyTorch ops
  (`kernels.impl=reference`), counted by `torch.utils.flop_counter.FlopCounterMode` through
  benchmarks/step_flops.py's `flop_counter` (the same counter as the training-step count): convolutions,
  matmuls and attention at 2 FLOPs per multiply-add; elementwise ops, norms, softmax and resizes are not counted.
  The reference attention is explicit matmuls (FlopCounterMode has no formula for torch's CPU flash attention).
  Split into the encoder (`backbone`) and the decode head; the SegFormer-adapter neck only resizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import environment  # noqa: E402
from step_flops import flop_counter  # noqa: E402

from daformer_fast.experiments import build_config, experiment_runs  # noqa: E402
from daformer_fast.models import build_segmentor  # noqa: E402
from daformer_fast.ops.dispatch import using_impl  # noqa: E402

__all__ = ["DAFORMER_SETS", "count_model", "experiment_pairs", "main", "markdown_table"]

DAFORMER_SETS = (1, 2, 3, 4, 5, 6, 7, 8, 100, 101)


def experiment_pairs(exps=DAFORMER_SETS) -> list[dict]:
    """One entry per distinct (architecture, backbone) of the sets: the original's name fragments, our model fields
    (from `build_config` of the pair's first run) and the sets it appears in."""
    pairs: dict[tuple[str, str], dict] = {}
    for exp in exps:
        for run in experiment_runs(exp):
            key = (run.architecture, run.backbone)
            if key not in pairs:
                model = build_config(run).model
                pairs[key] = {"architecture": run.architecture, "backbone_name": run.backbone, "exps": [],
                              "backbone": model.backbone, "decoder": model.decoder,
                              "decoder_norm": model.decoder_norm, "model": model}  # fmt: skip
            if exp not in pairs[key]["exps"]:
                pairs[key]["exps"].append(exp)
    return list(pairs.values())


def count_model(model_cfg, size: int = 512) -> dict:
    """Parameter counts and the forward FLOPs of one size×size image (module docstring) of the model `model_cfg`."""
    torch.manual_seed(0)
    model = build_segmentor(model_cfg).eval()

    def n_params(module, trainable=True):
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

    x = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    with torch.no_grad(), using_impl("reference"), flop_counter() as counter:
        logits = model(x)
    by_module = counter.get_flop_counts()
    return {
        "params": n_params(model), "params_encoder": n_params(model.backbone),
        "params_decoder": n_params(model.decode_head), "params_all": n_params(model, trainable=False),
        "params_decoder_all": n_params(model.decode_head, trainable=False),
        "flops": int(counter.get_total_flops()),
        "flops_encoder": int(sum(by_module.get("Segmentor.backbone", {}).values())),
        "flops_decoder": int(sum(by_module.get("Segmentor.decode_head", {}).values())),
        "logits_shape": list(logits.shape), "count_s": round(time.perf_counter() - start, 2),
    }  # fmt: skip


def markdown_table(rows: list[dict]) -> str:
    """The README table: name fragments, our model fields, trainable parameters and forward GFLOPs per image."""
    lines = ["| architecture / backbone (experiment name) | `model.decoder` | `model.backbone` | `decoder_norm` | sets "
             "| params | GFLOPs / image |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| `{r['architecture']}` / `{r['backbone_name']}` | `{r['decoder']}` | `{r['backbone']}` | "
                     f"{str(r['decoder_norm']).lower()} | {', '.join(map(str, r['exps']))} | "
                     f"{r['params']:,} | {r['flops'] / 1e9:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", type=int, nargs="*", default=list(DAFORMER_SETS), help="experiment sets to take pairs from")
    p.add_argument("--size", type=int, default=512, help="input side length (one size×size image)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="write the record here")
    p.add_argument("--print", dest="print_json", metavar="PATH", help="print the table of a written record and exit")
    args = p.parse_args(argv)
    if args.print_json:
        record = json.loads(Path(args.print_json).read_text())
        print(markdown_table(record["rows"]))
        return record
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    record = {
        "command": " ".join(["python", "benchmarks/arch_table.py", *(argv if argv is not None else sys.argv[1:])]),
        "setting": {"input": [1, 3, args.size, args.size], "mode": "eval", "precision": "fp32",
                    "kernels": "reference", "num_classes": 19, "exps": args.exp,
                    "flops": "FlopCounterMode forward count (benchmarks/step_flops.py flop_counter), 2 per MAC"},
        **environment(device), "rows": [],
    }  # fmt: skip
    for pair in experiment_pairs(args.exp):
        row = {k: v for k, v in pair.items() if k != "model"} | count_model(pair["model"], args.size)
        record["rows"].append(row)
        print(f"{row['architecture']} / {row['backbone_name']}: {row['params']:,} params, "
              f"{row['flops'] / 1e9:.1f} GFLOPs ({row['count_s']} s)", flush=True)  # fmt: skip
    record["load_avg_1m_end"] = environment(device)["load_avg_1m"]
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(markdown_table(record["rows"]))
    return record


if __name__ == "__main__":
    main()
