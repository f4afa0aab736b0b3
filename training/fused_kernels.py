"""Triton kernels for the fast engine's decode step, and the Python wrappers that launch them."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

try:  # Triton ships with CUDA builds of torch; without it the fast engine decodes with eager ops
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

TRITON_AVAILABLE = triton is not None
# triton.jit reads TRITON_INTERPRET when it defines the kernels below: set, they run in the CPU interpreter.
# (triton.knobs, which parses it, is new in Triton 3.4; torch 2.6/2.7 ship older Tritons.)
_knobs = getattr(triton, "knobs", None)
INTERPRETED = TRITON_AVAILABLE and (
    bool(_knobs.runtime.interpret)
    if _knobs is not None
    else os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
)


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
    def _head_norm_rope_kernel(X, W, COS, SIN, Y, n_heads, stride_x, eps, D: tl.constexpr, HEADS: tl.constexpr):
        # One (row, block of HEADS heads): RMSNorm over each head's dim, then q*cos + rotate_half(q)*sin. X's
        # rows are stride_x apart (a column block of a wider projection output), Y's are contiguous. Several
        # heads a program: one warp per head left 1,319 x 32 programs of 128 values each at the eval's decode
        # shape, each too small to keep the memory busy.
        row = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        d = tl.arange(0, D)
        rot = (d + D // 2) % D  # rotate_half reads the other half; its sign is applied below
        real = (h < n_heads)[:, None]
        x_offs = row * stride_x + h[:, None] * D
        x = tl.load(X + x_offs + d[None, :], mask=real, other=0.0).to(tl.float32)
        xr = tl.load(X + x_offs + rot[None, :], mask=real, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        w = tl.load(W + d).to(tl.float32)[None, :]
        wr = tl.load(W + rot).to(tl.float32)[None, :]
        n = _round(x * r, Y.dtype.element_ty)
        n = _round(w * n, Y.dtype.element_ty)
        nr = _round(xr * r, Y.dtype.element_ty)
        nr = _round(wr * nr, Y.dtype.element_ty)
        nr = tl.where(d[None, :] < D // 2, -nr, nr)
        c = tl.load(COS + row * D + d).to(tl.float32)[None, :]
        s = tl.load(SIN + row * D + d).to(tl.float32)[None, :]
        a = _round(n * c, Y.dtype.element_ty)
        b = _round(nr * s, Y.dtype.element_ty)
        y_offs = row * n_heads * D + h[:, None] * D + d[None, :]
        tl.store(Y + y_offs, _round(a + b, Y.dtype.element_ty).to(Y.dtype.element_ty), mask=real)

    @triton.jit
    def _silu_mul_kernel(G, U, Y, n_cols, stride_in, BLOCK: tl.constexpr):
        # One (row, block of columns). G and U may be column blocks of one wider tensor whose rows are
        # stride_in apart; a 2-D grid addresses them without a division per element.
        row = tl.program_id(0).to(tl.int64)  # rows x a fused gate/up stride passes 2**31 past ~110k rows
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        src = row * stride_in + cols
        g = tl.load(G + src, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + src, mask=mask, other=0.0).to(tl.float32)
        act = _round(g / (1.0 + tl.exp(-g)), Y.dtype.element_ty)
        tl.store(Y + row * n_cols + cols, _round(act * u, Y.dtype.element_ty).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_attention_kernel(
        Q, K, V, OUT, PART_ACC, PART_M, PART_SUM, PAD, POS, scale, stride_row, stride_head, stride_slot,
        K_NEW, V_NEW, stride_k_new, stride_v_new,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, WRITE_NEW: tl.constexpr,
    ):  # fmt: skip
        # One (row, KV head[, split]): its G query heads against cache slots [pad, pos] of that row, with
        # an online softmax (fp32) over blocks of BLOCK_N slots. Blocks wholly before the row's first real
        # slot are never read, nor any slot past pos. Operands go to the tensor cores as fp32 (TF32 for
        # bf16/fp16 data, which TF32 holds exactly; IEEE fp32 for fp32 data): Triton's CPU interpreter
        # cannot multiply bf16. NATIVE_DOT multiplies in the cache dtype instead (the same products: q, k
        # and the rounded p are all exact in it; GPU only for bf16).
        # With SPLITS > 1 (flash decoding), program ``split`` takes every SPLITS-th share of the row's
        # blocks and writes its unnormalised sum, max and softmax total for _decode_attention_reduce.
        # WRITE_NEW: this step's K/V (K_NEW/V_NEW rows stride_k_new/stride_v_new apart, heads contiguous) go
        # to slot pos first. Only the program whose share holds pos reads that slot, after a barrier that
        # makes its threads' stores visible to all of them: the loop stays as it is (substituting the new
        # K/V for the loaded slot in registers instead doubles its registers on sm_90, 86 to 168).
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        q_offs = row * tl.num_programs(1) * G * D + (head * G + g[:, None]) * D + d[None, :]
        q = tl.load(Q + q_offs, mask=g[:, None] < G, other=0.0)
        if not NATIVE_DOT:
            q = q.to(tl.float32)
        pad = tl.load(PAD + row)
        pos = tl.load(POS)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        base = row * stride_row + head * stride_head
        first = pad // BLOCK_N * BLOCK_N
        blocks = (pos + 1 - first + BLOCK_N - 1) // BLOCK_N
        share = (blocks + SPLITS - 1) // SPLITS * BLOCK_N
        lo = first + split * share
        hi = lo + share
        if hi > pos + 1:
            hi = pos + 1
        if WRITE_NEW:
            if (lo <= pos) & (pos < hi):  # one program per (row, head): the shares split [first, pos]
                k_new = tl.load(K_NEW + row * stride_k_new + head * D + d)
                v_new = tl.load(V_NEW + row * stride_v_new + head * D + d)
                tl.store(K + base + pos * stride_slot + d, k_new)
                tl.store(V + base + pos * stride_slot + d, v_new)
            tl.debug_barrier()
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            real = (n >= pad) & (n <= pos)
            offs = base + n[:, None] * stride_slot + d[None, :]
            k = tl.load(K + offs, mask=real[:, None], other=0.0)
            if not NATIVE_DOT:
                k = k.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(real[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            decay = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            total = total * decay + tl.sum(p, axis=1)
            v = tl.load(V + offs, mask=real[:, None], other=0.0)
            p = _round(p, V.dtype.element_ty)
            if NATIVE_DOT:
                p = p.to(V.dtype.element_ty)
            else:
                v = v.to(tl.float32)
            acc = acc * decay[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m = m_new
        if SPLITS == 1:
            tl.store(OUT + q_offs, (acc / total[:, None]).to(OUT.dtype.element_ty), mask=g[:, None] < G)
        else:
            # Only the G real query heads: the partials' traffic is what splitting costs.
            part = (row * tl.num_programs(1) + head) * SPLITS + split
            tl.store(PART_ACC + part * G * D + g[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
            tl.store(PART_M + part * G + g, m, mask=g < G)
            tl.store(PART_SUM + part * G + g, total, mask=g < G)

    @triton.jit
    def _decode_attention_reduce(
        OUT, PART_ACC, PART_M, PART_SUM, n_kv,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        # One (row, KV head): the splits' partial softmax sums rescaled to their common max and added.
        row = tl.program_id(0)
        head = tl.program_id(1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        first = (row * n_kv + head) * SPLITS
        real = g < G
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        for s in range(SPLITS):
            m = tl.maximum(m, tl.load(PART_M + (first + s) * G + g, mask=real, other=0.0))
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for s in range(SPLITS):
            m_s = tl.load(PART_M + (first + s) * G + g, mask=real, other=0.0)
            weight = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m))  # an empty split adds nothing
            total += weight * tl.load(PART_SUM + (first + s) * G + g, mask=real, other=1.0)
            part = tl.load(
                PART_ACC + (first + s) * G * D + g[:, None] * D + d[None, :], mask=real[:, None], other=0.0
            )
            acc += weight[:, None] * part
        offs = row * n_kv * G * D + (head * G + g[:, None]) * D + d[None, :]
        tl.store(OUT + offs, (acc / total[:, None]).to(OUT.dtype.element_ty), mask=g[:, None] < G)


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
    if x.stride(-1) != 1:  # rows may be strided (a column block of a wider output), columns not
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dim = x.shape[-1] // n_heads
    heads = min(8, triton.next_power_of_2(n_heads))
    _head_norm_rope_kernel[(x.shape[0], triton.cdiv(n_heads, heads))](
        x, norm.weight, cos, sin, y, n_heads, x.stride(0), norm.variance_epsilon, D=dim, HEADS=heads,
        num_warps=max(1, heads // 2),
    )  # fmt: skip
    return y


def fused_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, for [..., cols] tensors; two column blocks of one [rows, wider] tensor are read in
    place."""
    shape = gate.shape
    blocks = gate.dim() == 2 and gate.stride() == up.stride() and gate.stride(-1) == 1
    if not blocks:
        gate, up = gate.contiguous().view(-1, shape[-1]), up.contiguous().view(-1, shape[-1])
    rows, cols = gate.shape
    y = torch.empty((rows, cols), dtype=gate.dtype, device=gate.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(cols, block))](gate, up, y, cols, gate.stride(0), BLOCK=block)
    return y.view(shape)


