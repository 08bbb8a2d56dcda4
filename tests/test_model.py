"""Sparse convs against dense torch convs, the U-Net on CPU, and the sparse-tensor builder."""

import numpy as np
import pytest
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from spconv.core import ConvAlgo
from spconv.pytorch.conv import SparseConvolution

from sparse_ad.config import ModelConfig
from sparse_ad.errors import ConfigError, SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.models.sparse_tensor import conv_algo, to_sparse_tensor
from sparse_ad.models.spunet import SpUNet, build_model, padded_shape, voxel_features
from sparse_ad.voxelize.result import Voxels

SHAPE = (5, 6, 7)   # distinct sizes, so a swapped axis cannot pass


def random_sparse(rng, shape, batch_size, per_frame, channels):
    coords, batch = [], []
    for b in range(batch_size):
        keys = rng.choice(int(np.prod(shape)), per_frame, replace=False)
        coords.append(np.stack(np.unravel_index(keys, shape), axis=1))
        batch.append(np.full(per_frame, b))
    coords, batch = np.concatenate(coords), np.concatenate(batch)
    feats = torch.from_numpy(rng.standard_normal((len(coords), channels)).astype(np.float32))
    return feats, coords, batch


def to_dense(feats, coords, batch, shape, batch_size):
    """(B, C, nx, ny, nz), filled independently of spconv's own `.dense()`."""
    dense = torch.zeros(batch_size, feats.shape[1], *shape)
    dense[batch, :, coords[:, 0], coords[:, 1], coords[:, 2]] = feats
    return dense


def dense_at(dense, indices):
    """Rows (M, C) of a dense (B, C, X, Y, Z) tensor at spconv indices (M, 4)."""
    i = indices.long()
    return dense[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]]


def as_dense_weight(w):
    """spconv weight (out, kx, ky, kz, in) → nn.Conv3d weight (out, in, kx, ky, kz)."""
    return w.permute(0, 4, 1, 2, 3)


@pytest.fixture
def sparse_input():
    rng = np.random.default_rng(0)
    feats, coords, batch = random_sparse(rng, SHAPE, 2, 40, 3)
    return feats, coords, batch, to_sparse_tensor(feats, coords, batch, SHAPE, 2)


def test_subm_conv_matches_dense(sparse_input):
    feats, coords, batch, x = sparse_input
    conv = spconv.SubMConv3d(3, 4, 3, padding=1, bias=True, algo=ConvAlgo.Native)
    assert tuple(conv.weight.shape) == (4, 3, 3, 3, 3)
    out = conv(x)
    assert torch.equal(out.indices, x.indices)          # submanifold: same sites, same order
    ref = F.conv3d(to_dense(feats, coords, batch, SHAPE, 2), as_dense_weight(conv.weight), conv.bias, padding=1)
    torch.testing.assert_close(out.features, dense_at(ref, out.indices), rtol=1e-5, atol=1e-5)


