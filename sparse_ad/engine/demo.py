"""`make demo` / `sparse-ad demo`: synthetic split → train → evaluate → plots, on CPU.

Everything it leaves is under the run folder: best.pt, last.pt, config.yaml, history.json,
metrics.json (the evaluation JSON of the held-out scenarios), curves.png (PR and ROC),
bev.png (a held-out frame: predicted vs true anomaly voxels), tb/ (TensorBoard).
"""

from __future__ import annotations

from pathlib import Path

from sparse_ad.config import Config


def run_demo(cfg: Config, run_dir: Path) -> dict:
    from sparse_ad.engine.evaluate import evaluate_checkpoint
    from sparse_ad.engine.runtime import refuse_ddp
    from sparse_ad.engine.train import train

    refuse_ddp("demo")
    run_dir = Path(run_dir)
    summary = train(cfg, run_dir)
    if summary.get("stopped"):
        return summary
    print("\nevaluating best.pt on the held-out scenarios")
    result = evaluate_checkpoint(run_dir / "best.pt", run_dir)
    bev = _bev_of_one_frame(run_dir)
    print(f"\nfiles: {run_dir / 'best.pt'}, {run_dir / 'metrics.json'}, {run_dir / 'curves.png'}"
          + (f", {bev}" if bev else ""))
    return result


def _bev_of_one_frame(run_dir: Path) -> Path | None:
    """Bird's-eye view of the held-out frame with the most true anomaly voxels."""
    import numpy as np
    import torch

    from sparse_ad.data.anovox import open_split
    from sparse_ad.data.dataset import train_val_frames
    from sparse_ad.data.files import load_voxel_grid
    from sparse_ad.data.labels import ANOMALY, target_table
    from sparse_ad.engine.evaluate import load_checkpoint_model, predict_frames
    from sparse_ad.engine.runtime import resolve_data_root
    from sparse_ad.plots import plot_bev

    model, cfg, ck = load_checkpoint_model(run_dir / "best.pt", torch.device("cpu"))
    split = open_split(resolve_data_root(cfg), cfg.data.sensor)
    _, val = train_val_frames(split.frames, cfg)
    lut = target_table(cfg.labels.anomaly_tags, cfg.labels.ignore_tags)
    counts = [int((lut[load_voxel_grid(r.scenario.voxel_grid_file(r.frame))[:, 3]] == ANOMALY).sum()) for r in val]
    if not counts or max(counts) == 0:
        return None
    ref = val[int(np.argmax(counts))]
    (_, _, coords, scores), = predict_frames(model, cfg, [ref], torch.device("cpu"), progress=False)
    return plot_bev(coords, scores, ref.scenario.voxel_grid_file(ref.frame), cfg, run_dir / "bev.png",
                    threshold=float(ck.get("threshold", 0.5)), title=f"held-out frame {ref.name}")
