"""Experiment sets (docs/recipe.md §6): names, generated deltas that load back, unavailable runs reported with
counts."""

import dataclasses
import math
import sys
import types
from pathlib import Path

import pytest

from daformer_fast import experiments
from daformer_fast.config import Config, ConfigError, load_config
from daformer_fast.experiments import EXPERIMENT_IDS, build_config, experiment_runs, main, write_experiment

FINAL_GTA = "gta2cs_dacs_a999_fdthings_rcs001_cpl_daformer_sepaspp_mitb5_poly10warm_s0"

# (total, unavailable) per ID, counted by hand from the §6.3 table. Every architecture and encoder of sets 1-8, 100
# and 101 exists; only the MIC sets' HRDA, AdvSeg, MinEnt and MIC-on-source-only rows are unavailable.
EXPECTED_COUNTS = {
    1: (5 * 3 * 3, 0),  # 5 architectures × {src-only, DACS, oracle} × 3 seeds
    2: (2 * 2 * 3, 0),  # SegFormerAdapter+DLv3+ and R101+SegFormer
    3: (6 * 3, 0),  # DLv2-red with R50/S50/S101/S200, SegFormer with MiT-B3/B4
    4: (2 * 2, 0),
    5: (7 * 3, 0),
    6: (7 * 2 * 3, 0),
    7: (3, 0),
    8: (2 * 3, 0),
    80: (4 * 3, 4 * 3),  # MIC(HRDA) on four benchmarks: HRDA missing
    81: (6 * 3, 3 * 3),  # AdvSeg, MinEnt, HRDA-DLv2 missing; DACS-DLv2, DAFormer-DLv2, DAFormer MiT-B5 available
    82: (4 * 3, 4 * 3),  # HRDA domain study
    83: (4 * 3, 0),
    84: (15 * 3, 0),  # 4 block sizes × 4 ratios, less the (32, 0.7) cell of exp 81
    85: (3, 3),  # MIC on the source-only baseline
    100: (22, 0),
    101: (9, 0),
}


@pytest.mark.parametrize("exp", EXPERIMENT_IDS)
def test_every_id_generates_files_that_load(exp, tmp_path):
    written, unavailable = write_experiment(exp, tmp_path)
    runs = experiment_runs(exp)
    total, num_unavailable = EXPECTED_COUNTS[exp]
    assert (len(runs), len(unavailable), len(written)) == (total, num_unavailable, total - num_unavailable)
    assert len({r.name for r in runs}) == total  # names are unique within a set
    by_name = {r.name: r for r in runs}
    for path in written:
        assert path.parent == tmp_path / f"exp{exp}"
        cfg = load_config(path)
        assert cfg == build_config(by_name[path.stem])
        assert cfg.train.work_dir == f"work_dirs/exp{exp}/{path.stem}"


def test_final_gta_run_is_the_default_config(tmp_path):
    written, _ = write_experiment(6, tmp_path)
    path = tmp_path / "exp6" / f"{FINAL_GTA}.yaml"
    assert path in written
    # Config defaults are the final recipe, so the delta holds only the work dir.
    assert load_config(path) == load_config(None, [f"train.work_dir=work_dirs/exp6/{FINAL_GTA}"])
    body = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert body == [f"train: {{work_dir: work_dirs/exp6/{FINAL_GTA}}}"]


def test_names_follow_the_reference_rule():
    names = {r.name for r in experiment_runs(5)}
    assert "gta2cs_dacs_rcsinf_segformer_mitb5_poly10warm_s1" in names
    assert "gta2cs_dacs_fdthings_rcs001_segformer_mitb5_poly10warm_s2" in names
    assert "gta2cs_source-only_segformer_mitb3_poly10warm_s0" in {r.name for r in experiment_runs(3)}
    # The baselines drop the RCS / PL-crop parts of the name even where the set enables them.
    assert "gta2cs_target-only_daformer_aspp_mitb5_poly10warm_s0" in {r.name for r in experiment_runs(6)}
    assert "gta2cs_dacs_segformer_mitb5_poly10_s0" in {r.name for r in experiment_runs(4)}


