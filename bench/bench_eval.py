"""Eval benchmark: the fast engine on the 6-model study against HF ``generate``, in one run on one GPU.

Random weights of the real Qwen3-4B shape (bf16, SDPA) and synthetic GSM8K-length prompts (120-200 token
ids); no tokenizer and no downloads. Output lengths are forced per model (min = max new tokens) to each
model's token profile: base 300, L1 200, L2 100, L3 60, L4 40, L5 15. Measured, in this order:

0. self-check: a tiny fp32 model with natural stops, min_new_tokens and a short last batch, fast engine
   (CUDA graphs on a GPU) vs HF ``generate``, token for token;
1. the fast engine on the whole eval (base + 5 merged LoRA r16 adapters, 1,319 problems each);
2. baseline (a): HF ``generate`` at batch 64 with the unmerged PEFT adapter, timed on ``--hf-batches``
   batches per model and extrapolated to the whole eval; its outputs are also (4) the token-for-token
   comparison with the fast engine on the same 64 problems and the same weights;
3. baseline (b): one problem at a time (unmerged adapter), on a 64-problem sample at the L5 profile
   (15 new tokens) plus 8 problems at 1 new token, extrapolated by time = a + b * new_tokens;
4. fp32 exactness on a 4-layer model of the real width: fast vs HF generate, base and merged adapter;
5. the decode roofline of the fast run's own schedule: every step reads the bf16 weights once plus the KV
   cache of every real row at its context, at the GPU's bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s).

``--decode-attention SPEC`` and ``--fuse-projections`` switch the fast engine's optional paths on for the
self-check, the whole eval and the fp32 check; the base model's decode then runs again with the default
engine and with each option alone (``ablation_engine_options``), so one run measures with and without.
The base model also runs again at the former 512-row cap (``ablation_batch_cap_base``): what the whole
eval as one batch per model (``--max-batch-size``, default 2048, memory permitting) buys.

Run on the GPU machine from the repository root:  python -m bench.bench_eval
Quick CPU check of the whole script:               python -m bench.bench_eval --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen3Config

from bench import common
from training.fast_generate import FastGenerator
from training.fused_kernels import DecodeAttentionConfig

GSM8K_TEST_PROBLEMS = 1319
FORMER_BATCH_CAP = 512  # the fast engine's row cap before the eval ran as one batch per model
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- HF reference
def hf_generate(model, prompts, *, max_new: int, min_new: int, stop_ids, pad_id: int) -> list[list[int]]:
    """One left-padded HF ``generate`` call (greedy); each row cut after its first stop token."""
    device = next(model.parameters()).device
    plen = max(map(len, prompts))
    ids = torch.full((len(prompts), plen), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), plen), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, plen - len(p) :] = torch.tensor(p)
        mask[r, plen - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
        )
    rows = []
    for row in out[:, plen:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
        rows.append(row if cut is None else row[: cut + 1])
    return rows


def adapter_context(peft_model, name: str):
    """HF's usual way: the stock model with adapters disabled, an adapter unmerged and active."""
    if name == "base":
        return peft_model.disable_adapter()
    peft_model.set_adapter(name)
    return nullcontext()


def match_stats(fast: list[list[int]], reference: list[list[int]]) -> dict:
    """Token-for-token agreement: identical rows, first-token agreement, mean agreeing prefix."""
    prefixes = []
    for a, b in zip(fast, reference, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n / max(len(a), len(b)))
    return {
        "rows": len(fast),
        "identical_rows": sum(a == b for a, b in zip(fast, reference, strict=True)),
        "first_token_agree": sum(a[:1] == b[:1] for a, b in zip(fast, reference, strict=True)),
        "mean_agreeing_prefix": sum(prefixes) / len(prefixes),
        "tokens_compared": sum(len(b) for b in reference),
    }


# ---------------------------------------------------------------- measurements
def self_check(device: torch.device, options: dict) -> dict:
    """Tiny fp32 model, natural stops: the fast engine (graphs on CUDA) equals HF generate exactly."""
    config = common.smoke_config()
    model = common.build_random_model(config, device=str(device), dtype=torch.float32, seed=11)
    prompts = common.synthetic_prompts(40, vocab_size=config.vocab_size, min_len=3, max_len=30, seed=4)
    pad = config.pad_token_id
    # A stop token that some rows produce and others do not, so both finish reasons occur.
    free = hf_generate(model, prompts, max_new=30, min_new=0, stop_ids={config.vocab_size + 7}, pad_id=pad)
    counts = {}
    for row in free:
        for token in set(row[1:]):
            counts[token] = counts.get(token, 0) + 1
    stop = min(counts, key=lambda t: abs(counts[t] - len(prompts) / 2))
    engine = FastGenerator(model, max_batch_size=16, context_bucket=8, **options)
    results = {}
    for min_new in (0, 5):
        expected = hf_generate(model, prompts, max_new=30, min_new=min_new, stop_ids={stop}, pad_id=pad)
        got = engine.generate(
            prompts, max_new_tokens=30, min_new_tokens=min_new, stop_token_ids=[stop], pad_token_id=pad
        )
        results[f"min_new_{min_new}"] = {
            **match_stats([c.token_ids for c in got], expected),
            "stopped_rows": sum(c.finish_reason == "stop" for c in got),
        }
    engine.close()
    ok = all(r["identical_rows"] == r["rows"] for r in results.values())
    return {
        "ok": ok,
        "cuda_graphs": engine.use_graphs,
        "fused_kernels": engine.fused_status,
        "batches": [b.rows for b in engine.last_stats.batches],
        **results,
    }


