"""One DAFormer training iteration (docs/recipe.md §2.2): the mean-teacher self-training step with ClassMix, strong
augmentation, ImageNet feature distance and rare-class-sampled source batches, composed from the `uda/` stages.

    student, step, optimizer = build_training(cfg, device)    # daformer_fast.build
    out = step(batch, t)        # dict of 0-dim device tensors: loss_src, loss_fd, loss_mix, pseudo_weight, skipped

Two paths compute the same thing (`train.path`):
- `fast`: batched stages, no host synchronisation inside the step, the source CE and FD backward fused into one
  (author-endorsed, docs/recipe.md §8b), each backward pass's gradients summed into the held ones in one
  multi-tensor op (`_backward`), ClassMix with colour jitter in one op and the blur in another
  (`ops.classmix_aug`), fused AdamW whose update is skipped on the device when a gradient is non-finite.
- `original`: the original's order — per-sample ClassMix and augmentation loops, three separate backward passes,
  the pseudo-label weight read back to the host, the for-loop AdamW — with plain-PyTorch ops throughout.
`train.precision=bf16` (autocast) and `train.compile` apply to either path (the original is fp32 eager; the
benchmark ladder adds them to the original one at a time).
From the same state, seed and batch the two give the same losses and weights (tests/test_train_step.py).

Randomness: every draw of iteration t comes from (seed, rank, t) — a CPU generator for ClassMix and the strong
augmentation, and the global torch RNG (DropPath, Dropout2d) reseeded at the start of the step — so a resumed run
repeats an uninterrupted one and ranks differ.

An iteration is a host part, `prepare` (learning rates, reseeding, every draw as `StepDraws`), and on the fast path a
device part, `body`, which reads only device tensors and branches on nothing drawn, so `daformer_fast.graphs` can
capture it in a CUDA graph and replay it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from daformer_fast.config import OptimConfig, ScheduleConfig, TrainConfig, UDAConfig
from daformer_fast.data.pipeline import _norm_stats, normalize
from daformer_fast.models.mit import DropPath
from daformer_fast.models.segmentor import Segmentor, param_groups
from daformer_fast.ops.classmix_aug import gaussian_blur, mix, mix_and_jitter
from daformer_fast.ops.dispatch import Impl, using_impl
from daformer_fast.uda.augment import StrongParams, apply_strong, draw_strong_params, strong_on_device
from daformer_fast.uda.classmix import chosen_classes, class_masks_original, draw_class_keys
from daformer_fast.uda.ema import ema_weights, update_ema
from daformer_fast.uda.fdist import feature_distance
from daformer_fast.uda.losses import seg_ce_loss
from daformer_fast.uda.mic import block_keep_mask, draw_block_uniforms, draw_mic_aug, mic_batch, mic_threshold
from daformer_fast.uda.pseudo_label import pseudo_label
from daformer_fast.uda.schedule import set_lrs
from daformer_fast.utils import to_device

__all__ = ["StepDraws", "UDAStep", "build_optimizer", "frozen_copy", "step_seed"]


def step_seed(seed: int, rank: int, t: int) -> int:
    """The seed of iteration t's step-level draws (distinct from the loaders' per-sample streams)."""
    return int(np.random.SeedSequence([seed, rank, t, 7]).generate_state(1, dtype=np.uint64)[0] >> 1)


def build_optimizer(optim: OptimConfig, student: Segmentor, fused: bool) -> torch.optim.AdamW:
    """AdamW over the student only (docs/recipe.md §1.4: the teacher and ImageNet copies never receive gradients); fused
    (one kernel per step, on-device skip of non-finite updates) or torch's per-parameter loop as the original."""
    groups = param_groups(student, optim)
    opts = {"fused": True} if fused else {"foreach": False}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, **opts)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that receives no gradients: the EMA teacher of the student, or the ImageNet encoder of the
    feature distance (a copy of the encoder as initialised, i.e. the ImageNet weights when `model.pretrained` is
    set)."""
    copy_ = copy.deepcopy(module)
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_


def _teacher_inference_mode(teacher: nn.Module) -> None:
    """Dropout and DropPath off, BatchNorm left in training mode (batch statistics of the target crops, recipe
    §2.3); called after every `.train()` of the owner."""
    for m in teacher.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd | DropPath):
            m.training = False


_INPUT_KEYS = ("img", "target_img", "gt", "valid_hw", "target_valid_hw")


def _dev(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else to_device(x, device)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` lays its elements out as the dense `b` (strides of size-1 dimensions do not matter)."""
    return all(n == 1 or sa == sb for n, sa, sb in zip(b.shape, a.stride(), b.stride(), strict=True))


