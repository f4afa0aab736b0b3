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
    def _round(x, DTYPE: tl.constexpr):
        """fp32 ``x`` rounded to ``DTYPE`` (nearest, ties to even), returned as fp32.

        bf16 is rounded on the bits: the GPU's conversion does the same, but Triton's CPU interpreter
        truncates, and the interpreter is how these kernels are tested without a GPU.
        """
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        elif DTYPE == tl.float32:
            return x
        else:
            return x.to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)

    @triton.jit
    def _add_rms_norm_kernel(R, DELTA, H, Y, W, n_cols, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = row * n_cols + cols
        x = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:  # the residual add, rounded like the eager bf16 add, and stored as the new stream
            delta = tl.load(DELTA + offs, mask=mask, other=0.0).to(tl.float32)
            x = _round(x + delta, H.dtype.element_ty)
            tl.store(H + offs, x.to(H.dtype.element_ty), mask=mask)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        y = _round(x * r, Y.dtype.element_ty)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, _round(w * y, Y.dtype.element_ty).to(Y.dtype.element_ty), mask=mask)

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
        n = _round(x * r, Y.dtype.element_ty)
        n = _round(w * n, Y.dtype.element_ty)
        nr = _round(xr * r, Y.dtype.element_ty)
        nr = _round(wr * nr, Y.dtype.element_ty)
        nr = tl.where(d < D // 2, -nr, nr)
        c = tl.load(COS + row * D + d).to(tl.float32)
        s = tl.load(SIN + row * D + d).to(tl.float32)
        a = _round(n * c, Y.dtype.element_ty)
        b = _round(nr * s, Y.dtype.element_ty)
        tl.store(Y + base + d, _round(a + b, Y.dtype.element_ty).to(Y.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(G, U, Y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + i, mask=mask, other=0.0).to(tl.float32)
        act = _round(g / (1.0 + tl.exp(-g)), Y.dtype.element_ty)
        tl.store(Y + i, _round(act * u, Y.dtype.element_ty).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_attention_kernel(
        Q, K, V, OUT, PAD, POS, scale, stride_row, stride_head, stride_slot,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        # One (row, KV head): its G query heads against cache slots [pad, pos] of that row, with an
        # online softmax (fp32) over blocks of BLOCK_N slots. Blocks wholly before the row's first real
        # slot are never read, nor any slot past pos. Operands go to the tensor cores as fp32 (TF32 for
        # bf16/fp16 data, which TF32 holds exactly; IEEE fp32 for fp32 data): Triton's CPU interpreter
        # cannot multiply bf16.
        row = tl.program_id(0)
        head = tl.program_id(1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        q_offs = row * tl.num_programs(1) * G * D + (head * G + g[:, None]) * D + d[None, :]
        q = tl.load(Q + q_offs, mask=g[:, None] < G, other=0.0).to(tl.float32)
        pad = tl.load(PAD + row)
        pos = tl.load(POS)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        base = row * stride_row + head * stride_head
        for start in range(pad // BLOCK_N * BLOCK_N, pos + 1, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            real = (n >= pad) & (n <= pos)
            offs = base + n[:, None] * stride_slot + d[None, :]
            k = tl.load(K + offs, mask=real[:, None], other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(real[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            decay = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            total = total * decay + tl.sum(p, axis=1)
            v = tl.load(V + offs, mask=real[:, None], other=0.0).to(tl.float32)
            p = _round(p, V.dtype.element_ty)
            acc = acc * decay[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m = m_new
        tl.store(OUT + q_offs, (acc / total[:, None]).to(OUT.dtype.element_ty), mask=g[:, None] < G)


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
    # One warp per (row, head): a 128-wide reduction needs no shared memory between warps.
    _head_norm_rope_kernel[(x.shape[0], n_heads)](
        x, norm.weight, cos, sin, y, n_heads, norm.variance_epsilon, D=dim, num_warps=1
    )
    return y


def fused_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    _silu_mul_kernel[(triton.cdiv(gate.numel(), 1024),)](gate, up, y, gate.numel(), BLOCK=1024)
    return y


def fused_decode_attention(q, k_cache, v_cache, pad, pos, *, scale: float) -> torch.Tensor:
    """One query token per row against its cache slots [pad[row], pos]; q = [rows, heads*dim].

    ``k_cache``/``v_cache`` are [rows, kv_heads, slots, dim] (any row stride); the query heads that share
    a KV head read its cache once. Softmax in fp32, the probabilities rounded to the cache dtype for the
    product with V, as flash attention does. Returns [rows, heads*dim].
    """
    rows, kv_heads, _, dim = k_cache.shape
    groups = q.shape[-1] // (kv_heads * dim)
    q = q.contiguous()
    out = torch.empty_like(q)
    _decode_attention_kernel[(rows, kv_heads)](
        q, k_cache, v_cache, out, pad, pos, scale,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        G=groups, G_PAD=max(16, triton.next_power_of_2(groups)), D=dim, BLOCK_N=64,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is exact on bf16/fp16 values
    )  # fmt: skip
    return out
