from pathlib import Path

import pytest
import yaml

from sparse_ad.config import Config, config_to_dict, load_config, save_config
from sparse_ad.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_matches_the_code():
    assert yaml.safe_load((CONFIGS / "default.yaml").read_text()) == config_to_dict(Config())


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml", "anovox_mono.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.grid.build().shape == (1000, 1000, 64)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=3", "loss.kind=bce", "augment.flip_y=false", "model.channels=[8,16]"])
    assert cfg.train.epochs == 3 and cfg.loss.kind == "bce" and cfg.augment.flip_y is False
    assert cfg.model.channels == (8, 16)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid keys: .*epochs"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.epochs"])
    for broken in ("model.channels=[8,16", "train.epochs={"):   # a typo: one line, not a YAML traceback
        with pytest.raises(ConfigError, match=r"override .*: not a valid YAML value \(while parsing"):
            load_config(None, [broken])


def test_config_file_problems_name_the_file(tmp_path):
    """A misspelt section (maybe in a `base:` file), a folder, a file that is not text."""
    (tmp_path / "base.yaml").write_text("trian: {epochs: 3}\n")
    (tmp_path / "a.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: top level: unknown key\(s\) trian; valid keys: .*train"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "base.yaml").write_text("train: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"a.yaml \+ overrides: train: unknown key\(s\) epoch"):
        load_config(tmp_path / "a.yaml", ["train.epoch=3"])
    with pytest.raises(ConfigError, match=rf"{tmp_path.name}: cannot read it as a YAML config"):
        load_config(tmp_path)
    (tmp_path / "b.yaml").write_bytes(b"train: {epochs: \xff\xfe}\n")
    with pytest.raises(ConfigError, match=r"b.yaml: cannot read it as a YAML config"):
        load_config(tmp_path / "b.yaml")


def test_base_chain_and_save_roundtrip(tmp_path):
    (tmp_path / "a.yaml").write_text("base: " + str(CONFIGS / "default.yaml") + "\ntrain: {epochs: 7}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.train.epochs == 7 and cfg.optim.lr == Config().optim.lr
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


def test_missing_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_a_checkpoint_config_with_removed_settings_still_loads_and_says_so():
    import warnings

    from sparse_ad.config import Config, config_from_saved, config_to_dict

    saved = config_to_dict(Config())
    saved["eval"] = {"target_recall": 0.9}              # a section removed since
    saved["train"]["old_knob"] = 3                      # a key removed since
    saved["train"]["epochs"] = 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = config_from_saved(saved, "run/best.pt")
    assert cfg.train.epochs == 7
    msg = " ".join(str(w.message) for w in caught)
    assert "run/best.pt" in msg and "eval" in msg and "train.old_knob" in msg
    saved["train"]["epochs"] = "many"
    with pytest.raises(ConfigError, match="epochs"):
        config_from_saved(saved, "run/best.pt")


def test_synthetic_splits_with_braking_get_their_own_cache_folder(tmp_path, monkeypatch):
    """A split with sudden-braking scenarios must not reuse the cached split without them."""
    import sparse_ad.synth as synth
    from sparse_ad.engine.runtime import resolve_data_root

    written = []
    monkeypatch.setenv("SPARSE_AD_CACHE", str(tmp_path))
    def fake_write_split(root, **kw):
        root.mkdir(parents=True)
        written.append((root.name, kw["braking_share"]))

    monkeypatch.setattr(synth, "write_split", fake_write_split)
    plain = resolve_data_root(load_config(None, ["data.synth_seed=3"]))
    braking = resolve_data_root(load_config(None, ["data.synth_seed=3", "data.synth_braking_share=0.5"]))
    assert plain.name == "synth_s8_f10_a0.6_seed3"          # as before braking existed: caches stay valid
    assert braking != plain and written == [(plain.name, 0.0), (braking.name, 0.5)]


def test_an_unfinished_synthetic_cache_is_written_anew(tmp_path, monkeypatch):
    """A write that was interrupted (no .complete) left scenario folders: they are removed, so
    the new write neither mixes them in nor replaces them one by one."""
    import sparse_ad.synth as synth
    from sparse_ad.engine.runtime import data_root, resolve_data_root

    monkeypatch.setenv("SPARSE_AD_CACHE", str(tmp_path))
    cfg = load_config(None, ["data.synth_seed=3"])
    stale = data_root(cfg) / "Scenario_left-from-a-killed-write"
    stale.mkdir(parents=True)
    seen = []
    monkeypatch.setattr(synth, "write_split", lambda root, **kw: seen.append(root.exists()) or root.mkdir())
    root = resolve_data_root(cfg)
    assert seen == [False] and not stale.exists() and (root / ".complete").exists()


def test_a_resolution_without_its_shape_is_refused():
    """0.25 m on (1000, 1000, 64) would silently shrink the box to 250 x 250 x 16 m."""
    with pytest.raises(ConfigError, match=r"grid.resolution=0.25 .*set grid.shape=\[2000, 2000, 128\] too"):
        load_config(None, ["grid.resolution=0.25"]).grid.build()
    grid = load_config(None, ["grid.resolution=0.25", "grid.shape=[2000,2000,128]"]).grid.build()
    assert grid.extent == (500.0, 500.0, 32.0)


@pytest.mark.parametrize("override,message", [
    ("train.log_every=0", r"train.log_every: expected a number in \[1, inf\), found 0"),
    ("train.batch_size=0", "train.batch_size: expected"), ("data.num_workers=-1", "data.num_workers: expected"),
    ("data.val_fraction=0", r"expected a number in \(0, 1\)"), ("train.ema_decay=1.0", r"in \[0, 1\), found 1.0"),
    ("optim.lr=0", r"optim.lr: expected a number in \(0, inf\)"), ("data.val_fraction=.nan", "found nan"),
    ("optim.grad_clip=.inf", "optim.grad_clip: expected a number in .*found inf"),
    ("train.seed=-1", r"train.seed: expected a number in \[0, inf\), found -1"), ("data.split_seed=-1", "split_seed"),
    ("data.synth_seed=-2", "synth_seed"), ("loss.gamma=.nan", "loss.gamma: expected a number in"),
    ("loss.pos_weight=.nan", "loss.pos_weight"), ("loss.scene_weight=-5", "loss.scene_weight"),
    ("loss.beta=1", r"loss.beta: expected a number in \[0, 1\)"), ("augment.rotate_z_deg=.nan", "rotate_z_deg"),
    ("augment.jitter_m=-1", "augment.jitter_m"), ("augment.scale=[1.1,0.9]", r"low <= high, found \(1.1, 0.9\)"),
    ("augment.scale=[-1,1]", r"augment.scale: expected numbers in \(0, inf\), found \(-1.0, 1.0\)")])
def test_out_of_range_numbers_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/demo.yaml", [override])


def test_an_unwritable_run_dir_is_a_one_line_error(tmp_path, capsys):
    from sparse_ad.cli import main

    (tmp_path / "file").write_text("")
    rc = main(["train", "--config", "configs/demo.yaml", "--run-dir", str(tmp_path / "file" / "run")])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot create the run directory" in err and "Traceback" not in err


def test_shipped_configs_are_found_from_any_folder_and_demo_defaults_to_its_own(tmp_path, monkeypatch):
    from sparse_ad.cli import build_parser

    monkeypatch.chdir(tmp_path)
    assert load_config("configs/demo.yaml").model.channels == (16, 32, 64, 128)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("train: {epochs: 2}\n")   # a local file wins
    assert load_config("configs/demo.yaml").train.epochs == 2
    assert build_parser().parse_args(["demo"]).config == "configs/demo.yaml"
