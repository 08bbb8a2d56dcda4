"""Losses: hand-computed values, extreme imbalance, ignore mask, every supervision path."""

import math

import pytest
import torch

from sparse_ad.config import LossConfig
from sparse_ad.errors import ConfigError
from sparse_ad.losses import (
    Targets,
    bce_loss,
    build_loss,
    class_balanced_weights,
    focal_loss,
    mil_loss,
    scene_loss,
)
from sparse_ad.models.spunet import SpUNetOutput


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_class_balanced_weights_by_hand():
    beta = 0.9999
    eff = [(1 - beta**n) / (1 - beta) for n in (9999, 1)]
    inv = [1 / e for e in eff]
    expected = [2 * v / sum(inv) for v in inv]
    w = class_balanced_weights([9999, 1], beta)
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(w.sum()) == pytest.approx(2.0)
    assert class_balanced_weights([10, 1_000_000], 0.0).tolist() == [1.0, 1.0]
    # beta -> 1: inverse class frequency
    assert class_balanced_weights([300, 100], 1 - 1e-12).tolist() == pytest.approx([0.5, 1.5], rel=1e-4)
    assert torch.isfinite(class_balanced_weights([20_000_000, 0], 0.9999)).all()
    with pytest.raises(ConfigError, match="beta"):
        class_balanced_weights([1, 1], 1.0)


def test_the_log_says_how_much_an_anomaly_weighs_on_this_split():
    """The same beta weighs anomalies ~33x on the demo's split and ~1x on a split 300x larger:
    the training log says which (a user moving from the demo to real data should see it)."""
    def note(counts, **kw):
        return build_loss(LossConfig(**kw), counts).weight_note()

    assert "weighs 33.4x" in note([671_530, 304], beta=0.9999)
    assert "weighs 1.0x" in note([100_000_000, 100_000], beta=0.9999)
    assert "weighs 10.5x" in note([100_000_000, 100_000], beta=0.999999)
    assert "weighs 3.0x" in note([671_530, 304], kind="bce", pos_weight=3.0)
    assert note([671_530, 304], supervision="mil") == ""


def test_focal_by_hand():
    x, t = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    w = torch.tensor([0.5, 1.5])
    l_pos = 1.5 * (1 - sig(2)) ** 2 * -math.log(sig(2))
    l_neg = 0.5 * sig(-1) ** 2 * -math.log(sig(1))
    got = focal_loss(x, t, torch.tensor([True, True]), w, gamma=2.0)
    assert float(got) == pytest.approx((l_pos + l_neg) / 2.0, rel=1e-6)
    one = focal_loss(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([True]), w, gamma=2.0)
    assert float(one) == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_bce_and_scene_by_hand():
    x, t = torch.tensor([0.5, -2.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
    got = bce_loss(x, t, torch.ones(3, dtype=torch.bool), pos_weight=3.0)
    expected = (3 * -math.log(sig(0.5)) - math.log(sig(2.0)) - math.log(sig(-1.0))) / (3 + 1 + 1)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    s = scene_loss(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0]), gamma=0.0)
    assert float(s) == pytest.approx((-math.log(sig(1)) - math.log(sig(-1))) / 2, rel=1e-6)


def test_mil_by_hand():
    logits = torch.tensor([-1.0, 2.0, 5.0, 0.5, -0.5], requires_grad=True)
    t = Targets(voxel_targets=torch.zeros(5), valid=torch.tensor([True, True, False, True, True]),
                batch_index=torch.tensor([0, 0, 0, 1, 1]), frame_labels=torch.tensor([1.0, 0.0]))
    loss = mil_loss(logits, t, gamma=0.0)
    bag = -math.log(sig(2.0))                       # 5.0 is ignored, so 2.0 is the bag's max
    normal = (-math.log(sig(-0.5)) - math.log(sig(0.5))) / 2
    assert loss.item() == pytest.approx(bag + normal, rel=1e-6)
    loss.backward()
    g = logits.grad
    assert g[1] < 0 and g[0] == 0 and g[2] == 0     # only the bag's max voxel is pushed up
    assert g[3] > 0 and g[4] > 0                    # normal frame: every voxel pushed down


def imbalanced(n=10_000):
    t = torch.zeros(n)
    t[1234] = 1.0
    return t, torch.ones(n, dtype=torch.bool), class_balanced_weights([n - 1, 1], 0.9999)