def fast_eval(engine: FastGenerator, prompts, models, profiles, *, stop_ids, pad_id, device) -> dict:
    per_model, outputs = {}, {}
    sync(device)
    start = time.perf_counter()
    for name in models:
        t0 = time.perf_counter()
        completions = engine.generate(
            prompts,
            adapter=None if name == "base" else name,
            max_new_tokens=profiles[name],
            min_new_tokens=profiles[name],
            stop_token_ids=stop_ids,
            pad_token_id=pad_id,
        )
        sync(device)
        wall = time.perf_counter() - t0
        stats = engine.last_stats
        tokens = sum(len(c.token_ids) for c in completions)
        decode_tokens = sum(b.rows * (b.steps - 1) for b in stats.batches)
        prompt_tokens = sum(sum(b.prompt_lens) for b in stats.batches)
        prefill_slots = sum(b.prefill_slots for b in stats.batches)
        decode_s = sum(b.decode_s for b in stats.batches)
        per_model[name] = {
            "new_tokens": profiles[name],
            "wall_s": wall,
            "generated_tokens": tokens,
            "tokens_per_s": tokens / wall,
            "merge_s": stats.merge_s,
            "capture_s": stats.capture_s,
            "prefill_s": sum(b.prefill_s for b in stats.batches),
            "prompt_tokens": prompt_tokens,
            # Slots the prefill computed (each chunk padded to its longest prompt, filler rows included).
            "prefill_slots": prefill_slots,
            "prefill_padding_share": 1 - prompt_tokens / prefill_slots,
            "decode_s": decode_s,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s else None,
            "decode_ms_per_step": 1000 * decode_s / max(1, sum(b.steps - 1 for b in stats.batches)),
            "batches": [
                {
                    "rows": b.rows,
                    "graph_rows": b.graph_rows,
                    "padded_prompt_len": b.padded_prompt_len,
                    "prefill_slots": b.prefill_slots,
                    "steps": b.steps,
                }
                for b in stats.batches
            ],
            "_schedule": [{"prompt_lens": b.prompt_lens, "steps": b.steps} for b in stats.batches],
        }
        outputs[name] = [c.token_ids for c in completions]
        log(
            f"fast {name:8s}: {tokens:>8,} tokens in {wall:6.1f}s = {tokens / wall:>9,.0f} tok/s "
            f"(prefill {per_model[name]['prefill_s']:.1f}s, {per_model[name]['prefill_padding_share']:.0%} of its "
            f"slots padding, decode {decode_s:.1f}s, capture {stats.capture_s:.1f}s, "
            f"{per_model[name]['decode_ms_per_step']:.2f} ms/step at {stats.batches[0].graph_rows} rows)"
        )
    wall = time.perf_counter() - start
    tokens = sum(m["generated_tokens"] for m in per_model.values())
    prompt_tokens = sum(m["prompt_tokens"] for m in per_model.values())
    prefill_slots = sum(m["prefill_slots"] for m in per_model.values())
    totals = {
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "capture_s": sum(m["capture_s"] for m in per_model.values()),
        "prefill_s": sum(m["prefill_s"] for m in per_model.values()),
        "prefill_padding_share": 1 - prompt_tokens / prefill_slots,
        "decode_s": sum(m["decode_s"] for m in per_model.values()),
        "merge_s": sum(m["merge_s"] for m in per_model.values()),
        "max_batch_size": engine.max_batch_size,
        "max_batch_rows": engine._capacity[0],
        "cache_slots": engine._capacity[1],
        "cuda_graphs": engine.use_graphs,
        "context_bucket": engine.bucket,
    }
    return {"totals": totals, "per_model": per_model, "outputs": outputs}


def hf_batch_baseline(
    peft_model, prompts, models, profiles, *, batch: int, n_batches: int, stop_ids, pad_id, device
):
    """HF ``generate`` at ``batch`` rows, unmerged adapters: time the first ``n_batches`` per model."""
    per_model, outputs = {}, {}
    with adapter_context(peft_model, models[-1]):  # warm-up: kernels, cuBLAS handles, LoRA path
        hf_generate(peft_model, prompts[:batch], max_new=2, min_new=2, stop_ids=stop_ids, pad_id=pad_id)
    with peft_model.disable_adapter():
        hf_generate(peft_model, prompts[:batch], max_new=2, min_new=2, stop_ids=stop_ids, pad_id=pad_id)
    for name in models:
        new = profiles[name]
        times, rows = [], []
        for k in range(n_batches):
            part = prompts[k * batch : (k + 1) * batch]
            if not part:
                break
            sync(device)
            t0 = time.perf_counter()
            with adapter_context(peft_model, name):
                rows += hf_generate(
                    peft_model, part, max_new=new, min_new=new, stop_ids=stop_ids, pad_id=pad_id
                )
            sync(device)
            times.append(time.perf_counter() - t0)
        total_batches = math.ceil(len(prompts) / batch)
        per_batch = sum(times) / len(times)
        per_model[name] = {
            "measured_batches": len(times),
            "measured_s": sum(times),
            "measured_tokens": sum(map(len, rows)),
            "s_per_batch": per_batch,
            "ms_per_step": 1000 * per_batch / new,
            "batches_in_eval": total_batches,
            "extrapolated_wall_s": per_batch * total_batches,
        }
        outputs[name] = rows
        log(
            f"hf b{batch} {name:8s}: {per_batch:6.2f}s per batch of {new} new tokens -> {per_batch * total_batches:7.1f}s"
        )
    return per_model, outputs


def one_at_a_time(peft_model, prompts, *, adapter: str, new: int, stop_ids, pad_id, device) -> dict:
    """One problem per ``generate`` call, as a usage snippet does; time = a + b * new_tokens per problem."""
    with adapter_context(peft_model, adapter):
        hf_generate(peft_model, prompts[:1], max_new=2, min_new=2, stop_ids=stop_ids, pad_id=pad_id)

        def timed(sample, max_new):
            sync(device)
            t0 = time.perf_counter()
            for p in sample:
                hf_generate(
                    peft_model, [p], max_new=max_new, min_new=max_new, stop_ids=stop_ids, pad_id=pad_id
                )
            sync(device)
            return (time.perf_counter() - t0) / len(sample)

        short = timed(prompts, new)
        one = timed(prompts[: max(1, min(8, len(prompts)))], 1)
    per_token = (short - one) / (new - 1)
    fixed = one - per_token
    if per_token <= 0 or fixed < 0:  # timing noise on tiny runs: fall back to time proportional to tokens
        per_token, fixed = short / new, 0.0
    return {
        "adapter": adapter,
        "problems": len(prompts),
        "new_tokens": new,
        "s_per_problem": short,
        "tokens_per_s": new / short,
        "s_per_problem_1_token": one,
        "fit": {"fixed_s": fixed, "per_token_s": per_token},
    }