@dataclass(frozen=True)
class DecodeAttentionConfig:
    """Launch configuration of the Triton decode attention.

    The default is the fastest of ``bench.tune_decode_attention``'s sweep on one NVIDIA H200 (2026-12-01,
    bench/README.md): 0.122 ms a call at the eval's decode shape, 81% of the 4.8 TB/s datasheet bandwidth,
    within 0.5 ulp of SDPA's largest term (the former default, ``block_n=64`` with fp32 products: 0.153 ms,
    64%).

    ``block_n`` cache slots per loop step, ``num_warps``/``num_stages`` as Triton takes them (None: Triton's
    default), ``splits`` > 1 splits each row's slots across that many programs and adds their partial
    softmax sums in a second kernel (flash decoding), ``native_dot`` multiplies in the cache dtype instead
    of fp32/TF32 (same products; not in the CPU interpreter, see ``fused_decode_attention``).
    """

    block_n: int = 32
    num_warps: int | None = 4
    num_stages: int | None = 3
    splits: int = 1
    native_dot: bool = True

    @classmethod
    def parse(cls, spec: str | None) -> DecodeAttentionConfig:
        """``"block_n=32,num_warps=4,num_stages=2,splits=2,native_dot=1"`` (any subset; the rest: default's)."""
        fields = {}
        for item in filter(None, (part.strip() for part in (spec or "").split(","))):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__ or not value:
                raise ValueError(
                    f"decode attention setting {item!r}: expected key=value with key in "
                    f"{', '.join(cls.__dataclass_fields__)}"
                )
            fields[key] = bool(int(value)) if key == "native_dot" else int(value)
        config = cls(**fields)
        if config.block_n < 16 or config.block_n & (config.block_n - 1) or config.splits < 1:
            raise ValueError(f"decode attention {spec!r}: block_n must be a power of two >= 16, splits >= 1")
        return config

    def spec(self) -> str:
        """The ``parse`` string of this configuration."""
        return ",".join(
            f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in asdict(self).items() if v is not None
        )