def test_exp7_is_synthia_and_exp8_is_acdc_and_darkzurich():
    runs7 = experiment_runs(7)
    assert [r.name for r in runs7] == [FINAL_GTA.replace("gta2cs", "syn2cs")[:-1] + s for s in "012"]
    cfg = build_config(runs7[0])
    assert (cfg.data.source.name, cfg.data.source.scale, cfg.data.target.name) == ("synthia", (1280, 760), "cityscapes")

    runs8 = experiment_runs(8)
    assert {r.name.split("_")[0] for r in runs8} == {"cs2acdc", "cs2dzur"}
    for run in runs8:
        cfg = build_config(run)
        assert cfg.data.source.name == "cityscapes" and cfg.data.target.name == cfg.data.val.name
        assert cfg.data.target.name in ("acdc", "darkzurich") and cfg.data.target.scale == (960, 540)
        assert cfg.data.rcs.enabled and cfg.uda.pseudo_weight_ignore_bottom == 120


def test_uda_variants_map_to_config():
    by_uda = {(r.uda, r.rcs_temp): build_config(r) for r in experiment_runs(101)}
    dacs = by_uda[("dacs", None)]
    assert (dacs.uda.alpha, dacs.uda.fd_lambda, dacs.data.rcs.enabled, dacs.uda.pseudo_weight_ignore_top) == (
        0.99, 0.0, False, 0,
    )  # fmt: skip
    assert math.isinf(by_uda[("dacs", math.inf)].data.rcs.class_temp)
    assert by_uda[("dacs_fd", None)].uda.fd_classes is None and by_uda[("dacs_fd", None)].uda.fd_lambda == 0.005
    assert by_uda[("dacs_fdthings", 0.01)].uda.fd_classes == Config().uda.fd_classes
    target_only = by_uda[("target-only", None)]
    # The oracle trains on the labelled target side, which the loader reads from data.target.
    assert target_only.uda.mode == "target_only" and target_only.data.target == Config().data.target
    assert by_uda[("source-only", None)].uda.mode == "source_only"
    for cfg in by_uda.values():
        assert (cfg.train.max_iters, cfg.train.checkpoint_interval, cfg.train.eval_interval) == (2, 2, 100)


def test_poly10_schedule_has_no_warmup_and_min_lr_1e4():
    cfg = build_config(experiment_runs(4)[-1])
    assert (cfg.schedule.warmup, cfg.schedule.min_lr) == ("none", 1e-4)


@pytest.mark.parametrize("exp", (1, 2, 3, 4, 5, 6, 7, 8, 100, 101))
def test_paper_sets_have_no_unavailable_run(exp, capsys):
    assert main(["--exp", str(exp), "--list"]) == 0
    out = capsys.readouterr().out
    assert "unavailable: " not in out and f"available, 0 unavailable" in out


def test_architecture_fragments_map_to_models():
    """The name fragments of docs/architectures.md §6: decoder, decoder BN (`_nodbn`), encoder, loader augmentation."""
    runs = {(r.architecture, r.backbone, r.uda): r for e in (1, 2, 3, 6, 100) for r in experiment_runs(e)}
    expect = {
        ("dlv2red", "r101v1c"): ("dlv2red", True, "resnet101_v1c"),
        ("da_nodbn", "r101v1c"): ("danet", False, "resnet101_v1c"),
        ("isa_nodbn", "r101v1c"): ("isanet", False, "resnet101_v1c"),
        ("dlv3p_nodbn", "r101v1c"): ("dlv3p", False, "resnet101_v1c"),
        ("sfa_dlv3p_nodbn", "mitb5-del"): ("sfa_dlv3p", False, "mit_b5"),
        ("segformer", "r101v1c"): ("segformer", True, "resnet101_v1c"),
        ("dlv2red", "s200"): ("dlv2red", True, "resnest200"),
        ("dlv2red", "x101-32"): ("dlv2red", True, "resnext101_32x4d"),
        ("upernet_ch256", "mitb5"): ("upernet_ch256", True, "mit_b5"),
        ("daformer_isa", "mitb5"): ("daformer_isa", True, "mit_b5"),
    }
    for (arch, bb), (decoder, norm, backbone) in expect.items():
        run = runs[(arch, bb, "target-only")]
        cfg = build_config(run)
        assert (cfg.model.decoder, cfg.model.decoder_norm, cfg.model.backbone) == (decoder, norm, backbone)
        assert cfg.model.pretrained == f"pretrained/{backbone}.pth"
        assert cfg.data.photometric  # the oracle's loader adds PhotoMetricDistortion
    uda_run = runs[("dlv2red", "r101v1c", "dacs")]
    assert not build_config(uda_run).data.photometric  # the UDA configs comment it out
    assert build_config(runs[("dlv2red", "r101v1c", "source-only")]).data.photometric