def fp32_exactness(
    device: torch.device, *, smoke: bool, problems: int, new: int, stop_ids, pad_id, options: dict
) -> dict:
    """fp32 (no TF32) on a few layers of the real width: the algorithm is exact, not just close."""
    config = common.smoke_config() if smoke else common.qwen3_4b_config(num_layers=4)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = common.build_random_model(config, device=str(device), dtype=torch.float32, seed=5)
        peft_model = common.add_random_adapters(model, ["level_1"], seed=6)
        lo, hi = (12, 20) if smoke else (120, 200)
        prompts = common.synthetic_prompts(
            problems, vocab_size=config.vocab_size, min_len=lo, max_len=hi, seed=7
        )
        engine = FastGenerator(peft_model, **options)
        # Which path the check ran (the Triton kernels turn themselves off where they disagree with eager).
        out = {
            "layers": config.num_hidden_layers,
            "problems": problems,
            "new_tokens": new,
            "fused_kernels": engine.fused_status,
        }
        for name in ("base", "level_1"):
            with adapter_context(peft_model, name):
                expected = hf_generate(
                    peft_model, prompts, max_new=new, min_new=new, stop_ids=stop_ids, pad_id=pad_id
                )
            got = engine.generate(
                prompts,
                adapter=None if name == "base" else name,
                max_new_tokens=new,
                min_new_tokens=new,
                stop_token_ids=stop_ids,
                pad_token_id=pad_id,
            )
            out[name] = match_stats([c.token_ids for c in got], expected)
        engine.close()
        del engine, peft_model, model
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def floors(fast: dict, *, config, weight_bytes: int, dtype, peaks: dict, measured_bw: float | None) -> dict:
    """Decode roofline of the fast run's schedule, and a whole-eval floor (prefill compute + decode bytes)."""
    schedule = [b for m in fast["per_model"].values() for b in m["_schedule"]]
    kv = common.kv_bytes_per_token(config, dtype)
    params = common.matmul_params(config)
    out = {
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv,
        "bandwidth_source": peaks["source"],
        "datasheet_bandwidth": peaks["bandwidth"],
        "measured_copy_bandwidth": measured_bw,
        "bf16_peak_flops": peaks["bf16_flops"],
    }
    achieved_decode = sum(m["decode_s"] for m in fast["per_model"].values())
    # Prefill: every real prompt token through every layer's linears, plus causal attention.
    layer_params = params - config.hidden_size * config.vocab_size
    attn = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    prefill_flops = sum(
        2 * n * layer_params + attn * n * n + 2 * config.hidden_size * config.vocab_size
        for b in schedule
        for n in b["prompt_lens"]
    )
    prefill_floor = prefill_flops / peaks["bf16_flops"] if peaks["bf16_flops"] else None
    for label, bandwidth in (("datasheet", peaks["bandwidth"]), ("measured", measured_bw)):
        if not bandwidth:
            continue
        floor = common.decode_floor(
            schedule,
            weight_bytes=weight_bytes,
            kv_per_token=kv,
            matmul_params=params,
            bandwidth=bandwidth,
            flops=peaks["bf16_flops"],
        )
        decode_tokens = floor["decode_tokens"]
        decode_floor_s = max(floor["memory_floor_s"], floor.get("compute_floor_s", 0.0))
        out[label] = {
            **floor,
            "achieved_decode_tokens_per_s": decode_tokens / achieved_decode,
            "decode_share_of_roofline": (decode_tokens / achieved_decode) / floor["roofline_tokens_per_s"],
            "end_to_end_share_of_roofline": fast["totals"]["tokens_per_s"] / floor["roofline_tokens_per_s"],
            "prefill_flops": prefill_flops,
            "prefill_compute_floor_s": prefill_floor,
            "whole_eval_floor_s": (prefill_floor or 0.0) + decode_floor_s,
            "whole_eval_share_of_floor": ((prefill_floor or 0.0) + decode_floor_s) / fast["totals"]["wall_s"],
        }
    return out


# ---------------------------------------------------------------- main and its stages
@dataclass
class EvalInputs:
    """The model shape, prompts and generation settings that every measured stage shares."""

    device: torch.device
    smoke: bool
    config: Qwen3Config
    dtype: torch.dtype
    models: list[str]  # evaluated, in this order
    adapters: list[str]  # built: level_1 even when only the base is evaluated, for baseline (b)
    profiles: dict[str, int]  # new tokens forced per model
    prompts: list[list[int]]
    hf_batch: int
    gen: dict  # stop_ids and pad_id, as every generate call takes them
    engine_options: dict  # FastGenerator's optional paths switched on for the measured runs


def engine_options(args: argparse.Namespace) -> dict:
    """The FastGenerator settings of ``--decode-attention`` and ``--fuse-projections`` (empty: defaults)."""
    options = {}
    if args.decode_attention:
        options["decode_attention"] = DecodeAttentionConfig.parse(args.decode_attention)
    if args.fuse_projections:
        options["fuse_projections"] = True
    return options


def describe_options(options: dict) -> dict:
    """The options as the JSON records them."""
    return {k: v.spec() if isinstance(v, DecodeAttentionConfig) else v for k, v in options.items()}


