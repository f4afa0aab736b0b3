"""Shared benchmark pieces: the random-weight Qwen3-4B-shape model, synthetic prompts, rooflines, device info.

Nothing here downloads anything: the GPU machines have no network. Models are built with random weights
directly on the target device, prompts are random token ids of GSM8K lengths.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from eval_artifacts import rundir

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Qwen3-4B-Instruct-2507's special tokens: <|endoftext|> (also the pad) and <|im_end|>.
QWEN3_STOP_IDS = (151643, 151645)
QWEN3_PAD_ID = 151643

# Qwen/Qwen3-4B-Instruct-2507's architecture (its config.json).
QWEN3_4B = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
# The same architecture, small enough for the --smoke runs on a CPU.
SMOKE = {
    **QWEN3_4B,
    "vocab_size": 512,  # at 151936 the CPU spends minutes on the logits alone
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
}
# New tokens forced per model in the eval benchmarks: the study's think lengths, rounded up.
EVAL_PROFILES = {"base": 300, "level_1": 200, "level_2": 100, "level_3": 60, "level_4": 40, "level_5": 15}

# Bandwidth and dense bf16 tensor-core peak from the datasheets (SXM parts).
_DATASHEET = {
    "H200": {"bandwidth": 4.8e12, "bf16_flops": 989e12},
    "H100": {"bandwidth": 3.35e12, "bf16_flops": 989e12},
}


def qwen3_4b_config(*, num_layers: int = 36) -> Qwen3Config:
    """``QWEN3_4B`` with Qwen's pad and stop ids (``num_layers`` for quick partial-depth runs)."""
    return Qwen3Config(
        **{**QWEN3_4B, "num_hidden_layers": num_layers},
        pad_token_id=QWEN3_PAD_ID,
        eos_token_id=QWEN3_STOP_IDS[1],
        attn_implementation="sdpa",
    )


def smoke_config() -> Qwen3Config:
    """``SMOKE`` with wide initial logits (few near-ties) and stop ids inside its small vocabulary."""
    return Qwen3Config(
        **SMOKE, initializer_range=0.2, pad_token_id=510, eos_token_id=511, attn_implementation="sdpa"
    )


def build_random_model(
    config: Qwen3Config, *, device: str, dtype: torch.dtype, seed: int = 0
) -> Qwen3ForCausalLM:
    """Random weights, created directly on ``device`` in ``dtype`` (no fp32 copy on the host)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def add_random_adapters(
    model: torch.nn.Module, names: list[str], *, r: int = 16, alpha: int = 32, seed: int = 0
):
    """A PeftModel with one LoRA adapter (all linear layers) per name, B drawn non-zero so each changes outputs."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear")
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            for linear in getattr(module, "lora_B", {}).values():
                noise = torch.randn(linear.weight.shape, generator=generator) * 0.02
                linear.weight.copy_(noise.to(linear.weight.dtype))
    return peft_model.eval()


def synthetic_prompts(
    n: int, *, vocab_size: int, min_len: int, max_len: int, seed: int = 0
) -> list[list[int]]:
    """``n`` prompts of random token ids, lengths uniform in [min_len, max_len] (GSM8K chat prompts: 120-200)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator).tolist()
    # Stay clear of the top of the vocabulary, where the special tokens live.
    high = vocab_size - 300 if vocab_size > 1000 else vocab_size - 4
    return [torch.randint(0, high, (k,), generator=generator).tolist() for k in lengths]


# ---------------------------------------------------------------- rooflines
def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base weights a decode step reads (tied embeddings counted once, LoRA factors excluded)."""
    seen, total = set(), 0
    for name, param in model.named_parameters():
        if "lora_" in name or param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        total += param.numel() * param.element_size()
    return total


def matmul_params(config: Qwen3Config) -> int:
    """Parameters multiplied per token: every layer's linears plus the LM head (2 FLOPs each)."""
    h, heads, kv, d, inter = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
    )
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * inter
    return config.num_hidden_layers * per_layer + h * config.vocab_size


def kv_bytes_per_token(config: Qwen3Config, dtype: torch.dtype) -> int:
    """K and V for one token in every layer."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def device_peaks(name: str) -> dict:
    """Datasheet memory bandwidth (bytes/s) and dense bf16 peak (FLOP/s) for the device name."""
    for key, peaks in _DATASHEET.items():
        if key in name:
            return {"part": key, **peaks, "source": f"datasheet {key} SXM"}
    return {"part": None, "bandwidth": None, "bf16_flops": None, "source": f"no datasheet entry for {name!r}"}


def measure_copy_bandwidth(device: torch.device, *, gib: float = 2.0, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of ``repeats`` timed copies."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    del src, dst
    return 2 * n * 2 / times[len(times) // 2]


def decode_floor(
    batches: list[dict],
    *,
    weight_bytes: int,
    kv_per_token: int,
    matmul_params: int,
    bandwidth: float,
    flops: float | None,
) -> dict:
    """Ideal decode time of a schedule: each step reads the weights once plus every real row's KV cache.

    ``batches`` rows: {"prompt_lens": [...], "steps": n} where ``steps`` counts tokens per row including the
    prefill's. Decode step j (1-based) of a row with prompt n reads n + j cached tokens.
    """
    bytes_total = 0
    steps_total = tokens = contexts = 0
    flops_total = 0.0
    for batch in batches:
        lens, steps = batch["prompt_lens"], batch["steps"]
        rows = len(lens)
        for j in range(1, steps):
            context = sum(lens) + rows * j
            bytes_total += weight_bytes + context * kv_per_token
            contexts += context
            flops_total += 2 * matmul_params * rows
        steps_total += steps - 1
        tokens += rows * (steps - 1)
    if not steps_total:
        return {"decode_steps": 0}
    memory_s = bytes_total / bandwidth
    out = {
        "decode_steps": steps_total,
        "decode_tokens": tokens,
        "mean_rows_per_step": tokens / steps_total,
        "mean_context": contexts / tokens,
        "bytes_read": bytes_total,
        "memory_floor_s": memory_s,
        "roofline_tokens_per_s": tokens / memory_s,
    }
    if flops:
        out["compute_floor_s"] = flops_total / flops
    return out


def library_versions(*extra: str) -> dict:
    """Versions of torch, transformers, peft, accelerate and ``extra``, with Python's and CUDA's."""
    versions = rundir.library_versions(("torch", "transformers", "peft", "accelerate", *extra))
    return versions | {"python": platform.python_version(), "cuda": torch.version.cuda}


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "name": platform.processor() or "cpu", "count": 0}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            count=torch.cuda.device_count(),
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
    return info


def default_out(name: str, out: Path | None = None) -> Path:
    """Where a benchmark writes ``name``: ``out`` (a .json file, or a folder for ``name``), else ``$OUT/<name>``
    on the device machine, else ``bench/results/<name>``."""
    if out is not None:
        return out if out.suffix == ".json" else out / name
    device_out = os.environ.get("OUT")
    return Path(device_out) / name if device_out else RESULTS_DIR / name


def write_result(name: str, result: dict, out: Path | None = None) -> Path:
    """Write a benchmark's JSON where ``default_out`` says, say where, and return the path."""
    path = default_out(name, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}", flush=True)
    return path


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
