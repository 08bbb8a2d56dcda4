"""The gather + GEMM inference U-Net against spconv's (CPU): same function, same rows."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_ad.errors import SparseADError
from sparse_ad.models.gather_gemm import GATHER_MODES, ROW_MODES, GatherGemmUNet, Taps, gather_rows, subm_map
from sparse_ad.models.inference import fuse_for_inference
from sparse_ad.models.sparse_tensor import to_sparse_tensor
from sparse_ad.models.spunet import SpUNet


def _input(seed, shape, batch_size=2, per_frame=300, channels=6):
    """Random voxels, denser near one corner (so neighbours and shared 2x2x2 cells exist)
    and including the box's faces and corners."""
    rng = np.random.default_rng(seed)
    coords, batch = [], []
    for b in range(batch_size):
        dense = rng.choice(int(np.prod([min(s, 6) for s in shape])), per_frame // 2, replace=False)
        near = np.stack(np.unravel_index(dense, [min(s, 6) for s in shape]), axis=1)
        far = np.stack(np.unravel_index(rng.choice(int(np.prod(shape)), per_frame, replace=False), shape), axis=1)
        corners = np.array([[0, 0, 0], [s - 1 for s in shape], [shape[0] - 1, 0, shape[2] - 1]])
        c = np.unique(np.concatenate([near, far, corners]), axis=0)
        c = c[rng.permutation(len(c))]                     # rows in no particular order
        coords.append(c)
        batch.append(np.full(len(c), b))
    coords, batch = np.concatenate(coords), np.concatenate(batch)
    feats = rng.standard_normal((len(coords), channels)).astype(np.float32)
    return to_sparse_tensor(feats, coords, batch, shape, batch_size)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("blocks,scene,shape", [(1, True, (9, 10, 11)), (2, False, (16, 12, 8)),
                                                (1, False, (30, 5, 7))])
def test_gather_gemm_equals_spconv(blocks, scene, shape, randomize_bn):
    gen = torch.Generator().manual_seed(blocks)
    torch.manual_seed(blocks)
    model = SpUNet(6, 8, (8, 16, 24), blocks_per_level=blocks, scene_head=scene)
    randomize_bn(model, gen)
    model.eval()
    fused = fuse_for_inference(model)
    gemm = GatherGemmUNet(fused)
    for seed in (0, 1):
        x = _input(seed, shape)
        with torch.no_grad():
            ref = fused(x)
            out = gemm(x)
        assert out.voxel_logits.shape == ref.voxel_logits.shape
        assert _rel(out.voxel_logits, ref.voxel_logits) < 1e-5
        if scene:
            assert _rel(out.scene_logits, ref.scene_logits) < 1e-5
    # chunked gathering (tiny memory cap) computes the same
    small = GatherGemmUNet(fused, max_gather_mb=0.01)
    with torch.no_grad():
        assert _rel(small(x).voxel_logits, ref.voxel_logits) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("cols", [1, 3, 6, 8, 12, 32])
@pytest.mark.parametrize("mode", ROW_MODES)
def test_gather_rows_copies_exactly_the_indexed_rows(mode, cols, dtype):
    """Every mode, every row width (the wide mode views rows as 2-, 4-, 8- or 16-byte
    elements): bit-equal to fp[index], also on a slice that starts mid-row-width."""
    gen = torch.Generator().manual_seed(cols)
    fp = torch.randn((41, cols), generator=gen).to(dtype)
    index = torch.randint(0, 41, (97,), generator=gen)
    odd = torch.randn(41 * cols + 1, generator=gen).to(dtype)[1:].view(41, cols)   # starts mid-element-width
    one = torch.randn(1, cols + 2, generator=gen).to(dtype)[:, :cols]   # "contiguous", rows 2 values apart
    for src in (fp, fp[1:], odd, one, fp[:, :-1] if cols > 1 else fp):   # offset storage; non-contiguous
        i = index.clamp(max=src.shape[0] - 1)
        out = gather_rows(src, i, mode)
        assert out.dtype == src.dtype and out.shape == (len(i), src.shape[1])
        assert torch.equal(out.view(torch.int16 if dtype == torch.float16 else torch.int32),
                           src[i].contiguous().view(torch.int16 if dtype == torch.float16 else torch.int32))


def test_every_gather_mode_computes_spconvs_function(randomize_bn):
    """Whole, in row chunks, in tap groups and one tap at a time (the memory caps): the row
    modes copy bits, so unchunked their outputs are identical; "bag" sums per tap,
    so it is equal to spconv's within float32 rounding, like the others."""
    torch.manual_seed(3)
    model = SpUNet(6, 8, (8, 16, 24), blocks_per_level=1, scene_head=True).eval()
    randomize_bn(model, torch.Generator().manual_seed(3))
    fused = fuse_for_inference(model)
    x = _input(3, (16, 12, 8))
    with torch.no_grad():
        ref = fused(x)
        outs = {(m, mb): GatherGemmUNet(fused, gather=m, max_gather_mb=mb)(x)
                for m in GATHER_MODES for mb in (512.0, 0.1, 0.01)}
    # unchunked (a GEMM over fewer rows may round otherwise, and "gather" counts its index)
    assert torch.equal(outs["index_select", 512.0].voxel_logits, outs["gather", 512.0].voxel_logits)
    for o in outs.values():
        assert _rel(o.voxel_logits, ref.voxel_logits) < 1e-5
        assert _rel(o.scene_logits, ref.scene_logits) < 1e-5
    assert not torch.equal(outs["bag", 512.0].voxel_logits, outs["gather", 512.0].voxel_logits)   # another sum
    with pytest.raises(SparseADError, match="gather mode"):
        GatherGemmUNet(fused, gather="rows")
    with pytest.raises(SparseADError, match="gather mode"):
        gather_rows(x.features, torch.zeros(1, dtype=torch.int64), "bag")


def test_bag_mode_weights_follow_the_mode(randomize_bn):
    """The (in, taps * out) weights exist only in the "bag" mode, and switching a built net
    into it and back gives that mode's outputs."""
    fused = fuse_for_inference(SpUNet(6, 8, (8, 16), blocks_per_level=1).eval())
    net = GatherGemmUNet(fused)
    assert net.stem.bag_weight is None and "stem.bag_weight" not in net.state_dict()
    x = _input(5, (16, 12, 8))
    before = net(x).voxel_logits
    net.gather_mode = "bag"
    assert net.stem.bag_weight.shape == (6, 27 * 8) and net.up[0].bag_weight is None
    assert torch.equal(net(x).voxel_logits, GatherGemmUNet(fused, gather="bag")(x).voxel_logits)
    net.gather_mode = "index_select"
    assert net.stem.bag_weight is None and torch.equal(net(x).voxel_logits, before)


def test_default_gather_mode_is_the_devices(monkeypatch):
    """A net built without a mode takes its device's `DEFAULT_GATHER` (the fastest measured
    there), and a named mode wins over it."""
    from sparse_ad.models import gather_gemm

    assert set(gather_gemm.DEFAULT_GATHER) == {"cpu", "cuda"}
    assert set(gather_gemm.DEFAULT_GATHER.values()) <= set(GATHER_MODES)
    fused = fuse_for_inference(SpUNet(6, 8, (8,), blocks_per_level=1).eval())
    monkeypatch.setitem(gather_gemm.DEFAULT_GATHER, "cpu", "bag")
    assert GatherGemmUNet(fused).gather_mode == "bag"
    assert fuse_for_inference(fused, engine="gather_gemm").gather_mode == "bag"
    assert GatherGemmUNet(fused, gather="gather").gather_mode == "gather"
    net, named = GatherGemmUNet(fused), GatherGemmUNet(fused, gather="gather")
    monkeypatch.setitem(gather_gemm.DEFAULT_GATHER, "cpu", "index_select")   # as if moved to a device
    x = _input(5, (16, 12, 8))                                             # whose default is another
    net(x), named(x)
    assert net.gather_mode == "index_select" and net.stem.bag_weight is None and named.gather_mode == "gather"


def test_bag_index_skips_absent_neighbours():
    """Bags read Z = input @ all taps' weights, row `input_row * taps + tap`; an absent
    neighbour, and the extra last row, only ever the padding index (so they are not read)."""
    idx = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 3, 3, 3]])
    table = subm_map(idx, (4, 4, 4))                   # "no voxel" = 4
    taps = Taps(table, "bag")
    bags = taps.bags(4, 0, 27)
    assert bags.shape == (5, 27) and (bags[4] == 4 * 27).all()
    assert torch.equal(bags[:4] == 4 * 27, table == 4)
    assert bags[0, 13] == 0 * 27 + 13 and bags[0, 22] == 1 * 27 + 22   # itself; (+1, 0, 0) is row 1
    group = taps.bags(4, 20, 25)                         # taps 20..24: Z of those 5 taps only
    assert torch.equal(group[:4], torch.where(table[:, 20:25] == 4, 20, table[:, 20:25] * 5 + torch.arange(5)))
    assert taps.bags(4, 0, 27) is bags and taps.bags(4, 20, 25) is not group   # whole table kept, groups not