def main(argv=None) -> dict:
    """Every stage in order, then the summary and the JSON (``--markdown``: only a result's README table)."""
    args = parse_args(argv)
    if args.markdown:
        return print_markdown(args.markdown)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_path = common.default_out("bench_eval.json", args.out)
    result = describe_run(device, smoke=args.smoke)
    options = engine_options(args)
    result["engine_options"] = describe_options(options)
    run_self_check(result, device, options)
    if args.self_check_only:
        return _write(result, out_path)
    inputs = build_inputs(args, device, options)
    peaks, measured_bw = measure_bandwidth(result, device)
    peft_model, weights = build_model(result, inputs)
    fast = run_fast_eval(result, inputs, peft_model, max_batch_size=args.max_batch_size)
    run_roofline(result, inputs, fast, weights=weights, peaks=peaks, measured_bw=measured_bw)
    _write(result, out_path)  # a run stopped by a time limit keeps what it measured; rewritten as it goes
    eager = run_eager_ablation(result, inputs, peft_model, fast, max_batch_size=args.max_batch_size)
    run_option_ablations(result, inputs, peft_model, fast, max_batch_size=args.max_batch_size)
    run_batch_cap_ablation(result, inputs, peft_model, fast, max_batch_size=args.max_batch_size)
    _write(result, out_path)
    empty_cache(device)
    if not args.skip_baselines:
        hf = run_hf_batch_baseline(result, inputs, peft_model, n_batches=args.hf_batches)
        compare_with_hf(result, inputs, fast, eager, hf)
        run_one_at_a_time(result, inputs, peft_model, sample=args.single_problems)
    peft_model = None  # free the 4B model before the fp32 check
    empty_cache(device)
    run_fp32_check(result, inputs)
    judge(result, inputs.models)
    _table(result)
    return _write(result, out_path)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line's options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, few problems: checks the script on a CPU"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default $OUT/bench_eval.json or bench/results/)"
    )
    parser.add_argument(
        "--models", type=int, default=6, help="how many of base, L1..L5 to evaluate (default 6)"
    )
    parser.add_argument(
        "--problems", type=int, default=None, help="problems per model (default 1319; smoke 12)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=2048, help="fast engine's row cap (memory caps it too)"
    )
    parser.add_argument(
        "--hf-batches", type=int, default=1, help="HF batches timed per model for baseline (a)"
    )
    parser.add_argument("--single-problems", type=int, default=None, help="baseline (b) sample (default 64)")
    parser.add_argument(
        "--skip-baselines",
        action="store_true",
        help="skip baselines (a) and (b) and the bf16 comparison with HF generate (the fp32 check still runs)",
    )
    parser.add_argument(
        "--self-check-only", action="store_true", help="run only the tiny exactness self-check"
    )
    parser.add_argument(
        "--decode-attention",
        default=None,
        help="the Triton decode attention's launch configuration, e.g. block_n=32,num_warps=4,splits=2 "
        "(bench.tune_decode_attention prints the best one); default: the engine's",
    )
    parser.add_argument(
        "--fuse-projections",
        action="store_true",
        help="one GEMM for q/k/v and one for gate/up per layer (FastGenerator(fuse_projections=True))",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="print the README table of a result JSON")
    return parser.parse_args(argv)


def run_stage(result: dict, name: str, fn):
    """Run one stage; a failure is logged and recorded, and the later stages that do not need it still run."""
    try:
        return fn()
    except Exception as error:  # one scarce GPU run should report every stage it can
        log(f"stage {name} FAILED: {error!r}\n{traceback.format_exc()}")
        result.setdefault("errors", {})[name] = f"{error!r}"
        return None


def print_markdown(path: Path) -> dict:
    """Print the README table of a result file and return the result."""
    result = json.loads(path.read_text(encoding="utf-8"))
    print(markdown_table(result))
    return result


def describe_run(device: torch.device, *, smoke: bool) -> dict:
    """The result's header: schema, mode, date, device and library versions."""
    result: dict = {
        "schema_version": 1,
        "benchmark": "eval",
        "smoke": smoke,
        "date": common.utc_now(),
        "device": common.device_info(device),
        "libraries": common.library_versions("triton"),
    }
    log(f"device {result['device']['name']} ({device.type}); {result['libraries']}")
    return result


def run_self_check(result: dict, device: torch.device, options: dict) -> None:
    """The tiny fp32 exactness self-check, into ``result["self_check"]``."""
    log("self-check: tiny fp32 model, fast engine vs HF generate")
    result["self_check"] = run_stage(result, "self_check", lambda: self_check(device, options))
    log(f"self-check: {json.dumps(result['self_check'])}")


def build_inputs(args: argparse.Namespace, device: torch.device, options: dict) -> EvalInputs:
    """The config, prompts, token profiles and batch sizes of the run (smoke: tiny, profiles / 10)."""
    smoke = args.smoke
    config = common.smoke_config() if smoke else common.qwen3_4b_config()
    models = list(common.EVAL_PROFILES)[: args.models]
    profiles = (
        {k: math.ceil(v / 10) for k, v in common.EVAL_PROFILES.items()}
        if smoke
        else dict(common.EVAL_PROFILES)
    )
    n_problems = args.problems or (12 if smoke else GSM8K_TEST_PROBLEMS)
    lo, hi = (12, 20) if smoke else (120, 200)
    return EvalInputs(
        device=device,
        smoke=smoke,
        config=config,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        models=models,
        adapters=[m for m in models if m != "base"] or ["level_1"],
        profiles=profiles,
        prompts=common.synthetic_prompts(
            n_problems, vocab_size=config.vocab_size, min_len=lo, max_len=hi, seed=0
        ),
        hf_batch=4 if smoke else 64,
        gen={"stop_ids": [config.eos_token_id, config.pad_token_id], "pad_id": config.pad_token_id},
        engine_options=options,
    )


def measure_bandwidth(result: dict, device: torch.device) -> tuple[dict, float | None]:
    """The datasheet peaks for the device, and its measured copy bandwidth on a GPU."""
    peaks = common.device_peaks(result["device"]["name"] if device.type == "cuda" else "cpu")
    measured_bw = (
        run_stage(result, "bandwidth", lambda: common.measure_copy_bandwidth(device))
        if device.type == "cuda"
        else None
    )
    if measured_bw:
        log(f"device-to-device copy bandwidth {measured_bw / 1e12:.2f} TB/s (datasheet {peaks['bandwidth']})")
    return peaks, measured_bw


