"""Config schema: defaults = the paper's final GTA→Cityscapes setting; strict loading; round trip."""

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import daformer_fast.config as config_module
from daformer_fast.config import Config, ConfigError, load_config, parse_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_paper_setting():
    cfg = Config()
    assert cfg.model.backbone == "mit_b5" and cfg.model.decoder == "daformer_sepaspp"
    assert cfg.model.num_classes == 19 and cfg.model.drop_path_rate == 0.1 and cfg.model.dropout == 0.1
    assert cfg.data.source.name == "gta" and cfg.data.source.scale == (1280, 720)
    assert cfg.data.target.name == "cityscapes" and cfg.data.target.scale == (1024, 512)
    assert cfg.data.val.split == "val" and cfg.data.crop == (512, 512) and cfg.data.batch_size == 2
    assert cfg.data.cat_max_ratio == 0.75 and cfg.data.workers == 4
    assert (cfg.data.rcs.min_pixels, cfg.data.rcs.class_temp, cfg.data.rcs.min_crop_ratio) == (3000, 0.01, 0.5)
    u = cfg.uda
    assert (u.alpha, u.pseudo_threshold, u.pseudo_weight_ignore_top, u.pseudo_weight_ignore_bottom) == (
        0.999, 0.968, 15, 120)  # fmt: skip
    assert u.fd_lambda == 0.005 and u.fd_classes == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    assert u.fd_scale_min_ratio == 0.75 and u.color_jitter_probability == 0.2 and u.blur
    o = cfg.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.head_lr_mult, o.norm_decay_mult) == (
        6e-5, (0.9, 0.999), 1e-8, 0.01, 10.0, 0.0)  # fmt: skip
    s = cfg.schedule
    assert (s.power, s.min_lr, s.warmup, s.warmup_iters, s.warmup_ratio) == (1.0, 0.0, "linear", 1500, 1e-6)
    t = cfg.train
    assert (t.max_iters, t.eval_interval, t.checkpoint_interval, t.seed, t.precision) == (40000, 4000, 40000, 0, "fp32")


