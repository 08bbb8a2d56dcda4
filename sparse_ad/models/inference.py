"""Inference form of `SpUNet`: BatchNorm folded into the convs, optionally real fp16.

`fuse_for_inference(model)` returns a new `InferenceUNet` (the trained model is not touched)
that computes what `model.eval()` computes, with fewer launches per forward:

* every eval-mode BatchNorm is folded into the conv before it: with s = gamma / sqrt(var + eps),
  W' = W * s per output channel and b' = beta - mean * s, so the BN modules are gone;
* on CUDA the bias and a following ReLU run inside spconv's implicit-GEMM kernel (its
  inference-only epilogue, `act_type`); on CPU (Native algorithm) spconv refuses bias and
  activation, so we add the bias and apply ReLU in place on the conv's fresh output;
* `half=True` stores weights in fp16 and feeds fp16 features: in eval mode spconv calls its
  kernels outside the autograd functions that cast for `torch.autocast`, so under autocast
  they run fp32 SIMT kernels (H100 profile); real fp16 tensors get tensor cores.

Weight layout (spconv >= 2.2, `ALL_WEIGHT_IS_KRSC`, checked in spunet.py): (out, kx, ky, kz, in)
for every conv, including the inverse conv, so output channels are dim 0. One exception: a
1x1x1 stride-1 conv (`conv.conv1x1`) runs as `features @ weight.view(in, out)` when
`FILTER_HWIO` is false, i.e. its output channel is the fastest-varying index of the flat
weight. Both cases are handled in `_fold`; tests/test_inference.py checks the result against
the unfolded eval model.
"""

from __future__ import annotations

import copy

import spconv.pytorch as spconv
import torch
from cumm import tensorview as tv
from spconv.constants import FILTER_HWIO
from spconv.pytorch.conv import SparseConvolution
from torch import nn

from sparse_ad.config import DEFAULT_ENGINE, INFERENCE_ENGINES
from sparse_ad.errors import SparseADError
from sparse_ad.models.sparse_tensor import conv_algo
from sparse_ad.models.spunet import ResidualBlock, SpUNet, SpUNetOutput, check_features, heads, padded_shape


def _fold(conv: SparseConvolution, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of `bn(conv(x))` as one conv, from BN's running statistics (fp32 math)."""
    if conv.bias is not None:
        raise SparseADError("fold: expected a conv without bias (SpUNet builds them so)")
    w = conv.weight.detach().float()
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    bias = bn.bias.detach().float() - bn.running_mean.float() * scale
    if conv.conv1x1 and not FILTER_HWIO:   # used as weight.view(in, out): out is the last index
        w = (w.reshape(conv.in_channels, conv.out_channels) * scale).reshape(w.shape)
    else:                                  # KRSC: (out, k..., in)
        w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    return w, bias


class FusedConv(nn.Module):
    """A spconv conv with its BN folded in (bias) and an optional ReLU."""

    def __init__(self, conv: SparseConvolution, bn: nn.BatchNorm1d, relu: bool):
        super().__init__()
        w, b = _fold(conv, bn)
        self.conv = copy.deepcopy(conv)
        self.conv.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False)
        self.relu = relu
        self.in_kernel = False   # bias (+ ReLU) inside spconv's kernel; set by InferenceUNet

    def set_epilogue(self, in_kernel: bool) -> None:
        """CUDA implicit GEMM takes bias and ReLU in its epilogue (not the 1x1 mm path, not
        the CPU Native algorithm)."""
        self.in_kernel = in_kernel and not self.conv.conv1x1
        self.conv.bias = self.bias if self.in_kernel else None
        self.conv.act_type = (tv.gemm.Activation.ReLU if self.in_kernel and self.relu
                              else tv.gemm.Activation.None_)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        y = self.conv(x)
        if not self.in_kernel:   # y.features is the conv's own fresh output: in place is safe
            f = y.features.add_(self.bias)
            if self.relu:
                f.relu_()
        return y


class FusedBlock(nn.Module):
    def __init__(self, block: ResidualBlock):
        super().__init__()
        self.conv1 = FusedConv(block.conv1, block.bn1, relu=True)
        self.conv2 = FusedConv(block.conv2, block.bn2, relu=False)
        self.proj = None if block.proj is None else FusedConv(block.proj[0], block.proj[1], relu=False)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        y = self.conv2(self.conv1(x))
        skip = x.features if self.proj is None else self.proj(x).features
        y.features.add_(skip).relu_()   # relu(bn2(conv2) + skip), on conv2's fresh output
        return y


def _seq(s: spconv.SparseSequential) -> FusedConv:
    conv, bn, relu = s   # SpUNet's stem / down / up: conv, BN, ReLU
    assert isinstance(relu, nn.ReLU)
    return FusedConv(conv, bn, relu=True)