def test_subm_map_finds_exactly_the_neighbours():
    idx = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 3, 3, 3]])
    m = subm_map(idx, (4, 4, 4))
    centre = 13                                           # tap (0, 0, 0)
    assert m[:, centre].tolist() == [0, 1, 2, 3, 4]
    assert m[0, 9 * 2 + 3 * 1 + 1].item() == 1            # (+1, 0, 0) of row 0 is row 1
    assert m[0, 9 * 1 + 3 * 1 + 2].item() == 2            # (0, 0, +1)
    assert m[1, 9 * 0 + 3 * 1 + 1].item() == 0            # (-1, 0, 0) of row 1
    assert (m[3] == 5).sum().item() == 26                 # frame 1 has one voxel: no neighbours
    assert (m[4] == 5).sum().item() == 26                 # the far corner: neighbours outside the box


def test_coarse_levels_come_in_key_order():
    """subm_map takes a coarse level's keys from DownMap unsorted-free: they must be that
    level's rows' own framed keys, ascending."""
    from sparse_ad.models.gather_gemm import DownMap, _framed_keys

    x = _input(3, (16, 12, 8))
    dm = DownMap(x.indices.long(), (16, 12, 8))
    assert torch.equal(dm.keys, _framed_keys(dm.idx, dm.shape))
    assert bool((dm.keys[1:] > dm.keys[:-1]).all())
    assert torch.equal(subm_map(dm.idx, dm.shape, keys=dm.keys), subm_map(dm.idx, dm.shape))