@pytest.mark.parametrize("name", ["gta2cs", "syn2cs", "cs2acdc", "cs2darkzurich"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    source = {"gta": "gta", "syn": "synthia", "cs": "cityscapes"}[name.split("2")[0]]
    assert cfg.data.source.name == source
    assert cfg.train.work_dir.endswith("_daformer_mitb5")


def test_benchmark_specific_scales():
    assert load_config(CONFIGS / "syn2cs.yaml").data.source.scale == (1280, 760)
    acdc = load_config(CONFIGS / "cs2acdc.yaml")
    assert (acdc.data.source.name, acdc.data.target.name, acdc.data.val.name) == ("cityscapes", "acdc", "acdc")
    assert acdc.data.target.scale == (960, 540) and acdc.data.val.scale == (960, 540)
    dz = load_config(CONFIGS / "cs2darkzurich.yaml")
    assert dz.data.target.split == "train/night" and dz.data.val.split == "val"


def test_yaml_deltas_merge_onto_section_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  source: {root: /x/gta}\nuda: {alpha: 0.99}\n")
    cfg = load_config(p)
    assert cfg.data.source.root == "/x/gta"
    assert cfg.data.source.name == "gta" and cfg.data.source.scale == (1280, 720)  # untouched defaults
    assert cfg.uda.alpha == 0.99 and cfg.uda.pseudo_threshold == 0.968


def test_overrides_apply_last_and_parse_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {backbone: mit_b2}\n")
    cfg = load_config(p, ["model.backbone=mit_b0", "data.crop=[64,64]", "optim.lr=1e-3", "model.pretrained=null",
                          "uda.fd_classes=none", "train.compile=true", "optim.weight_decay=0"])  # fmt: skip
    assert cfg.model.backbone == "mit_b0" and cfg.data.crop == (64, 64)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.model.pretrained is None and cfg.uda.fd_classes is None and cfg.train.compile == "full"


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown key train\.max_iter; did you mean train\.max_iters\?"):
        parse_config(overrides=["train.max_iter=10"])
    with pytest.raises(ConfigError, match=r"unknown key modle; did you mean model\?"):
        parse_config({"modle": {"backbone": "mit_b0"}})
    with pytest.raises(ConfigError, match=r"unknown key data\.rcs\.min_pixel; did you mean data\.rcs\.min_pixels\?"):
        parse_config({"data": {"rcs": {"min_pixel": 5}}})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.backbone=mit_b9", "model.backbone: expected one of"),
        ("train.max_iters=ten", "train.max_iters: expected int"),
        ("train.max_iters=1.5", "train.max_iters: expected int"),
        ("train.compile=1", "train.compile: expected one of 'off', 'regional', 'full'"),
        ("train.cuda_graphs=3", "train.cuda_graphs: expected bool"),
        ("train.cuda_graphs=true train.path=original", "train.cuda_graphs captures the fast step"),
        ("data.crop=[64]", "data.crop: expected 2 values"),
        ("optim.lr=fast", "optim.lr: expected float"),
        ("optim.lr=true", "optim.lr: expected float"),
        ("train.max_iters=0", "train.max_iters must be >= 1"),
        ("model.num_classes=5", "data.classes has 19 names but model.num_classes is 5"),
        ("nokey", "must look like section.key=value"),
    ],
)
def test_type_errors_are_short_and_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config(overrides=override.split())
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_section_given_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="model"):
        parse_config({"model": 3})


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {backbone: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_custom_classes_with_matching_num_classes():
    cfg = parse_config({"model": {"num_classes": 2}, "uda": {"fd_classes": [1]},
                        "data": {"classes": ["bg", "fg"], "palette": [[0, 0, 0], [255, 0, 0]]}})  # fmt: skip
    assert cfg.data.classes == ("bg", "fg") and cfg.data.palette[1] == (255, 0, 0)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "cs2acdc.yaml", ["model.backbone=mit_b0", "uda.fd_classes=[6,7]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert not list((tmp_path / "run").glob("*.tmp"))


def _undocumented_fields(source: str) -> dict[str, list[str]]:
    """Per dataclass of `source`: its fields (annotated assignments in the class body) with no string statement
    right after them, i.e. no attribute docstring."""
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        if not any(isinstance(d, ast.Name) and d.id == "dataclass" for d in decorators):
            continue
        missing = []
        for stmt, nxt in zip(node.body, node.body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign):
                is_str = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                if not (is_str and isinstance(nxt.value.value, str)):
                    missing.append(stmt.target.id)
        out[node.name] = missing
    return out


def test_undocumented_field_detection():
    src = (
        "from dataclasses import dataclass\n"
        "@dataclass(frozen=True)\nclass A:\n    x: int = 1\n    \"\"\"Doc.\"\"\"\n    y: int = 2\n    z: int = 3\n"
        "@dataclass\nclass B:\n    w: int = 0\n    v: int = 1\n    \"\"\"Doc.\"\"\"\n"
        "class C:\n    u: int = 0\n"
    )
    assert _undocumented_fields(src) == {"A": ["y", "z"], "B": ["w"]}


def test_every_config_field_has_a_docstring():
    found = _undocumented_fields(inspect.getsource(config_module))
    sections = {"ModelConfig", "DatasetConfig", "RCSConfig", "DataConfig", "UDAConfig", "OptimConfig",
                "ScheduleConfig", "TrainConfig", "KernelConfig", "MICConfig", "Config"}  # fmt: skip
    assert set(found) == sections
    # Every dataclass field is one of the annotated assignments checked above.
    for name in sections:
        fields = [f.name for f in dataclasses.fields(getattr(config_module, name))]
        body = [s.target.id for s in ast.parse(inspect.getsource(getattr(config_module, name))).body[0].body
                if isinstance(s, ast.AnnAssign)]  # fmt: skip
        assert body == fields, name
    assert {k: v for k, v in found.items() if v} == {}