def test_extreme_imbalance_all_normal_is_not_a_minimum():
    t, valid, w = imbalanced()
    all_normal = torch.full((len(t),), -6.0, requires_grad=True)
    loss = focal_loss(all_normal, t, valid, w, gamma=2.0)
    loss.backward()
    assert all_normal.grad[1234] < 0                # raising the anomaly's logit lowers the loss
    separating = torch.where(t > 0, 3.0, -6.0)
    assert float(focal_loss(separating, t, valid, w, 2.0)) < loss.item()

    # One shared constant logit at the class prior, logit(1e-4): the minimum of unweighted BCE,
    # but the class-balanced focal loss still pushes it up, away from "everything normal".
    prior = math.log(1e-4 / (1 - 1e-4))
    for weights, gamma, push_up in ((w, 2.0, True), (w, 0.0, True), (torch.ones(2), 0.0, False)):
        c = torch.tensor(prior, requires_grad=True)
        focal_loss(c.expand(len(t)), t, valid, weights, gamma).backward()
        if push_up:
            assert c.grad < 0
        else:
            assert abs(float(c.grad)) < 1e-6


def test_ignore_mask_respected():
    torch.manual_seed(0)
    x, t = torch.randn(50), (torch.rand(50) < 0.2).float()
    valid = torch.rand(50) < 0.6
    w = torch.tensor([0.3, 1.7])
    base = focal_loss(x, t, valid, w)
    x2 = x.clone()
    x2[~valid] = torch.tensor([float("inf"), float("nan"), -1e9, 7.0]).repeat(50)[: int((~valid).sum())]
    x2.requires_grad_(True)
    loss = focal_loss(x2, t, valid, w)
    assert loss.item() == pytest.approx(float(base), rel=1e-6)
    loss.backward()
    assert torch.all(x2.grad[~valid] == 0) and torch.isfinite(x2.grad).all()


def test_all_ignored_gives_zero_with_gradient():
    x = torch.randn(20, requires_grad=True)
    none = torch.zeros(20, dtype=torch.bool)
    for loss in (focal_loss(x, torch.ones(20), none, torch.tensor([1.0, 1.0])),
                 bce_loss(x, torch.ones(20), none, 3.0)):
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(x.grad, torch.zeros(20))
        x.grad = None


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_large_logits_stay_finite(gamma):
    x = torch.tensor([200.0, -200.0, 200.0, -200.0], requires_grad=True)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss = focal_loss(x, t, torch.ones(4, dtype=torch.bool), torch.tensor([1.0, 1.0]), gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and loss.item() > 10


def batch(scene: bool, all_ignored: bool = False):
    torch.manual_seed(1)
    m, b = 60, 3
    bi = torch.arange(m) % b
    targets = torch.zeros(m)
    targets[[0, 3]] = 1.0                            # anomalies in frame 0 only
    valid = torch.zeros(m, dtype=torch.bool) if all_ignored else torch.rand(m) < 0.9
    t = Targets(targets, valid, bi, torch.tensor([1.0, 0.0, 0.0]))
    out = SpUNetOutput(torch.randn(m, requires_grad=True), torch.randn(b, requires_grad=True) if scene else None)
    return out, t


@pytest.mark.parametrize("kind", ["focal", "bce"])
@pytest.mark.parametrize("supervision", ["voxel", "scene", "mil"])
@pytest.mark.parametrize("scene_head", [False, True])
def test_every_path_runs_forward_and_backward(kind, supervision, scene_head):
    loss_fn = build_loss(LossConfig(kind=kind, supervision=supervision), class_counts=[5000, 5])
    out, t = batch(scene_head)
    if supervision == "scene" and not scene_head:
        with pytest.raises(ConfigError, match="scene_head"):
            loss_fn(out, t)
        return
    loss, parts = loss_fn(out, t)
    assert torch.isfinite(loss) and parts["total"] == pytest.approx(loss.item())
    assert set(parts) == ({"voxel", "scene", "total"} if scene_head else {"voxel", "total"})
    loss.backward()
    assert torch.isfinite(out.voxel_logits.grad).all() and out.voxel_logits.grad.abs().sum() > 0
    if scene_head:
        assert out.scene_logits.grad.abs().sum() > 0
    out, t = batch(scene_head, all_ignored=True)
    loss, _ = loss_fn(out, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.voxel_logits.grad).all()
    if not scene_head:
        assert loss.item() == 0.0


def test_build_loss_rejects_bad_config():
    with pytest.raises(ConfigError, match="loss.kind"):
        build_loss(LossConfig(kind="dice"), [1, 1])
    with pytest.raises(ConfigError, match="loss.supervision"):
        build_loss(LossConfig(supervision="pixel"), [1, 1])
    with pytest.raises(ConfigError, match="class counts"):
        build_loss(LossConfig(kind="focal"))
    build_loss(LossConfig(kind="focal", supervision="mil"))   # MIL needs no counts
