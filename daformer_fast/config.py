"""Typed configuration: frozen dataclasses whose defaults are the paper's final GTA→Cityscapes DAFormer setting.

YAML files state only what differs from these defaults; `--set section.key=value` overrides apply last. There is
no inheritance, no `type:` registry and no interpolation. Unknown keys and wrong types raise `ConfigError` with
one short message naming the key (and the nearest valid key for typos).

    cfg = load_config("configs/gta2cs.yaml", overrides=["model.backbone=mit_b0"])
    save_config(cfg, "work_dirs/run/config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DatasetConfig",
    "KernelConfig",
    "MICConfig",
    "ModelConfig",
    "OptimConfig",
    "RCSConfig",
    "ScheduleConfig",
    "TrainConfig",
    "UDAConfig",
    "config_to_dict",
    "load_config",
    "parse_config",
    "save_config",
]

Backbone = Literal[
    "mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5",
    "resnet50_v1c", "resnet101_v1c", "resnest50", "resnest101", "resnest200", "resnext50_32x4d", "resnext101_32x4d",
]  # fmt: skip
Decoder = Literal[
    "daformer_sepaspp", "daformer_conv1", "daformer_aspp", "daformer_isa", "daformer_sepaspp_bottleneck",
    "segformer", "dlv2red", "dlv2", "dlv3p", "sfa_dlv3p", "danet", "isanet", "upernet", "upernet_ch256",
]  # fmt: skip
DatasetName = Literal["gta", "synthia", "cityscapes", "acdc", "darkzurich", "bdd100k", "mapillary", "folder"]

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


class ConfigError(ValueError):
    """A bad config file or override. The message is meant to be shown to the user as is."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    backbone: Backbone = "mit_b5"
    """Encoder: a Mix Transformer size (the recipe's is mit_b5, docs/recipe.md §1.2, §4.1) or one of the paper's CNN
    encoders at output stride 8 (ResNet V1c, ResNeSt, ResNeXt 32x4d; docs/architectures.md §1)."""
    decoder: Decoder = "daformer_sepaspp"
    """DAFormer head with separable ASPP fusion (final) or one of its Table-7 variants, the SegFormer MLP head, or
    a CNN-era decoder: DeepLabV2 (`dlv2red`: dilations 6/12; `dlv2`: 6/12/18/24), DeepLabV3+ (`dlv3p`;
    `sfa_dlv3p` = MiT with the SegFormer-adapter neck), DANet, ISANet, UperNet (512 or 256 channels)
    (docs/architectures.md §2)."""
    decoder_norm: bool = True
    """BatchNorm in the decoder's conv modules; False is the original's `_nodbn` (no BN, a bias on each conv), which
    the paper's DeepLabV3+/DANet/ISANet runs use (docs/architectures.md §0)."""
    num_classes: int = 19
    """Number of classes K: train ids 0..K-1 (255 = ignore) in labels, logits and metrics; must equal
    len(data.classes). 19 = the Cityscapes train ids (docs/recipe.md §0)."""
    head_channels: int | None = None
    """Fused/embedding channels of the head; None = 256 for DAFormer heads (docs/recipe.md §1.2), SegFormer's own width
    (256 for B0/B1, 768 for B2-B5) otherwise."""
    drop_path_rate: float = 0.1
    """Stochastic depth, linspace(0, rate) over all MiT blocks; the CNN encoders have none (as the original)."""
    dropout: float = 0.1
    """Dropout2d before the classifier."""
    pretrained: str | None = "pretrained/mit_b5.pth"
    """ImageNet encoder weights (SegFormer mit_b*.pth, HF nvidia/mit-b*, or OpenMMLab's ResNet/ResNeSt/ResNeXt
    files for the CNN encoders); None trains from scratch."""


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    name: DatasetName = "cityscapes"
    """Folder layout of `daformer_fast.data.datasets` (docs/recipe.md §1.7; BDD100K and Mapillary Vistas for the
    domain-generalisation evaluation, docs/architectures.md §4), or `folder` for a custom dataset
    (images/<split>, labels/<split>). A `synthia` source makes the evaluation report mIoU16/mIoU13 (docs/recipe.md
    §5)."""
    root: str = "data/cityscapes"
    """Dataset root folder. For the source with RCS it also holds `sample_class_stats.json` (docs/recipe.md §3.3)."""
    split: str = "train"
    """Sub-folder for layouts that have splits (cityscapes/acdc/darkzurich/bdd100k/mapillary/folder; for mapillary,
    train/val/test also find Vistas' training/validation/testing folders); ignored by gta/synthia."""
    scale: tuple[int, int] = (1024, 512)
    """Keep-ratio resize target (long side, short side), mmcv rule."""
    img_suffix: str | None = None
    """Image file suffix; None = the layout's default (e.g. `_leftImg8bit.png`)."""
    label_suffix: str | None = None
    """Label file suffix; None = the layout's default (e.g. `_gtFine_labelTrainIds.png`)."""


