"""voxelize-gt and check-alignment through the CLI, on the hand-written tiny split."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparse_ad.cli import main
from tests.conftest import MONO_SEM


def test_voxelize_gt_on_hand_computed_voxels(tmp_path):
    """Worked by hand from the AnoVox rule (sensor at (0, 0, 1.8): z' = z - 1.8; q = p' + (250,
    250, 16); idx = floor(q / 0.5)): a road-line point wins its voxel; otherwise the point
    nearest the voxel's minimum corner does, whatever the order."""
    pts = np.array([[10.2, 0.3, -1.5, 1],      # q (260.2, 250.3, 12.7) -> (520, 500, 25), road
                    [10.4, 0.1, -1.6, 24],     # same voxel, road line: the voxel is 24
                    [0.1, 0.1, 2.0, 14],       # q (250.1, 250.1, 16.2) -> (500, 500, 32), car
                    [0.01, 0.02, 1.85, 29]],   # same voxel, r = (.01, .02, .05): nearest the corner
                   np.float32)
    np.save(tmp_path / "sem.npy", pts)
    assert main(["voxelize-gt", str(tmp_path / "sem.npy"), str(tmp_path / "vg.npy"), "--location", "0", "0",
                 "1.8"]) == 0
    assert np.load(tmp_path / "vg.npy").tolist() == [[520, 500, 25, 24], [500, 500, 32, 29]]   # key order


def test_voxelize_gt_reproduces_voxel_grid_row_for_row(tiny_split, tmp_path):
    sc = sorted(tiny_split.glob("Scenario_*"))[0]
    src = sc / MONO_SEM / f"{MONO_SEM}_100.npy"
    out = tmp_path / "vg.npy"
    assert main(["voxelize-gt", str(src), str(out), "--location", "0", "0", "1.8"]) == 0
    rows = np.load(out, allow_pickle=False)
    assert rows.dtype == np.uint16 and np.array_equal(rows, np.load(sc / "VOXEL_GRID" / "VOXEL_GRID_100.npy"))
    r = rows.astype(np.int64)
    keys = r[:, 0] + r[:, 1] * 1000 + r[:, 2] * 1_000_000
    assert (np.diff(keys) > 0).all()


def test_voxelize_gt_whole_split_at_another_resolution(tiny_split, tmp_path, capsys):
    out = tmp_path / "gt025"
    assert main(["voxelize-gt", "--split", str(tiny_split), "--out", str(out), "--resolution", "0.25"]) == 0
    files = sorted(out.glob("Scenario_*/VOXEL_GRID/VOXEL_GRID_*.npy"))
    assert len(files) == 12
    coarse = np.load(sorted(tiny_split.glob("Scenario_*"))[0] / "VOXEL_GRID" / "VOXEL_GRID_100.npy")
    fine = np.load(files[0])
    assert len(fine) > len(coarse) and fine[:, :3].max() >= 1000  # 0.25 m indices go past 999
    # the output is a split: its sensor folders are links, the frames load with the new GT
    from sparse_ad.data.anovox import load_frame, open_split
    from sparse_ad.data.labels import GroundTruth
    from sparse_ad.grid import VoxelGrid

    ref = open_split(out).frames[0]
    frame = load_frame(ref, "LIDAR")
    assert GroundTruth.from_rows(frame.gt, VoxelGrid().with_resolution(0.25)).keys.size == len(frame.gt)
    assert frame.gt[:, :3].max() >= 1000
    # a rerun resumes on the same grid, and refuses to mix in another resolution's files
    assert main(["voxelize-gt", "--split", str(tiny_split), "--out", str(out), "--resolution", "0.25"]) == 0
    assert main(["voxelize-gt", "--split", str(tiny_split), "--out", str(out)]) == 2
    assert "holds ground truth made with other settings: resolution 0.25 (now 0.5)" in capsys.readouterr().err
    (out / "voxelize_gt.json").write_text("{bad")
    assert main(["voxelize-gt", "--split", str(tiny_split), "--out", str(out), "--resolution", "0.25"]) == 2
    assert "voxelize_gt.json: unreadable" in capsys.readouterr().err
    for bad in ("0", "nan", "-1"):
        assert main(["voxelize-gt", "--split", str(tiny_split), "--out", str(tmp_path / bad), "--resolution",
                     bad]) == 2
        assert "resolution must be a positive number" in capsys.readouterr().err


