"""Fast greedy generation for Qwen3 models: merged LoRA, a static KV cache and CUDA-graph decode steps.

Why not HF ``generate``: it spends ~30 ms of host time per decode step whatever the batch size, and an
unmerged LoRA adds ~1.8x on top (bench/README.md). This engine runs the same greedy algorithm with

- the adapter merged into the base weights in place for the duration of one call (exact restore after:
  the original weights are kept and copied back, never subtracted);
- its own decode loop over the HF modules (norms, projections, rotary embedding), a preallocated KV
  cache and, on CUDA, one captured graph per (batch size, context bucket): a decode step is one graph
  replay, so the host never waits for the GPU except once every ``stop_check_every`` steps;
- prompts sorted by length, left padded and split into equal batches as large as memory allows;
- on CUDA, Triton kernels (``training.fused_kernels``) for the decode step's norms, rotary embedding and
  SiLU gate (checked against the eager ops at start; eager ops otherwise).

Outputs are HF ``generate``'s greedy outputs (same stop tokens, ``min_new_tokens`` handling, pad after a
stop), which tests/test_fast_generate.py checks token for token on CPU.

With ``sampling`` (``Sampling``: temperature and top-k, as HF's warpers apply them) the decode step samples
instead, inside the captured graph, and each token's log-probability under the distribution it was drawn from
comes back with it (what GRPO rollouts need; ``training.rollouts``). See ``sample_tokens`` for why sampling is
an exponential race on a dedicated generator rather than ``torch.multinomial``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb, repeat_kv, rotate_half

from eval_artifacts.study.errors import ConfigError
from training.fused_kernels import (
    TRITON_AVAILABLE,
    DecodeAttentionConfig,
    fused_add_rms_norm,
    fused_decode_attention,
    fused_head_norm_rope,
    fused_rms_norm,
    fused_silu_mul,
)
from training.generate import SAMPLING_FALLBACK, Generation, GenerationEngine

# Stop ids the min_new_tokens ban holds without resizing (a call with more drops the captured graphs).
_STOP_ID_SLOTS = 8

# The prefill's attention backends, in SDPA's order of preference: every one but cuDNN's.
_PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class FastCompletion:
    """One prompt's greedy completion, as HF ``generate`` would return it."""

    token_ids: list[int]
    """Generated tokens up to and including the first stop token (no padding)."""
    finish_reason: str
    """"stop" when a stop token was generated, "length" when ``max_new_tokens`` ran out first."""
    logprobs: list[float] | None = None
    """Sampled runs only: each token's log-probability under the (temperature, top-k) distribution it was
    drawn from, one per entry of ``token_ids``."""


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: HF's ``do_sample=True`` with ``temperature`` and ``top_k`` (0: no cut)."""

    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    """Seeds the engine's own generator: same seed and inputs, same tokens."""

    def __post_init__(self) -> None:
        if not self.temperature > 0 or self.top_k < 0:
            raise ValueError(f"sampling needs temperature > 0 and top_k >= 0, got {self}")

    @property
    def graph_key(self) -> tuple[float, int]:
        """What a captured decode step bakes in; the seed is read from the generator at each replay."""
        return (self.temperature, self.top_k)

    def batch_seed(self, batch: int) -> int:
        """The generator's seed for the call's ``batch``-th batch, set after its graph captures (whose warm-up
        steps draw too), so a call's tokens do not depend on which graphs earlier calls left captured."""
        return (self.seed * 1_000_003 + batch) % 2**63