@dataclass(frozen=True, kw_only=True)
class RCSConfig:
    enabled: bool = True
    """Draw each source image by Rare Class Sampling (docs/recipe.md §3.2) instead of uniformly; used in `dacs` mode
    only and needs the source root's `sample_class_stats.json` (docs/recipe.md §3.3)."""
    min_pixels: int = 3000
    """An image is a candidate for class c if it has more than this many pixels of c (original resolution). 3000 is
    for GTA's 1914x1052 labels; scale it by label area for other sizes (`convert_datasets folder` prints the value,
    `daformer_fast.data.rcs.suggest_min_pixels`)."""
    class_temp: float = 0.01
    """Temperature T in P(c) ∝ exp(-f_c / T); use a large value for uniform class sampling."""
    min_crop_ratio: float = 0.5
    """Re-crop (up to 10 times) until the crop has > min_pixels * min_crop_ratio pixels of c."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: DatasetConfig = field(
        default_factory=lambda: DatasetConfig(name="gta", root="data/gta", scale=(1280, 720))
    )
    """Labelled source domain; GTA at scale (1280, 720), i.e. 1914x1052 → 1280x704 (docs/recipe.md §1.6). Not trained on
    in `target_only` mode."""
    target: DatasetConfig = field(default_factory=lambda: DatasetConfig(name="cityscapes", root="data/cityscapes"))
    """Target domain; Cityscapes train at (1024, 512) (docs/recipe.md §1.6). Unlabelled in `dacs` mode (its labels are
    never read); the labelled training set in `target_only` mode."""
    val: DatasetConfig = field(
        default_factory=lambda: DatasetConfig(name="cityscapes", root="data/cityscapes", split="val")
    )
    """Evaluation set (labelled): Cityscapes val at (1024, 512), whole-image inference (docs/recipe.md §5)."""
    classes: tuple[str, ...] = CITYSCAPES_CLASSES
    """Class names in train-id order, shared by all three datasets (custom datasets list their own)."""
    palette: tuple[tuple[int, int, int], ...] = CITYSCAPES_PALETTE
    """RGB colour per class for predictions and debug images."""
    crop: tuple[int, int] = (512, 512)
    """Training crop (height, width)."""
    cat_max_ratio: float = 0.75
    """Labelled crops only (the source; the target in `target_only` mode): re-draw, up to 10 times, a crop that has
    a single class or one class covering at least this share, 255 ignored (docs/recipe.md §1.6); >= 1 = no check. The
    unlabelled target crop never reads labels."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip of each training crop, source and target alike (docs/recipe.md §1.6: 0.5)."""
    batch_size: int = 2
    """Images per domain per GPU and iteration (2 source + 2 target)."""
    workers: int = 4
    """Loader parallelism: torch DataLoader workers (0 = the main process); with DALI, max(1, workers) decode
    threads and workers // 2 plan workers; evaluation during training reads with min(workers, 4) threads.
    Recipe §1.2: 4."""
    loader: Literal["auto", "dali", "torch"] = "auto"
    """auto = NVIDIA DALI when the device is CUDA and `nvidia.dali` imports, the torch DataLoader otherwise; both
    draw the same samples (`daformer_fast.data.loader`)."""
    rcs: RCSConfig = field(default_factory=RCSConfig)
    """Rare Class Sampling of the source images (docs/recipe.md §3)."""
    photometric: bool = False
    """mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue on the uint8 crop) on every training
    image, as the original's source-only and target-only baselines load them; the UDA configs have it off and jitter
    the mixed images instead (docs/architectures.md §3)."""
    strict: bool = False
    """Stop at the first unreadable sample instead of skipping it with a warning."""
    synthetic_root: str | None = None
    """Generate the synthetic domain-shift benchmark here on first use, by rank 0 with
    `daformer_fast.data.synthetic.ensure_synthetic` (nothing to do once ROOT/source/sample_class_stats.json exists),
    for configs whose source/target/val roots are ROOT/source and ROOT/target (configs/demo.yaml)."""


