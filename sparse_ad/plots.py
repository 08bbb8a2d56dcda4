"""Figures for runs and evaluations: PR and ROC curves, and a bird's-eye view of one frame.

matplotlib with the Agg backend (no display needed); imported only when a figure is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Write a figure as PNG (atomically) and free it."""
    import io as _io

    from sparse_ad.io import atomic_write

    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))
    return Path(path)


def plot_curves(acc, path: Path) -> Path | None:
    """PR and ROC curves of a ProtocolAccumulator's two sections; None if nothing to draw."""
    sections = [("normality included", acc.all), ("anomalies only", acc.anomalies_only)]
    sections = [(n, a) for n, a in sections if a.num_anomalies > 0 and a.num_voxels > a.num_anomalies]
    if not sections:
        return None
    plt = _pyplot()
    fig, (ax_pr, ax_roc) = plt.subplots(1, 2, figsize=(10, 4.2))
    for name, a in sections:
        c = a.curves()
        m = a.compute()
        ax_pr.step(c.recall, c.precision, where="post", label=f"{name} (AP {m.aupr:.3f})")
        ax_roc.plot(c.fpr, c.tpr, label=f"{name} (AUROC {m.auroc:.3f})")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    ax_roc.plot([0, 1], [0, 1], ls=":", c="grey")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_pr, ax_roc):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=8)
    return _save(plt, fig, path)


def plot_bev(coords: np.ndarray, scores: np.ndarray, gt_file: Path | None, cfg, path: Path,
             threshold: float = 0.5, title: str = "", half_width_m: float = 50.0) -> Path:
    """Bird's-eye view around the ego: GT voxels grey, true anomaly voxels red, predicted
    anomaly voxels (score ≥ threshold) as blue circles."""
    from sparse_ad.data.files import load_voxel_grid
    from sparse_ad.data.labels import ANOMALY, target_table

    grid = cfg.grid.build()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    res, off = grid.resolution, np.asarray(grid.offset)

    def to_m(c):
        return (np.asarray(c)[:, :2] + 0.5) * res - off[:2]

    if gt_file is not None:
        rows = load_voxel_grid(gt_file)
        lut = target_table(cfg.labels.anomaly_tags, cfg.labels.ignore_tags)
        is_anom = lut[rows[:, 3]] == ANOMALY
        xy = to_m(rows[:, :3])
        ax.scatter(xy[~is_anom, 0], xy[~is_anom, 1], s=0.3, c="0.75", label="GT voxels")
        ax.scatter(xy[is_anom, 0], xy[is_anom, 1], s=6, c="red", marker="s", label="true anomaly")
    pred = scores >= threshold
    xy = to_m(coords[pred])
    ax.scatter(xy[:, 0], xy[:, 1], s=14, facecolors="none", edgecolors="blue", linewidths=0.7,
               label=f"predicted (p ≥ {threshold:.2f})")
    ax.set(xlim=(-half_width_m, half_width_m), ylim=(-half_width_m, half_width_m), aspect="equal",
           xlabel="x forward (m)", ylabel="y left (m)", title=title)
    ax.legend(loc="upper right", fontsize=7, markerscale=2)
    return _save(plt, fig, path)