def sample_tokens(
    logits: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [rows, vocab], drawn as HF's sampling draws it; returns (tokens, logprobs).

    The distribution is HF's: fp32 logits divided by ``temperature``, then every token below the ``top_k``-th
    largest set to -inf (ties with it kept, as ``TopKLogitsWarper`` keeps them). A logprob is the token's
    log-softmax under that distribution (what vLLM's ``processed_logprobs`` reports to TRL).

    The draw is an exponential race, ``argmax(log p - log E)`` with ``E ~ Exp(1)`` per token, which picks token
    i with probability p_i (the Gumbel-max trick: ``-log E`` is Gumbel). Unlike ``torch.multinomial`` it is a
    fixed sequence of elementwise kernels, an ``exponential_`` and an argmax: no data-dependent host sync or
    validation, so it can be captured in a CUDA graph. Its randomness comes from ``generator``; a graph that
    draws from a generator other than the device's default must register it (``register_generator_state``)
    before capture, and then each replay advances that generator's Philox offset, so replays draw fresh numbers
    and reseeding between calls is honoured.
    """
    scaled = logits.float() / temperature
    if top_k:
        kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    logp = scaled.log_softmax(dim=-1)
    race = torch.empty_like(logp).exponential_(generator=generator)
    # exponential_ may return 0 for a uniform draw of exactly 0; -log(0) would make that token win outright.
    tokens = (logp - race.clamp_min_(torch.finfo(race.dtype).tiny).log()).argmax(dim=-1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


@dataclass
class BatchStats:
    """What one batch did, for throughput and roofline accounting."""

    rows: int
    graph_rows: int
    padded_prompt_len: int
    """The batch's longest prompt: rows are left padded to it in the cache."""
    prompt_lens: list[int]
    prefill_slots: int
    """Token slots the prefill computed: each chunk's rows (filler rows included) x that chunk's longest
    prompt (``prefill_chunks``); sum(prompt_lens) of them are real tokens, the rest padding."""
    steps: int
    """Tokens generated per row, including the first (from the prefill)."""
    prefill_s: float
    decode_s: float


@dataclass
class CallStats:
    batches: list[BatchStats] = field(default_factory=list)
    merge_s: float = 0.0
    capture_s: float = 0.0
    wall_s: float = 0.0


def prefill_chunks(prompt_lens: Sequence[int], tokens: int) -> list[tuple[int, int, int]]:
    """Consecutive row ranges [r0, r1) with their longest prompt: (r0, r1, longest), in row order.

    A row joins the current chunk while the chunk's rows x its longest prompt stay within ``tokens``
    (the activation memory a prefill chunk may take); a chunk has at least one row. Any order of rows is
    handled; rows sorted by length (as ``iter_batches`` sorts them) make chunks of similar lengths and so
    little padding.
    """
    chunks, r0, longest = [], 0, 0
    for r, n in enumerate(prompt_lens):
        if r > r0 and (r - r0 + 1) * max(longest, n) > tokens:
            chunks.append((r0, r, longest))
            r0, longest = r, 0
        longest = max(longest, n)
    chunks.append((r0, len(prompt_lens), longest))
    return chunks


def _plain(module: nn.Module) -> nn.Module:
    """The base ``nn.Linear`` under a PEFT LoRA wrapper (its weight holds the merged adapter)."""
    return getattr(module, "base_layer", module)


def _unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` inside a PEFT model, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _share_one_weight(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Make the linears' weights (and biases) row blocks of one new tensor, and return it (and the biases').

    The linears keep working as before, on views; a merge that writes a linear's weight in place writes
    the shared tensor too, so one GEMM on it always computes what the separate ones would.
    """
    weight = torch.cat([linear.weight.detach() for linear in linears])
    biases = [linear.bias for linear in linears]
    if len({b is None for b in biases}) > 1:  # one GEMM cannot add some linears' biases and not others'
        raise ValueError("fuse_projections needs all or none of the fused linears to have a bias")
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    row = 0
    for linear in linears:
        n = linear.weight.shape[0]
        linear.weight.data = weight[row : row + n]
        if bias is not None:
            linear.bias.data = bias[row : row + n]
        row += n
    return weight, bias


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
    """One GEMM on a shared weight, split into the separate linears' outputs (views, no copies)."""
    return F.linear(x, weight, bias).split(sizes, dim=-1)


class _Layer:
    """One decoder layer's modules, LoRA wrappers resolved to their base linears once.

    With ``fuse_projections``, q/k/v and gate/up share one weight tensor each (``qkv``, ``gate_up``), so a
    layer runs two GEMMs where it ran five.
    """

    def __init__(self, layer: nn.Module, *, fuse_projections: bool = False) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.q, self.k, self.v, self.o = (
            _plain(attn.q_proj),
            _plain(attn.k_proj),
            _plain(attn.v_proj),
            _plain(attn.o_proj),
        )
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.gate, self.up, self.down = _plain(mlp.gate_proj), _plain(mlp.up_proj), _plain(mlp.down_proj)
        self.act = mlp.act_fn
        self.qkv = self.gate_up = None
        if fuse_projections:
            self.qkv = _share_one_weight([self.q, self.k, self.v])
            self.qkv_sizes = [m.weight.shape[0] for m in (self.q, self.k, self.v)]
            self.gate_up = _share_one_weight([self.gate, self.up])
            self.gate_up_sizes = [m.weight.shape[0] for m in (self.gate, self.up)]

    def qkv_projections(self, x: torch.Tensor):
        """q, k, v projections of ``x``: one GEMM with shared weights, else three."""
        if self.qkv is not None:
            return _project(x, *self.qkv, self.qkv_sizes)
        return self.q(x), self.k(x), self.v(x)

    def gate_up_projections(self, x: torch.Tensor):
        """gate and up projections of ``x``: one GEMM with shared weights, else two."""
        if self.gate_up is not None:
            return _project(x, *self.gate_up, self.gate_up_sizes)
        return self.gate(x), self.up(x)


class FastGenerator:
    """Greedy batched generation for a Qwen3 causal LM, optionally wrapped by PEFT with LoRA adapters.

    Args:
        model: a HF Qwen3 ``*ForCausalLM`` or a ``PeftModel`` around one, in eval mode, on one device.
        max_batch_size: the most rows decoded together; on CUDA it is also capped by free memory.
        context_bucket: decode attention reads the cache up to the next multiple of this (one CUDA graph
            per bucket), instead of the whole preallocated length.
        stop_check_every: decode steps between the host checks of "every row finished" (one sync each);
            default 8 on CUDA, 1 elsewhere.
        use_cuda_graphs: capture decode steps in CUDA graphs; default: on CUDA devices.
        kv_memory_fraction: share of the free GPU memory (after weights and backups) the KV cache may use.
        prefill_tokens: rows are prefilled in chunks of about this many token slots (rows x the chunk's
            longest prompt), to bound activation memory.
        fused_kernels: decode with the Triton kernels (norms, rotary, SiLU-gate) instead of eager ops;
            default: on CUDA when Triton is there. They are checked against the eager ops on this device
            first and stay off if they differ; ``fused_status`` says which path runs and why.
        decode_attention: the Triton decode attention's launch configuration (block size, warps, stages,
            flash-decoding splits); default: the configuration measured in bench/README.md.
        fuse_projections: run q/k/v and gate/up as one GEMM each, on weights concatenated once. The
            model's q/k/v and gate/up weights become views of the concatenated tensors (same values, no
            extra memory), and stay so after ``close``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_size: int = 2048,
        context_bucket: int = 32,
        stop_check_every: int | None = None,
        use_cuda_graphs: bool | None = None,
        kv_memory_fraction: float = 0.85,
        prefill_tokens: int = 16384,
        fused_kernels: bool | None = None,
        decode_attention: DecodeAttentionConfig | None = None,
        fuse_projections: bool = False,
        backend_key: str = "eval.backend",
        max_new_tokens_key: str = "eval.max_new_tokens",
    ) -> None:
        # The settings its errors name: the evaluation's, or the RL stage's when it serves rollouts.
        self.backend_key, self.max_new_tokens_key = backend_key, max_new_tokens_key
        self.model = model
        self.decode_attention = decode_attention or DecodeAttentionConfig()
        lm = _unwrap_causal_lm(model)
        config = lm.config
        if getattr(lm, "is_loaded_in_4bit", False) or getattr(lm, "is_loaded_in_8bit", False):
            raise ConfigError(
                "the fast generation backend cannot merge adapters into a quantized base: "
                f"set {backend_key} to 'hf' or evaluate a bf16 base"
            )
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            raise ConfigError(
                f"the fast generation backend does not support sliding-window layers: set {backend_key} to 'hf'"
            )
        inner = lm.model
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = _plain(lm.get_output_embeddings())
        self.fuse_projections = fuse_projections
        self.layers = [_Layer(layer, fuse_projections=fuse_projections) for layer in inner.layers]
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.scale = self.head_dim**-0.5
        self.vocab = self.lm_head.weight.shape[0]
        self.device = self.lm_head.weight.device
        self.dtype = self.lm_head.weight.dtype

        self.max_batch_size = max_batch_size
        self.bucket = context_bucket
        self.use_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.stop_check_every = stop_check_every or (8 if self.device.type == "cuda" else 1)
        self.kv_memory_fraction = kv_memory_fraction
        self.prefill_tokens = prefill_tokens
        self.last_stats = CallStats()
        self.fused = False
        self.fused_status = "off: not requested"
        self.fused_check: dict[str, dict] = {}
        if fused_kernels or (fused_kernels is None and self.device.type == "cuda"):
            problem = self._check_fused()
            self.fused = problem is None
            self.fused_status = (
                "on: Triton kernels match the eager ops (within 2 ulps of each op's largest term, 4 for attention)"
                if problem is None
                else f"off: {problem}"
            )
            if self.decode_attention != DecodeAttentionConfig():
                self.fused_status += f"; decode attention {self.decode_attention.spec()}"

        self._backup: dict[int, torch.Tensor] = {}
        self._capacity = (0, 0)  # (rows, slots) of the allocated cache
        self._memory_bound = False  # the cache has fewer rows than the last call wanted: memory is full
        self._graphs: dict[tuple, Callable[[], None]] = {}
        self._sampling: Sampling | None = None  # of the current call; None: greedy
        self._rng: torch.Generator | None = None  # made on the first sampled call; graphs register it
        self._pool = None
        self._warmup_stream = None

    # ---------------------------------------------------------------- adapters
    def _lora_layers(self) -> list[nn.Module]:
        # Looked up per call: adapters may be loaded (and layers wrapped) after the engine was made.
        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    @contextmanager
    def merged(self, adapter: str | None) -> Iterator[None]:
        """Merge ``adapter`` into the base weights for the block; the exact base weights come back after."""
        if adapter is None:
            yield
            return
        layers = [m for m in self._lora_layers() if adapter in getattr(m, "lora_A", {})]
        if not layers:
            raise ConfigError(
                f"adapter {adapter!r} is not loaded in the model: load it with PeftModel.load_adapter"
            )
        for m in layers:
            plain = not (m.use_dora.get(adapter, False) or getattr(m, "lora_bias", {}).get(adapter, False))
            if not isinstance(m, LoraLinear) or not plain or m.merged:
                raise ConfigError(
                    f"adapter {adapter!r}: the fast backend merges plain LoRA on unmerged linear layers only; "
                    f"set {self.backend_key} to 'hf'"
                )
        try:
            with torch.no_grad():
                for m in layers:
                    if id(m) not in self._backup:  # taken while unmerged: every merge is undone below
                        self._backup[id(m)] = _plain(m).weight.detach().clone()
                    weight = _plain(m).weight
                    delta = m.get_delta_weight(adapter)
                    # Add in fp32 and round once: closest to the unmerged W x + B A x.
                    weight.copy_((self._backup[id(m)].float() + delta.float()).to(weight.dtype))
            yield
        finally:
            with torch.no_grad():
                for m in layers:
                    if id(m) in self._backup:
                        _plain(m).weight.copy_(self._backup[id(m)])

    # ---------------------------------------------------------------- fused kernels
    @torch.no_grad()
    def _check_fused(self) -> str | None:
        """None when the Triton kernels reproduce transformers' eager ops on this device, else the reason.

        Each kernel rounds to the model dtype where the eager code rounds, but its fp32 sum of squares
        (a tree reduction) and rsqrt may differ from torch's in the last fp32 bit. Near a bf16 rounding
        boundary that flips one normalised value by one bf16 ulp. The rotary embedding then sums two
        products, ``q*cos + rotate_half(q)*sin``, which can cancel: a one-ulp difference in a term of
        size 4 (0.031 in [4, 8)) lands on an output near 0. So each op is compared in ulps of its
        largest term (for the rotary sum: ``|q*cos| + |rotate_half(q)*sin|``), not of its output.
        ``fused_check`` keeps, per op, the largest difference in those ulps and the share of outputs
        that are bit-identical.
        """
        if not TRITON_AVAILABLE:
            return "Triton is not installed"
        if self.head_dim & (self.head_dim - 1):
            return f"head_dim {self.head_dim} is not a power of two"
        try:
            checks = self._fused_checks()
        except Exception as error:  # a Triton or driver problem: decode on the eager ops instead
            return f"Triton kernels failed: {error!r}"[:300]
        for name, (got, ref, scale) in checks.items():
            self.fused_check[name] = ulp_report(got, ref, scale, self.dtype)
            ulps, limit = self.fused_check[name]["max_ulps_of_largest_term"], ulp_limit(name, self.dtype)
            if ulps > limit:
                return f"{name} differs from eager by {ulps:.3g} ulps of its largest term"
        return None

    def _fused_checks(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(kernel output, eager output, size of the largest term) per fused op, on random inputs."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        lay, rows, heads, d = self.layers[0], 64, self.n_heads, self.head_dim

        def rand(*shape):
            return torch.randn(shape, generator=gen, device=self.device).to(self.dtype)

        hidden = rand(rows, lay.input_norm.weight.shape[0])
        delta = rand(*hidden.shape)
        summed, normed = fused_add_rms_norm(hidden, delta, lay.post_norm)
        q = rand(rows, heads * d)
        positions = torch.randint(0, 4096, (rows, 1), generator=gen, device=self.device)
        cos, sin = self.rotary(q[:, None, :], positions)
        ref_q = lay.q_norm(q.view(rows, 1, heads, d)).transpose(1, 2)
        ref_rope = apply_rotary_pos_emb(ref_q, ref_q, cos, sin)[0]
        terms = (ref_q * cos[:, None]).abs() + (rotate_half(ref_q) * sin[:, None]).abs()
        cos, sin = cos.reshape(rows, d), sin.reshape(rows, d)
        gate, up = rand(rows, lay.gate.weight.shape[0]), rand(rows, lay.gate.weight.shape[0])
        act = lay.act(gate)
        as_rows = functools.partial(_heads_to_rows, rows=rows)
        return {
            "rms_norm": (
                fused_rms_norm(hidden, lay.input_norm),
                lay.input_norm(hidden),
                lay.input_norm(hidden),
            ),
            "residual add": (summed, hidden + delta, hidden.abs().maximum(delta.abs())),
            "add + rms_norm": (normed, lay.post_norm(hidden + delta), lay.post_norm(hidden + delta)),
            # cos = 1, sin = 0: the head norm alone, to tell its differences from the rotary sum's.
            "head norm": (
                fused_head_norm_rope(q, lay.q_norm, torch.ones_like(cos), torch.zeros_like(sin), heads),
                as_rows(ref_q),
                as_rows(ref_q),
            ),
            "head norm + rotary": (
                fused_head_norm_rope(q, lay.q_norm, cos, sin, heads),
                as_rows(ref_rope),
                as_rows(terms),
            ),
            "silu gate": (fused_silu_mul(gate, up), act * up, act * up),
            "decode attention": self._attention_check(rand, gen, rows),
        }

    def _attention_check(self, rand, gen, rows: int):
        """The Triton decode attention, launched as a decode step launches it (writing the step's K/V at slot pos),
        and SDPA over the cache ``index_copy_`` writes; the scale is sum(p * |v|)."""
        slots, d = 160, self.head_dim
        k, v = rand(rows, self.n_kv, slots, d), rand(rows, self.n_kv, slots, d)
        q = rand(rows, self.n_heads * d)
        new_k, new_v = rand(rows, self.n_kv, 1, d), rand(rows, self.n_kv, 1, d)
        pad = torch.randint(0, 100, (rows,), generator=gen, device=self.device)
        pos = torch.full((1,), 130, dtype=torch.long, device=self.device)
        written_k, written_v = k.clone().index_copy_(2, pos, new_k), v.clone().index_copy_(2, pos, new_v)
        got = fused_decode_attention(
            q, k, v, pad, pos, scale=self.scale, config=self.decode_attention, new_k=new_k, new_v=new_v
        )
        return (got, *decode_attention_reference(q, written_k, written_v, pad, pos, scale=self.scale))

    # ---------------------------------------------------------------- memory
    def _kv_bytes_per_slot(self) -> int:
        return 2 * len(self.layers) * self.n_kv * self.head_dim * self.dtype.itemsize

    def _rows_that_fit(self, slots: int) -> int:
        if self.device.type != "cuda":
            return self.max_batch_size
        free, _ = torch.cuda.mem_get_info(self.device)
        free += sum(t.numel() * t.element_size() for t in getattr(self, "_k", []) + getattr(self, "_v", []))
        pending = [m for m in self._lora_layers() if id(m) not in self._backup]
        backup = sum(_plain(m).weight.numel() * self.dtype.itemsize for m in pending)
        # Room for the prefill activations, then the cache's share of the rest; the decode graph's logits
        # (about three fp32 [rows, vocab] tensors) grow with the rows like the cache, so they are reserved
        # for the rows that fit, not for max_batch_size (3.7 GB at 2,048 rows of Qwen3's vocabulary):
        # rows * slot_bytes = (free - backup - prefill - rows * logits) * fraction, solved for rows.
        widest = max(self.layers[0].gate.weight.shape[0], 4 * self.n_heads * self.head_dim)
        prefill = 4 * self.prefill_tokens * widest * 4
        logits = 3 * self.vocab * 4
        fraction = self.kv_memory_fraction
        per_row = slots * self._kv_bytes_per_slot() + fraction * logits
        rows = int((free - backup - prefill) * fraction // per_row)
        if rows < 1:
            raise ConfigError(
                f"the KV cache for {slots} positions does not fit in GPU memory: lower {self.max_new_tokens_key} "
                f"or set {self.backend_key} to 'hf'"
            )
        return min(self.max_batch_size, rows)

    def _allocate(self, rows: int, slots: int) -> None:
        """(Re)allocate the cache and the decode state; drops captured graphs, which point into them."""
        self._drop_graphs()
        self._k = self._v = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        shape = (rows, self.n_kv, slots, self.head_dim)
        # Zeros, not empty: masked slots still enter softmax(QK)V as 0 * V, and 0 * NaN is NaN.
        self._k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self._v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        dev = self.device
        self._tokens = torch.zeros(rows, slots, dtype=torch.long, device=dev)
        self._cur = torch.zeros(rows, dtype=torch.long, device=dev)
        self._pad = torch.zeros(rows, dtype=torch.long, device=dev)
        self._finished = torch.zeros(rows, dtype=torch.bool, device=dev)
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)
        self._min_slot = torch.zeros(1, dtype=torch.long, device=dev)
        self._slots = torch.arange(slots, device=dev)
        self._is_stop = torch.zeros(self.vocab, dtype=torch.bool, device=dev)
        # The stop ids themselves, for the min_new_tokens ban; a fixed length (padded with id 0, banned only
        # if it is a stop) so captured steps keep working when a call has fewer stop ids.
        self._stop_ids = torch.zeros(_STOP_ID_SLOTS, dtype=torch.long, device=dev)
        self._pad_id = torch.zeros(1, dtype=torch.long, device=dev)
        self._logps = torch.zeros(rows, slots, dtype=torch.float32, device=dev)  # sampled runs' logprobs
        self._capacity = (rows, slots)

    # ---------------------------------------------------------------- model
    def _layer(
        self, lay: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend
    ) -> torch.Tensor:
        """One decoder layer, op for op as transformers' Qwen3DecoderLayer; ``attend`` does the cache part."""
        b, t, _ = h.shape
        x = lay.input_norm(h)
        q, k, v = lay.qkv_projections(x)
        q = lay.q_norm(q.view(b, t, -1, self.head_dim)).transpose(1, 2)
        k = lay.k_norm(k.view(b, t, -1, self.head_dim)).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        h = h + lay.o(attend(q, k, v).reshape(b, t, -1))
        x = lay.post_norm(h)
        gate, up = lay.gate_up_projections(x)
        return h + lay.down(lay.act(gate) * up)

    def _next_token(self, x: torch.Tensor, b: int) -> None:
        """Pick from the final-normed hidden state (greedy, or sampled with ``_sampling``); writes the token
        at slot pos+1 (its logprob too when sampled), advances pos."""
        logits = self.lm_head(x)
        # min_new_tokens: stop tokens are banned while the token being generated is before min_slot+1. Only
        # their columns are read and written: a mask over [rows, vocab] reads and writes 400 MB each a step at 1,319 rows.
        cols = self._stop_ids
        ban = self._is_stop[cols] & (self._pos < self._min_slot)
        logits.index_copy_(1, cols, logits.index_select(1, cols).masked_fill(ban, float("-inf")))
        finished = self._finished[:b]
        if self._sampling is None:
            nxt = logits.argmax(dim=-1)
        else:
            nxt = self._sample(logits, finished)
        hit_stop = self._is_stop[nxt]
        nxt = torch.where(finished, self._pad_id, nxt)
        finished |= hit_stop
        self._tokens[:b].index_copy_(1, self._pos + 1, nxt[:, None])
        self._cur[:b].copy_(nxt)
        self._pos += 1

    def _sample(self, logits: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """Sampled tokens of ``logits``; their logprobs go to slot pos+1 (0 for rows already finished)."""
        sampling = self._sampling
        tokens, logps = sample_tokens(
            logits, temperature=sampling.temperature, top_k=sampling.top_k, generator=self._rng
        )
        self._logps[: logits.shape[0]].index_copy_(1, self._pos + 1, logps.masked_fill(finished, 0.0)[:, None])
        return tokens

    def _decode_mask(self, b: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[b, 1, 1, width] additive mask: a row's real prompt slots and everything up to pos."""
        slots = self._slots[:width]
        allowed = (slots[None, :] >= self._pad[:b, None]) & (slots[None, :] <= self._pos)
        # Additive, built once per step: SDPA would otherwise turn a boolean mask into this in every layer.
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, float("-inf"))[:, None, None, :]

    def _attend_decode(self, i: int, b: int, width: int, q, k, v, mask) -> torch.Tensor:
        """Write this step's K/V ([b, n_kv, 1, d]) at slot pos, attend over [:width]; returns [b, heads*d]."""
        kc, vc = self._k[i][:b], self._v[i][:b]
        if self.fused:  # writes k/v at slot pos itself and reads each row's slots [pad, pos] only; no mask
            return fused_decode_attention(
                q.reshape(b, -1),
                kc,
                vc,
                self._pad[:b],
                self._pos,
                scale=self.scale,
                config=self.decode_attention,
                new_k=k,
                new_v=v,
            )
        kc.index_copy_(2, self._pos, k)
        vc.index_copy_(2, self._pos, v)
        # One query token: fold the query heads that share a KV head into the query axis, so the cache
        # is read once instead of expanded per query head (repeat_kv).
        out = F.scaled_dot_product_attention(
            q.reshape(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim),
            kc[:, :, :width],
            vc[:, :, :width],
            attn_mask=mask,
            scale=self.scale,
        )
        return out.reshape(b, -1)

    def _decode_step(self, b: int, width: int) -> None:
        """One token for rows [:b], attending to cache slots [:width]; pure tensor ops (graph-capturable)."""
        if self.fused:
            return self._decode_step_fused(b, width)
        h = self.embed(self._cur[:b])[:, None, :]
        cos, sin = self.rotary(h, (self._pos - self._pad[:b])[:, None])
        mask = self._decode_mask(b, width, h.dtype)
        for i, lay in enumerate(self.layers):
            attend = functools.partial(self._attend_decode_3d, i, b, width, mask=mask)
            h = self._layer(lay, h, cos, sin, attend)
        self._next_token(self.final_norm(h[:, -1]), b)

    def _attend_decode_3d(self, i: int, b: int, width: int, q, k, v, *, mask) -> torch.Tensor:
        return self._attend_decode(i, b, width, q, k, v, mask)[:, None, :]

    def _decode_step_fused(self, b: int, width: int) -> None:
        """The decode step with Triton kernels for the norms, rotary embedding and SiLU-gate."""
        d = self.head_dim
        h = self.embed(self._cur[:b])
        cos, sin = self.rotary(h[:, None, :], (self._pos - self._pad[:b])[:, None])

        def attend(i, q, k, v):
            return self._attend_decode(
                i, b, width, q, k.view(b, self.n_kv, 1, d), v.view(b, self.n_kv, 1, d), None
            )

        self._next_token(self._fused_layers(h, cos.reshape(b, d), sin.reshape(b, d), attend), b)

    def _fused_layers(self, h: torch.Tensor, cos, sin, attend) -> torch.Tensor:
        """Every decoder layer and the final norm on [tokens, hidden], with the Triton kernels.

        Same arithmetic as the eager ``_layer`` (fp32 inside each op, rounding to the model dtype where
        eager rounds), in about 15 kernels a layer instead of about 60. ``attend(i, q, k, v)`` takes and
        returns [tokens, heads*dim] and does layer i's cache part. Returns the final-normed hidden state.
        """
        x = fused_rms_norm(h, self.layers[0].input_norm)
        for i, lay in enumerate(self.layers):
            q, k, v = lay.qkv_projections(x)
            q = fused_head_norm_rope(q, lay.q_norm, cos, sin, self.n_heads)
            k = fused_head_norm_rope(k, lay.k_norm, cos, sin, self.n_kv)
            h, x = fused_add_rms_norm(h, lay.o(attend(i, q, k, v)), lay.post_norm)
            m = lay.down(fused_silu_mul(*lay.gate_up_projections(x)))
            after = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.final_norm
            h, x = fused_add_rms_norm(h, m, after)
        return x

    def _prefill(self, b: int, plen: int, prompt_lens: Sequence[int]) -> int:
        """Fill the cache for rows [:b] and pick each row's first token; returns the token slots computed.

        Rows are left padded to ``plen`` (row r's ``prompt_lens[r]`` tokens sit in slots [pad[r], plen)) and
        go through in chunks of consecutive rows (``prefill_chunks``), each padded only to its own longest
        prompt ``clen``: it runs slots [plen - clen, plen) and writes K/V there, not the batch's whole width
        (a 200-token longest prompt against a mean of 160 would waste a fifth of the compute). The Triton
        kernels run when they are on (as in decode), else transformers' modules.

        A chunk's rows keep in slots before plen - clen whatever an earlier batch (or a graph capture's
        warm-up) wrote there. Decode never uses them: the Triton attention loads slots [pad, pos] only, and
        the eager SDPA path adds -inf to every slot before pad, so each such slot enters the softmax as
        exp(-inf) = 0 and the product with V as 0 * v. That is exact as long as the stale K/V are finite,
        and they are: the cache starts as zeros (``_allocate``) and is only ever written with the K/V of
        the model's own forward passes.
        """
        # Not cuDNN's attention: it builds an execution plan for every new (rows, length) shape, and the
        # chunks have many: 3.4 s of the first model's 6.5 s prefill on an H200, against 0.2 s of warm-up
        # for the memory-efficient kernel, nearly as fast once warm (3.13 s against 3.09 s).
        with sdpa_kernel(_PREFILL_ATTENTION):
            return self._prefill_chunks(b, plen, prompt_lens)

    def _prefill_chunks(self, b: int, plen: int, prompt_lens: Sequence[int]) -> int:
        groups, d = self.n_heads // self.n_kv, self.head_dim
        last_hidden, computed = [], 0
        for r0, r1, clen in prefill_chunks(prompt_lens, self.prefill_tokens):
            rows, start = r1 - r0, plen - clen
            computed += rows * clen
            pad = self._pad[r0:r1]  # every row's pad >= start: its prompt is at most clen long
            slots = self._slots[start:plen]
            h = self.embed(self._tokens[r0:r1, start:plen])
            cos, sin = self.rotary(h, slots[None, :] - pad[:, None])
            # Causal, real keys only; a pad query sees itself, so no softmax row is empty (no NaN).
            causal = slots[None, :] <= slots[:, None]
            real = slots[None, None, :] >= pad[:, None, None]
            mask = (causal[None] & (real | torch.eye(clen, dtype=torch.bool, device=h.device)[None]))[:, None]

            def attend(i, q, k, v, r0=r0, r1=r1, start=start, mask=mask):
                """[rows, heads, clen, dim] in (the cache written), [rows, clen, heads, dim] out."""
                self._k[i][r0:r1, :, start:plen].copy_(k)
                self._v[i][r0:r1, :, start:plen].copy_(v)
                out = F.scaled_dot_product_attention(
                    q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, scale=self.scale
                )
                return out.transpose(1, 2)

            if self.fused:

                def attend_flat(i, q, k, v, rows=rows, clen=clen):
                    def heads(flat):
                        return flat.view(rows, clen, -1, d).transpose(1, 2)

                    return attend(i, heads(q), heads(k), heads(v)).reshape(rows * clen, -1)

                x = self._fused_layers(
                    h.view(rows * clen, -1), cos.reshape(-1, d), sin.reshape(-1, d), attend_flat
                )
                last_hidden.append(x.view(rows, clen, -1)[:, -1])
            else:
                for i, lay in enumerate(self.layers):
                    h = self._layer(lay, h, cos, sin, functools.partial(attend, i))
                last_hidden.append(self.final_norm(h[:, -1]))
        self._pos.fill_(plen - 1)
        self._next_token(torch.cat(last_hidden), b)
        return computed

    # ---------------------------------------------------------------- graphs
    def _width(self, pos: int) -> int:
        """Cache slots a decode step at ``pos`` attends over: SDPA reads up to the next bucket; the Triton
        attention reads each row's real slots whatever the width, so it needs one graph for all."""
        if self.fused:
            return self._capacity[1]
        return min(self._capacity[1], math.ceil((pos + 1) / self.bucket) * self.bucket)

    def _drop_graphs(self) -> None:
        """Forget every captured graph together with the memory pool they were captured into.

        A graph pool lives as long as some graph uses it: when the last one is destroyed, the caching
        allocator releases the pool, and a later capture into the same handle fails with
        ``INTERNAL ASSERT FAILED ... it->second->use_count > 0``. That is what happened when evaluate
        moved from the stock model to an adapter whose longer prompts needed a bigger cache. So the
        handle is dropped with its graphs, and the next capture starts a fresh pool.
        """
        self._graphs.clear()
        self._pool = None

    def _graph_pool(self):
        """The pool this set of graphs shares (one per cache allocation), made on first capture."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _ensure_graphs(self, b: int, widths: set[int]) -> None:
        """Capture any missing decode graphs. Runs before a batch's prefill, which resets the state."""
        for width in sorted(w for w in widths if self._graph_key(b, w) not in self._graphs):
            self._graphs[self._graph_key(b, width)] = self._capture(b, width)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _graph_key(self, b: int, width: int) -> tuple:
        """Greedy and each (temperature, top_k) capture their own decode step."""
        return (b, width, None if self._sampling is None else self._sampling.graph_key)

    def _capture(self, b: int, width: int) -> Callable[[], None]:
        """Warm up, then capture one decode step of ``b`` rows over ``width`` slots; returns its replay.

        The warm-up really runs (it writes slot width-2 of the cache and moves the decode state), which
        is why captures happen before a batch's prefill: the prefill rewrites all the state a step reads.
        """
        pool = self._graph_pool()
        if self._warmup_stream is None:  # one for every capture: cuBLAS keeps a workspace per stream
            self._warmup_stream = torch.cuda.Stream(self.device)
        stream = self._warmup_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up off the capture stream, as torch.cuda.graph requires
            for _ in range(2):
                self._pos.fill_(width - 2)
                self._decode_step(b, width)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._pos.fill_(width - 2)
        graph = torch.cuda.CUDAGraph()
        if self._sampling is not None:  # sample_tokens draws from the engine's generator, not the default one
            graph.register_generator_state(self._rng)
        with torch.cuda.graph(graph, pool=pool):
            self._decode_step(b, width)
        return graph.replay

    # ---------------------------------------------------------------- public
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        min_new_tokens: int = 0,
        adapter: str | None = None,
        sampling: Sampling | None = None,
    ) -> list[FastCompletion]:
        """Greedy completions of token-id prompts, in input order, with ``adapter`` merged (None: base).

        Same outputs as ``model.generate(do_sample=False, max_new_tokens=..., min_new_tokens=...,
        eos_token_id=stop_token_ids, pad_token_id=...)`` on left-padded batches. With ``sampling``: drawn
        from HF's ``do_sample=True`` distribution instead (``sample_tokens``), with per-token logprobs.
        ``last_stats`` holds the per-batch timings afterwards.
        """
        results: list[FastCompletion | None] = [None] * len(prompts)
        for indices, completions in self.iter_batches(
            prompts,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            pad_token_id=pad_token_id,
            min_new_tokens=min_new_tokens,
            adapter=adapter,
            sampling=sampling,
        ):
            for i, completion in zip(indices, completions, strict=True):
                results[i] = completion
        return results  # type: ignore[return-value]

    def iter_batches(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        min_new_tokens: int = 0,
        adapter: str | None = None,
        sampling: Sampling | None = None,
    ) -> Iterator[tuple[list[int], list[FastCompletion]]]:
        """As ``generate``, batch by batch (shortest prompts first): yields (prompt indices, completions).

        The adapter stays merged until the iterator is exhausted or closed; exhaust it (or close it)
        before using the model any other way.
        """
        if not prompts:
            return
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        start = time.perf_counter()
        stats = CallStats()
        self.last_stats = stats
        self._use_sampling(sampling)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        longest = len(prompts[order[-1]])
        slots = math.ceil((longest + max_new_tokens) / self.bucket) * self.bucket
        rows_cap, slots_cap = self._capacity
        # The cache holds this call's rows, not all the memory allows: evaluate hands it its plan's batches
        # (eval.batch_size), and a cache sized for max_batch_size rows would take most of the GPU for nothing.
        wanted = min(len(prompts), self.max_batch_size)
        if slots > slots_cap or (rows_cap < wanted and not self._memory_bound):
            fit = self._rows_that_fit(slots)
            self._allocate(min(fit, wanted), slots)
            self._memory_bound = fit < wanted
        n_batches = math.ceil(len(prompts) / self._capacity[0])
        graph_rows = math.ceil(len(prompts) / n_batches)

        with torch.no_grad():
            self._is_stop.zero_()
            # Ids past the vocabulary can never be generated; they only have to stay out of the index.
            in_vocab = sorted(t for t in set(stop_token_ids) if 0 <= t < self.vocab)
            stop_in_vocab = torch.tensor(in_vocab, dtype=torch.long, device=self.device)
            self._is_stop[stop_in_vocab] = True
            if len(stop_in_vocab) > len(self._stop_ids):
                self._drop_graphs()  # captured steps index the shorter tensor
                self._stop_ids = torch.zeros(len(stop_in_vocab), dtype=torch.long, device=self.device)
            self._stop_ids.zero_()[: len(stop_in_vocab)] = stop_in_vocab
            self._pad_id.fill_(pad_token_id)

        t0 = time.perf_counter()
        with self.merged(adapter):
            stats.merge_s = time.perf_counter() - t0
            for first in range(0, len(order), graph_rows):
                indices = order[first : first + graph_rows]
                with torch.no_grad():
                    done = self._run_batch(
                        [prompts[i] for i in indices],
                        graph_rows=graph_rows,
                        max_new_tokens=max_new_tokens,
                        min_new_tokens=min_new_tokens,
                        stop_ids=set(stop_token_ids),
                        pad_token_id=pad_token_id,
                        stats=stats,
                    )
                stats.wall_s = time.perf_counter() - start
                yield indices, done

    def _run_batch(
        self,
        batch: list[Sequence[int]],
        *,
        graph_rows: int,
        max_new_tokens: int,
        min_new_tokens: int,
        stop_ids: set[int],
        pad_token_id: int,
        stats: CallStats,
    ) -> list[FastCompletion]:
        rows = len(batch)
        plen = max(len(p) for p in batch)
        # Rows past the real ones (to reuse one graph for a short last batch) repeat a prompt and start
        # finished, so they never hold up the end of the batch.
        padded = batch + [batch[-1]] * (graph_rows - rows)
        last_pos = plen + max_new_tokens - 2  # slot of the last decode step's input token
        if self.use_graphs:
            t0 = time.perf_counter()
            self._ensure_graphs(graph_rows, {self._width(p) for p in range(plen, last_pos + 1)})
            stats.capture_s += time.perf_counter() - t0

        if self._sampling is not None:
            self._rng.manual_seed(self._sampling.batch_seed(len(stats.batches)))
        t0 = time.perf_counter()
        host_tokens = torch.full((graph_rows, plen), pad_token_id, dtype=torch.long)
        for r, prompt in enumerate(padded):
            host_tokens[r, plen - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        self._tokens[:graph_rows, :plen].copy_(host_tokens)
        self._pad[:graph_rows].copy_(torch.tensor([plen - len(p) for p in padded]))
        self._finished[:graph_rows].copy_(torch.arange(graph_rows) >= rows)
        self._min_slot.fill_(plen + min_new_tokens - 1)
        prefill_slots = self._prefill(graph_rows, plen, [len(p) for p in padded])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()

        steps = 1
        pos = plen
        while pos <= last_pos:
            if self.use_graphs:
                self._graphs[self._graph_key(graph_rows, self._width(pos))]()
            else:
                self._decode_step(graph_rows, self._width(pos))
            pos += 1
            steps += 1
            if steps % self.stop_check_every == 0 and bool(self._finished[:rows].all()):
                break
        generated = self._tokens[:rows, plen : plen + steps].cpu()
        logps = self._logps[:rows, plen : plen + steps].cpu() if self._sampling is not None else None
        t2 = time.perf_counter()
        stats.batches.append(
            BatchStats(
                rows=rows,
                graph_rows=graph_rows,
                padded_prompt_len=plen,
                prompt_lens=[len(p) for p in batch],
                prefill_slots=prefill_slots,
                steps=steps,
                prefill_s=t1 - t0,
                decode_s=t2 - t1,
            )
        )
        return [
            _completion(row.tolist(), stop_ids, None if logps is None else logps[r].tolist())
            for r, row in enumerate(generated)
        ]

    def _use_sampling(self, sampling: Sampling | None) -> None:
        """Decode this call greedily (None) or sampled, from the engine's own generator."""
        self._sampling = sampling
        if sampling is not None and self._rng is None:
            self._rng = torch.Generator(device=self.device)

    def close(self) -> None:
        """Free the cache and the graphs (the weights stay the model's)."""
        self._drop_graphs()
        self._k = self._v = []
        self._backup = {}
        self._capacity = (0, 0)
        self._memory_bound = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def ulp_limit(op: str, dtype: torch.dtype) -> float:
    """How far (in ulps of the op's largest term) a Triton kernel may be from the eager op.

    Two ulps: the rsqrt and the reduction order may each move a rounding; attention rounds its
    probabilities to bf16 for the product with V, as SDPA's kernels do, each its own way, so 4. In fp32
    the reduction order moves the last bits of sums over thousands of values directly, so there the
    limit is 2**-16 of the largest term.
    """
    return max(4.0 if op == "decode attention" else 2.0, 2**-16 / torch.finfo(dtype).eps)


def ulp_report(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> dict:
    """Largest difference of ``got`` from ``ref`` (absolute, and in ulps of the largest term ``scale``),
    and the share of bit-identical outputs."""
    eps = torch.finfo(dtype).eps  # one ulp at 1.0 (2**-7 in bf16)
    got, ref, scale = got.float(), ref.float(), scale.float().abs()
    # ulp of the largest term: eps * 2**floor(log2(scale)), and at least the smallest normal's.
    ulp = eps * torch.exp2(torch.floor(torch.log2(scale.clamp_min(torch.finfo(dtype).tiny))))
    return {
        "max_abs_diff": (got - ref).abs().max().item(),
        "max_ulps_of_largest_term": ((got - ref).abs() / ulp).max().item(),
        "identical_share": (got == ref).float().mean().item(),
    }


def decode_attention_reference(q, k, v, pad, pos, *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's decode attention over a left-padded cache (slots [pad[row], pos] of each row), and its
    largest term ``sum(p * |v|)``; q = [rows, heads*dim], k/v = [rows, kv_heads, slots, dim]."""
    rows, n_kv, slots, d = k.shape
    index = torch.arange(slots, device=k.device)
    allowed = (index[None, :] >= pad[:, None]) & (index[None, :] <= pos)
    mask = torch.zeros(allowed.shape, dtype=k.dtype, device=k.device)
    mask = mask.masked_fill_(~allowed, float("-inf"))[:, None, None, :]

    def sdpa(values):
        out = F.scaled_dot_product_attention(
            q.view(rows, n_kv, -1, d), k, values, attn_mask=mask, scale=scale
        )
        return out.reshape(rows, -1)

    return sdpa(v), sdpa(v.abs())


def _heads_to_rows(x: torch.Tensor, *, rows: int) -> torch.Tensor:
    """[rows, heads, 1, dim] (transformers' attention layout) to [rows, heads*dim] (the kernels')."""
    return x.transpose(1, 2).reshape(rows, -1)


def _completion(tokens: list[int], stop_ids: set[int], logprobs: list[float] | None = None) -> FastCompletion:
    for n, token in enumerate(tokens):
        if token in stop_ids:
            kept = None if logprobs is None else logprobs[: n + 1]
            return FastCompletion(token_ids=tokens[: n + 1], finish_reason="stop", logprobs=kept)
    return FastCompletion(token_ids=tokens, finish_reason="length", logprobs=logprobs)


class FastGenerationEngine:
    """The fast backend behind the ``training.generate.Engine`` interface.

    It wraps a loaded ``GenerationEngine`` (tokenizer, chat template, model, PEFT adapters) and runs its
    generation on a ``FastGenerator``: same prompts in, same ``Generation`` records out, batched by the same
    plan. A planned batch larger than GPU memory (or ``max_batch_size``) allows is split in equal parts.

    On a GPU it runs q/k/v and gate/up as one GEMM each (``fuse_projections``): fewer launches a step for the
    same tokens (fp32 rows identical to HF ``generate``; 0.55 ms of a decode step at bench_eval's 1,319 rows on
    an H200, bench/README.md). The model is this engine's own, loaded for the evaluation, so its weights may be
    re-laid; on a CPU the separate GEMMs stay, as the CPU tests' fp32 reference.
    """

    def __init__(self, engine: GenerationEngine, *, max_batch_size: int = 2048) -> None:
        self.hf = engine
        self.max_batch_size = max_batch_size
        self._fast: FastGenerator | None = None

    @property
    def tokenizer(self):
        return self.hf.tokenizer

    @property
    def model(self):
        return self.hf.model

    @property
    def adapters(self):
        return self.hf.adapters

    @property
    def stop_ids(self) -> list[int]:
        return self.hf.stop_ids

    def load_adapter(self, name: str, path: str | Path) -> None:
        self.hf.load_adapter(name, path)
        self._close_generator()  # the model object may have been wrapped by PEFT: rebuild on next use

    def _close_generator(self) -> None:
        # Explicitly, not by dropping the reference: its cache and graphs must be gone before the next
        # generator allocates and captures, whenever the garbage collector would get to them.
        if self._fast is not None:
            self._fast.close()
            self._fast = None

    def describe(self) -> dict:
        fast = self._generator()
        return {
            **self.hf.describe(),
            "engine": "fast",
            "cuda_graphs": fast.use_graphs,
            "fused_kernels": fast.fused_status,
            "fused_projections": fast.fuse_projections,
        }

    def close(self) -> None:
        """Free the generator's cache and graphs, then the model, so the next stage finds the GPU empty."""
        self._close_generator()
        self.hf.close()

    def render(self, prompt: str) -> str:
        return self.hf.render(prompt)

    def plan(self, prompts: list[str], *, batch_size: int) -> list[list[int]]:
        """The HF engine's plan; a batch larger than the GPU's cache is split inside ``generate_batch``."""
        return self.hf.plan(prompts, batch_size=batch_size)

    def _generator(self) -> FastGenerator:
        if self._fast is None or self._fast.model is not self.hf.model:
            self._close_generator()
            on_gpu = next(self.hf.model.parameters()).device.type == "cuda"
            self._fast = FastGenerator(self.hf.model, max_batch_size=self.max_batch_size, fuse_projections=on_gpu)
        return self._fast

    def generate(
        self, prompts: list[str], *, adapter: str | None, max_new_tokens: int
    ) -> Iterator[list[Generation]]:
        """Yield ``Generation`` lists batch by batch; each ``index`` points into ``prompts``.

        Batches are as large as ``max_batch_size`` and GPU memory allow, shortest prompts first.
        """
        self.hf.check_adapter(adapter)
        encoded = self.tokenizer([self.render(p) for p in prompts], add_special_tokens=False)["input_ids"]
        for indices, completions in self._generator().iter_batches(
            encoded,
            max_new_tokens=max_new_tokens,
            stop_token_ids=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            adapter=adapter,
        ):
            yield [
                self.hf.to_generation(i, list(c.token_ids)) for i, c in zip(indices, completions, strict=True)
            ]

    def generate_batch(
        self, prompts: list[str], *, adapter: str | None, max_new_tokens: int, sampling: None = None
    ) -> list[Generation]:
        """Greedy completions of ``prompts`` in order (one or more internal batches).

        Raises:
            ConfigError: ``sampling`` was given: this engine decodes greedily only (``select_backend`` picks
                the hf engine for sampled evaluations).
        """
        if sampling is not None:
            raise ConfigError(SAMPLING_FALLBACK)
        results: list[Generation | None] = [None] * len(prompts)
        for batch in self.generate(prompts, adapter=adapter, max_new_tokens=max_new_tokens):
            for generation in batch:
                results[generation.index] = generation
        return results  # type: ignore[return-value]