MICMode = Literal["separate", "separatesrc", "separatetrg", "separateaug", "separatesrcaug", "separatetrgaug"]


@dataclass(frozen=True, kw_only=True)
class MICConfig:
    """Masked Image Consistency (Hoyer et al., CVPR 2023) on the DAFormer step (docs/mic.md)."""

    mode: MICMode | None = None
    """None = off. Which images the masked pass trains on (docs/mic.md §3): `separatetrg` the target batch against
    its pseudo-labels and weights, `separatesrc` the source batch against its labels, `separate` image 0 of each
    (needs data.batch_size 2); the `aug` variants colour-augment (and maybe blur) before masking. MIC(DAFormer)
    uses `separatetrgaug`."""
    block_size: int = 32
    """Side in pixels of the square mask cells; the grid has round(H / block_size) × round(W / block_size) cells
    (32 at 512² crops)."""
    ratio: float = 0.7
    """Probability, in [0, 1], that a cell is masked: a cell is kept iff its U(0, 1) draw is > ratio."""
    lambda_: float = 1.0
    """Weight of the MIC loss (the original multiplies only when it is not 1)."""
    alpha: float | Literal["same"] = "same"
    """EMA momentum of the MIC teacher; `same` = DAFormer's teacher and `uda.alpha`. A value (0 included: a copy of
    the current student) makes a separate MIC teacher, as the original does (docs/mic.md §4)."""
    pseudo_threshold: float | Literal["same"] | None = "same"
    """Confidence threshold of the MIC pseudo-label weight; `same` = DAFormer's pseudo-labels and weights, None =
    weight 1 outside the ignored rows. Any value but `same` (None included) makes a separate MIC teacher."""

    @property
    def separate_teacher(self) -> bool:
        """Whether MIC has its own EMA teacher: only when `alpha` or `pseudo_threshold` is not `same`."""
        return self.mode is not None and (self.alpha != "same" or self.pseudo_threshold != "same")