class StepDraws(NamedTuple):
    """Every value of iteration t besides its batch and the networks' state: drawn or computed on the host before
    the step's device part runs (`UDAStep.prepare`, CPU tensors), then moved there whole (`on_device`). None where
    the configuration has no such stage."""

    ema: torch.Tensor | None = None
    """[a, 1 − a] of DAFormer's EMA teacher (`uda.ema.ema_weights`); None at t = 0 (a copy)."""
    mic_ema: torch.Tensor | None = None
    """The same for MIC's separate teacher."""
    class_keys: torch.Tensor | None = None
    """(B, 256) float64 ClassMix keys (`uda.classmix.draw_class_keys`)."""
    strong: StrongParams | None = None
    """The mixed image's colour jitter and blur (`uda.augment.draw_strong_params`)."""
    mic_strong: StrongParams | None = None
    """The masked batch's colour augmentation (`uda.mic.draw_mic_aug`), `*aug` modes only."""
    mic_uniforms: torch.Tensor | None = None
    """MIC's mask cells (`uda.mic.draw_block_uniforms`)."""

    def on_device(self, device: torch.device) -> StepDraws:
        """The draws as the fast step reads them: on `device`, the augmentation switches as 0-dim bool tensors."""
        return StepDraws(
            *(_dev(x, device) for x in (self.ema, self.mic_ema, self.class_keys)),
            *(None if p is None else strong_on_device(p, device) for p in (self.strong, self.mic_strong)),
            _dev(self.mic_uniforms, device),
        )  # fmt: skip