def build_model(result: dict, inputs: EvalInputs) -> tuple[object, int]:
    """The random base with its LoRA adapters, described in ``result["setup"]``; returns it and its weight bytes."""
    config, dtype, device, prompts = inputs.config, inputs.dtype, inputs.device, inputs.prompts
    log(
        f"building random {config.num_hidden_layers}-layer model (hidden {config.hidden_size}) on {device} in {dtype}"
    )
    t0 = time.perf_counter()
    model = common.build_random_model(config, device=str(device), dtype=dtype, seed=0)
    peft_model = common.add_random_adapters(model, inputs.adapters, seed=1)
    sync(device)
    weights = common.weight_bytes(peft_model)
    result["setup"] = {
        "model": {
            "shape": "smoke" if inputs.smoke else "Qwen3-4B",
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "vocab": config.vocab_size,
            "dtype": str(dtype),
            "attention": "sdpa",
            "weight_bytes": weights,
        },
        "adapters": {
            "names": inputs.adapters,
            "r": 16,
            "alpha": 32,
            "target_modules": "all-linear",
            "B": "N(0, 0.02)",
        },
        "problems_per_model": len(prompts),
        "prompt_tokens": {
            "min": min(map(len, prompts)),
            "max": max(map(len, prompts)),
            "mean": sum(map(len, prompts)) / len(prompts),
        },
        "models": inputs.models,
        "new_tokens": {m: inputs.profiles[m] for m in inputs.models},
        "build_s": time.perf_counter() - t0,
    }
    log(
        f"built in {result['setup']['build_s']:.1f}s: {weights / 1e9:.2f} GB of weights, adapters {inputs.adapters}"
    )
    return peft_model, weights


def timed_fast_eval(
    inputs: EvalInputs,
    peft_model,
    models: list[str],
    *,
    max_batch_size: int,
    fused_kernels=None,
    options: dict | None = None,
) -> dict:
    """A fresh fast engine on ``models``; its wall time and tokens/s include the engine's start.

    ``options``: the engine's optional paths (default: the run's ``--decode-attention``/``--fuse-projections``)."""
    options = inputs.engine_options if options is None else options
    sync(inputs.device)
    t0 = time.perf_counter()
    engine = FastGenerator(peft_model, max_batch_size=max_batch_size, fused_kernels=fused_kernels, **options)
    init_s = time.perf_counter() - t0  # includes compiling and checking the Triton kernels
    log(f"fast engine ready in {init_s:.1f}s; fused decode kernels {engine.fused_status}")
    try:
        out = fast_eval(engine, inputs.prompts, models, inputs.profiles, device=inputs.device, **inputs.gen)
    finally:
        engine.close()
    totals = out["totals"]
    totals.update(
        engine_init_s=init_s,
        fused_kernels=engine.fused_status,
        fused_check=engine.fused_check,
        engine_options=describe_options(options),
        wall_s=totals["wall_s"] + init_s,
    )
    totals["tokens_per_s"] = totals["generated_tokens"] / totals["wall_s"]
    return out


def public(per_model: dict) -> dict:
    """Per-model figures without the private (``_``-prefixed) keys, for the JSON."""
    return {name: {k: v for k, v in m.items() if not k.startswith("_")} for name, m in per_model.items()}


def run_fast_eval(result: dict, inputs: EvalInputs, peft_model, *, max_batch_size: int) -> dict | None:
    """The fast engine on the whole eval, into ``result["fast"]``."""
    fast = run_stage(
        result,
        "fast",
        lambda: timed_fast_eval(inputs, peft_model, inputs.models, max_batch_size=max_batch_size),
    )
    if fast:
        result["fast"] = {"totals": fast["totals"], "per_model": public(fast["per_model"])}
        t = fast["totals"]
        log(
            f"fast whole eval: {t['generated_tokens']:,} tokens in {t['wall_s']:.1f}s = {t['tokens_per_s']:,.0f} tok/s"
        )
    return fast


def run_roofline(
    result: dict, inputs: EvalInputs, fast: dict | None, *, weights: int, peaks: dict, measured_bw
) -> None:
    """The decode roofline of the fast run's schedule, into ``result["roofline"]``."""
    if not fast:
        return
    result["roofline"] = run_stage(
        result,
        "roofline",
        lambda: floors(
            fast,
            config=inputs.config,
            weight_bytes=weights,
            dtype=inputs.dtype,
            peaks=peaks,
            measured_bw=measured_bw,
        ),
    )


def run_eager_ablation(
    result: dict, inputs: EvalInputs, peft_model, fast: dict | None, *, max_batch_size: int
) -> dict | None:
    """The base model's decode again with eager ops, when the fast run used the Triton kernels."""
    if not (fast and fast["totals"]["fused_kernels"].startswith("on")):
        return None
    log("ablation: base model with eager decode ops (no Triton kernels)")
    return rerun_base(
        result, result, "ablation_eager_base", inputs, peft_model, max_batch_size=max_batch_size, fused_kernels=False
    )


def rerun_base(
    result: dict, into: dict, key: str, inputs: EvalInputs, peft_model, *, stage: str | None = None, **engine
) -> dict | None:
    """The base model alone on a fresh engine (``engine``: timed_fast_eval's options), recorded as ``into[key]``
    (totals and public per-model figures; a failure is recorded in ``result`` under ``stage``, default
    ``key``); returns the whole run."""
    run = run_stage(result, stage or key, lambda: timed_fast_eval(inputs, peft_model, ["base"], **engine))
    if run:
        into[key] = {"totals": run["totals"], "per_model": public(run["per_model"])}
    return run