def fused_decode_attention(
    q,
    k_cache,
    v_cache,
    pad,
    pos,
    *,
    scale: float,
    config: DecodeAttentionConfig | None = None,
    new_k: torch.Tensor | None = None,
    new_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per row against its cache slots [pad[row], pos]; q = [rows, heads*dim].

    ``k_cache``/``v_cache`` are [rows, kv_heads, slots, dim] (any row stride); the query heads that share
    a KV head read its cache once. Softmax in fp32, the probabilities rounded to the cache dtype for the
    product with V, as flash attention does. Returns [rows, heads*dim].

    With ``new_k``/``new_v`` (this step's K/V, [rows, kv_heads*dim] or [rows, kv_heads, 1, dim], rows may be
    strided), the kernel first writes them to slot pos, as ``index_copy_(2, pos, ...)`` on both caches before
    the call would (two launches less per layer); every row needs pad[row] <= pos, as decoding has.
    """
    config = config or DecodeAttentionConfig()
    rows, kv_heads, _, dim = k_cache.shape
    write_new = new_k is not None
    if write_new != (new_v is not None):
        raise ValueError("new_k and new_v go together: pass both (this step's K/V) or neither")
    if write_new:
        if new_k.dtype != k_cache.dtype or new_v.dtype != v_cache.dtype:
            raise ValueError(f"new K/V ({new_k.dtype}, {new_v.dtype}) must have the cache's dtype {k_cache.dtype}")
        new_k, new_v = (_rows_of_heads(t, rows, kv_heads * dim) for t in (new_k, new_v))
    else:
        new_k = new_v = k_cache  # never read
    groups = q.shape[-1] // (kv_heads * dim)
    g_pad = max(16, triton.next_power_of_2(groups))
    q = q.contiguous()
    out = torch.empty_like(q)
    splits = config.splits
    # Triton's CPU interpreter cannot multiply bf16 (Triton 3.6's bf16 dot returns garbage there): the fp32
    # path computes the same products (q, k and the rounded probabilities are exact in fp32).
    native_dot = config.native_dot and not INTERPRETED
    if splits > 1:  # fp32 partial results, rounded once in the reduction
        part_acc = torch.empty((rows * kv_heads * splits, groups, dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((rows * kv_heads * splits, groups), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_sum = out
    launch = {k: v for k, v in (("num_warps", config.num_warps), ("num_stages", config.num_stages)) if v}
    _decode_attention_kernel[(rows, kv_heads, splits)](
        q, k_cache, v_cache, out, part_acc, part_m, part_sum, pad, pos, scale,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), new_k, new_v, new_k.stride(0), new_v.stride(0),
        G=groups, G_PAD=g_pad, D=dim, BLOCK_N=config.block_n, SPLITS=splits, NATIVE_DOT=native_dot,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is exact on bf16/fp16 values
        WRITE_NEW=write_new,
        **launch,
    )  # fmt: skip
    if splits > 1:
        _decode_attention_reduce[(rows, kv_heads)](
            out, part_acc, part_m, part_sum, kv_heads, G=groups, G_PAD=g_pad, D=dim, SPLITS=splits
        )
    return out


def _rows_of_heads(x: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """``x`` as [rows, width] with contiguous columns, a view where its layout allows (a column block of a
    wider projection output keeps its row stride)."""
    x = x.reshape(rows, width)
    return x if x.stride(-1) == 1 else x.contiguous()
