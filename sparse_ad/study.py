"""Quality over several synthetic splits: is a recipe good, or was one run lucky?

One small synthetic split holds a few dozen anomalies, so a single run's held-out AUPR moves
by ±0.1 between epochs and by more between splits; comparisons of recipes need several
seeds and a test split that nothing was picked on. For each seed this trains the config on
the synthetic split of that seed (`data.synth_seed`), then scores `best.pt` on its own
held-out scenarios and on one independent synthetic test split (`--test-seed`, every frame,
same size and anomaly share). Prints a table and writes JSON; finished seeds are reused, so
an interrupted study continues where it stopped ("minutes" is the wall time of this study's
training call: a run that was already finished shows ~0).

    python tools/quality_study.py --config configs/demo.yaml --seeds 0 1 2 --out runs/study

`--baseline DIR` compares with an earlier study seed by seed: both trained on the same split
for a seed, so the split's own difficulty (which moves AUPR by more than most recipe changes)
cancels in the paired difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import yaml

from sparse_ad.config import changed_settings, config_to_dict, load_config
from sparse_ad.errors import ConfigError, SparseADError
from sparse_ad.io import atomic_write_text

VOXEL_METRICS = ("auroc", "aupr", "fpr95", "recall")
METRICS = (*VOXEL_METRICS, "aupr_all", "objects_found")
"""Anomalies-only voxel metrics; `aupr_all`, the normality-included AUPR (it also counts false
alarms in frames without anomalies, e.g. on a vehicle in the frames before it brakes); and the
share of objects whose median voxel scores above 99% of the normal voxels
(`protocol.object_summary`): less noisy than pooled AUPR on few objects."""
LOWER_IS_BETTER = ("fpr95",)
SPLIT_KEYS = ("synth_scenarios", "synth_frames", "synth_anomaly_share", "synth_braking_share", "val_fraction",
              "split_seed", "max_frames")
"""data.* keys that decide a seed's training split and held-out scenarios: equal for a paired comparison."""
SPLIT_DEFAULTS = {"synth_braking_share": 0.0, "max_frames": 0}
"""What a study written before a key existed trained with."""


def add_study_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", default="configs/demo.yaml", help="the recipe (default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data.synth_seed of each training split")
    p.add_argument("--test-seed", type=int, default=100, help="synth seed of the independent test split")
    p.add_argument("--out", type=Path, default=Path("runs/study"))
    p.add_argument("--baseline", type=Path, default=None,
                   help="an earlier study's --out directory: print the per-seed differences to it")
    p.add_argument("overrides", nargs="*", help="config key=value pairs applied to every run")
    return p


def run_study(args) -> dict:
    from sparse_ad.engine.runtime import refuse_ddp

    refuse_ddp("study")
    base = load_config(args.config, args.overrides)
    if base.data.root:
        raise ConfigError(f"{args.config}: data.root is set; a quality study trains on synthetic splits "
                          "(override data.root= to use them)")
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; a repeat is the same run "
                          "counted twice in the mean ± std")
    if args.test_seed in args.seeds:
        raise ConfigError(f"--test-seed {args.test_seed} is also a training seed; pick one outside --seeds")
    baseline = _load_baseline(args.baseline) if args.baseline else None   # before hours of training
    from sparse_ad.engine.runtime import resolve_data_root

    test_root = resolve_data_root(_seeded(base, args.test_seed))
    resolved = config_to_dict(base)
    if baseline is not None:
        _check_same_splits({"test_split": str(test_root), "resolved_config": resolved}, baseline, str(args.baseline))
    rows = [_one_seed(base, seed, test_root, args.out / f"seed{seed}") for seed in args.seeds]
    result = {"config": args.config, "overrides": list(args.overrides), "test_seed": args.test_seed,
              "test_split": str(test_root), "runs": rows,
              "summary": {scope: _summary([r[scope] for r in rows]) for scope in ("held_out", "test")},
              "resolved_config": resolved}
    if baseline is not None:
        result["versus_baseline"] = compare(result, baseline, str(args.baseline))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "study.json", json.dumps(result, indent=2))
    print(_table(rows, result["summary"]))
    if baseline is not None:
        print(_versus_table(result["versus_baseline"]))
    print(f"wrote {args.out / 'study.json'}")
    return result


def _load_baseline(path: Path) -> dict:
    file = path / "study.json" if path.is_dir() else path
    try:
        baseline = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no study here; point --baseline at an earlier study's --out directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise ConfigError(f"{file}: not a study.json (unreadable JSON); rerun that study to rewrite it") from None
    if not isinstance(baseline, dict) or not isinstance(baseline.get("runs"), list) or "test_split" not in baseline:
        raise ConfigError(f"{file}: not a study.json (no runs / test_split); point --baseline at an earlier "
                          "study's --out directory")
    return baseline