@dataclass(frozen=True, kw_only=True)
class UDAConfig:
    mode: Literal["dacs", "source_only", "target_only"] = "dacs"
    """dacs = the DAFormer self-training recipe; the other two are the paper's baselines."""
    alpha: float = 0.999
    """EMA teacher momentum; the effective value is min(1 - 1/(t+1), alpha)."""
    pseudo_threshold: float = 0.968
    """Softmax confidence at or above which a target pixel counts toward the pseudo-label weight."""
    pseudo_weight_ignore_top: int = 15
    """Top rows of each target crop whose pseudo-label weight is set to 0, before mixing (pasted source pixels
    keep weight 1). 15 is for 512-row crops of Cityscapes (docs/recipe.md §2.2 step 6, §2.3); scale it with the crop
    height for other data."""
    pseudo_weight_ignore_bottom: int = 120
    """Bottom rows of each target crop whose pseudo-label weight is set to 0, as `pseudo_weight_ignore_top`; 120 is
    for 512-row crops of Cityscapes (docs/recipe.md §2.2 step 6)."""
    fd_lambda: float = 0.005
    """ImageNet feature distance weight; 0 disables FD (and the frozen ImageNet encoder)."""
    fd_classes: tuple[int, ...] | None = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    """Thing classes whose cells carry the feature distance; None = all cells (ablation)."""
    fd_scale_min_ratio: float = 0.75
    """FD mask: minimum share, in (0, 1], of the majority class in the label cell of one last-stage feature
    (32x32 pixels at MiT's stride 32) for the cell to count; cells mostly 255 never count (docs/recipe.md §2.7:
    0.75)."""
    blur: bool = True
    """Gaussian blur of the mixed images with probability 0.5 (one switch per batch, σ ~ U(0.15, 1.15) per sample,
    docs/recipe.md §2.5); False never blurs."""
    color_jitter_strength: float = 0.2
    """Colour jitter factors of the mixed images: brightness, contrast, saturation ~ U(1-s, 1+s), hue ~ U(-s, s)
    per sample, kornia 0.5.8 semantics (docs/recipe.md §2.5: 0.2)."""
    color_jitter_probability: float = 0.2
    """As in the original: jitter is applied when U(0,1) > this value, i.e. with probability 0.8."""
    debug_img_interval: int = 1000
    """Every this many iterations (t = 0, N, 2N, ...) rank 0 saves debug grids of the step's images, labels and
    masks to work_dir/class_mix_debug (`dacs` mode only; docs/recipe.md §2.9: 1000); <= 0 disables them."""
    mic: MICConfig = field(default_factory=MICConfig)
    """Masked Image Consistency, off by default (`uda.mic.mode`)."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 6e-5
    """AdamW base learning rate, the encoder groups' peak lr before the schedule (docs/recipe.md §1.2: 6e-5)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (β1, β2) (docs/recipe.md §1.2)."""
    eps: float = 1e-8
    """AdamW epsilon (docs/recipe.md §1.2: the torch default 1e-8)."""
    weight_decay: float = 0.01
    """Decoupled AdamW decay, p ← p·(1 - lr·wd) with the group's current lr; every parameter, biases and head BN
    included, except the encoder LayerNorms (`norm_decay_mult`) (docs/recipe.md §1.4: 0.01)."""
    head_lr_mult: float = 10.0
    """Learning-rate multiplier of every decode-head parameter: head lr = lr · head_lr_mult, 6e-5 · 10 = 6e-4
    (docs/recipe.md §1.4)."""
    norm_decay_mult: float = 0.0
    """Weight-decay multiplier of every encoder LayerNorm parameter."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """With N data-parallel processes the global batch is N·(2+2): keep the paper's lr (none), or scale it by N
    (linear) or √N (sqrt)."""


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    power: float = 1.0
    """Poly exponent: lr(t) = (lr0 - min_lr)·(1 - t/max_iters)^power + min_lr per group (docs/recipe.md §1.5: 1)."""
    min_lr: float = 0.0
    """Poly end value, not clipped to a group's lr0: the no-warmup ablation's 1e-4 makes the backbone lr rise
    (docs/recipe.md §1.5)."""
    warmup: Literal["linear", "none"] = "linear"
    """linear = the recipe's warmup (docs/recipe.md §1.5); none = the poly schedule alone."""
    warmup_iters: int = 1500
    """Iterations t < warmup_iters are warmed up (docs/recipe.md §1.5: 1500)."""
    warmup_ratio: float = 1e-6
    """Warmup factor at t = 0: for t < warmup_iters the lr is poly(t)·(1 - (1 - t/warmup_iters)·(1 - ratio)),
    scaling the already decayed poly value (docs/recipe.md §1.5: 1e-6)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_iters: int = 40000
    """Training iterations t = 0 .. max_iters - 1, also the poly schedule's length (docs/recipe.md §1.1: 40 000)."""
    log_interval: int = 50
    """Every this many iterations (and at the end) one host read of the interval's mean losses: a metrics.jsonl row,
    TensorBoard, the progress bar, the non-finite check (docs/recipe.md §2.8: 50)."""
    eval_interval: int = 4000
    """Every this many iterations and at the end, the student's mIoU on `data.val` (docs/recipe.md §5: 4000)."""
    checkpoint_interval: int = 40000
    """Every this many iterations, at the end and on SIGTERM, `work_dir/iter_<t>.pth`; the recipe saves one at
    40 000 (docs/recipe.md §1.1)."""
    keep_checkpoints: int = 1
    """How many of the newest iter_*.pth files to keep; older ones are deleted after each save."""
    seed: int = 0
    """Seeds the student's initial weights, the loaders' per-sample draws and each step's draws (with rank and t,
    so a resumed run repeats an uninterrupted one). Recipe §1.2: 0 (the paper averages seeds 0, 1, 2)."""
    work_dir: str = "work_dirs/gta2cs_daformer_mitb5"
    """Run folder: config.yaml, train.log, metrics.jsonl, tb/, class_mix_debug/, iter_*.pth, latest.pth; resuming
    looks for checkpoints here."""
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """fp32 = true fp32: TF32 off for matmuls and cuDNN convolutions (torch enables TF32 convolutions by default on
    Ampere and newer; the original ran fp32 on pre-Ampere GPUs). tf32 = fp32 storage with TF32 tensor-core matmuls
    and convolutions on CUDA. bf16 = bfloat16 autocast around the step's forward passes and losses (and evaluation
    on CUDA). The recipe trains in fp32; tf32 and bf16 are recipe changes (docs/recipe.md §1.2, §8b)."""
    compile: Literal["off", "regional", "full"] = "off"
    """torch.compile of the networks (`daformer_fast.build.build_training`), on either path: `full` compiles the
    student, the teachers and the ImageNet encoder whole, in place; `regional` compiles each repeated unit once per
    distinct shape (every encoder block and patch embedding, the decode head), so MiT-B5's 52 blocks are not unrolled
    into one graph and the teacher and ImageNet copies reuse the compiled code. Off by default until a GPU has timed
    it. YAML booleans are accepted: false = off, true = full."""
    cuda_graphs: bool = False
    """Capture the fast iteration in a CUDA graph and replay it (`daformer_fast.graphs`): checked at first use against
    eager iterations from the same state, with one logged reason and an eager fallback on a mismatch or capture
    error; without CUDA a logged reason and eager steps. Under DDP the gradient all-reduce runs between two graphs."""
    deterministic: bool = False
    """Call `torch.use_deterministic_algorithms(True)` at the start of training (ops without a deterministic
    implementation then raise). The recipe runs non-deterministic (docs/recipe.md §1.2, §2.10)."""
    device: str = "auto"
    """auto = cuda when available, else cpu; or an explicit torch device string."""
    path: Literal["fast", "original"] = "fast"
    """fast = batched, sync-free step; original = the original's order (per-sample loops, three backward passes, host
    reads, for-loop AdamW) with plain-PyTorch ops throughout (the step then runs `reference` ops whatever
    `kernels.impl` says)."""
    max_nonfinite: int = 20
    """Stop the run after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    impl: Literal["auto", "reference", "triton"] = "auto"
    """The ops' process default, set by `daformer_fast.build.build_training`: auto = per op, the Triton kernel where
    that op enables it and it can run (CUDA tensors, Triton importable), else the PyTorch path; reference = plain
    PyTorch everywhere; triton = force the kernels (an error where one cannot run). The step runs its ops under
    this choice too, except on `train.path: original` (always `reference`)."""


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The segmentation network (docs/recipe.md §1.2, §4)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, crops and loaders (docs/recipe.md §1.6, §1.7, §3)."""
    uda: UDAConfig = field(default_factory=UDAConfig)
    """The self-training step (docs/recipe.md §2)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and its parameter groups (docs/recipe.md §1.4)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule (docs/recipe.md §1.5)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, intervals, outputs, numerics and device."""
    kernels: KernelConfig = field(default_factory=KernelConfig)
    """Which implementation (Triton kernels or plain PyTorch) the ops use."""

    def __post_init__(self) -> None:
        if self.model.num_classes < 1:
            raise ConfigError(f"model.num_classes must be >= 1, got {self.model.num_classes}")
        if len(self.data.classes) != self.model.num_classes:
            raise ConfigError(
                f"data.classes has {len(self.data.classes)} names but model.num_classes is {self.model.num_classes}"
            )
        if len(self.data.palette) != len(self.data.classes):
            raise ConfigError(f"data.palette has {len(self.data.palette)} colours for {len(self.data.classes)} classes")
        bad = [c for c in self.uda.fd_classes or () if not 0 <= c < self.model.num_classes]
        if bad:
            # The default thing classes are Cityscapes train ids; a custom dataset lists its own (or null = all).
            raise ConfigError(
                f"uda.fd_classes {bad} are not class ids 0..{self.model.num_classes - 1}; list this dataset's thing "
                f"classes or set uda.fd_classes: null"
            )
        for name in ("max_iters", "log_interval", "eval_interval", "checkpoint_interval", "keep_checkpoints"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self.train, name)}")
        if self.data.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.data.batch_size}")
        if self.train.cuda_graphs and self.train.path != "fast":
            raise ConfigError("train.cuda_graphs captures the fast step; train.path original runs the original's "
                              "host-syncing order, which cannot be captured")  # fmt: skip
        mic = self.uda.mic
        if mic.mode is not None:
            if self.uda.mode != "dacs":
                raise ConfigError(f"uda.mic.mode is for uda.mode dacs; MIC on the {self.uda.mode} baseline (the "
                                  "original's exp 85) is not implemented")  # fmt: skip
            if mic.mode in ("separate", "separateaug") and self.data.batch_size != 2:
                raise ConfigError(f"uda.mic.mode {mic.mode} pairs image 0 of each domain and needs data.batch_size "
                                  f"2, got {self.data.batch_size}")  # fmt: skip
            if mic.block_size < 1 or not 0.0 <= mic.ratio <= 1.0:
                raise ConfigError(f"uda.mic.block_size must be >= 1 and uda.mic.ratio in [0, 1]; got "
                                  f"{mic.block_size}, {mic.ratio}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Loading: YAML dict + dotted overrides -> validated dataclass tree.


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, prefix + f.name + ".")
    return keys


