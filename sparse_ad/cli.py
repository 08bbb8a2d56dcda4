"""The `sparse-ad` command: one entry point, one subcommand per job.

Exit codes: 0 success, 2 usage or config error, 1 data or runtime error. Errors the user
can cause print as one line without a traceback (`--debug` shows it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import warnings
from pathlib import Path

from sparse_ad import __version__
from sparse_ad.errors import ConfigError, SparseADError


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, unless its help already says it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _sub(subs, name: str, help_: str, example: str) -> argparse.ArgumentParser:
    return subs.add_parser(name, help=help_, description=f"{help_}\n\nexample:\n  {example}",
                           formatter_class=_Formatter)


def _add_config_args(p: argparse.ArgumentParser, required: bool = False, default: str | None = None) -> None:
    p.add_argument("--config", required=required, default=default,
                   help="YAML config (see configs/; a path under configs/ is found from any folder)"
                        + (f"; default {default}" if default else ""))
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    from sparse_ad.config import DEFAULT_ENGINE, INFERENCE_ENGINES, TEST_VIEW_COUNTS

    p.add_argument("--views", type=int, choices=TEST_VIEW_COUNTS,
                   help="mirrored copies averaged per voxel (test-time augmentation); default: the checkpoint's "
                        "model.test_views, the count its threshold was calibrated with")
    p.add_argument("--engine", choices=INFERENCE_ENGINES,
                   help="how the folded U-Net runs its convs: spconv's kernels, gather_gemm (plain torch "
                        "gather + GEMM; far fewer host calls per conv, more arithmetic), or gather_gemm_graphs "
                        f"(those convs replayed from CUDA graphs; CUDA only); see README; default: "
                        f"{', '.join(f'{v} on {k}' for k, v in DEFAULT_ENGINE.items())}")
    p.add_argument("--batch-size", type=_int_at_least(1),
                   help="frames per forward pass; default: the checkpoint's train.batch_size (as validation scored)")
    p.add_argument("--workers", type=_int_at_least(0),
                   help="frame loader processes; default: the checkpoint's data.num_workers")


def _scoring(args):
    from sparse_ad.engine.evaluate import Scoring

    return Scoring(views=args.views, engine=args.engine, batch_size=args.batch_size, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-ad", formatter_class=_Formatter,
        description="Voxel-level LiDAR anomaly segmentation on the AnoVox voxel grid.")
    parser.add_argument("--version", action="version", version=f"sparse-ad {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subs = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = _sub(subs, "synth", "write a synthetic split in the AnoVox layout",
             "sparse-ad synth data/synth --scenarios 8 --frames 20 --seed 0")
    p.add_argument("out", type=Path, help="output split folder")
    from sparse_ad.synth import add_synth_args

    add_synth_args(p)

    p = _sub(subs, "voxelize-gt", "semantic points → AnoVox VOXEL_GRID rows (or a whole split)",
             "sparse-ad voxelize-gt SEMANTIC-LIDAR_123.npy VOXEL_GRID_123.npy --location 0 0 1.8\n"
             "  sparse-ad voxelize-gt --split /data/AnoVox_Dynamic_Mono_Town07 --out /data/gt_025 "
             "--resolution 0.25")
    p.add_argument("input", nargs="?", type=Path, help="semantic points (N, 4) .npy or .pcd, sensor frame")
    p.add_argument("output", nargs="?", type=Path, help="VOXEL_GRID .npy to write")
    p.add_argument("--location", nargs=3, type=float, default=(0.0, 0.0, 1.8), metavar=("X", "Y", "Z"))
    p.add_argument("--rotation", nargs=3, type=float, default=(0.0, 0.0, 0.0), metavar=("A", "B", "C"))
    p.add_argument("--split", type=Path, help="regenerate every frame of this split")
    p.add_argument("--out", type=Path, help="output folder for --split")
    p.add_argument("--resolution", type=float, default=None, help="voxel size (m); default 0.5")

    p = _sub(subs, "check-alignment", "check the sensor→grid transform against a split's own VOXEL_GRID",
             "sparse-ad check-alignment /data/AnoVox_Dynamic_Mono_Town07 --frames 20")
    p.add_argument("root", type=Path)
    p.add_argument("--frames", type=int, default=20, help="frames to sample (0 = all)")
    p.add_argument("--json", type=Path, help="also write the table as JSON")
    _add_config_args(p)

    p = _sub(subs, "train", "train the sparse U-Net (resumes from RUN_DIR/last.pt)",
             "sparse-ad train --config configs/anovox_mono.yaml --run-dir runs/mono train.epochs=30")
    _add_config_args(p, required=True)
    p.add_argument("--run-dir", type=Path, required=True)

    p = _sub(subs, "eval", "evaluate a checkpoint with the AnoVox protocol",
             "sparse-ad eval --checkpoint runs/mono/best.pt --data /data/AnoVox_Town07 --out runs/mono/eval")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, help="split root (default: the checkpoint's config)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--all-frames", action="store_true", help="score every frame, not only held-out scenarios")
    p.add_argument("--histogram-bins", type=int, default=0,
                   help="approximate metrics with this many score bins over [0, 1] (flat memory for huge splits)")
    _add_scoring_args(p)

    p = _sub(subs, "eval-preds", "score any method's prediction files with the AnoVox protocol",
             "sparse-ad eval-preds --pred-dir preds/ --data /data/AnoVox_Town07 --out metrics.json")
    p.add_argument("--pred-dir", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threshold", type=_finite_float, default=None,
                   help="score threshold for recall/precision/F1 (default: the calibrated one `predict` wrote into "
                        "PRED_DIR/predict.json, else 0.5)")
    p.add_argument("--histogram-bins", type=int, default=0,
                   help="approximate metrics with this many score bins over [0, 1] (flat memory for huge splits)")
    _add_config_args(p)

    p = _sub(subs, "predict", "write AnoVox prediction files (one (K, 4) .npy per frame)",
             "sparse-ad predict --checkpoint runs/mono/best.pt --data /data/AnoVox_Town07 --out preds/")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bev", action="store_true", help="also write bird's-eye PNGs")
    _add_scoring_args(p)

    p = _sub(subs, "bench-voxelize", "benchmark the voxelizer (prints a table, writes JSON)",
             "sparse-ad bench-voxelize --sizes 120000,1000000 --out bench.json")
    from sparse_ad.bench import add_bench_args

    add_bench_args(p)

    p = _sub(subs, "study", "train a config on several synthetic seeds; score held-out and test splits",
             "sparse-ad study --config configs/demo.yaml --seeds 0 1 2 --out runs/study")
    from sparse_ad.study import add_study_args

    add_study_args(p)

    p = _sub(subs, "demo", "synthetic split → train → evaluate → plots, on CPU in minutes",
             "sparse-ad demo --config configs/demo.yaml --run-dir runs/demo")
    _add_config_args(p, default="configs/demo.yaml")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    return parser


# --- command bodies (imports are lazy so `--help` stays fast) ---------------------------

def _cmd_synth(args):
    from sparse_ad.synth import run_synth

    return run_synth(args)


def _cmd_voxelize_gt(args):
    from sparse_ad.config import GridConfig
    from sparse_ad.data.files import load_points
    from sparse_ad.grid import SensorTransform
    from sparse_ad.ground_truth import regenerate_split, voxel_grid_rows
    from sparse_ad.io import atomic_save_npy

    grid = GridConfig().build()
    if args.resolution is not None:
        grid = grid.with_resolution(args.resolution)
    if args.split:
        if not args.out or args.input:
            raise ConfigError("use either IN OUT or --split DIR --out DIR")
        n = regenerate_split(args.split, args.out, grid)
        print(f"wrote {n} VOXEL_GRID file(s) under {args.out} at {grid.resolution} m")
        return 0
    if not (args.input and args.output):
        raise ConfigError("voxelize-gt needs IN and OUT (or --split DIR --out DIR); see --help")
    points = load_points(args.input, semantic=True)
    rows = voxel_grid_rows(points, SensorTransform(tuple(args.location), tuple(args.rotation)), grid)
    atomic_save_npy(args.output, rows)
    print(f"{args.input}: {len(points)} points → {len(rows)} voxels → {args.output}")
    return 0


def _cmd_check_alignment(args):
    from sparse_ad.alignment import check_alignment, format_table, verdict
    from sparse_ad.config import load_config
    from sparse_ad.io import atomic_write_text

    cfg = load_config(args.config, args.overrides)
    results, sweeps = check_alignment(args.root, cfg.grid.build(), cfg.transform, args.frames)
    print(format_table(results))
    ok, message = verdict(results)
    if args.json:
        atomic_write_text(args.json, json.dumps({
            "ok": ok, "message": message,
            "sweeps": {**dataclasses.asdict(sweeps), "registers": sweeps.registers, "message": sweeps.message()},
            "candidates": [{"name": r.name, "overrides": r.overrides(), "lidar_voxels": r.lidar_voxels,
                            "found_share": r.found_share, "agreement": r.agreement} for r in results]},
            indent=2))
    print(sweeps.message())
    print(("OK: " if ok else "MISALIGNED: ") + message)
    return 0 if ok else 1


def _cmd_train(args):
    from sparse_ad.config import load_config
    from sparse_ad.engine.train import train

    return _exit_code(train(load_config(args.config, args.overrides), args.run_dir))


def _exit_code(summary: dict) -> int:
    """0, or 128 + the signal that stopped a run after it saved last.pt (130 SIGINT, 143
    SIGTERM), so `sparse-ad train … && sparse-ad eval …` and batch schedulers see it unfinished."""
    return 128 + int(summary["signal"]) if summary.get("stopped") else 0


def _cmd_eval(args):
    from sparse_ad.engine.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.out, data=args.data, all_frames=args.all_frames,
                        histogram_bins=args.histogram_bins, scoring=_scoring(args))
    return 0


def _cmd_eval_preds(args):
    from sparse_ad.config import load_config
    from sparse_ad.engine.evaluate import evaluate_predictions

    cfg = load_config(args.config, args.overrides)
    evaluate_predictions(args.pred_dir, args.data, args.out, cfg, threshold=args.threshold,
                         histogram_bins=args.histogram_bins)
    return 0


def _cmd_predict(args):
    from sparse_ad.export import predict_split

    predict_split(args.checkpoint, args.data, args.out, bev=args.bev, scoring=_scoring(args))
    return 0


def _cmd_bench(args):
    from sparse_ad.bench import run_bench

    return run_bench(args)


def _cmd_study(args):
    from sparse_ad.study import run_study

    run_study(args)
    return 0


def _cmd_demo(args):
    from sparse_ad.config import load_config
    from sparse_ad.engine.demo import run_demo

    return _exit_code(run_demo(load_config(args.config, args.overrides), args.run_dir))


COMMANDS = {
    "synth": _cmd_synth, "voxelize-gt": _cmd_voxelize_gt, "check-alignment": _cmd_check_alignment,
    "train": _cmd_train, "eval": _cmd_eval, "eval-preds": _cmd_eval_preds, "predict": _cmd_predict,
    "bench-voxelize": _cmd_bench, "study": _cmd_study, "demo": _cmd_demo,
}


def _one_line_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # spconv's SparseConvTensor is an fx-proxyable class: torch >= 2.10 logs an is_fx_tracing
    # deprecation at its first construction, mid progress bar, addressed to spconv, not to users
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def _finite_float(text: str) -> float:
    """A finite number (NaN would write `NaN` into the metrics JSON, which strict parsers reject)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _int_at_least(low: int):
    """An argparse type: a whole number >= `low` (so the error names the flag, not the
    config setting it overrides)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key.sub=value` overrides may come after options (argparse stops its positional
    # list at the first option); collect them here, reject anything else
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.debug:
        _one_line_warnings()
    try:
        code = COMMANDS[args.command](args) or 0
    except SparseADError as e:
        if args.debug:
            raise
        print(f"sparse-ad {args.command}: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print(f"sparse-ad {args.command}: interrupted", file=sys.stderr)
        code = 130
    if args.command == "train":   # a DDP rank ends here, before the interpreter's shutdown
        from sparse_ad.engine.runtime import end_rank

        return end_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
