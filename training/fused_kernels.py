"""Triton kernels for the fast engine's decode step, and the Python wrappers that launch them."""

from __future__ import annotations

import torch
from torch import nn

try:  # Triton ships with CUDA builds of torch; without it the fast engine decodes with eager ops
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

TRITON_AVAILABLE = triton is not None


if triton is not None:
    # Each kernel computes in fp32 and rounds to the model dtype exactly where transformers' eager Qwen3
    # code rounds (after the normalisation, after each bf16 product and sum), so outputs match it to the
    # last ulp of rsqrt/exp and the reduction order.
    @triton.jit
    def _add_rms_norm_kernel(R, DELTA, H, Y, W, n_cols, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = row * n_cols + cols
        x = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:  # the residual add, rounded like the eager bf16 add, and stored as the new stream
            delta = tl.load(DELTA + offs, mask=mask, other=0.0).to(tl.float32)
            x = (x + delta).to(H.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(H + offs, x, mask=mask)
            x = x.to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        y = (x * r).to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, (w * y).to(Y.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    @triton.jit
    def _head_norm_rope_kernel(X, W, COS, SIN, Y, n_heads, eps, D: tl.constexpr):
        # One (row, head): RMSNorm over the head dim, then q*cos + rotate_half(q)*sin.
        row = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, D)
        rot = (d + D // 2) % D  # rotate_half reads the other half; its sign is applied below
        base = row * n_heads * D + head * D
        x = tl.load(X + base + d).to(tl.float32)
        xr = tl.load(X + base + rot).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(W + d).to(tl.float32)
        wr = tl.load(W + rot).to(tl.float32)
        n = (x * r).to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        n = (w * n).to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        nr = (xr * r).to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        nr = (wr * nr).to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        nr = tl.where(d < D // 2, -nr, nr)
        c = tl.load(COS + row * D + d).to(tl.float32)
        s = tl.load(SIN + row * D + d).to(tl.float32)
        a = (n * c).to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        b = (nr * s).to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(Y + base + d, (a + b).to(Y.dtype.element_ty, fp_downcast_rounding="rtne"))

    @triton.jit
    def _silu_mul_kernel(G, U, Y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + i, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        tl.store(Y + i, (act * u).to(Y.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def fused_rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``norm(x)`` for a [rows, dim] tensor (a transformers Qwen3RMSNorm)."""
    x = x.contiguous()  # the kernels index rows by pointer arithmetic; a no-op on the decode path
    y = torch.empty_like(x)
    block = triton.next_power_of_2(x.shape[-1])
    _add_rms_norm_kernel[(x.shape[0],)](
        x,
        x,
        x,
        y,
        norm.weight,
        x.shape[-1],
        norm.variance_epsilon,
        HAS_DELTA=False,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return y


def fused_add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, norm: nn.Module):
    """``h = residual + delta`` and ``norm(h)``, in one pass."""
    residual, delta = residual.contiguous(), delta.contiguous()
    h, y = torch.empty_like(residual), torch.empty_like(residual)
    block = triton.next_power_of_2(residual.shape[-1])
    _add_rms_norm_kernel[(residual.shape[0],)](
        residual,
        delta,
        h,
        y,
        norm.weight,
        residual.shape[-1],
        norm.variance_epsilon,
        HAS_DELTA=True,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return h, y


def fused_head_norm_rope(x: torch.Tensor, norm: nn.Module, cos, sin, n_heads: int) -> torch.Tensor:
    """Per-head ``norm`` then the rotary embedding, for x = [rows, heads*dim] and cos/sin = [rows, dim]."""
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    y = torch.empty_like(x)
    dim = x.shape[-1] // n_heads
    _head_norm_rope_kernel[(x.shape[0], n_heads)](
        x, norm.weight, cos, sin, y, n_heads, norm.variance_epsilon, D=dim
    )
    return y


def fused_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    _silu_mul_kernel[(triton.cdiv(gate.numel(), 1024),)](gate, up, y, gate.numel(), BLOCK=1024)
    return y
