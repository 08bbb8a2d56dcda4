"""Voxel-level anomaly metrics over a whole split, fed frame by frame: AUROC, AUPR, FPR95 and
threshold metrics, exactly as scikit-learn computes them (ties grouped, within float rounding).

Exact mode keeps every score, split by label (4 bytes per voxel for float32 scores: 20 M
voxels = 80 MB), so accumulation is linear. `compute` sorts each class once (numpy's SIMD
sort: about 0.2 s for 20 M float32 scores on one core) and then needs only the K distinct
anomaly scores: each curve point is a `searchsorted` into the sorted normals, O(K log N).
This works because TPR, recall and precision only change where an anomaly score sits:

    AUROC = sum_k c_k (#normal < u_k + #normal == u_k / 2) / (P N)      (Mann-Whitney, ties 1/2)
    AP    = sum_k (c_k / P) * TP_k / (TP_k + FP_k)                      (sklearn's step sum)
    FPR95 = FP_k / N at the first k (scores descending) with TP_k / P >= 0.95

with u_k the distinct anomaly scores in descending order, c_k their multiplicities and
TP_k / FP_k the anomalies / normals scoring >= u_k. Scores are kept in the dtype they come in
(float16 is widened to float32), so the result is exact for what the model produced.

Histogram mode (`histogram_bins > 0`) keeps two integer histograms over `score_range`
instead (flat memory, for splits too large to hold); it is exact for the binned scores,
i.e. it treats every bin as one tied score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from sparse_ad.errors import SparseADError

TPR_FOR_FPR = 0.95


@dataclass
class Metrics:
    voxels: int
    anomaly_voxels: int
    ranked: bool                 # both classes present, so auroc/aupr/fpr95 are defined
    exact: bool                  # False in histogram mode
    auroc: float | None = None
    aupr: float | None = None    # average precision, as sklearn.metrics.average_precision_score
    fpr95: float | None = None
    threshold: float | None = None   # predicted anomaly iff score >= threshold
    recall: float | None = None
    precision: float | None = None   # None when nothing is predicted anomalous
    f1: float | None = None
    specificity: float | None = None
    detections: int | None = None    # anomaly voxels predicted anomalous (true positives)
    positive_rate: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Curves:
    fpr: np.ndarray          # (2K+2,) ROC, from (0, 0) to (1, 1)
    tpr: np.ndarray
    recall: np.ndarray       # (K,) PR points, scores descending
    precision: np.ndarray
    thresholds: np.ndarray   # (K,) the anomaly score of each PR point


class ScoreAccumulator:
    """Collects (score, label) of scored voxels frame by frame; `compute` gives `Metrics`."""

    def __init__(self, histogram_bins: int = 0, score_range: tuple[float, float] = (-20.0, 20.0)):
        self._pos: list[np.ndarray] = []   # chunks of anomaly scores (exact mode)
        self._neg: list[np.ndarray] = []   # chunks of normal scores (exact mode)
        self._dirty = False
        self._edges = None
        if histogram_bins:
            lo, hi = (float(v) for v in score_range)
            if histogram_bins < 1 or not hi > lo:
                raise SparseADError(f"histogram mode: expected bins >= 1 and lo < hi, found "
                                    f"{histogram_bins} bins over {score_range}")
            self._edges = np.linspace(lo, hi, histogram_bins + 1)          # (bins+1,)
            self._hist = np.zeros((2, histogram_bins), np.int64)           # [normal, anomaly]

    # --- accumulation ---------------------------------------------------------------------
    def update(self, scores, labels, valid=None) -> None:
        """scores (M,) float, labels (M,) 0/1 or bool, valid (M,) bool or None (all scored).
        numpy or torch (any device; copied to the host)."""
        s, y = _numpy(scores), _numpy(labels)
        if s.ndim != 1 or y.shape != s.shape:
            raise SparseADError(f"scores and labels: expected two (M,) arrays, found {s.shape} and {y.shape}")
        if valid is not None:
            v = _numpy(valid).astype(bool)
            if v.shape != s.shape:
                raise SparseADError(f"valid: expected shape {s.shape}, found {v.shape}")
            s, y = s[v], y[v]
        if not np.issubdtype(s.dtype, np.floating) or s.dtype == np.float16:
            s = s.astype(np.float32 if s.dtype == np.float16 else np.float64)
        if np.isnan(s).any():
            raise SparseADError("scores contain NaN; check the model output (diverged training?)")
        if y.dtype != bool:
            if ((y != 0) & (y != 1)).any():
                raise SparseADError(f"labels: expected 0/1, found values {np.unique(y)[:5]}")
            y = y.astype(bool)
        if self._edges is None:
            self._pos.append(s[y])
            self._neg.append(s[~y])
            self._dirty = True
        else:
            b = self._bin(s)
            self._hist[1] += np.bincount(b[y], minlength=self._hist.shape[1])
            self._hist[0] += np.bincount(b[~y], minlength=self._hist.shape[1])

    def merge(self, other: ScoreAccumulator) -> None:
        """Add another accumulator's voxels (e.g. from another process)."""
        if (self._edges is None) != (other._edges is None) or (
                self._edges is not None and not np.array_equal(self._edges, other._edges)):
            raise SparseADError("merge: both accumulators must use the same mode and histogram bins")
        if self._edges is None:
            self._pos += other._pos
            self._neg += other._neg
            self._dirty = True
        else:
            self._hist += other._hist

    @property
    def num_voxels(self) -> int:
        return self.num_anomalies + self._count(self._neg, 0)

    @property
    def num_anomalies(self) -> int:
        return self._count(self._pos, 1)

    # --- results --------------------------------------------------------------------------
    def compute(self, threshold: float | None = None) -> Metrics:
        """Ranking metrics, and the threshold metrics when a threshold is given."""
        p, n = self.num_anomalies, self.num_voxels - self.num_anomalies
        m = Metrics(voxels=p + n, anomaly_voxels=p, ranked=p > 0 and n > 0, exact=self._edges is None)
        if m.ranked:
            c, tp, fp, fp_eq = self._levels()
            m.auroc = float(np.sum(c * (n - fp + 0.5 * fp_eq)) / p / n)
            m.aupr = float(np.sum(c / p * (tp / (tp + fp))))
            k = int(np.searchsorted(tp / p, TPR_FOR_FPR, side="left"))
            m.fpr95 = float(fp[k] / n)
        if threshold is not None:
            tp, fp = self._count_ge(float(threshold))
            m.threshold, m.detections = float(threshold), tp
            m.recall = tp / p if p else None
            m.precision = tp / (tp + fp) if tp + fp else None
            m.specificity = 1.0 - fp / n if n else None
            m.f1 = 2 * tp / (2 * tp + fp + (p - tp)) if p or fp else None
            m.positive_rate = (tp + fp) / (p + n) if p + n else None
        return m

    def normal_fraction_ge(self, scores) -> np.ndarray:
        """For each given score, the fraction of normal voxels scoring >= it (in histogram
        mode: in its bin or above). How many false alarms come before an object whose
        median voxel scores that much (`protocol.object_summary`)."""
        s = np.asarray(scores, np.float64).reshape(-1)
        n = self.num_voxels - self.num_anomalies
        if n == 0:
            return np.zeros(len(s))
        if self._edges is None:
            _, neg = self._finalize()
            return (len(neg) - np.searchsorted(neg, s, side="left")) / n
        above = np.cumsum(self._hist[0][::-1])[::-1]     # normals in bin b or above
        return above[self._bin(s)] / n

    def threshold_for_recall(self, target_recall: float) -> float:
        """The largest threshold whose recall is at least `target_recall` (calibrate on
        validation, then pass it to `compute` on test)."""
        if not 0.0 < target_recall <= 1.0:
            raise SparseADError(f"target recall: expected a value in (0, 1], found {target_recall}")
        p = self.num_anomalies
        if p == 0:
            raise SparseADError("cannot calibrate a threshold: the split holds no anomaly voxels")
        k = max(1, math.ceil(target_recall * p))        # fewest anomalies to keep, k / p >= target
        k = k + 1 if k < p and k / p < target_recall else k
        k = k - 1 if k > 1 and (k - 1) / p >= target_recall else k
        if self._edges is None:
            pos, _ = self._finalize()
            return float(pos[p - k])                     # k-th largest anomaly score
        cum = np.cumsum(self._hist[1][::-1])             # anomalies in the top j+1 bins
        top = int(np.searchsorted(cum, k, side="left"))
        return float(self._edges[self._hist.shape[1] - 1 - top])

    def best_f1_threshold(self) -> float:
        """The anomaly score u_k that maximizes F1 (predict anomaly iff score >= u_k); 0.5 when
        nothing can be calibrated (no anomalies or no normals)."""
        p = self.num_anomalies
        if p == 0:
            return 0.5
        _, tp, fp, _ = self._levels()
        k = int(np.argmax(2 * tp / (tp + fp + p)))
        return float(self._level_scores()[k])

    def curves(self) -> Curves:
        """ROC and PR curve points, one per distinct anomaly score (descending)."""
        p, n = self.num_anomalies, self.num_voxels - self.num_anomalies
        if p == 0 or n == 0:
            raise SparseADError("curves need both anomaly and normal voxels")
        _, tp, fp, fp_eq = self._levels()
        # ROC: before each level, a horizontal step over the normals scoring strictly above it,
        # then a diagonal over the tied anomalies and normals at it (what sklearn's curve does).
        fp_above = fp - fp_eq
        tp_before = np.concatenate([[0.0], tp[:-1]])
        fpr = np.stack([fp_above, fp], axis=1).ravel() / n
        tpr = np.stack([tp_before, tp], axis=1).ravel() / p
        return Curves(fpr=np.concatenate([[0.0], fpr, [1.0]]), tpr=np.concatenate([[0.0], tpr, [1.0]]),
                      recall=tp / p, precision=tp / (tp + fp), thresholds=self._level_scores())

    # --- internals ------------------------------------------------------------------------
    def _level_scores(self) -> np.ndarray:
        """The distinct anomaly scores u_k (descending) that `_levels` describes; in histogram
        mode the lower edge of each bin holding anomalies."""
        if self._edges is None:
            pos, _ = self._finalize()
            return np.unique(pos)[::-1]
        return self._edges[np.nonzero(self._hist[1])[0][::-1]]

    def _levels(self):
        """Per distinct anomaly score u_k (descending): multiplicity c_k, TP_k = #anomalies >= u_k,
        FP_k = #normals >= u_k, and #normals == u_k. All (K,) float64."""
        if self._edges is None:
            pos, neg = self._finalize()
            u, c = np.unique(pos, return_counts=True)
            u, c = u[::-1], c[::-1]
            below = np.searchsorted(neg, u, side="left")
            fp = len(neg) - below
            fp_eq = np.searchsorted(neg, u, side="right") - below
        else:
            neg_hist, pos_hist = self._hist
            top = np.nonzero(pos_hist)[0][::-1]          # bins holding anomalies, high to low
            c = pos_hist[top]
            fp = np.cumsum(neg_hist[::-1])[::-1][top]    # normals in this bin or above
            fp_eq = neg_hist[top]
        tp = np.cumsum(c)
        return tuple(np.asarray(a, np.float64) for a in (c, tp, fp, fp_eq))

    def _count_ge(self, threshold: float) -> tuple[int, int]:
        """(#anomalies, #normals) scoring >= threshold."""
        if self._edges is None:
            pos, neg = self._finalize()
            return (len(pos) - int(np.searchsorted(pos, _ceil_to(threshold, pos.dtype), side="left")),
                    len(neg) - int(np.searchsorted(neg, _ceil_to(threshold, neg.dtype), side="left")))
        b = int(self._bin(np.array([threshold]))[0])
        return int(self._hist[1][b:].sum()), int(self._hist[0][b:].sum())

    def _bin(self, s: np.ndarray) -> np.ndarray:
        """Bin b holds [edges[b], edges[b+1]); scores beyond the range go to the end bins.
        Arithmetic first (fast), then a one-step fix-up against the edge values themselves, so
        a threshold equal to an edge and a score equal to it land in the same bin."""
        e, last = self._edges, len(self._edges) - 2
        x = np.clip(np.floor((s - e[0]) * ((last + 1) / (e[-1] - e[0]))), 0, last)
        b = x.astype(np.int64)
        b -= (s < e[b]) & (b > 0)
        b += (s >= e[b + 1]) & (b < last)
        return b

    def _count(self, chunks: list[np.ndarray], row: int) -> int:
        if self._edges is not None:
            return int(self._hist[row].sum())
        return sum(len(c) for c in chunks)

    def _finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """Sort each class once; the sorted array replaces the chunks, so later updates append
        to it and the next call only re-sorts when something was added."""
        if self._dirty or not self._pos:
            for chunks in (self._pos, self._neg):
                whole = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
                whole.sort()
                chunks[:] = [whole]
            self._dirty = False
        return self._pos[0], self._neg[0]


def _ceil_to(value: float, dtype) -> np.generic:
    """The smallest `dtype` number >= value, so `s >= value` and `s >= _ceil_to(value)` agree
    for every `dtype` score s (a plain cast could round the threshold down onto a score)."""
    with np.errstate(over="ignore"):
        v = np.asarray(value, dtype=dtype)[()]
    return np.nextafter(v, np.asarray(np.inf, dtype)) if float(v) < float(value) else v


def _numpy(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):  # a tensor on any device
        x = x.detach()
        if x.is_floating_point() and x.element_size() < 4:  # float16 / bfloat16
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)