def run_option_ablations(
    result: dict, inputs: EvalInputs, peft_model, fast: dict | None, *, max_batch_size: int
) -> None:
    """With optional engine paths on: the base model's decode again with the default engine, and with each
    option alone, into ``result["ablation_engine_options"]`` (label: that run's engine options)."""
    options = inputs.engine_options
    if not (fast and options):
        return
    variants = {"default engine": {}}
    if len(options) > 1:
        variants.update({f"only {key}": {key: value} for key, value in options.items()})
    result["ablation_engine_options"] = {}
    for label, variant in variants.items():
        log(f"ablation: base model, {label} {describe_options(variant)}")
        rerun_base(
            result, result["ablation_engine_options"], label, inputs, peft_model, stage=f"ablation {label}",
            max_batch_size=max_batch_size, options=variant,
        )  # fmt: skip


def run_batch_cap_ablation(
    result: dict, inputs: EvalInputs, peft_model, fast: dict | None, *, max_batch_size: int
) -> None:
    """The base model again at the former row cap, into ``result["ablation_batch_cap_base"]``: what the
    larger batches buy (same engine options, same prompts)."""
    if not fast or max_batch_size == FORMER_BATCH_CAP:
        return
    log(f"ablation: base model at the former {FORMER_BATCH_CAP}-row cap")
    rerun_base(result, result, "ablation_batch_cap_base", inputs, peft_model, max_batch_size=FORMER_BATCH_CAP)


def run_hf_batch_baseline(result: dict, inputs: EvalInputs, peft_model, *, n_batches: int):
    """Baseline (a), HF ``generate`` in batches with unmerged adapters, into ``result["baseline_hf_batch"]``."""
    hf_batch, models, profiles = inputs.hf_batch, inputs.models, inputs.profiles
    log(f"baseline (a): HF generate batch {hf_batch}, unmerged adapters, {n_batches} batch(es) per model")
    hf = run_stage(
        result,
        "baseline_hf_batch",
        lambda: hf_batch_baseline(
            peft_model,
            inputs.prompts,
            models,
            profiles,
            batch=hf_batch,
            n_batches=n_batches,
            device=inputs.device,
            **inputs.gen,
        ),
    )
    if hf:
        hf_models, _ = hf
        hf_wall = sum(m["extrapolated_wall_s"] for m in hf_models.values())
        eval_tokens = len(inputs.prompts) * sum(profiles[m] for m in models)
        result["baseline_hf_batch"] = {
            "batch_size": hf_batch,
            "per_model": hf_models,
            "extrapolated_wall_s": hf_wall,
            "tokens_per_s": eval_tokens / hf_wall,
            "method": f"{n_batches} batch(es) of {hf_batch} per model timed after a warm-up; mean batch time "
            "x batches in the eval (the last, partial batch counted as a full one: HF's step cost is host-bound)",
        }
    return hf


def compare_with_hf(result: dict, inputs: EvalInputs, fast: dict | None, eager: dict | None, hf) -> None:
    """The fast engine's tokens against HF ``generate``'s on the same problems, into ``result["match"]``."""
    if not (fast and hf):
        return
    _, hf_outputs = hf
    models = inputs.models
    result["match"] = {
        "dtype": str(inputs.dtype),
        "note": "fast engine's outputs in the whole-eval run vs HF generate on the same first problems",
        **{n: match_stats(fast["outputs"][n][: len(hf_outputs[n])], hf_outputs[n]) for n in models},
    }
    if eager and "base" in hf_outputs:
        result["match"]["base_eager_ops"] = match_stats(
            eager["outputs"]["base"][: len(hf_outputs["base"])], hf_outputs["base"]
        )
    for name in models:
        m = result["match"][name]
        log(
            f"match {name:8s}: {m['identical_rows']}/{m['rows']} rows identical, first token "
            f"{m['first_token_agree']}/{m['rows']}, mean agreeing prefix {m['mean_agreeing_prefix']:.1%}"
        )


def run_one_at_a_time(result: dict, inputs: EvalInputs, peft_model, *, sample: int | None) -> None:
    """Baseline (b), one problem per call extrapolated to the eval, into ``result["baseline_one_at_a_time"]``."""
    models, profiles, n_problems = inputs.models, inputs.profiles, len(inputs.prompts)
    single_n = sample or (4 if inputs.smoke else 64)
    short_model = models[-1] if models[-1] != "base" else inputs.adapters[-1]
    short_new = max(2, profiles[short_model])
    log(f"baseline (b): one problem at a time, {single_n} problems at {short_new} new tokens ({short_model})")
    single = run_stage(
        result,
        "baseline_one_at_a_time",
        lambda: one_at_a_time(
            peft_model,
            inputs.prompts[:single_n],
            adapter=short_model,
            new=short_new,
            device=inputs.device,
            **inputs.gen,
        ),
    )
    if not single:
        return
    fit = single["fit"]
    single_wall = sum(n_problems * (fit["fixed_s"] + fit["per_token_s"] * profiles[m]) for m in models)
    single.update(
        extrapolated_wall_s=single_wall,
        tokens_per_s_extrapolated=n_problems * sum(profiles[m] for m in models) / single_wall,
        method="per-problem time = fixed + per_token x new_tokens, fitted from the sample at "
        f"{short_new} new tokens and at 1, summed over every model's problems and token profile",
    )
    result["baseline_one_at_a_time"] = single
    log(
        f"one at a time: {single['s_per_problem']:.2f}s per problem ({single['tokens_per_s']:.1f} tok/s) -> "
        f"{single_wall:,.0f}s for the eval"
    )


def run_fp32_check(result: dict, inputs: EvalInputs) -> None:
    """fp32 exactness on a few layers of the real width, into ``result["match_fp32"]``."""
    smoke = inputs.smoke
    log("fp32 exactness check (TF32 off)")
    result["match_fp32"] = run_stage(
        result,
        "match_fp32",
        lambda: fp32_exactness(
            inputs.device,
            smoke=smoke,
            problems=8 if smoke else 64,
            new=16 if smoke else 64,
            options=inputs.engine_options,
            **inputs.gen,
        ),
    )
    log(f"fp32: {json.dumps(result['match_fp32'])}")