def compare(result: dict, baseline: dict, name: str = "baseline") -> dict:
    """Per-seed differences (this − baseline) on the seeds both studies ran, per scope and metric:
    the mean and standard deviation of the differences and on how many seeds this one is better."""
    _check_same_splits(result, baseline, name)
    base_rows = {r["seed"]: r for r in baseline["runs"]}
    pairs = [(r, base_rows[r["seed"]]) for r in result["runs"] if r["seed"] in base_rows]
    if not pairs:
        raise ConfigError(f"{name} ran none of these seeds; run both studies with the same --seeds")
    out = {"baseline": name, "seeds": [r["seed"] for r, _ in pairs]}
    for scope in ("held_out", "test"):
        out[scope] = {}
        for k in METRICS:
            diffs = [a[scope][k] - b[scope][k] for a, b in pairs
                     if a[scope].get(k) is not None and b[scope].get(k) is not None]
            if diffs:
                sign = -1 if k in LOWER_IS_BETTER else 1
                out[scope][k] = {**_mean_std(diffs), "better": sum(sign * d > 0 for d in diffs), "seeds": len(diffs)}
    return out


def _same_split(a: str | Path, b: str | Path) -> bool:
    """Whether two synthetic split paths name the same split: its folder name encodes what made
    it (scenarios, frames, shares, seed), while the cache around it may move (SPARSE_AD_CACHE)."""
    return Path(a).name == Path(b).name


def _check_same_splits(result: dict, baseline: dict, name: str) -> None:
    """Paired differences mean something only on the same training and test splits."""
    if not _same_split(result["test_split"], baseline.get("test_split") or ""):
        raise ConfigError(f"{name} scored another test split ({baseline.get('test_split')} vs "
                          f"{result['test_split']}); compare studies with the same test seed and split size")
    ours, theirs = ({k: (d.get("resolved_config") or {}).get("data", {}).get(k, SPLIT_DEFAULTS.get(k))
                     for k in SPLIT_KEYS}
                    for d in (result, baseline))
    if ours != theirs:
        raise ConfigError(f"{name} trained on other splits ({theirs} vs {ours}); a paired comparison needs the same "
                          "data.synth_* / val_fraction / split_seed")


def _versus_table(v: dict) -> str:
    seeds = " ".join(str(s) for s in v["seeds"])
    lines = [f"versus {v['baseline']} (this − baseline, paired over seeds {seeds}; fpr95: lower is better)",
             "| metric | held-out mean Δ ± std | seeds better | test mean Δ ± std | seeds better |",
             "| --- | --- | --- | --- | --- |"]
    for k in METRICS:
        cells = [k]
        for scope in ("held_out", "test"):
            d = v[scope].get(k)
            cells += [f"{d['mean']:+.3f} ± {d['std']:.3f}", f"{d['better']}/{d['seeds']}"] if d else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seeded(base, seed: int):
    """A copy of `base` on the synthetic split of `seed`."""
    cfg = copy.deepcopy(base)
    cfg.data.synth_seed = seed
    return cfg


