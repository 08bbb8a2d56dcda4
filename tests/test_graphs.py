"""The CUDA-graph form of gather_gemm: bucketed, padded static buffers compute the same rows.

The capture itself needs a GPU (`tools/device_check.sh`); off CUDA `GraphedGatherGemm` runs
the very buffers a graph would replay, so the padding, the "no voxel" index at the bucket
and the stale rows left by earlier frames are all checked here."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_ad.errors import SparseADError
from sparse_ad.models import graphs
from sparse_ad.models.gather_gemm import GATHER_MODES, GatherGemmUNet
from sparse_ad.models.graphs import GraphedGatherGemm, bucket, level_rows
from sparse_ad.models.inference import fuse_for_inference, is_inference_model
from sparse_ad.models.spunet import SpUNet
from tests.conftest import random_voxels


def _frame(seed, shape=(16, 12, 8), voxels=120, batch_size=1):
    return random_voxels(seed, shape, voxels, batch_size)


def _nets(randomize_bn, blocks=1, scene=True, channels=(8, 16, 24), gather="index_select"):
    torch.manual_seed(blocks)
    model = SpUNet(6, 8, channels, blocks_per_level=blocks, scene_head=scene)
    randomize_bn(model, torch.Generator().manual_seed(blocks))
    gemm = GatherGemmUNet(fuse_for_inference(model.eval()), gather=gather)
    return gemm, GraphedGatherGemm(gemm)


def _close(a, b, tol=1e-6):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_bucket_rounds_up_by_at_most_an_eighth():
    for n in [*range(1, 3000), 24_088, 1_000_003, 2**20]:
        b = bucket(n)
        assert n <= b and bucket(b) == b
        assert b == 64 if n <= 64 else b <= n * 1.125
    assert len({bucket(n) for n in range(4097, 8193)}) == 8   # eight sizes per octave


def test_coarse_levels_round_to_powers_of_two():
    """Few signatures on a stream: the coarse counts wander on their own (module docstring)."""
    for n in range(1, 5000):
        assert level_rows(0, n) == bucket(n)
        r = level_rows(2, n)
        assert r >= max(n, 64) and r & (r - 1) == 0 and (r == 64 or r < 2 * n)
    frames = [(10_021, 3598, 1222, 385, 163), (10_200, 3643, 1212, 376, 161), (10_091, 3587, 1242, 383, 164)]
    assert len({tuple(level_rows(i, n) for i, n in enumerate(f)) for f in frames}) == 1


@pytest.mark.parametrize("gather", GATHER_MODES)
@pytest.mark.parametrize("blocks,scene", [(1, True), (2, False)])
def test_graphed_buffers_give_the_same_rows(randomize_bn, blocks, scene, gather):
    gemm, graphed = _nets(randomize_bn, blocks, scene, gather=gather)
    for seed, voxels, frames in [(0, 120, 1), (1, 300, 2), (2, 97, 3)]:
        x = _frame(seed, voxels=voxels, batch_size=frames)
        ref, out = gemm(x), graphed(x)
        assert out.voxel_logits.shape == ref.voxel_logits.shape
        assert _close(out.voxel_logits, ref.voxel_logits)
        if scene:
            assert _close(out.scene_logits, ref.scene_logits)
    assert len(graphed._signatures) == 3 and graphed.graphs == 0   # no graph off CUDA


@pytest.mark.parametrize("gather", GATHER_MODES)
def test_stale_rows_of_a_larger_frame_do_not_leak(randomize_bn, monkeypatch, gather):
    """Every level in one bucket: a small frame reuses the buffers a larger one filled."""
    monkeypatch.setattr(graphs, "level_rows", lambda level, n: 1024)
    gemm, graphed = _nets(randomize_bn, gather=gather)
    big, small = _frame(5, voxels=600), _frame(6, voxels=150)
    graphed(big)
    out = graphed(small)
    (sig,) = graphed._signatures.values()
    assert sig.inp[150:600].abs().sum() > 0          # the larger frame's rows are still there
    assert (sig.maps[0].table[150:600] != 1024).any()
    assert _close(out.voxel_logits, gemm(small).voxel_logits)
    assert _close(graphed(big).voxel_logits, gemm(big).voxel_logits)


def test_only_the_latest_signatures_are_kept(randomize_bn):
    gemm, _ = _nets(randomize_bn)
    graphed = GraphedGatherGemm(gemm, max_graphs=2)
    for voxels in (100, 200, 400, 200):
        graphed(_frame(voxels, voxels=voxels))
    assert len(graphed._signatures) == 2
    assert next(reversed(graphed._signatures))[0] == level_rows(0, 200)   # most recently used last
    sizes = [s.nbytes for s in graphed._signatures.values()]
    assert sizes[0] > sizes[1]   # least recently used first: 400 voxels' buffers, then 200's
    capped = GraphedGatherGemm(gemm, max_buffer_mb=(sizes[0] + sizes[1] - 1) / 2**20)   # not room for both
    for voxels in (400, 200):
        capped(_frame(voxels, voxels=voxels))
    assert list(capped._signatures) == [next(reversed(graphed._signatures))]   # the newest alone
    tiny = GraphedGatherGemm(gemm, max_buffer_mb=0)
    assert _close(tiny(_frame(1, voxels=100)).voxel_logits, gemm(_frame(1, voxels=100)).voxel_logits)
    assert len(tiny._signatures) == 1   # the newest is kept whatever its size


def test_graphs_engine_is_cuda_only_and_inference_only(randomize_bn):
    model = SpUNet(6, 8, (8,)).eval()
    with pytest.raises(SparseADError, match="CUDA graphs.*gather_gemm or spconv"):
        fuse_for_inference(model, engine="gather_gemm_graphs")
    _, graphed = _nets(randomize_bn)
    assert is_inference_model(graphed)
    with pytest.raises(SparseADError, match="inference-only"):
        graphed.train()


def test_half_precision_buffers(randomize_bn):
    torch.manual_seed(3)
    model = SpUNet(6, 8, (8, 16), blocks_per_level=1).eval()
    randomize_bn(model, torch.Generator().manual_seed(3))
    half = GatherGemmUNet(fuse_for_inference(model, half=True))
    x = _frame(7, voxels=200)
    out, ref = GraphedGatherGemm(half)(x), half(x)
    assert out.voxel_logits.dtype == torch.float32
    assert _close(out.voxel_logits, ref.voxel_logits, tol=1e-3)


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_property_same_rows_on_any_small_scene(data):
    """Any depth and box, down to one voxel per frame: padded buffers, same rows."""
    levels = data.draw(st.integers(1, 4), label="levels")
    shape = tuple(data.draw(st.integers(1, 12), label=f"axis{a}") for a in range(3))
    seed = data.draw(st.integers(0, 2**16), label="seed")
    voxels = data.draw(st.integers(1, min(80, int(np.prod(shape)))), label="voxels")
    frames = data.draw(st.integers(1, 3), label="frames")
    mode = data.draw(st.sampled_from(GATHER_MODES), label="mode")
    torch.manual_seed(seed)
    model = SpUNet(6, 4, tuple(4 * (i + 1) for i in range(levels)), blocks_per_level=1, scene_head=True)
    gemm = GatherGemmUNet(fuse_for_inference(model.eval()), gather=mode)
    graphed = GraphedGatherGemm(gemm)
    for k in range(2):   # the second frame may reuse the first one's signature
        x = _frame(seed + k, shape, voxels, frames)
        ref, out = gemm(x), graphed(x)
        assert _close(out.voxel_logits, ref.voxel_logits, 1e-5)
        assert _close(out.scene_logits, ref.scene_logits, 1e-5)


def test_a_capture_error_names_the_op_behind_the_exit_error():
    """torch.cuda.graph's exit raises its own error while the op's is being handled."""
    from sparse_ad.models.graphs import error_chain

    try:
        try:
            raise ValueError("operation not permitted when stream is capturing\nmore")
        except ValueError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as e:
        outer = e
    assert error_chain(outer) == ("RuntimeError: operation failed due to a previous error during capture <- "
                                  "ValueError: operation not permitted when stream is capturing")


def test_a_failed_capture_warns_once_and_the_convs_run_eagerly(randomize_bn, monkeypatch):
    """A capture that fails must not cost an eval or predict run: one warning with the error,
    then the same ops without graphs (the CUDA path's fallback, driven here on CPU)."""
    gemm, graphed = _nets(randomize_bn)
    x = _frame(0)
    graphed(x)   # on CPU: buffers filled, run eagerly
    sig = next(iter(graphed._signatures.values()))
    tries = []

    def fail(s):
        tries.append(s)
        raise SparseADError("CUDA graph capture failed (RuntimeError: boom)")

    monkeypatch.setattr(graphed, "_capture", fail)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    with pytest.warns(UserWarning, match=r"capture failed \(RuntimeError: boom\); running the convs eagerly"):
        out = graphed._replay(sig)
    assert torch.equal(out, gemm.run(sig.inp, sig.maps)) and graphed.eager_reason.endswith("boom)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no second warning, no second try
        assert torch.equal(graphed._replay(sig), out)
    assert len(tries) == 1 and graphed.captures == 0 and graphed.capture_s == 0.0