def test_strided_and_inverse_conv_match_dense(sparse_input):
    feats, coords, batch, x = sparse_input
    shape = padded_shape(SHAPE, 2)
    x = spconv.SparseConvTensor(x.features, x.indices, shape, 2)
    down = spconv.SparseConv3d(3, 4, 2, stride=2, bias=False, indice_key="d", algo=ConvAlgo.Native)
    up = spconv.SparseInverseConv3d(4, 3, 2, bias=False, indice_key="d", algo=ConvAlgo.Native)
    y = down(x)
    dense_in = to_dense(feats, coords, batch, shape, 2)
    ref = F.conv3d(dense_in, as_dense_weight(down.weight), stride=2)
    torch.testing.assert_close(y.features, dense_at(ref, y.indices), rtol=1e-5, atol=1e-5)
    occupied = F.max_pool3d((dense_in != 0).any(1, keepdim=True).float(), 2)   # outputs exist exactly here
    assert len(y.indices) == int(occupied.sum())

    z = up(y)
    assert torch.equal(z.indices, x.indices)            # back onto the input sites, same order
    # inverse conv = transposed conv; spconv (out, k, in) → ConvTranspose3d (in, out, k)
    dense_y = to_dense(y.features, y.indices[:, 1:].long().numpy(), y.indices[:, 0].long().numpy(),
                       [s // 2 for s in shape], 2)
    ref_up = F.conv_transpose3d(dense_y, up.weight.permute(4, 0, 1, 2, 3), stride=2)
    torch.testing.assert_close(z.features, dense_at(ref_up, z.indices), rtol=1e-5, atol=1e-5)


def tiny_unet(scene_head=True):
    torch.manual_seed(0)
    return SpUNet(6, 8, (8, 16, 16), blocks_per_level=1, scene_head=scene_head)


def unet_input(rng, batch_size=2, per_frame=300, shape=(24, 24, 12)):
    feats, coords, batch = random_sparse(rng, shape, batch_size, per_frame, 6)
    return to_sparse_tensor(feats, coords, batch, shape, batch_size)


def test_unet_forward_backward_cpu():
    model = tiny_unet()
    x = unet_input(np.random.default_rng(1))
    out = model(x)
    assert out.voxel_logits.shape == (x.features.shape[0],)
    assert out.scene_logits.shape == (2,)
    convs = [m for m in model.modules() if isinstance(m, SparseConvolution)]
    assert convs and all(m.algo == ConvAlgo.Native for m in convs)
    r = torch.randn_like(out.voxel_logits)
    ((out.voxel_logits * r).sum() + out.scene_logits.sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert model(x).voxel_logits.shape == (x.features.shape[0],)   # indice keys rebuilt per input


def test_unet_keeps_row_order_and_has_no_scene_head_by_default():
    model = tiny_unet(scene_head=False).eval()
    x = unet_input(np.random.default_rng(2))
    perm = torch.randperm(x.features.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        out_perm = model(spconv.SparseConvTensor(x.features[perm], x.indices[perm], x.spatial_shape, 2))
    assert out.scene_logits is None
    torch.testing.assert_close(out_perm.voxel_logits, out.voxel_logits[perm], rtol=1e-4, atol=1e-5)


def test_unet_sees_voxels_on_the_last_index_of_an_odd_axis():
    # Unpadded, a stride-2 conv on an axis of 5 drops index 4, so (4,4,4) could never reach
    # (0,0,0) through the bottleneck; the model widens the box instead. Positive weights and
    # inputs keep every ReLU open, so any path shows up in the output.
    torch.manual_seed(0)
    model = SpUNet(6, 4, (4, 4), blocks_per_level=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.fill_(0.1)
    coords = np.array([[0, 0, 0], [4, 4, 4]])
    feats = torch.ones(2, 6)
    with torch.no_grad():
        before = model(to_sparse_tensor(feats, coords, [0, 0], (5, 5, 5), 1)).voxel_logits
        feats[1] += 5.0
        after = model(to_sparse_tensor(feats, coords, [0, 0], (5, 5, 5), 1)).voxel_logits
    assert abs(float(after[0] - before[0])) > 1e-4
    assert padded_shape((1000, 1000, 64), 16) == [1008, 1008, 64]


def test_unet_rejects_wrong_channels():
    with pytest.raises(SparseADError, match="expected 6 feature channels, found 3"):
        tiny_unet()(to_sparse_tensor(torch.randn(4, 3), np.arange(12).reshape(4, 3) % 5, [0] * 4, SHAPE, 1))


def test_build_model_from_config():
    model = build_model(ModelConfig(base_channels=8, channels=(8, 16), blocks_per_level=1, scene_head=True))
    assert len(model.down) == 2 and model.stride == 4 and model.scene is not None
    assert torch.sigmoid(model.head.bias).item() == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="blocks_per_level"):
        build_model(ModelConfig(blocks_per_level=0))
    with pytest.raises(ConfigError, match="head_prior"):
        build_model(ModelConfig(head_prior=1.0))


def test_conv_algo_by_device():
    assert conv_algo("cpu") == ConvAlgo.Native
    assert conv_algo(torch.device("cuda", 0)) == ConvAlgo.MaskImplicitGemm


def test_to_sparse_tensor_layout():
    feats = torch.randn(3, 2)
    coords = np.array([[1, 2, 3], [4, 5, 6], [0, 0, 0]], np.int64)
    x = to_sparse_tensor(feats, coords, np.array([1, 0, 1]), SHAPE, 2)
    assert x.indices.dtype == torch.int32 and x.spatial_shape == list(SHAPE) and x.batch_size == 2
    assert x.indices.tolist() == [[1, 1, 2, 3], [0, 4, 5, 6], [1, 0, 0, 0]]


@pytest.mark.parametrize("change,match", [
    (dict(coords=np.zeros((3, 3), np.float32)), "coords: expected an integer array of shape \\(3, 3\\), found"),
    (dict(coords=np.zeros((3, 2), np.int64)), "coords: expected .* found .* of shape \\(3, 2\\)"),
    (dict(batch_index=np.zeros(2, np.int64)), "batch_index: expected .* shape \\(3,\\)"),
    (dict(batch_index=np.array([0, 2, 0])), "batch index in \\[0, 2\\) .* found batch 2"),
    (dict(coords=np.array([[0, 0, 0], [5, 0, 0], [0, 0, 0]])),
     "within spatial_shape \\(5, 6, 7\\), found batch 0 at \\(5, 0, 0\\)"),
    (dict(coords=np.array([[0, 0, 0], [0, -1, 0], [0, 0, 0]])), "found batch 0 at \\(0, -1, 0\\)"),
    (dict(features=torch.zeros(3, 2, dtype=torch.int64)), "features: expected a float32"),
    (dict(features=np.zeros((3, 2))), "features: expected a float32 .* found torch.float64"),
    (dict(spatial_shape=(5, 6)), "spatial_shape: expected 3"),
    (dict(batch_size=0), "batch_size: expected >= 1"),
])
def test_to_sparse_tensor_errors(change, match):
    args = dict(features=torch.zeros(3, 2), coords=np.zeros((3, 3), np.int64), batch_index=np.zeros(3, np.int64),
                spatial_shape=SHAPE, batch_size=2)
    args.update(change)
    with pytest.raises(SparseADError, match=match):
        to_sparse_tensor(**args)


def test_to_sparse_tensor_rejects_empty():
    with pytest.raises(SparseADError, match="at least one voxel"):
        to_sparse_tensor(torch.zeros(0, 2), np.zeros((0, 3), np.int64), np.zeros(0, np.int64), SHAPE, 1)


def test_voxel_features_numpy_and_torch_agree():
    grid = VoxelGrid(0.5, (10, 10, 8), (2.5, 2.5, 2.0))
    vox = Voxels(coords=np.array([[1, 2, 0], [3, 4, 7]], np.int32), keys=np.array([21, 743]),
                 point2voxel=np.zeros(5, np.int64), features=np.array([[0.2], [0.9]], np.float32),
                 counts=np.array([1, 4], np.int32), offsets=np.array([[0.1, -0.2, 0.0], [0.25, 0.0, -0.05]],
                                                                      np.float32),
                 labels=None, n_nonfinite=0, n_outside=0)
    f = voxel_features(vox, grid)
    assert f.dtype == np.float32 and f.shape == (2, 6)
    np.testing.assert_allclose(f[0], [0.2, np.log(2), 0.2, -0.4, 0.0, 0.5 / 8 * 2 - 1], rtol=1e-6)
    np.testing.assert_allclose(f[1, 5], 7.5 / 8 * 2 - 1)
    tvox = Voxels(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in vars(vox).items()})
    ft = voxel_features(tvox, grid)
    assert isinstance(ft, torch.Tensor) and ft.dtype == torch.float32
    np.testing.assert_allclose(ft.numpy(), f, rtol=1e-6)


def test_scene_pooling_sums_in_float32_for_fp16_features():
    """Under AMP (and in the fp16 folded model) the features are fp16: their per-frame sum
    must not overflow or stall; the pooled result keeps the features' dtype."""
    from sparse_ad.models.spunet import pool_per_frame

    feats = torch.full((80_000, 3), 2.0, dtype=torch.float16)
    feats[:40_000] = 1.0
    batch = torch.zeros(80_000, dtype=torch.long)
    batch[60_000:] = 1
    pooled = pool_per_frame(feats, batch, 3)
    assert pooled.dtype == torch.float16
    expected = [[2, 2, 2, 4 / 3, 4 / 3, 4 / 3], [2, 2, 2, 2, 2, 2], [0] * 6]   # max | mean; empty frame: 0
    assert torch.allclose(pooled.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-3)
