"""The BN-folded inference model against the unfolded eval model (CPU, Native algorithm)."""

import pytest
import torch

from sparse_ad.errors import SparseADError
from sparse_ad.models.inference import InferenceUNet, fuse_for_inference
from sparse_ad.models.spunet import SpUNet
from tests.conftest import random_voxels

SHAPE = (9, 10, 11)


def _input(seed, batch_size=2, per_frame=150):
    return random_voxels(seed, SHAPE, per_frame, batch_size)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("blocks,scene", [(1, True), (2, False)])
def test_folded_equals_unfolded_eval(blocks, scene, randomize_bn):
    gen = torch.Generator().manual_seed(blocks)
    torch.manual_seed(blocks)
    model = SpUNet(6, 8, (8, 16), blocks_per_level=blocks, scene_head=scene)
    randomize_bn(model, gen)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model)
    assert isinstance(fused, InferenceUNet)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fused.modules())
    for seed in (0, 1):
        with torch.no_grad():
            ref = model(_input(seed))
            out = fused(_input(seed))
        assert _rel(out.voxel_logits, ref.voxel_logits) < 1e-5
        if scene:
            assert _rel(out.scene_logits, ref.scene_logits) < 1e-5
    # folding leaves the trained model untouched (weights, BN stats, mode)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
    assert all(m.bias is None for m in model.modules() if hasattr(m, "indice_key"))


def test_fold_is_not_identity_and_model_stays_trainable(randomize_bn):
    """BN really changes the output here (so the check above can fail), and the original model
    still trains in train mode after folding."""
    torch.manual_seed(0)
    model = SpUNet(6, 8, (8, 16), blocks_per_level=1)
    randomize_bn(model, torch.Generator().manual_seed(3))
    model.eval()
    fused = fuse_for_inference(model)
    plain = SpUNet(6, 8, (8, 16), blocks_per_level=1)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "running" not in k}, strict=False)
    plain.eval()
    with torch.no_grad():
        assert _rel(plain(_input(5)).voxel_logits, fused(_input(5)).voxel_logits) > 1e-2
    with pytest.raises(SparseADError):
        fused.train()
    model.train()
    model(_input(6)).voxel_logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


def test_validation_scores_with_what_eval_runs_on_the_device():
    """CUDA validation scores with the folded fp16 model on eval's CUDA engine (eval's
    numerics); CPU with the model itself. Building the CUDA scorer needs no GPU (it only
    converts weights)."""
    from sparse_ad.config import DEFAULT_ENGINE
    from sparse_ad.engine.validate import validation_scorer
    from sparse_ad.models.gather_gemm import GatherGemmUNet

    model = SpUNet(6, 8, (8,)).eval()
    assert validation_scorer(model, torch.device("cpu")) is model
    scorer = validation_scorer(model, torch.device("cuda"))
    assert DEFAULT_ENGINE["cuda"].startswith("gather_gemm")   # validation runs its ops eagerly
    assert type(scorer) is GatherGemmUNet and scorer.dtype == torch.float16 and not scorer.gather_named
    assert next(model.parameters()).dtype == torch.float32          # the trained model untouched
