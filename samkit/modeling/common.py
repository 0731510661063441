"""Small building blocks shared by the encoder and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear_available()


# The smallest normal float32, as the bits of an int32: positive floats order as their bits do.
_FP32_MIN_NORMAL_BITS = 0x00800000


def flush_subnormal_probs(p: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (>= 0, fp32) with the subnormal ones (below 1.2e-38) set to zero.

    Softmax over thousands of keys leaves the far keys' weights at exp(-100) and the like:
    subnormal floats, on which x86 CPUs multiply tens of times slower unless the thread flushes them
    (torch.set_flush_denormal reaches the calling thread only, not the GEMM's worker threads). In
    the decoder's prompt-to-image attention of a trained model about 1 weight in 5 is subnormal and
    the value GEMM ran at 50 GFLOP/s instead of 300. Their products with the values are subnormal
    too and vanish in the fp32 sums beside the normal weights' terms (row sums are 1), so the
    result is unchanged. The test reads the bits as integers (a float comparison of a subnormal is
    itself slow): in place in inference (negative bits, which no probability has, go to zero too),
    out of place where autograd needs the input. CPU only;
    other dtypes and devices, and traced graphs, get ``p`` as it is.
    """
    if p.device.type != "cpu" or p.dtype != torch.float32 or torch.jit.is_tracing():
        return p  # (an exported graph runs elsewhere: ONNX Runtime flushes subnormals itself)
    bits = p.view(torch.int32)
    if torch.is_grad_enabled() and p.requires_grad:
        return p.masked_fill(bits < _FP32_MIN_NORMAL_BITS, 0.0)
    # One in-place pass over the bits (bits <= threshold -> 0): 14x faster than a comparison into a
    # bool mask and a masked fill (0.75 -> 0.05 ms for 4 prompts' 56 x 4096 weights).
    torch.threshold_(bits, _FP32_MIN_NORMAL_BITS - 1, 0)
    return p


_FP32_ONEDNN_MIN_ROWS = 64  # below this many rows fp32 linears take the plain path (see linear_fn)


def version_key(t: torch.Tensor) -> tuple | None:
    """What tells whether ``t`` still holds the data it held: its memory and its version counter (an
    in-place change bumps it). None for an inference tensor (made under ``torch.inference_mode``,
    such as a model built there), which counts no versions: a cache must not keep anything of it."""
    if t.is_inference():
        return None
    return (t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride())


_FP32_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def fp32_param(t: torch.Tensor) -> torch.Tensor:
    """``t.float()`` for inference, kept for the next call while ``t`` (the same tensor object) holds
    the same data: same memory, no in-place change since (a state-dict load or an optimizer step
    bumps its version). For the decoder's fp32 token stream (see ``MaskDecoder._token_dtype``)."""
    if t.dtype == torch.float32:
        return t
    key = version_key(t)
    if key is None:
        return t.float()
    kept = _FP32_COPIES.get(t)
    if kept is None or kept[0] != key:
        kept = (key, t.float())
        _FP32_COPIES[t] = kept
    return kept[1]


_ACTIVATIONS = {"none": lambda y: y, "gelu": F.gelu, "relu": F.relu}


def token_linear(x: torch.Tensor, layer: nn.Linear, activation: str = "none") -> torch.Tensor:
    """``activation(layer(x))``, where ``x`` may be fp32 tokens of a 16-bit layer (inference): then
    with fp32 copies of its weights (:func:`fp32_param`) and an fp32 result."""
    if x.dtype == torch.float32 != layer.weight.dtype:
        bias = None if layer.bias is None else fp32_param(layer.bias)
        return _ACTIVATIONS[activation](F.linear(x, fp32_param(layer.weight), bias))
    return _ACTIVATIONS[activation](layer(x))


def token_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(x)``, where ``x`` may be fp32 tokens of a 16-bit layer norm (as :func:`token_linear`)."""
    if norm.weight is not None and x.dtype == torch.float32 != norm.weight.dtype:
        return F.layer_norm(
            x, norm.normalized_shape, fp32_param(norm.weight), fp32_param(norm.bias), norm.eps
        )
    return norm(x)


def linear(x: torch.Tensor, layer: nn.Linear, activation: str = "none") -> torch.Tensor:
    """``activation(layer(x))`` with ``activation`` one of "none", "gelu" (exact, erf) or "relu"."""
    return linear_fn(x, layer.weight, layer.bias, activation)


def linear_fn(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"
) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))``.

    On the CPU without autograd this is one oneDNN call with the bias and the activation in the
    matmul's epilogue: no separate pass that copies the bias into the output (what addmm does) or
    applies the activation (measured 1.5x faster for the encoder's 768->3072 GELU layer in fp32).
    Elsewhere (GPU, training, torch.compile, fp16) it is the plain PyTorch composition, and so are
    fp32 calls on a few rows (the decoder's prompt tokens), where oneDNN's per-call setup costs more
    than the separate passes (7 tokens, 256->2048: 100 us against 50 us).
    """
    if (
        _ONEDNN_LINEAR
        and x.device.type == "cpu"
        and (
            x.dtype == torch.bfloat16
            or (x.dtype == torch.float32 and x.numel() >= _FP32_ONEDNN_MIN_ROWS * x.shape[-1])
        )
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
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


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a BxCxHxW tensor (statistics per pixel)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last layer_norm is one fused kernel (and computes in fp32 for bf16/fp16 inputs).
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (the transformer feed-forward block)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = {nn.GELU: "gelu", nn.ReLU: "relu"}.get(type(self.act))
        if fused is None or getattr(self.act, "approximate", "none") != "none":
            if x.dtype == torch.float32 != self.lin1.weight.dtype:  # fp32 tokens, 16-bit weights
                return token_linear(self.act(token_linear(x, self.lin1)), self.lin2)
            return self.lin2(self.act(self.lin1(x)))
        if x.dtype == torch.float32 != self.lin1.weight.dtype:
            return token_linear(token_linear(x, self.lin1, fused), self.lin2)
        return linear(linear(x, self.lin1, fused), self.lin2)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the hypernetwork and IoU heads), and a
    sigmoid on the output with ``sigmoid_output``."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = token_linear(x, layer, "relu" if i < last else "none")
        return torch.sigmoid(x) if self.sigmoid_output else x