def test_check_alignment_passes_on_aligned_split(tiny_split, tmp_path, capsys):
    rc = main(["check-alignment", str(tiny_split), "--frames", "3", "--json", str(tmp_path / "a.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads((tmp_path / "a.json").read_text())
    by_name = {c["name"]: c for c in report["candidates"]}
    assert by_name["configured"]["agreement"] == 1.0
    assert by_name["location added"]["agreement"] < 0.5


def test_check_alignment_names_the_fix_when_misconfigured(tiny_split, capsys):
    rc = main(["check-alignment", str(tiny_split), "--frames", "2", "transform.location_sign=0"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "MISALIGNED" in out and "anovox default" in out
    # the printed fix works on top of the misconfigured command (every transform field is named)
    fix = out.split("select it with: ")[1].split("\n")[0].split()
    assert fix == ["transform.location_sign=-1.0", "transform.negate_rotation=true", "transform.flip_y=false"]
    assert main(["check-alignment", str(tiny_split), "--frames", "2", "transform.location_sign=0", *fix]) == 0


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparse_ad.cli", "check-alignment", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "split folder not found" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sparse_ad.cli", "train", "--config", str(tmp_path / "x.yaml"),
                        "--run-dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr


def test_output_paths_numbers_and_tools_fail_in_one_line(tmp_path, capsys):
    from sparse_ad.synth.lead_vans import main as lead_vans

    (tmp_path / "file").write_text("")
    assert main(["synth", str(tmp_path / "file" / "split")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    for args in (["--sizes", "0"], ["--sizes", "1000,0.5"], ["--repeats", "-1"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["bench-voxelize", *args])
        assert e.value.code == 2 and "expected whole numbers >= 1" in capsys.readouterr().err
    from sparse_ad.bench_model import main as bench_model_main

    for args in (["--repeats", "0"], ["--latency-rounds", "0"], ["--points", "1e3.5"]):
        with pytest.raises(SystemExit) as e:
            bench_model_main(args)
        assert e.value.code == 2 and "expected whole numbers >= 1" in capsys.readouterr().err
    # a wrong --data fails before the timings
    import sparse_ad.bench_model as bench_model_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_model_module, "bench_model", lambda *a, **k: pytest.fail("timed before reading --data"))
        assert bench_model_main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b.json")]) == 1
    assert "split folder not found" in capsys.readouterr().err
    if not torch.cuda.is_available():   # the error names the flag the user typed, not a config key
        assert bench_model_main(["--device", "cuda", "--out", str(tmp_path / "c.json")]) == 2
        assert "--device cuda but no CUDA device is visible; use --device cpu or auto" in capsys.readouterr().err
    for bad in ("nan", "inf", "x"):
        with pytest.raises(SystemExit) as e:
            main(["eval-preds", "--pred-dir", "p", "--data", "d", "--out", "m.json", "--threshold", bad])
        assert e.value.code == 2 and "--threshold: expected a finite number" in capsys.readouterr().err
    for cmd, flag, bad, low in (("eval", "--batch-size", "0", 1), ("predict", "--workers", "-1", 0),
                                ("eval", "--workers", "two", 0)):   # the flag typed, not the config key it sets
        with pytest.raises(SystemExit) as e:
            main([cmd, "--checkpoint", "c.pt", "--data", "d", "--out", "o", flag, bad])
        assert e.value.code == 2 and f"{flag}: expected a whole number >= {low}" in capsys.readouterr().err
    assert lead_vans(["--split", str(tmp_path), "--checkpoint", str(tmp_path / "none.pt")]) == 2   # not a synth split
    err = capsys.readouterr().err.strip()
    assert err.startswith("lead_vans: error: ") and "synth" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("cmd", ["synth", "voxelize-gt", "check-alignment", "train", "eval", "eval-preds",
                                 "predict", "bench-voxelize", "study", "demo"])
def test_every_subcommand_has_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "sparse-ad" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["demo"], ["study", "--seeds", "0"]])
def test_demo_and_study_refuse_torchrun(command, tmp_path, monkeypatch, capsys):
    """Under torchrun every rank ran demo's / study's evaluation into the same files (and a
    study's rank 1 crashed on train's empty non-main summary)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*command, "--run-dir" if command[0] == "demo" else "--out", str(tmp_path / "r")]) == 2
    assert "runs in one process, not under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
