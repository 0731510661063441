"""The fused relative-position attention kernel (Triton) against the dense-bias attention.

Without a GPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors, in a
subprocess because the variable is read when Triton compiles); on a machine with CUDA the same checks
run on the GPU in bf16. Elsewhere (no Triton, CPU, training) the encoder keeps the dense path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from samkit.fast import accelerate
from samkit.fast import rel_pos_kernel as fused
from samkit.fast.encoder import FastAttention
from samkit.modeling.image_encoder import Attention

pytest.importorskip("triton")

INTERPRETED = textwrap.dedent(
    r"""
    import json, torch, torch.nn.functional as F
    from samkit.fast import accelerate, rel_pos_kernel as fused
    from samkit.modeling.image_encoder import Attention

    results = {}
    torch.manual_seed(0)
    for gh, gw, d, dtype in [(6, 10, 64, torch.float32), (5, 7, 80, torch.float32), (6, 10, 64, torch.float16)]:
        n, length = 3, gh * gw
        q, k, v = (torch.randn(n, length, d) for _ in range(3))
        rel_h, rel_w = torch.randn(n, length, gh), torch.randn(n, length, gw)
        bias = (rel_h.view(n, length, gh, 1) + rel_w.view(n, length, 1, gw)).reshape(n, length, length)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=d**-0.5)
        args = [t.to(dtype) for t in (q, k, v, rel_h, rel_w)]
        out = fused.rel_pos_attention(*args, (gh, gw), d**-0.5)
        results[f"kernel {gh}x{gw} d{d} {dtype}"] = [(out.float() - ref).abs().max().item(), str(out.dtype)]

    # The fast encoder attention takes the kernel for half-precision inference when it is available;
    # the reference one (samkit.modeling) gives the dense result.
    attn = Attention(64, 2, use_rel_pos=True, input_size=(6, 10))
    torch.nn.init.normal_(attn.rel_pos_h, std=0.5)
    torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
    x = torch.randn(2, 6, 10, 64)
    with torch.no_grad():
        dense = attn(x)
        calls = []
        op = fused._op()
        fused._op = lambda: (lambda *a: calls.append(1) or op(*a))
        half = accelerate(attn).half()(x.half()).float()
    results["encoder attention fp16"] = [(half - dense).abs().max().item(), len(calls)]
    print(json.dumps(results))
    """
)


def test_kernel_matches_dense_bias_attention_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for name, (err, extra) in results.items():
        if name.startswith("kernel"):
            tol = 1e-5 if "float32" in name else 5e-3
            assert err < tol, (name, err)
            assert extra == name.split()[-1], (name, extra)  # output dtype = input dtype
    err, calls = results["encoder attention fp16"]
    assert calls == 1 and err < 2e-2, (err, calls)


def test_without_gpu_or_interpreter_the_dense_path_runs(monkeypatch):
    """On CPU (no interpreter) the kernel is never used: the fast attention's inference and training
    take the dense path and agree with the reference; the switch turns the kernel off everywhere."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 4, 8)
    assert not fused.available(q)
    monkeypatch.setattr(fused, "ENABLED", False)
    assert not fused.available(q.to("meta"))
    torch.manual_seed(0)
    reference = Attention(32, 4, use_rel_pos=True, input_size=(6, 10))
    torch.nn.init.normal_(reference.rel_pos_h)
    attn = accelerate(reference)
    assert isinstance(attn, FastAttention)
    x = torch.randn(2, 6, 10, 32)
    with torch.no_grad():
        inference = attn(x)
        torch.testing.assert_close(reference(x), inference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x).detach(), inference, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused():
    q = torch.randn(2, 12, 8)
    with pytest.raises(ValueError, match="3x5 grid"):
        fused.rel_pos_attention(q, q, q, torch.randn(2, 12, 3), torch.randn(2, 12, 5), (3, 5), 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grid, d", [((64, 64), 64), ((14, 14), 64), ((64, 64), 80), ((6, 10), 64)])
def test_kernel_on_gpu_bf16(grid, d):
    gh, gw = grid
    n, length = 12, gh * gw
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(n, length, d, device="cuda", generator=g) for _ in range(3))
    rel_h = torch.randn(n, length, gh, device="cuda", generator=g)
    rel_w = torch.randn(n, length, gw, device="cuda", generator=g)
    bias = (rel_h.view(n, length, gh, 1) + rel_w.view(n, length, 1, gw)).reshape(n, length, length)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=d**-0.5)
    out = fused.rel_pos_attention(*(t.bfloat16() for t in (q, k, v, rel_h, rel_w)), grid, d**-0.5)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