def test_unknown_id_lists_valid_ones(capsys):
    assert main(["--exp", "9"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment id 9" in err and "1, 2, 3, 4, 5, 6, 7, 8, 80, 81, 82, 83, 84, 85, 100, 101" in err
    with pytest.raises(ConfigError):
        experiment_runs(0)


def test_bad_override_is_a_short_error(capsys, tmp_path):
    assert main(["--exp", "7", "--out", str(tmp_path), "--set", "train.no_such_key=1"]) == 2
    assert "unknown key train.no_such_key" in capsys.readouterr().err


def test_overrides_reach_every_file(tmp_path):
    assert main(["--exp", "8", "--out", str(tmp_path), "--set", "data.source.root=/mnt/cs"]) == 0
    files = sorted((tmp_path / "exp8").glob("*.yaml"))
    assert len(files) == 6 and all(load_config(f).data.source.root == "/mnt/cs" for f in files)


def test_torchrun_prints_one_line_per_config(capsys, tmp_path):
    assert main(["--exp", "101", "--out", str(tmp_path), "--torchrun", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9
    assert all(line.startswith("torchrun --standalone --nproc_per_node=4 -m daformer_fast.train ") for line in lines)
    assert all(Path(line.split()[-1]).is_file() for line in lines)


def test_run_calls_train_main_per_config(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("daformer_fast.train")
    fake.main = lambda argv: calls.append(argv) or (1 if len(calls) == 2 else 0)
    monkeypatch.setitem(sys.modules, "daformer_fast.train", fake)
    assert main(["--exp", "7", "--out", str(tmp_path), "--run"]) == 1  # the second run "failed"; all three ran
    assert [Path(a[0]).name for a in calls] == [r.name + ".yaml" for r in experiment_runs(7)]


def test_unavailable_run_cannot_be_built():
    run = experiment_runs(81)[0]
    with pytest.raises(ConfigError, match="AdvSeg host"):
        build_config(run)


# MIC sets (docs/mic.md §9), written out from the original's run lists; seeds 0, 1, 2 follow each row.
_DAF = "gta2cs_dacs_a999_fdthings_rcs001_cpl_"
_TAIL = "_daformer_sepaspp_mitb5_poly10warm"
EXP81_ROWS = [
    "gta2cs_advseg_m32-07-spta_dlv2red_r101v1c_poly10warm_sgd_00025_pmF",
    "gta2cs_minent_m32-07-spta_dlv2red_r101v1c_poly10warm_sgd_00025_pmF",
    "gta2cs_dacs_m32-07-spta_dlv2red_r101v1c_poly10warm",
    "gta2cs_dacs_a999_fdthings_rcs001_cpl_m32-07-spta_dlv2red_r101v1c_poly10warm",
    "gtaHR2csHR_1024x1024_dacs_a999_fdthings_rcs001-20_cpl2_m64-07-spta_hrda1-512-01_dlv2red_sl_r101v1c_poly10warm",
    "gta2cs_dacs_a999_fdthings_rcs001_cpl_m32-07-spta_daformer_sepaspp_mitb5_poly10warm",
]
EXP83_ROWS = [_DAF + m + _TAIL for m in ("m32-07-spt", "m32-0-spta", "m32-07-a0-spta", "m32-07-pN-spta")]
EXP84_CELLS = ["m16-03", "m16-05", "m16-07", "m16-09", "m32-03", "m32-05", "m32-09", "m64-03", "m64-05", "m64-07",
               "m64-09", "m128-03", "m128-05", "m128-07", "m128-09"]  # fmt: skip
EXP84_ROWS = [f"{_DAF}{cell}-spta{_TAIL}" for cell in EXP84_CELLS]


def _with_seeds(rows):
    return [f"{row}_s{s}" for row in rows for s in (0, 1, 2)]


@pytest.mark.parametrize("exp, rows", [(81, EXP81_ROWS), (83, EXP83_ROWS), (84, EXP84_ROWS)])
def test_mic_set_names_match_the_original(exp, rows):
    assert [r.name for r in experiment_runs(exp)] == _with_seeds(rows)


def test_mic_hrda_and_supervised_sets_are_named_and_unavailable():
    hrda = "_1024x1024_dacs_a999_fdthings_rcs001-20_{}m64-07-{}_hrda1-512-01_daformer_sepaspp_sl_mitb5_poly10warm"
    gta, syn = "gtaHR2csHR" + hrda.format("cpl2_", "{}"), "synHR2csHR" + hrda.format("cpl2_", "{}")
    acdc, dzur = "csHR2acdcHR" + hrda.format("", "{}"), "csHR2dzurHR" + hrda.format("", "{}")
    assert [r.name for r in experiment_runs(80)] == _with_seeds(
        [gta.format("spta"), syn.format("spta"), acdc.format("sep"), dzur.format("sep")])
    assert [r.name for r in experiment_runs(82)] == _with_seeds(
        [gta.format("spsa"), gta.format("spa"), acdc.format("sps"), acdc.format("spt")])
    assert [r.name for r in experiment_runs(85)] == _with_seeds(["cs2cs_dacs_srconly_m32-07-sps" + _TAIL])
    for run in experiment_runs(80) + experiment_runs(82):
        assert run.unavailable_reason == "HRDA (multi-resolution training) not implemented"
    for run in experiment_runs(85):
        assert run.unavailable_reason == "MIC on the source_only baseline is not implemented"
        with pytest.raises(ConfigError, match="source_only baseline"):
            build_config(run)
    # The reason is the one Config itself gives for MIC on the source-only baseline.
    with pytest.raises(ConfigError, match="MIC on the source_only baseline"):
        load_config(None, ["uda.mode=source_only", "uda.mic.mode=separatesrc"])


def test_exp81_unavailable_rows_carry_their_reasons():
    runs = experiment_runs(81)
    reasons = [r.unavailable_reason for r in runs]
    assert all(reasons[:6]) and not any(reasons[6:12]) and all(reasons[12:15]) and not any(reasons[15:])
    assert all(x.startswith("AdvSeg host") for x in reasons[0:3])
    assert all(x.startswith("MinEnt host") for x in reasons[3:6])
    assert all(x == "HRDA (multi-resolution training) not implemented" for x in reasons[12:15])
    for run in runs[:6] + runs[12:15]:
        with pytest.raises(ConfigError, match="is unavailable"):
            build_config(run)
    for run in runs[6:12]:  # DACS and DAFormer (+MIC) with DeepLabV2 on ResNet-101
        cfg = build_config(run)
        assert (cfg.model.decoder, cfg.model.backbone, cfg.uda.mic.mode) == ("dlv2red", "resnet101_v1c",
                                                                               "separatetrgaug")


def test_mic_configs_extend_the_daformer_run():
    final = build_config(next(r for r in experiment_runs(6) if r.name == FINAL_GTA))
    for exp in (81, 83, 84):
        for run in experiment_runs(exp):
            if run.unavailable_reason or run.architecture != "daformer_sepaspp":  # exp 81's DeepLabV2 rows: other nets
                continue
            cfg = build_config(run)
            mic = cfg.uda.mic
            assert mic.lambda_ == 1.0 and cfg.train.seed == run.seed
            # Apart from MIC, seed and work dir, a MIC run is the final DAFormer run it extends.
            assert dataclasses.replace(cfg, uda=dataclasses.replace(cfg.uda, mic=final.uda.mic), train=final.train) \
                == final
            assert cfg.train == dataclasses.replace(final.train, seed=run.seed,
                                                    work_dir=f"work_dirs/exp{exp}/{run.name}")
    cfgs81 = [build_config(r) for r in experiment_runs(81)[15:]]
    assert {(c.uda.mic.mode, c.uda.mic.block_size, c.uda.mic.ratio, c.uda.mic.alpha, c.uda.mic.pseudo_threshold)
            for c in cfgs81} == {("separatetrgaug", 32, 0.7, "same", "same")}  # fmt: skip
    assert not any(c.uda.mic.separate_teacher for c in cfgs81)

    by_row = {r.name[len(_DAF):-len(_TAIL) - 3]: build_config(r).uda.mic for r in experiment_runs(83) if r.seed == 0}
    assert (by_row["m32-07-spt"].mode, by_row["m32-07-spt"].separate_teacher) == ("separatetrg", False)
    assert (by_row["m32-0-spta"].ratio, by_row["m32-0-spta"].mode) == (0.0, "separatetrgaug")
    a0 = by_row["m32-07-a0-spta"]
    assert (a0.alpha, a0.pseudo_threshold, a0.separate_teacher) == (0.0, "same", True)
    pn = by_row["m32-07-pN-spta"]
    assert (pn.alpha, pn.pseudo_threshold, pn.separate_teacher, pn.ratio) == ("same", None, True, 0.7)

    mics84 = [build_config(r).uda.mic for r in experiment_runs(84)]
    assert [(m.block_size, m.ratio) for m in mics84[::3]] == [
        (16, 0.3), (16, 0.5), (16, 0.7), (16, 0.9), (32, 0.3), (32, 0.5), (32, 0.9), (64, 0.3), (64, 0.5),
        (64, 0.7), (64, 0.9), (128, 0.3), (128, 0.5), (128, 0.7), (128, 0.9)]  # fmt: skip
    assert all(m.mode == "separatetrgaug" and not m.separate_teacher for m in mics84)


def test_mic_yaml_round_trips(tmp_path):
    written, _ = write_experiment(83, tmp_path)
    by_stem = {p.stem: p for p in written}
    pn = by_stem[f"{_DAF}m32-07-pN-spta{_TAIL}_s1"]
    body = [line for line in pn.read_text().splitlines() if not line.startswith("#")]
    # null must be written out: leaving it to the default would give 'same' back.
    assert body[0] == "uda:" and "  mic: {mode: separatetrgaug, pseudo_threshold: null}" in body
    assert load_config(pn).uda.mic.pseudo_threshold is None
    a0 = load_config(by_stem[f"{_DAF}m32-07-a0-spta{_TAIL}_s0"])
    assert a0.uda.mic.alpha == 0.0 and isinstance(a0.uda.mic.alpha, float)
    written81, _ = write_experiment(81, tmp_path)
    available81 = [r for r in experiment_runs(81) if not r.unavailable_reason]
    assert [p.stem for p in written81] == _with_seeds(EXP81_ROWS[2:4] + EXP81_ROWS[-1:])
    assert [p.stem for p in written81] == [r.name for r in available81]
    assert all(load_config(p) == build_config(r) for p, r in zip(written81, available81, strict=True))


def test_list_shows_mic_sets(capsys, tmp_path):
    assert main(["--exp", "81", "--list", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    out = "\n".join(lines)
    assert sum(x.startswith("unavailable: ") for x in lines) == 9
    assert sum(x.startswith("available: ") for x in lines) == 9
    assert f"available: {EXP81_ROWS[-1]}_s0" in out and f"available: {EXP81_ROWS[2]}_s1" in out
    assert f"unavailable: {EXP81_ROWS[0]}_s2 (AdvSeg host" in out
    assert "exp 81: 18 runs, 9 available, 9 unavailable" in out
    assert not any(tmp_path.iterdir())  # --list writes nothing


def test_run_settings_config_cannot_express_are_refused():
    run = experiment_runs(84)[0]
    for change in ({"opt": "sgd"}, {"crop": "1024x1024"}, {"inference": "slide"}, {"plcrop": "v2"}):
        with pytest.raises(ValueError, match="not expressible"):
            build_config(dataclasses.replace(run, **change))