def copy_levels(dst: nn.Module, src: nn.Module, conv, block) -> None:
    """dst.{stem, enc0, down, enc, up, dec} = src's, each conv layer through `conv` and each
    residual block through `block` (the U-Net's layout in one place for its inference forms)."""
    dst.stem = conv(src.stem)
    dst.enc0 = nn.ModuleList(block(b) for b in src.enc0)
    dst.down = nn.ModuleList(conv(c) for c in src.down)
    dst.enc = nn.ModuleList(nn.ModuleList(block(b) for b in e) for e in src.enc)
    dst.up = nn.ModuleList(conv(c) for c in src.up)
    dst.dec = nn.ModuleList(nn.ModuleList(block(b) for b in d) for d in src.dec)


class InferenceUNet(nn.Module):
    """Eval-only `SpUNet` with folded BN; same input (fp32 features) and output (fp32 logits)."""

    def __init__(self, model: SpUNet, half: bool = False):
        super().__init__()
        self.in_channels = model.in_channels
        self.stride = model.stride
        copy_levels(self, model, _seq, FusedBlock)
        self.head = copy.deepcopy(model.head)
        self.scene = copy.deepcopy(model.scene)
        self.requires_grad_(False)
        self.eval()
        self.dtype = torch.float16 if half else torch.float32
        self.to(self.dtype)
        self._device_type = None

    def train(self, mode: bool = True):
        if mode:
            raise SparseADError("InferenceUNet is inference-only (BN is folded); train the SpUNet")
        return super().train(False)

    @torch.inference_mode()   # no autograd bookkeeping at all (cheaper per op than no_grad)
    def forward(self, x: spconv.SparseConvTensor) -> SpUNetOutput:
        check_features(x, self.in_channels)
        feats = x.features
        self._use_device(feats.device)
        x = spconv.SparseConvTensor(feats.to(self.dtype), x.indices, padded_shape(x.spatial_shape, self.stride),
                                    x.batch_size)
        x = self.stem(x)
        for blk in self.enc0:
            x = blk(x)
        skips = []
        for down, enc in zip(self.down, self.enc, strict=True):
            skips.append(x)
            x = down(x)
            for blk in enc:
                x = blk(x)
        for up, dec in zip(reversed(self.up), reversed(self.dec), strict=True):
            x = up(x)
            x = x.replace_feature(torch.cat([x.features, skips.pop().features], dim=1))
            for blk in dec:
                x = blk(x)
        return heads(self.head, self.scene, x.features, x.indices[:, 0], x.batch_size)

    def _use_device(self, device: torch.device) -> None:
        """Conv algorithm and bias/ReLU placement follow the input's device (as in SpUNet)."""
        if device.type != self._device_type:
            algo = conv_algo(device)
            for m in self.modules():
                if isinstance(m, SparseConvolution):
                    m.algo = algo
                elif isinstance(m, FusedConv):
                    m.set_epilogue(device.type == "cuda")
            self._device_type = device.type


def fuse_for_inference(model: SpUNet | InferenceUNet, half: bool = False, engine: str | None = "spconv",
                       gather: str | None = None) -> nn.Module:
    """A new inference-only model on `model`'s device; `model` itself is left as it is.
    `half` (CUDA only: spconv's CPU algorithm has no fp16 path worth using) stores fp16.
    `engine`: one of `config.INFERENCE_ENGINES`, or None for the device's `DEFAULT_ENGINE`.
    `gather`: how the gather engines gather rows (`gather_gemm.GATHER_MODES`; None: the device's
    `gather_gemm.DEFAULT_GATHER`)."""
    if engine is None:
        engine = DEFAULT_ENGINE[next(model.parameters()).device.type]
    if engine not in INFERENCE_ENGINES:
        raise SparseADError(f"inference engine: expected one of {INFERENCE_ENGINES}, found {engine!r}")
    device = next(model.parameters()).device
    if engine == "gather_gemm_graphs" and device.type != "cuda":
        raise SparseADError(f"inference engine gather_gemm_graphs replays CUDA graphs, and the model is on "
                            f"{device.type}; use --engine gather_gemm or spconv there")
    fused = model if isinstance(model, InferenceUNet) else InferenceUNet(model, half=half)
    if half and fused.dtype != torch.float16:   # an already folded model keeps its dtype
        raise SparseADError("fuse_for_inference: this model is already folded in float32; fold the SpUNet "
                            "with half=True instead")
    if engine.startswith("gather_gemm"):
        from sparse_ad.models.gather_gemm import GatherGemmUNet
        from sparse_ad.models.graphs import GraphedGatherGemm

        net = GatherGemmUNet(fused, gather=gather)
        return GraphedGatherGemm(net) if engine == "gather_gemm_graphs" else net
    return fused


def is_inference_model(model: nn.Module) -> bool:
    """A folded model (either engine): it carries its own dtype, autocast is not for it."""
    from sparse_ad.models.gather_gemm import GatherGemmUNet
    from sparse_ad.models.graphs import GraphedGatherGemm

    return isinstance(model, (InferenceUNet, GatherGemmUNet, GraphedGatherGemm))
