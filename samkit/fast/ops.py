"""Kernels and checks the fast modules share: fused linear layers, subnormal flushing, plain layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN_LINEAR = _onednn_linear_available()
_FP32_ONEDNN_MIN_ROWS = 64  # below this many rows fp32 linears take the plain path (see linear_fn)
# The smallest normal float32, as the bits of an int32: positive floats order as their bits do.
_FP32_MIN_NORMAL_BITS = 0x00800000


def plain(*layers: nn.Module) -> bool:
    """Whether every layer is exactly ``nn.Linear`` (or ``nn.ConvTranspose2d``), so that reading its
    ``weight`` and ``bias`` is the same as calling it. A wrapped layer (a LoRA adapter of ``peft``,
    a quantised layer, a subclass, a parametrised layer) is not: the fast modules then call the reference code, which calls
    the layer. A layer with forward hooks is not plain either: they run only when it is called."""
    return all(
        type(layer) in (nn.Linear, nn.ConvTranspose2d)
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
        for layer in layers
    )


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def flush_subnormal_probs(p: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (>= 0, fp32) with the subnormal ones (below 1.2e-38) set to zero.

    Softmax over thousands of keys leaves the far keys' weights at exp(-100) and the like:
    subnormal floats, on which x86 CPUs multiply many times slower unless the thread flushes them
    (torch.set_flush_denormal reaches the calling thread only, not the GEMM's worker threads). Their
    products with the values are subnormal too and vanish in the fp32 sums beside the normal
    weights' terms (row sums are 1), so the result is unchanged. The test reads the bits as integers
    (a float comparison of a subnormal is itself slow): in place in inference (negative bits, which
    no probability has, go to zero too), out of place where autograd needs the input. CPU only;
    other dtypes and devices, and traced graphs, get ``p`` as it is.
    """
    if p.device.type != "cpu" or p.dtype != torch.float32 or torch.jit.is_tracing():
        return p
    bits = p.view(torch.int32)
    if torch.is_grad_enabled() and p.requires_grad:
        return p.masked_fill(bits < _FP32_MIN_NORMAL_BITS, 0.0)
    torch.threshold_(bits, _FP32_MIN_NORMAL_BITS - 1, 0)  # one in-place pass: bits <= threshold -> 0
    return p


def linear_fn(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"
) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))`` with ``activation`` "none", "gelu" (exact) or "relu".

    On the CPU without autograd this is one oneDNN call with the bias and the activation in the
    matmul's epilogue: no separate passes that copy the bias into the output (what addmm does) or
    apply the activation. Elsewhere (GPU, training, torch.compile, fp16) it is the plain PyTorch
    composition, and so are fp32 calls on a few rows (the decoder's prompt tokens), where oneDNN's
    per-call setup costs more than the separate passes.
    """
    if (
        ONEDNN_LINEAR
        and x.device.type == "cpu"
        and (
            x.dtype == torch.bfloat16
            or (x.dtype == torch.float32 and x.numel() >= _FP32_ONEDNN_MIN_ROWS * x.shape[-1])
        )
        and weight.dtype == x.dtype
        and not needs_grad(x, weight)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    ):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, activation, [], "none")
        return out.view(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "relu":
        return F.relu(y)
    return y


def linear(x: torch.Tensor, layer: nn.Module, activation: str = "none") -> torch.Tensor:
    """``activation(layer(x))``: fused (:func:`linear_fn`) for a plain ``nn.Linear``, else the layer is
    called (an adapter-wrapped layer keeps its adapter)."""
    if plain(layer):
        return linear_fn(x, layer.weight, layer.bias, activation)
    y = layer(x)
    return F.gelu(y) if activation == "gelu" else F.relu(y) if activation == "relu" else y


def fused_activation(act: nn.Module) -> str | None:
    """The :func:`linear_fn` name of an activation module, or None when it has none."""
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    if type(act) is nn.ReLU:
        return "relu"
    return None