def _one_seed(base, seed: int, test_root: Path, run_dir: Path) -> dict:
    """Train (or reuse a finished run) and score best.pt on both yardsticks."""
    from sparse_ad.engine.evaluate import evaluate_checkpoint
    from sparse_ad.engine.train import train

    done = run_dir / "study_row.json"
    cfg = _seeded(base, seed)
    if done.exists():
        try:
            row = json.loads(done.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            row = None
        if not isinstance(row, dict) or not {"held_out", "test", "seed"} <= row.keys():
            raise ConfigError(f"{done}: unreadable; delete it to score the seed's finished run again (training "
                              "is not repeated)")
        _check_reusable(row, cfg, test_root, run_dir)
        _warn_other_engine(row, run_dir)
        return _refresh(row, run_dir)
    start = time.monotonic()
    summary = train(cfg, run_dir)
    minutes = (time.monotonic() - start) / 60
    if summary.get("stopped"):
        raise SparseADError(f"seed {seed}: training was stopped ({run_dir}); run the same command again to "
                            "resume")
    test = evaluate_checkpoint(run_dir / "best.pt", run_dir / "test", data=test_root, all_frames=True,
                               progress=False)
    row = {"seed": seed, "best_epoch": summary["best_epoch"], "epochs": summary["epochs"],
           "train_minutes": round(minutes, 2), "held_out": _scope(summary["best"]), "test": _scope(test),
           "test_split": str(test_root), "engine": test.get("engine")}
    atomic_write_text(done, json.dumps(row, indent=2))
    return row


def _check_reusable(row: dict, cfg, test_root: Path, run_dir: Path) -> None:
    """A finished seed is reused only if it trained what this study asks for (its config.yaml,
    runtime settings aside) and was tested on the same split: otherwise the study would report,
    and pair with a baseline, numbers of another recipe under this one's name."""
    saved = run_dir / "config.yaml"
    try:
        changed = changed_settings(yaml.safe_load(saved.read_text()) or {}, cfg)
    except (OSError, yaml.YAMLError, AttributeError):   # missing, unreadable, or not a mapping
        raise ConfigError(f"{saved}: missing or unreadable, so what this finished seed trained is unknown; use "
                          "another --out, or delete that folder to train it again") from None
    if not _same_split(row.get("test_split", test_root), test_root):
        changed = ", ".join(filter(None, [changed, f"test split {row['test_split']} (now {test_root})"]))
    if changed:
        raise ConfigError(f"{run_dir}: this finished seed was trained with {changed}; use another --out, or "
                          "delete that folder to train it again")


def _warn_other_engine(row: dict, run_dir: Path) -> None:
    """A finished seed scored with another inference engine than new seeds get here (the CUDA
    default changed on 2026-11-26) is reused, with a warning: the engines agree up to fp16
    rounding (~1e-4 in AUPR), which a seed-to-seed spread dwarfs, but the rows are not exact
    peers."""
    import warnings

    from sparse_ad.engine.evaluate import Scoring
    from sparse_ad.engine.runtime import pick_device

    test = run_dir / "test" / "metrics.json"
    try:
        was = row.get("engine") or json.loads(test.read_text()).get("engine")
    except (OSError, ValueError):
        return
    now = Scoring().engine_on(pick_device("auto"))   # what `evaluate_checkpoint` scores new seeds with
    if was and was != now:
        warnings.warn(f"{run_dir}: this finished seed's test split was scored with the {was} engine, new seeds "
                      f"here with {now} (equal up to fp16 rounding); delete {test.parent} and "
                      f"{run_dir / 'study_row.json'} to score it again", stacklevel=2)


def _refresh(row: dict, run_dir: Path) -> dict:
    """A finished seed's row with the metrics this version reports, recomputed from the run's own
    files (validation's best epoch in summary.json, the test evaluation's metrics.json) when a
    study written by an earlier version lacks some: no training, no evaluation."""
    summary, test = run_dir / "summary.json", run_dir / "test" / "metrics.json"
    if all(k in row[s] for s in ("held_out", "test") for k in METRICS) or not (summary.exists() and test.exists()):
        return row
    row = {**row, "held_out": _scope(json.loads(summary.read_text())["best"]),
           "test": _scope(json.loads(test.read_text()))}
    atomic_write_text(run_dir / "study_row.json", json.dumps(row, indent=2))
    return row


def _scope(metrics: dict) -> dict:
    """The study's numbers from one metrics dict (validation's best epoch, or `eval`'s JSON)."""
    out = {k: metrics["anomalies_only"].get(k) for k in (*VOXEL_METRICS, "anomaly_voxels")}
    out["aupr_all"] = metrics["normality_included"].get("aupr")
    ob = metrics.get("objects", {})
    out["objects_found"] = ob["median_above_99pct_of_normals"] / ob["objects"] if ob.get("objects") else None
    return out


def _summary(scopes: list[dict]) -> dict:
    out = {}
    for k in METRICS:
        vals = [s[k] for s in scopes if s.get(k) is not None]
        if vals:
            out[k] = {**_mean_std(vals), "min": min(vals), "max": max(vals)}
    return out


def _mean_std(vals: list[float]) -> dict:
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def _table(rows: list[dict], summary: dict) -> str:
    head = ["seed", "epochs (best)", "minutes"] + [f"held-out {k}" for k in METRICS] + [f"test {k}" for k in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [str(r["seed"]), f"{r['epochs']} ({r['best_epoch']})", f"{r['train_minutes']:.1f}"]
        cells += [_fmt(r[s].get(k)) for s in ("held_out", "test") for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["mean ± std", "", ""]
    cells += [f"{summary[s][k]['mean']:.3f} ± {summary[s][k]['std']:.3f}" if k in summary[s] else "–"
              for s in ("held_out", "test") for k in METRICS]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"