class UDAStep:
    """Owns the teacher and the frozen ImageNet encoder next to the (possibly DDP-wrapped) student."""

    def __init__(
        self,
        student: Segmentor,
        teacher: Segmentor | None,
        imnet: nn.Module | None,
        optimizer: torch.optim.Optimizer,
        *,
        uda: UDAConfig,
        schedule: ScheduleConfig,
        train: TrainConfig,
        num_classes: int,
        device: torch.device,
        impl: Impl = "auto",
        rank: int = 0,
        student_fwd: Callable | None = None,
        mic_teacher: Segmentor | None = None,
    ) -> None:
        """teacher: the EMA teacher (a frozen copy of the student; None for the supervised baselines); imnet: the
        frozen ImageNet encoder of the feature distance (None without FD). `student_fwd`: the callable that runs the
        student (its DDP wrapper; the student itself by default). `impl`: the ops implementation (`kernels.impl`);
        the original path always runs the plain-PyTorch references. `daformer_fast.build.build_training` makes all of
        these from a config, compiled when asked. mic_teacher: the separate EMA teacher of MIC (`uda.mic`), when
        its alpha or threshold is not `same`."""
        self.uda, self.schedule, self.student, self.optimizer = uda, schedule, student, optimizer
        self.seed, self.max_iters, self.num_classes = train.seed, train.max_iters, num_classes
        self.device, self.rank = device, rank
        self.original = train.path == "original"
        self.impl: Impl = "reference" if self.original else impl
        self.student_fwd = student_fwd or student
        self.no_sync = getattr(student_fwd, "no_sync", contextlib.nullcontext)
        # Called before the update: the gradient all-reduce of a captured DDP step (graphs.CapturedStep), which runs
        # the plain student and reduces the gradients itself; None when DDP (or nothing) does it.
        self.grad_sync: Callable[[], None] | None = None
        if (teacher is None) != (uda.mode != "dacs") or (imnet is None) != (uda.mode != "dacs" or uda.fd_lambda == 0):
            raise ValueError(f"uda.mode={uda.mode}, fd_lambda={uda.fd_lambda} needs "
                             "a teacher for dacs and an ImageNet encoder for FD, and neither otherwise")  # fmt: skip
        if (mic_teacher is None) == uda.mic.separate_teacher:
            raise ValueError("uda.mic needs a separate MIC teacher exactly when its alpha or threshold is not 'same'")
        self.teacher, self.imnet, self.mic_teacher = teacher, imnet, mic_teacher
        self.mic = uda.mic if uda.mode == "dacs" and uda.mic.mode is not None else None
        self.mean, self.std = _norm_stats(device)
        classes = uda.fd_classes
        self.fd_classes = None if classes is None else torch.tensor(list(classes), dtype=torch.int64, device=device)
        self.bf16 = train.precision == "bf16"
        self.grad_params = [p for p in student.parameters() if p.requires_grad]

    # ---------------------------------------------------------------------------------------------------------
    # Pieces shared by both paths.

    def train(self) -> None:
        self.student.train()
        for teacher in (self.teacher, self.mic_teacher):
            if teacher is not None:
                teacher.train()
                _teacher_inference_mode(teacher)

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _images(self, batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        """Normalised images on the device; padding (images smaller than the crop) exactly 0, as the original."""
        valid = batch.get("target_valid_hw" if key == "target_img" else "valid_hw")
        return normalize(batch[key].to(self.device, non_blocking=True), valid)

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch tensors the fast step reads, on the device (copies that do not block the host)."""
        return {k: batch[k].to(self.device, non_blocking=True) for k in _INPUT_KEYS if k in batch}

    def prepare(self, t: int, batch_size: int, size: tuple[int, int]) -> StepDraws:
        """The host part of iteration t: the learning rates written into the optimizer, the global torch RNG
        reseeded (DropPath, Dropout2d), and every other value the iteration reads drawn on the CPU (`StepDraws`).
        The draws follow one fixed order and amount — class keys, strong augmentation, MIC's augmentation, MIC's
        mask cells — so the stream never depends on a switch."""
        seed = step_seed(self.seed, self.rank, t)
        torch.manual_seed(seed)  # DropPath / Dropout2d of the student's forward passes
        set_lrs(self.optimizer, t, self.schedule, self.max_iters)
        if self.uda.mode != "dacs":
            return StepDraws()
        gen = torch.Generator().manual_seed(seed)
        keys = draw_class_keys(batch_size, gen)  # ClassMix: source classes pasted into each target image (§2.4)
        strong = draw_strong_params(batch_size, gen, self.uda)  # jitter/blur switches, factors, σ (§2.5)
        mic_ema = mic_strong = mic_uniforms = None
        if self.mic is not None:
            n = 2 if self.mic.mode.removesuffix("aug") == "separate" else batch_size  # docs/mic.md §3
            mic_strong = draw_mic_aug(n, gen, self.uda) if self.mic.mode.endswith("aug") else None
            mic_uniforms = draw_block_uniforms(n, size, self.mic.block_size, gen)
            if self.mic_teacher is not None:
                mic_ema = ema_weights(t, self.uda.alpha if self.mic.alpha == "same" else self.mic.alpha)
        return StepDraws(ema_weights(t, self.uda.alpha), mic_ema, keys, strong, mic_strong, mic_uniforms)

    def _feature_distance(self, img: torch.Tensor, feat_student: torch.Tensor, gt: torch.Tensor):
        with torch.no_grad():
            feat_imnet = self.imnet(img)[-1]
        dist, mask = feature_distance(
            feat_student, feat_imnet, gt, self.fd_classes, self.uda.fd_scale_min_ratio,
            self.num_classes,
        )  # fmt: skip
        return self.uda.fd_lambda * dist, mask

    @torch.no_grad()
    def _pseudo_labels(self, target_img: torch.Tensor, teacher=None, threshold=None):
        """(labels, weights) of a teacher (DAFormer's by default) on the target images."""
        logits = (self.teacher if teacher is None else teacher)(target_img)
        return pseudo_label(
            logits, tuple(target_img.shape[-2:]), self.uda.pseudo_threshold if threshold is None else threshold,
            self.uda.pseudo_weight_ignore_top, self.uda.pseudo_weight_ignore_bottom,
        )  # fmt: skip

    def _update_teachers(self, d: StepDraws) -> None:
        """EMA of DAFormer's teacher, then of the separate MIC teacher (docs/mic.md §4), before any forward."""
        update_ema(self.teacher.parameters(), self.student.parameters(), _dev(d.ema, self.device))
        if self.mic_teacher is not None:
            update_ema(self.mic_teacher.parameters(), self.student.parameters(), _dev(d.mic_ema, self.device))

    def _mic_pass(self, d: StepDraws, img, gt, tgt, pl, pw, debug: dict | None) -> torch.Tensor:
        """MIC's masked pass and its own backward (docs/mic.md §1-§6), after the ClassMix backward; returns the
        (λ-weighted) loss. The original path runs the per-sample colour ops, the fast path the batched ones; both
        from the same draws."""
        mic = self.mic
        if self.mic_teacher is not None:  # a separate teacher labels the unaugmented, unmasked target batch
            with self._autocast():
                pl, pw = self._pseudo_labels(tgt, self.mic_teacher, mic_threshold(mic, self.uda))
        images, labels, weights = mic_batch(mic.mode, img, gt, tgt, pl, pw)
        if d.mic_strong is not None:
            images = apply_strong(images, self.mean, self.std, d.mic_strong, original=self.original)
        keep = block_keep_mask(_dev(d.mic_uniforms, self.device), tuple(images.shape[-2:]), mic.ratio)
        masked = images * keep
        with self._autocast():
            loss_mic = seg_ce_loss(self.student_fwd(masked), labels, weights)
        if mic.lambda_ != 1:  # as the original: a weight of 1 is never multiplied in
            loss_mic = mic.lambda_ * loss_mic
        self._backward(loss_mic)
        if debug is not None:
            debug.update(mic_img=masked, mic_keep=keep[:, 0], mic_label=labels,
                         mic_weight=weights if weights is not None else torch.ones_like(keep[:, 0]))  # fmt: skip
        return loss_mic.detach()

    def _backward(self, loss: torch.Tensor) -> None:
        """Add d loss / d student to the student's gradients.

        Autograd accumulates each parameter's gradient with an op of its own (a detach to keep a new gradient, an
        add to sum into one): ~2,200 ops per iteration at MiT-B5's 1,086 parameter tensors, over a quarter of what
        was left with the networks compiled (benchmarks/results/README.md). The fast step instead takes the gradients
        as one list (`torch.autograd.grad`) and sums them into the held ones in one multi-tensor add; the sums are
        the same, in the same order. DDP's reducer hooks on autograd's own accumulation, and the original path
        accumulates as the original, so those two keep `loss.backward()`.
        """
        if self.original or self.student_fwd is not self.student:
            loss.backward()
            return
        params = self.grad_params
        new = torch.autograd.grad(loss, params, allow_unused=True)
        held, add, kept = [], [], set()
        for p, g in zip(params, new, strict=True):
            if g is None:
                continue
            if p.grad is None:
                # Kept as it is, as autograd keeps a gradient, unless another parameter already keeps the same
                # memory (the backward of `w1 + w2` hands both one tensor; later sums would then add twice) or it
                # breaks autograd's layout rule, the parameter's strides, which the fused optimizer relies on.
                keep = _same_layout(g, p) and (g.numel() == 0 or g.data_ptr() not in kept)
                p.grad = g if keep else torch.empty_like(p).copy_(g)
                kept.add(p.grad.data_ptr())
            else:
                held.append(p.grad)
                add.append(g)
        if held:
            torch._foreach_add_(held, add)

    def _optimizer_step(self, loss_total: torch.Tensor) -> torch.Tensor:
        """Apply the update unless a loss or gradient is non-finite; returns 1.0 if skipped, else 0.0.

        The gradient test is on each tensor's L2 norm: besides NaN and inf it catches finite gradients whose square
        overflows fp32 (|g| ≳ 1e19), which would turn AdamW's second moment into inf and silently freeze that
        parameter for good (m / inf = 0); torch's CPU bf16 depthwise convolution produced such gradients
        (ops/depthwise.py).
        """
        if self.grad_sync is not None:
            self.grad_sync()
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        found_inf = (~torch.isfinite(torch.stack([loss_total.detach().float(), *norms]))).any().float()
        if self.optimizer.defaults.get("fused"):
            # The fused kernel skips the update (and the step count) on the device when found_inf is set:
            # the guard costs no host synchronisation (the mechanism torch's GradScaler uses).
            self.optimizer.found_inf, self.optimizer.grad_scale = found_inf, None
            self.optimizer.step()
        elif found_inf.item() == 0:  # original path: a host read, as the original's logging does anyway
            self.optimizer.step()
        return found_inf

    # ---------------------------------------------------------------------------------------------------------
    # The step.

    def __call__(self, batch: dict[str, torch.Tensor], t: int, debug: bool = False) -> dict[str, torch.Tensor]:
        """Iteration t on `batch`. With `debug`, the output also holds "debug": the step's images, labels and masks
        (the panels of `visualize.save_debug_grids`), for the caller to draw outside the step."""
        with using_impl(self.impl):
            draws = self.prepare(t, batch["img"].shape[0], tuple(batch["img"].shape[-2:]))
            self.optimizer.zero_grad(set_to_none=True)
            if self.original and self.uda.mode == "dacs":
                return self.dacs_step_original(batch, draws, debug)
            return self.body(self.inputs(batch), draws.on_device(self.device), debug)

    def body(self, inputs: dict[str, torch.Tensor], draws: StepDraws, debug: bool = False) -> dict[str, torch.Tensor]:
        """The device part of a fast iteration (the supervised step on either path): batch tensors and draws on
        the device in, 0-dim device tensors out. It reads no value back to the host, creates no tensor from host
        data and branches on nothing drawn, so the same kernels run every iteration: `daformer_fast.graphs`
        captures it in a CUDA graph and replays it with new contents of the same input tensors."""
        if self.uda.mode != "dacs":
            return self._supervised_body(inputs)
        return self._dacs_body(inputs, draws, debug)

    def _supervised_body(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Source-only / target-only baselines: plain supervised training on the labelled side."""
        img = normalize(inputs["img"], inputs.get("valid_hw"), host_check=False)
        with self._autocast():
            loss_src = seg_ce_loss(self.student_fwd(img), inputs["gt"])
        self._backward(loss_src)
        return {"loss_src": loss_src.detach(), "skipped": self._optimizer_step(loss_src)}

    def _dacs_body(self, inputs: dict[str, torch.Tensor], d: StepDraws, debug: bool) -> dict[str, torch.Tensor]:
        """DAFormer's iteration (MIC's masked pass last, when on), batched and free of host synchronisation."""
        self._update_teachers(d)
        img = normalize(inputs["img"], inputs.get("valid_hw"), host_check=False)
        tgt = normalize(inputs["target_img"], inputs.get("target_valid_hw"), host_check=False)
        gt = inputs["gt"]

        # Source: supervised loss + ImageNet feature distance, one backward (no gradient all-reduce yet).
        with self.no_sync(), self._autocast():
            logits_src, feats = self.student_fwd(img, with_features=True)
            loss_src = seg_ce_loss(logits_src, gt)
            loss_fd, fd_mask = self._feature_distance(img, feats[-1], gt) if self.imnet else (img.new_zeros(()), None)
            self._backward(loss_src + loss_fd)

        # Target: teacher pseudo-labels, ClassMix with the source, strong augmentation; weighted loss.
        with self._autocast():
            pl, pw = self._pseudo_labels(tgt)
        chosen = chosen_classes(gt, d.class_keys)
        aug = d.strong
        mixed_img, mixed_lbl, mixed_w, mask = mix_and_jitter(img, tgt, gt, pl, pw, chosen, aug.jitter_params,
                                                             self.mean, self.std)  # fmt: skip
        # The switches select (exactly) between the jittered/blurred and the plain image: no branch on a draw.
        mixed_img = torch.where(aug.jitter, mixed_img, mix(mask, img, tgt))
        mixed_img = torch.where(aug.blur, gaussian_blur(mixed_img, aug.sigma_B), mixed_img)
        mixed = (mixed_img, mixed_lbl, mixed_w, mask)
        loss_mix, loss_mic, panels = self._mixed_and_masked(d, img, gt, tgt, pl, pw, mixed, fd_mask, debug)
        return self._finish(loss_src, loss_fd, loss_mix, loss_mic, pw.amax(), panels)

    def dacs_step_original(self, batch: dict[str, torch.Tensor], d: StepDraws, debug: bool = False) -> dict:
        """The same iteration in the original's order: three backward passes (four with MIC), per-sample loops,
        host reads; from the same (CPU) draws."""
        self._update_teachers(d)
        img, tgt = self._images(batch, "img"), self._images(batch, "target_img")
        gt = batch["gt"].to(self.device)

        with self.no_sync():
            with self._autocast():
                logits_src, feats = self.student_fwd(img, with_features=True)
                loss_src = seg_ce_loss(logits_src, gt)
            loss_src.backward(retain_graph=self.imnet is not None)  # FD reuses the encoder graph
            loss_fd, fd_mask = img.new_zeros(()), None
            if self.imnet is not None:
                with self._autocast():
                    loss_fd, fd_mask = self._feature_distance(img, feats[-1], gt)
                loss_fd.backward()

        with self._autocast():
            pl, pw = self._pseudo_labels(tgt)
        q = pw.amax().item()  # the original reads the confident fraction back as a Python float
        masks = class_masks_original(gt, d.class_keys)
        mixed = [mix(masks[i : i + 1], img[i : i + 1], tgt[i : i + 1]) for i in range(img.shape[0])]
        mixed_img = apply_strong(torch.cat(mixed), self.mean, self.std, d.strong, original=True)
        mixed_lbl = torch.cat([mix(masks[i : i + 1], gt[i : i + 1], pl[i : i + 1]) for i in range(img.shape[0])])
        mixed_w = torch.cat([mix(masks[i : i + 1], torch.ones_like(pw[i : i + 1]), pw[i : i + 1])
                             for i in range(img.shape[0])])  # fmt: skip
        mixed = (mixed_img, mixed_lbl, mixed_w, masks)
        loss_mix, loss_mic, panels = self._mixed_and_masked(d, img, gt, tgt, pl, pw, mixed, fd_mask, debug)
        return self._finish(loss_src, loss_fd, loss_mix, loss_mic, torch.tensor(q), panels)

    def _mixed_and_masked(self, d: StepDraws, img, gt, tgt, pl, pw, mixed, fd_mask, debug: bool):
        """The mixed loss and its backward, then MIC's masked pass (when on) on the unmixed pseudo-labels and
        weights (mixing wrote new tensors); returns (loss_mix, loss_mic or None, debug panels or None)."""
        mixed_img, mixed_lbl, mixed_w, mask = mixed
        # With MIC the gradient all-reduce waits for its backward, the step's last.
        with self.no_sync() if self.mic else contextlib.nullcontext():
            with self._autocast():
                loss_mix = seg_ce_loss(self.student_fwd(mixed_img), mixed_lbl, mixed_w)
            self._backward(loss_mix)
        panels = dict(img=img, target_img=tgt, gt=gt, pseudo_label=pl, mixed_img=mixed_img, mix_mask=mask,
                      mixed_label=mixed_lbl, pseudo_weight=mixed_w, fd_mask=fd_mask) if debug else None  # fmt: skip
        loss_mic = self._mic_pass(d, img, gt, tgt, pl, pw, panels) if self.mic else None
        return loss_mix, loss_mic, panels

    def _finish(self, loss_src, loss_fd, loss_mix, loss_mic, pseudo_weight, panels) -> dict[str, torch.Tensor]:
        """The single optimizer step over the summed gradients, and the step's outputs."""
        losses = loss_src + loss_fd + loss_mix + (loss_mic if loss_mic is not None else 0.0)
        out = {"loss_src": loss_src.detach(), "loss_fd": loss_fd.detach(), "loss_mix": loss_mix.detach()}
        if loss_mic is not None:
            out["loss_mic"] = loss_mic
        out.update(pseudo_weight=pseudo_weight, skipped=self._optimizer_step(losses))
        if panels is not None:
            out["debug"] = panels
        return out