def judge(result: dict, models: list[str]) -> None:
    """The fast engine's speed-ups, issue 9's goals and issue 19's eval lines, from what the stages recorded."""
    fast = result.get("fast")
    hf = result.get("baseline_hf_batch")
    single = result.get("baseline_one_at_a_time")
    result["speedup"] = {}
    if fast and hf:
        result["speedup"]["vs_hf_batch"] = hf["extrapolated_wall_s"] / fast["totals"]["wall_s"]
    if fast and single:
        result["speedup"]["vs_one_at_a_time"] = single["extrapolated_wall_s"] / fast["totals"]["wall_s"]
    roof = (
        (result.get("roofline") or {}).get("datasheet")
        or (result.get("roofline") or {}).get("measured")
        or {}
    )
    match, fp32 = result.get("match") or {}, result.get("match_fp32") or {}
    fp32_match = bool(fp32) and all(fp32[k]["identical_rows"] == fp32[k]["rows"] for k in ("base", "level_1"))
    decode_share = roof.get("decode_share_of_roofline", 0) >= 0.4
    # None where the HF baselines a goal needs did not run (--skip-baselines): not measured is not missed. A
    # stage that ran and failed (its result None, its error in "errors") counts as a miss.
    result["goals"] = {
        "whole_eval_10x_vs_hf_batch64": result["speedup"].get("vs_hf_batch", 0) >= 10 if hf else None,
        "end_to_end_40pct_of_decode_roofline": roof.get("end_to_end_share_of_roofline", 0) >= 0.4,
        "decode_40pct_of_decode_roofline": decode_share,
        "match_all_rows": all(match[n]["identical_rows"] == match[n]["rows"] for n in models) if match else None,
        "fp32_match_all_rows": fp32_match,
        "self_check": bool(result["self_check"] and result["self_check"]["ok"]),
    }
    # Issue 19's four eval lines, all from this run.
    fused = (fast or {}).get("totals", {}).get("fused_kernels", "")
    result["goals_issue_19"] = {
        "fused_kernels_on": fused.startswith("on"),
        "decode_40pct_of_decode_roofline": decode_share,
        "whole_eval_at_most_45s": bool(fast) and fast["totals"]["wall_s"] <= 45,
        "fp32_match_all_rows": fp32_match and str(fp32.get("fused_kernels", "")).startswith("on"),
    }


def _ablation_base(result: dict, key: str) -> dict | None:
    """The base model's figures in the ablation ``key`` (None when it did not run)."""
    return (result.get(key) or {}).get("per_model", {}).get("base")


def _table(result: dict) -> None:
    """The short summary printed last (the device reply carries the end of the output)."""
    fast = (result.get("fast") or {}).get("totals")
    hf = result.get("baseline_hf_batch")
    single = result.get("baseline_one_at_a_time")
    speed = result.get("speedup", {})
    lines = ["", f"{'method':44s} {'whole eval s':>12s} {'tokens/s':>10s} {'fast is':>8s}"]
    if fast:
        lines.append(f"{'fast engine (measured)':44s} {fast['wall_s']:12.1f} {fast['tokens_per_s']:10,.0f}")
    if hf:
        label = f"HF generate b{hf['batch_size']} unmerged (extrapolated)"
        lines.append(
            f"{label:44s} {hf['extrapolated_wall_s']:12.1f} {hf['tokens_per_s']:10,.0f} "
            f"{speed.get('vs_hf_batch', float('nan')):7.1f}x"
        )
    if single:
        lines.append(
            f"{'one at a time (extrapolated)':44s} {single['extrapolated_wall_s']:12.1f} "
            f"{single['tokens_per_s_extrapolated']:10,.1f} {speed.get('vs_one_at_a_time', float('nan')):7.1f}x"
        )
    roofline = result.get("roofline") or {}
    for label in ("datasheet", "measured"):
        roof = roofline.get(label)
        if roof:
            lines.append(
                f"decode roofline ({label} bandwidth) {roof['roofline_tokens_per_s']:,.0f} tok/s at "
                f"{roof['mean_rows_per_step']:.0f} rows, context {roof['mean_context']:.0f}: decode reached "
                f"{roof['decode_share_of_roofline']:.0%}, end to end {roof['end_to_end_share_of_roofline']:.0%}; "
                f"whole-eval floor {roof['whole_eval_floor_s']:.1f}s = {roof['whole_eval_share_of_floor']:.0%} of wall"
            )
    # The ablations rerun the base model: each is compared with the whole eval's base model.
    base = result["fast"]["per_model"].get("base") if fast else None
    eager = _ablation_base(result, "ablation_eager_base")
    if eager and base:
        lines.append(
            f"base decode step: {base['decode_ms_per_step']:.2f} ms fused kernels vs {eager['decode_ms_per_step']:.2f} ms eager"
        )
    options = (result.get("ablation_engine_options") or {}) if base else {}
    for label, run in options.items():
        lines.append(
            f"base decode step: {base['decode_ms_per_step']:.2f} ms with "
            f"{json.dumps(result['engine_options'])} vs {run['per_model']['base']['decode_ms_per_step']:.2f} ms "
            f"{label} {json.dumps(run['totals']['engine_options'])}; base wall "
            f"{base['wall_s']:.1f}s vs {run['per_model']['base']['wall_s']:.1f}s"
        )
    capped = _ablation_base(result, "ablation_batch_cap_base")
    if capped and base:
        lines.append(
            f"base: {base['wall_s']:.1f}s wall, {base['decode_ms_per_step']:.2f} ms/step at "
            f"{base['batches'][0]['graph_rows']} rows (cap {fast['max_batch_size']}) vs {capped['wall_s']:.1f}s, "
            f"{capped['decode_ms_per_step']:.2f} ms/step at {capped['batches'][0]['graph_rows']} rows "
            f"(cap {FORMER_BATCH_CAP})"
        )
    lines.append(f"goals: {json.dumps(result['goals'])}")
    lines.append(f"goals of issue 19: {json.dumps(result['goals_issue_19'])}")
    if result.get("errors"):
        lines.append(f"errors: {json.dumps(result['errors'])}")
    print("\n".join(lines), flush=True)