def test_inference_only_and_engines_are_named():
    model = SpUNet(6, 8, (8,)).eval()
    gemm = fuse_for_inference(model, engine="gather_gemm")
    assert isinstance(gemm, GatherGemmUNet)
    with pytest.raises(SparseADError, match="inference-only"):
        gemm.train()
    with pytest.raises(SparseADError, match="spconv.*gather_gemm"):
        fuse_for_inference(model, engine="dense")


def test_half_precision_engine_runs_without_spconv_kernels(randomize_bn):
    """fp16 weights and features (the CUDA setting) through the same torch ops on CPU: close
    to fp32, logits back in fp32. spconv has no CPU fp16 path; this engine needs none."""
    torch.manual_seed(3)
    model = SpUNet(6, 8, (8, 16), blocks_per_level=2, scene_head=True).eval()
    randomize_bn(model, torch.Generator().manual_seed(3))
    ref = fuse_for_inference(model, engine="gather_gemm")
    half = fuse_for_inference(model, half=True, engine="gather_gemm")
    assert half.dtype == torch.float16 and half.stem.weight.dtype == torch.float16
    x = _input(4, (16, 12, 8))
    for mode in GATHER_MODES:
        half.gather_mode = mode
        with torch.no_grad():
            a, b = ref(x), half(x)
        assert b.voxel_logits.dtype == torch.float32 and b.scene_logits.dtype == torch.float32
        assert 0 < _rel(b.voxel_logits, a.voxel_logits) < 5e-3
        assert _rel(b.scene_logits, a.scene_logits) < 5e-3


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_property_equals_spconv_on_any_small_scene(data):
    """Any depth, box and occupancy, down to one voxel per frame and levels that collapse to a
    single coarse voxel: the same rows and values as spconv."""
    levels = data.draw(st.integers(1, 4), label="levels")
    shape = tuple(data.draw(st.integers(1, 12), label=f"axis{a}") for a in range(3))
    frames = data.draw(st.integers(1, 3), label="frames")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    mode = data.draw(st.sampled_from(GATHER_MODES), label="mode")
    rng = np.random.default_rng(seed)
    coords, batch = [], []
    for b in range(frames):
        k = int(rng.integers(1, min(40, int(np.prod(shape))) + 1))
        keys = rng.choice(int(np.prod(shape)), k, replace=False)
        coords.append(np.stack(np.unravel_index(keys, shape), axis=1))
        batch.append(np.full(k, b))
    coords, batch = np.concatenate(coords), np.concatenate(batch)
    feats = rng.standard_normal((len(coords), 6)).astype(np.float32)
    x = to_sparse_tensor(feats, coords, batch, shape, frames)
    torch.manual_seed(seed)
    model = SpUNet(6, 4, tuple(4 * (i + 1) for i in range(levels)), blocks_per_level=1, scene_head=True).eval()
    fused = fuse_for_inference(model)
    with torch.no_grad():
        ref, out = fused(x), GatherGemmUNet(fused, gather=mode)(x)
    assert _rel(out.voxel_logits, ref.voxel_logits) < 1e-5
    assert _rel(out.scene_logits, ref.scene_logits) < 1e-5
