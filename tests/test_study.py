"""The quality study: trains per synthetic seed, scores on held-out and test splits, resumes."""

import argparse
import json

import pytest

from sparse_ad.errors import ConfigError
from sparse_ad.study import add_study_args, compare, run_study

SMALL = ["data.synth_scenarios=4", "data.synth_frames=1", "data.synth_anomaly_share=1.0", "data.val_fraction=0.5",
         "data.num_workers=0", "train.epochs=1", "train.batch_size=2", "model.channels=[8,16]",
         "train.max_minutes=0"]


def _args(tmp_path, *extra):
    return add_study_args(argparse.ArgumentParser()).parse_args(
        ["--seeds", "0", "1", "--test-seed", "9", "--out", str(tmp_path / "study"), *extra, *SMALL])


def test_study_trains_each_seed_scores_both_splits_and_reuses_finished_seeds(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSE_AD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    result = run_study(_args(tmp_path))
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    for r in result["runs"]:
        assert r["held_out"]["anomaly_voxels"] > 0 and r["test"]["anomaly_voxels"] > 0
        assert 0.0 <= r["test"]["auroc"] <= 1.0
        assert 0.0 <= r["test"]["objects_found"] <= 1.0 and 0.0 <= r["held_out"]["objects_found"] <= 1.0
    assert {p.name for p in (tmp_path / "cache").iterdir()} >= {"synth_s4_f1_a1_seed0", "synth_s4_f1_a1_seed1",
                                                                 "synth_s4_f1_a1_seed9"}
    same_test = {r["test"]["anomaly_voxels"] for r in result["runs"]}
    assert len(same_test) == 1                        # both scored on the one test split
    on_disk = json.loads((tmp_path / "study" / "study.json").read_text())
    assert on_disk["summary"]["test"]["aupr"]["min"] <= on_disk["summary"]["test"]["aupr"]["mean"]
    assert "mean ± std" in capsys.readouterr().out

    def no_training(*a, **k):
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr("sparse_ad.engine.train.train", no_training)
    again = run_study(_args(tmp_path, "--baseline", str(tmp_path / "study")))   # compared with itself
    assert again["runs"] == result["runs"]
    assert again["versus_baseline"]["held_out"]["aupr"] == {"mean": 0.0, "std": 0.0, "better": 0, "seeds": 2}
    assert "paired over seeds 0 1" in capsys.readouterr().out

    # a row written before `aupr_all` existed is completed from the run's files, still without training
    row_file = tmp_path / "study" / "seed1" / "study_row.json"
    old = json.loads(row_file.read_text())
    for scope in ("held_out", "test"):
        del old[scope]["aupr_all"]
    row_file.write_text(json.dumps(old))
    refreshed = run_study(_args(tmp_path))
    assert refreshed["runs"] == result["runs"] and 0.0 < refreshed["runs"][1]["test"]["aupr_all"] <= 1.0

    # a seed scored with another inference engine is reused, with a warning
    assert {r["engine"] for r in result["runs"]} == {"spconv"}   # this CPU's default
    row0 = tmp_path / "study" / "seed0" / "study_row.json"
    kept = row0.read_text()
    row0.write_text(kept.replace('"engine": "spconv"', '"engine": "gather_gemm"'))
    with pytest.warns(UserWarning, match="scored with the gather_gemm engine, new seeds here with spconv"):
        run_study(_args(tmp_path))
    row0.write_text(kept)

    # ... but never under another recipe's or test split's name
    with pytest.raises(ConfigError, match=r"seed0: this finished seed was trained with optim.lr=0.003 \(now 0.01\)"):
        run_study(_args(tmp_path, "optim.lr=0.01"))
    with pytest.raises(ConfigError, match=r"seed0: .*test split .*seed9 \(now .*seed8\); use another --out"):
        run_study(add_study_args(argparse.ArgumentParser()).parse_args(
            ["--seeds", "0", "--test-seed", "8", "--out", str(tmp_path / "study"), *SMALL]))
    # a run from before a setting existed: its default is what it trained with
    saved = tmp_path / "study" / "seed0" / "config.yaml"
    saved.write_text(saved.read_text().replace("  supervision: voxel\n", ""))
    assert run_study(_args(tmp_path))["runs"] == result["runs"]
    with pytest.raises(ConfigError, match=r"trained with loss.supervision='voxel' \(now 'mil'\)"):
        run_study(_args(tmp_path, "loss.supervision=mil"))
    saved.unlink()
    with pytest.raises(ConfigError, match=r"seed0/config.yaml: missing or unreadable"):
        run_study(_args(tmp_path))
    row_file.write_text('{"seed": 1, "held')
    with pytest.raises(ConfigError, match=r"seed1/study_row.json: unreadable; delete it"):
        run_study(add_study_args(argparse.ArgumentParser()).parse_args(
            ["--seeds", "1", "--test-seed", "9", "--out", str(tmp_path / "study"), *SMALL]))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list.json: not a study.json"):
        run_study(_args(tmp_path, "--baseline", str(tmp_path / "list.json")))
    with pytest.raises(ConfigError, match=r"--seeds 0 0 repeats a seed"):
        run_study(add_study_args(argparse.ArgumentParser()).parse_args(
            ["--seeds", "0", "0", "--test-seed", "9", *SMALL]))


def test_study_refuses_a_test_seed_it_trains_on_and_real_data(tmp_path):
    with pytest.raises(ConfigError, match="also a training seed"):
        run_study(add_study_args(argparse.ArgumentParser()).parse_args(["--seeds", "0", "1", "--test-seed", "1"]))
    with pytest.raises(ConfigError, match="data.root is set"):
        run_study(_args(tmp_path, "data.root=/data/AnoVox"))


def test_study_cli_errors_are_one_line_with_exit_code_2(capsys):
    from sparse_ad.cli import main

    assert main(["study", "--seeds", "0", "1", "--test-seed", "0"]) == 2
    err = capsys.readouterr().err
    assert "also a training seed" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _study(test_split="t", seeds=(0, 1, 2), aupr=(0.5, 0.6, 0.7), fpr95=(0.1, 0.1, 0.1), frames=2):
    rows = [{"seed": sd, "held_out": {"aupr": a, "fpr95": f}, "test": {"aupr": a, "fpr95": f}}
            for sd, a, f in zip(seeds, aupr, fpr95, strict=True)]
    return {"test_split": test_split, "runs": rows, "resolved_config": {"data": {"synth_frames": frames}}}


def test_compare_pairs_runs_by_seed_and_knows_which_way_is_better():
    ours = _study(seeds=(0, 1, 2), aupr=(0.5, 0.9, 0.7), fpr95=(0.05, 0.2, 0.1))
    base = _study(seeds=(1, 2, 3), aupr=(0.6, 0.8, 0.1), fpr95=(0.1, 0.1, 0.1))
    v = compare(ours, base)
    assert v["seeds"] == [1, 2]                                   # seed 0 and 3 have no partner
    assert v["test"]["aupr"]["mean"] == pytest.approx((0.3 - 0.1) / 2) and v["test"]["aupr"]["better"] == 1
    assert v["held_out"]["fpr95"]["mean"] == pytest.approx(0.05) and v["held_out"]["fpr95"]["better"] == 0
    assert "auroc" not in v["test"]
    with pytest.raises(ConfigError, match="another test split"):
        compare(ours, _study(test_split="other"))
    with pytest.raises(ConfigError, match="trained on other splits"):
        compare(ours, _study(frames=4))
    with pytest.raises(ConfigError, match="ran none of these seeds"):
        compare(ours, _study(seeds=(7, 8, 9)))


def test_a_study_from_before_braking_scenarios_pairs_with_braking_share_zero():
    """Studies written before `synth_braking_share` existed trained without braking scenarios."""
    old = _study()
    zero, some = _study(), _study()
    zero["resolved_config"]["data"]["synth_braking_share"] = 0.0
    some["resolved_config"]["data"]["synth_braking_share"] = 0.5
    assert compare(zero, old)["seeds"] == [0, 1, 2]
    with pytest.raises(ConfigError, match="trained on other splits"):
        compare(some, old)


def test_a_missing_baseline_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="point --baseline at an earlier study's --out directory"):
        run_study(_args(tmp_path, "--baseline", str(tmp_path / "nothing")))