def markdown_table(result: dict) -> str:
    """The README table for one result file: device, libraries, date, then one row per method."""
    lib = result["libraries"]
    fast = result["fast"]["totals"]
    hf = result.get("baseline_hf_batch")
    single = result.get("baseline_one_at_a_time")
    roofline = result.get("roofline") or {}
    roof = roofline.get("datasheet") or roofline.get("measured") or {}
    setup = result["setup"]
    tokens = fast["generated_tokens"]
    lines = [
        f"{result['device']['name']}, torch {lib['torch']}, transformers {lib['transformers']}, "
        f"peft {lib['peft']}, CUDA {lib['cuda']}, {result['date']}; {setup['problems_per_model']} problems x "
        f"{len(setup['models'])} models, {tokens:,} generated tokens.",
        "",
        "| method | whole eval (s) | tokens/s | fast engine speed-up |",
        "|---|---|---|---|",
        f"| fast engine (measured) | {fast['wall_s']:,.1f} | {fast['tokens_per_s']:,.0f} | - |",
    ]
    if hf:  # not with --skip-baselines
        lines.append(
            f"| HF `generate`, batch {hf['batch_size']}, unmerged LoRA (extrapolated) | {hf['extrapolated_wall_s']:,.0f} "
            f"| {hf['tokens_per_s']:,.0f} | {result['speedup']['vs_hf_batch']:.1f}x |"
        )
    if single:
        lines.append(
            f"| one problem at a time (extrapolated) | {single['extrapolated_wall_s']:,.0f} "
            f"| {single['tokens_per_s_extrapolated']:,.1f} | {result['speedup']['vs_one_at_a_time']:.0f}x |"
        )
    if roof:
        lines += [
            "",
            f"Decode roofline of the fast run's schedule ({roofline['bandwidth_source']}, "
            f"{roof['mean_rows_per_step']:.0f} rows a step, mean context {roof['mean_context']:.0f}): "
            f"{roof['roofline_tokens_per_s']:,.0f} tokens/s. Decode steps reached "
            f"{roof['decode_share_of_roofline']:.0%} of it; the whole eval, prefill included, "
            f"{roof['end_to_end_share_of_roofline']:.0%}. Whole-eval floor (prefill FLOPs at peak + decode bytes "
            f"or FLOPs, whichever is larger): {roof['whole_eval_floor_s']:.1f} s, "
            f"{roof['whole_eval_share_of_floor']:.0%} of the measured wall time.",
        ]
    lines += [
        "",
        f"Decode kernels: {fast.get('fused_kernels', 'eager')}; engine start {fast.get('engine_init_s', 0):.1f} s.",
    ]
    if "prefill_padding_share" in fast:  # not in results from before prefill chunks had their own padding
        lines.append(
            f"Prefill {fast['prefill_s']:.1f} s; {fast['prefill_padding_share']:.0%} of the token slots it computed "
            "were padding."
        )
    # The ablations rerun the base model: each is compared with the whole eval's base model.
    base = result["fast"]["per_model"].get("base")
    eager = _ablation_base(result, "ablation_eager_base")
    if eager:
        lines.append(
            f"Base model decode step: {base['decode_ms_per_step']:.2f} ms with the Triton kernels, "
            f"{eager['decode_ms_per_step']:.2f} ms with eager ops ({eager['batches'][0]['graph_rows']} rows)."
        )
    for label, run in (result.get("ablation_engine_options") or {}).items():
        lines.append(
            f"Engine options {result['engine_options']}: base model decode step {base['decode_ms_per_step']:.2f} ms "
            f"(wall {base['wall_s']:.1f} s); {label} {run['totals']['engine_options']}: "
            f"{run['per_model']['base']['decode_ms_per_step']:.2f} ms (wall {run['per_model']['base']['wall_s']:.1f} s)."
        )
    capped = _ablation_base(result, "ablation_batch_cap_base")
    if capped:
        lines.append(
            f"Base model at up to {fast['max_batch_size']} rows a batch ({base['batches'][0]['graph_rows']} "
            f"rows): wall {base['wall_s']:.1f} s, decode step {base['decode_ms_per_step']:.2f} ms; at the former "
            f"{FORMER_BATCH_CAP}-row cap ({capped['batches'][0]['graph_rows']} rows): wall {capped['wall_s']:.1f} s, "
            f"decode step {capped['decode_ms_per_step']:.2f} ms."
        )
    match = result.get("match") or {}
    models = [m for m in setup["models"] if m in match]
    if models:
        cells = ", ".join(
            f"{m} {match[m]['identical_rows']}/{match[m]['rows']} ({match[m]['mean_agreeing_prefix']:.0%})"
            for m in models
        )
        lines += [
            "",
            f"Token match vs HF `generate` ({match['dtype']}, identical rows, mean agreeing prefix): {cells}.",
        ]
    fp32 = result.get("match_fp32") or {}
    if fp32:
        lines.append(
            f"fp32, {fp32['layers']} layers, {fp32['problems']} problems x {fp32['new_tokens']} tokens: base "
            f"{fp32['base']['identical_rows']}/{fp32['base']['rows']}, merged adapter "
            f"{fp32['level_1']['identical_rows']}/{fp32['level_1']['rows']} rows identical"
            # Results from before 2026-12-02 (session 7) do not record the path the check ran.
            + (f"; fused kernels {fp32['fused_kernels']}." if "fused_kernels" in fp32 else ".")
        )
    return "\n".join(lines)


def _write(result: dict, path: Path) -> dict:
    """Write the result JSON and log where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
