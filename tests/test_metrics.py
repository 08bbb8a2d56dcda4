"""Metrics against scikit-learn: ties, heavy imbalance, streaming, degenerate splits."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

from sparse_ad.errors import SparseADError
from sparse_ad.metrics import ScoreAccumulator


def reference(y, s, threshold=None):
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    out = {"auroc": roc_auc_score(y, s), "aupr": average_precision_score(y, s),
           "fpr95": fpr[np.searchsorted(tpr, 0.95, side="left")]}
    if threshold is not None:
        tn, fp, fn, tp = confusion_matrix(y, s >= threshold, labels=[0, 1]).ravel()
        with np.errstate(invalid="ignore"):  # precision 0/0 when nothing is predicted anomalous
                out.update(recall=tp / (tp + fn), precision=tp / (tp + fp), f1=2 * tp / (2 * tp + fp + fn),
                       specificity=tn / (tn + fp), detections=tp, positive_rate=(tp + fp) / len(y))
    return out


def feed(acc, y, s, frames=7):
    for part_y, part_s in zip(np.array_split(y, frames), np.array_split(s, frames), strict=True):
        acc.update(part_s, part_y)
    return acc


def random_case(rng, n, rate, levels=None):
    y = rng.random(n) < rate
    y[rng.integers(n)] = True
    y[rng.integers(n)] = False
    s = rng.standard_normal(n) + 1.5 * y
    if levels:  # coarse scores: many ties, also across the two classes
        s = np.round(s * levels) / levels
    return y.astype(np.int64), s.astype(np.float32)


@pytest.mark.parametrize("n,rate,levels", [(2000, 0.3, None), (5000, 0.1, 3), (50_000, 0.001, None),
                                           (50_000, 0.001, 2), (300, 0.5, 1), (10_000, 0.0002, 4)])
def test_matches_sklearn(n, rate, levels):
    rng = np.random.default_rng(n + (levels or 0))
    y, s = random_case(rng, n, rate, levels)
    threshold = float(np.quantile(s, 0.9))
    m = feed(ScoreAccumulator(), y, s).compute(threshold)
    ref = reference(y, s, threshold)
    assert m.voxels == n and m.anomaly_voxels == y.sum() and m.ranked and m.exact
    for key, value in ref.items():
        assert getattr(m, key) == pytest.approx(value, abs=1e-6), key


def test_float64_and_torch_inputs_and_valid_mask():
    rng = np.random.default_rng(1)
    y, s = random_case(rng, 4000, 0.05)
    s64 = s.astype(np.float64) + rng.standard_normal(len(s)) * 1e-9   # ties a float32 cast would make
    valid = rng.random(len(s)) < 0.8
    acc = ScoreAccumulator()
    acc.update(torch.from_numpy(s64), torch.from_numpy(y), torch.from_numpy(valid))
    m = acc.compute()
    assert m.auroc == pytest.approx(roc_auc_score(y[valid], s64[valid]), abs=1e-12)
    assert m.aupr == pytest.approx(average_precision_score(y[valid], s64[valid]), abs=1e-12)
    half = ScoreAccumulator()
    half.update(torch.from_numpy(s).half(), y)
    assert half.compute().auroc == pytest.approx(roc_auc_score(y, s.astype(np.float16)), abs=1e-6)


def test_streaming_merge_and_recompute():
    rng = np.random.default_rng(2)
    y, s = random_case(rng, 6000, 0.02, 5)
    a, b = ScoreAccumulator(), ScoreAccumulator()
    feed(a, y[:3000], s[:3000])
    first = a.compute()
    assert first.auroc == pytest.approx(roc_auc_score(y[:3000], s[:3000]), abs=1e-6)
    feed(b, y[3000:], s[3000:])
    a.merge(b)
    assert a.compute().auroc == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    a.update(s[:10], y[:10])  # more data after a compute
    yy, ss = np.concatenate([y, y[:10]]), np.concatenate([s, s[:10]])
    assert a.compute().aupr == pytest.approx(average_precision_score(yy, ss), abs=1e-6)


@pytest.mark.parametrize("target", [0.05, 0.5, 0.95, 1.0])
def test_threshold_for_recall(target):
    rng = np.random.default_rng(3)
    y, s = random_case(rng, 20_000, 0.01, 10)
    acc = feed(ScoreAccumulator(), y, s)
    t = acc.threshold_for_recall(target)
    assert acc.compute(t).recall >= target
    # the largest such threshold: the next anomaly score above it falls short
    above = np.unique(s[(y == 1) & (s > t)])
    if len(above):
        assert acc.compute(float(above[0])).recall < target


def test_threshold_between_float32_values():
    s = np.array([0.3, 0.3, 0.1, 0.5], np.float32)
    acc = ScoreAccumulator()
    acc.update(s, np.array([1, 0, 0, 1]))
    just_above = float(np.float32(0.3)) + 1e-12   # a float32 cast would round it onto the scores
    assert acc.compute(just_above).detections == 1
    assert acc.compute(float(np.float32(0.3))).detections == 2


def test_degenerate_splits():
    acc = ScoreAccumulator()
    acc.update(np.array([0.1, 0.9], np.float32), np.array([0, 0]))
    m = acc.compute(0.5)
    assert not m.ranked and m.auroc is None and m.aupr is None and m.fpr95 is None
    assert m.recall is None and m.detections == 0 and m.specificity == 0.5 and m.f1 == 0.0
    assert ScoreAccumulator().compute().voxels == 0
    with pytest.raises(SparseADError, match="no anomaly voxels"):
        acc.threshold_for_recall(0.5)
    only_pos = ScoreAccumulator()
    only_pos.update(np.array([0.2]), np.array([1]))
    m = only_pos.compute(0.9)
    assert not m.ranked and m.precision is None and m.recall == 0.0 and m.specificity is None


def test_bad_inputs():
    acc = ScoreAccumulator()
    with pytest.raises(SparseADError, match="NaN"):
        acc.update(np.array([np.nan, 1.0]), np.array([0, 1]))
    with pytest.raises(SparseADError, match="0/1"):
        acc.update(np.array([0.0, 1.0]), np.array([0, 2]))
    with pytest.raises(SparseADError, match="expected two"):
        acc.update(np.zeros(3), np.zeros(2))


def test_histogram_mode_exact_on_binned_scores():
    rng = np.random.default_rng(4)
    bins, lo, hi = 64, -4.0, 4.0
    y, _ = random_case(rng, 30_000, 0.005)
    centres = lo + (np.arange(bins) + 0.5) * (hi - lo) / bins
    s = centres[np.clip((rng.standard_normal(len(y)) * 1.2 + 2 * y + 32).astype(int), 0, bins - 1)]
    hist = feed(ScoreAccumulator(histogram_bins=bins, score_range=(lo, hi)), y, s)
    exact = feed(ScoreAccumulator(), y, s)
    mh, me = hist.compute(), exact.compute()
    assert not mh.exact
    for key in ("auroc", "aupr", "fpr95"):
        assert getattr(mh, key) == pytest.approx(getattr(me, key), abs=1e-9), key
    t = hist.threshold_for_recall(0.5)
    assert hist.compute(t).detections == exact.compute(t).detections


def test_histogram_bins_agree_with_edges():
    acc = ScoreAccumulator(histogram_bins=37, score_range=(-3.0, 5.0))
    edges = acc._edges
    s = np.concatenate([edges, np.nextafter(edges, -np.inf), np.random.default_rng(5).uniform(-4, 6, 5000),
                        [np.inf, -np.inf]])
    expected = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2)
    np.testing.assert_array_equal(acc._bin(s), expected)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=40))
def test_small_tied_cases_match_sklearn(rows):
    s = np.array([r[0] for r in rows], np.float32) / 2
    y = np.array([r[1] for r in rows], np.int64)
    assume(0 < y.sum() < len(y))
    acc = ScoreAccumulator()
    acc.update(s, y)
    m, ref = acc.compute(0.5), reference(y, s, 0.5)
    for key in ("auroc", "aupr", "fpr95", "recall", "specificity", "f1", "detections"):
        assert getattr(m, key) == pytest.approx(ref[key], abs=1e-9), key


def test_best_f1_threshold_and_curves_match_sklearn():
    from sklearn.metrics import precision_recall_curve, roc_curve

    from sparse_ad.metrics import ScoreAccumulator

    rng = np.random.default_rng(3)
    y = rng.random(3000) < 0.05
    s = np.round(rng.normal(y * 1.5, 1.0), 2).astype(np.float32)  # many ties
    acc = ScoreAccumulator()
    acc.update(s, y)
    prec, rec, thr = precision_recall_curve(y, s)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    m = acc.compute(acc.best_f1_threshold())
    assert abs(m.f1 - f1.max()) < 1e-9
    c = acc.curves()
    fpr, tpr, _ = roc_curve(y, s)
    assert abs(np.trapezoid(c.tpr, c.fpr) - np.trapezoid(tpr, fpr)) < 1e-9
    assert abs(np.trapezoid(c.tpr, c.fpr) - acc.compute().auroc) < 1e-9


def test_object_summary_counts_and_ranks_each_anomaly_frame():
    from sparse_ad.engine.protocol import ProtocolAccumulator

    for bins in (0, 1000):
        acc = ProtocolAccumulator(histogram_bins=bins)
        acc.add_frame(np.full(50, 0.99, np.float32), np.zeros(50, bool), name="normal")  # not an object
        # object A shares its frame with 101 normals in [0, 0.5]; its median 0.9 beats them all.
        # B: one voxel at 0.6, median 0.25 (half the normals score that much); C: missed (0.05)
        normals = np.linspace(0.0, 0.5, 101, dtype=np.float32)
        acc.add_frame(np.r_[normals, 0.9, 0.95, 0.7], np.r_[np.zeros(101, bool), True, True, True],
                      size=(2.0, 1.0, 1.0), name="A")
        acc.add_frame([0.6, 0.25, 0.2, 0.25, 0.3], [True] * 5, name="B")
        acc.add_frame([0.05, 0.05], [True, True], size=0.4, name="C")
        ob = acc.result(threshold=0.55)["objects"]
        # the normal frame's 0.99s are not in the anomalies-only pool, so A still beats 99%
        counts = (ob["objects"], ob["detected"], ob["median_detected"], ob["median_above_99pct_of_normals"])
        assert counts == (3, 2, 1, 1)
        assert [o["frame"] for o in ob["worst"]] == ["C", "B", "A"]
        c, b, a = ob["worst"]
        assert (a["size"], b["size"], c["size"]) == ("large", None, "small")
        assert (a["voxels"], a["median_score"], a["max_score"]) == (3, pytest.approx(0.9), pytest.approx(0.95))
        # the medians 0.05 and 0.25 sit on bin edges, so the binned counts are exact too
        assert c["normals_at_or_above_median"] == pytest.approx(91 / 101, abs=1e-9)
        assert b["normals_at_or_above_median"] == pytest.approx(51 / 101, abs=1e-9)
        assert a["normals_at_or_above_median"] == 0.0


def test_normal_fraction_ge_exact_and_binned():
    rng = np.random.default_rng(3)
    s = rng.random(5000).astype(np.float32)
    y = rng.random(5000) < 0.1
    exact, binned = ScoreAccumulator(), ScoreAccumulator(histogram_bins=100, score_range=(0.0, 1.0))
    for acc in (exact, binned):
        acc.update(s, y)
    q = np.array([0.0, 0.25, 0.5, 0.99, 1.0])
    want = np.array([(s[~y] >= v).mean() for v in q])
    np.testing.assert_allclose(exact.normal_fraction_ge(q), want)
    # binned: "in its bin or above", so exact on bin edges, and from the lower edge inside a bin
    edges = np.array([0.0, 0.25, 0.5, 0.75])
    np.testing.assert_array_equal(binned.normal_fraction_ge(edges), [(s[~y] >= v).mean() for v in edges])
    inside = np.array([0.2503, 0.999, 1.0])
    np.testing.assert_array_equal(binned.normal_fraction_ge(inside), [(s[~y] >= v).mean() for v in (0.25, 0.99, 0.99)])


@pytest.mark.parametrize("size,bucket", [
    ((1.5, 2.0, 1.3), "large"), ((0.5, 0.4, 0.9), "small"), (1.2, "medium"), ("[0.48 0.48 0.72]", "small"),
    ("(1.1, 0.5, 0.5)", "medium"), ("tiny", "small"), ("Big", "large"), ("huge", "large"), ("medium", "medium"),
    ("Vector3D(x=1)", None), ({"x": 1}, None), (float("nan"), None)])
def test_size_bucket_reads_extents_numpy_prints_and_carla_size_names(size, bucket):
    from sparse_ad.engine.protocol import size_bucket

    assert size_bucket(size) == bucket


def test_anomaly_frames_without_a_readable_size_are_counted():
    from sparse_ad.engine.protocol import ProtocolAccumulator

    acc = ProtocolAccumulator()
    acc.add_frame([0.9, 0.1], [True, False], size="big")
    acc.add_frame([0.8, 0.2], [True, False], size="Vector3D(x=1)")
    acc.add_frame([0.7, 0.3], [True, False])
    acc.add_frame([0.7, 0.3], [False, False], size="what")   # not an anomaly frame: not counted
    res = acc.result(0.5)
    assert list(res["by_size"]) == ["large"] and res["by_size_unknown_frames"] == 2


def test_collapse_alarm_fires_on_chance_ranking_and_only_then():
    """Validation metrics as `validate` builds them: a constant output, a noisy "normal
    everywhere" and a healthy model on the same voxels (1% anomalies)."""
    from sparse_ad.engine.protocol import ProtocolAccumulator
    from sparse_ad.engine.validate import collapse_reason

    rng = np.random.default_rng(0)
    labels = np.zeros(10_000, bool)
    labels[:100] = True

    def metrics(scores):
        acc = ProtocolAccumulator()
        acc.add_frame(scores.astype(np.float32), labels)
        return acc.result(acc.all.best_f1_threshold())

    constant = metrics(np.full(10_000, 0.01))
    assert constant["normality_included"]["detections"] > 0        # the calibrated threshold always detects
    assert "no better than chance" in collapse_reason(constant)
    assert "no better than chance" in collapse_reason(metrics(rng.uniform(0, 0.1, 10_000)))
    healthy = rng.uniform(0, 0.5, 10_000) + 0.4 * labels
    assert collapse_reason(metrics(healthy)) is None
    no_anomalies = metrics(np.full(10_000, 0.01))
    no_anomalies["normality_included"]["anomaly_voxels"] = 0
    assert collapse_reason(no_anomalies) is None