def _unknown_key(full_key: str) -> ConfigError:
    close = difflib.get_close_matches(full_key, _all_keys(Config), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown key {full_key}{hint}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting YAML lists to tuples and ints to floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if isinstance(value, bool) and "off" in args and "full" in args:
            value = "full" if value else "off"  # YAML reads off/on/true/false as booleans; true was "full" before
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in args)}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads exponents without a dot ("1e-4") as strings; accept them as numbers.
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this file, not user input


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    """A dataclass section from a full dict (used only where no default instance exists to merge onto)."""
    return _merge(cls(), values, prefix)


def _merge(base: Any, delta: dict, prefix: str) -> Any:
    """Return a copy of dataclass `base` with the (possibly nested) values of `delta` replaced."""
    hints = typing.get_type_hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    changes = {}
    for key, value in delta.items():
        if not isinstance(key, str) or key not in names:
            raise _unknown_key(prefix + str(key))
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _merge(current, value, prefix + key + ".")
        else:
            changes[key] = _convert(value, hints[key], prefix + key)
    try:
        return dataclasses.replace(base, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null", "~"):
        value = None
    return key.split("."), value


def parse_config(values: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated Config from a dict of deltas plus `key=value` overrides."""
    values = dict(values or {})
    cfg = _merge(Config(), values, "")
    for item in overrides:
        path, value = _parse_override(item)
        delta: dict = {}
        node = delta
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        cfg = _merge(cfg, delta, "")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file of deltas (None = defaults only) and apply `key=value` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            # safe_load only: tags such as !!python/object are refused here (the problem text names the tag).
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}" + (f": {problem}" if problem else "")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        values = loaded or {}
    return parse_config(values, overrides)


def _plain(obj: Any) -> Any:
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists for tuples) of a config or any config section."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config; `load_config` of the file gives an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
