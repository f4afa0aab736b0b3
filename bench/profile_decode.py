"""Where a decode step and a prefill of the fast engine spend their GPU time, by kernel class.

Random weights of the real Qwen3-4B shape (bf16, SDPA), ``--rows`` rows of ``--context`` tokens (the
bench_eval schedule's 440 rows and mean context 262). For the eager ops and for the Triton kernels:

- the decode step's wall time as the engine runs it (one CUDA-graph replay per step), from the engine's own
  clock of its decode loop (``BatchStats.decode_s``, as bench_eval reads it) over ``--steps`` steps: the
  difference of two whole ``generate`` calls carried their prefills' noise (at 1,319 rows, 29.7 and 33.5 ms for
  the same launch);
- the same difference under ``torch.profiler`` without graphs: each kernel's GPU time per step, by
  class (GEMM, attention, Triton, ...). Wall minus kernel time is the GPU idle between kernels;
- the prefill of ``--prefill-rows`` GSM8K-length prompts (120-200 tokens), timed and profiled: eager
  ops, then the Triton kernels at each ``--prefill-chunks`` size.

    python -m bench.profile_decode            # one CUDA GPU; writes $OUT/profile_decode.json or bench/results/
    python -m bench.profile_decode --smoke    # CPU check of the script (tiny shapes, no graphs, no Triton)
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench import common
from training.fast_generate import FastGenerator
from training.fused_kernels import DecodeAttentionConfig

# Kernel classes, by the first pattern that matches the kernel's name (cuBLAS names vary by version;
# the Triton decode attention counts as attention, the other Triton kernels as "triton").
KERNEL_CLASSES = (
    ("attention", r"sdpa|fmha|flash|attention|softmax"),
    ("triton", r"_add_rms_norm|_head_norm_rope|_silu_mul|triton"),
    ("gemm", r"gemm|gemv|cutlass|nvjet|xmma|sm90_|cublas"),
    ("cache write", r"index_copy|index_put|indexing_backward|scatter"),
    ("copy", r"memcpy|memset|copy_|direct_copy|CatArrayBatched|cat_"),
    ("reduce", r"reduce|argmax|max_kernel|mean"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
)


def kernel_class(name: str, classes=KERNEL_CLASSES) -> str:
    """The label of the first of ``classes`` (label, regex) whose pattern the kernel's name matches."""
    lowered = name.lower()
    for label, pattern in classes:
        if re.search(pattern, lowered):
            return label
    return "other"


def kernel_times(prof, *, cpu_ops: bool = False) -> dict[str, dict]:
    """GPU time (ms) and launches per kernel name, from a profiler run (``cpu_ops``: each CPU op's self
    time instead, for the CPU smoke runs)."""
    out: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "count": 0})
    for event in prof.events():
        if cpu_ops:
            if event.device_type != torch.autograd.DeviceType.CPU:
                continue
            ms = event.self_cpu_time_total / 1000
        elif event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        else:
            ms = event.time_range.elapsed_us() / 1000
        out[event.name]["ms"] += ms
        out[event.name]["count"] += 1
    return dict(out)


def per_step(longer: dict, shorter: dict, steps: int) -> dict[str, dict]:
    """Kernels of ``steps`` decode steps: the longer run's minus the shorter's, per step."""
    out = {}
    for name, figures in longer.items():
        base = shorter.get(name, {"ms": 0.0, "count": 0})
        ms, count = (figures["ms"] - base["ms"]) / steps, (figures["count"] - base["count"]) / steps
        if count > 0.01:
            out[name] = {"ms": ms, "count": count}
    return out


def by_class(kernels: dict[str, dict], table=KERNEL_CLASSES) -> dict[str, dict]:
    classes: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "count": 0.0})
    for name, figures in kernels.items():
        label = kernel_class(name, table)
        classes[label]["ms"] += figures["ms"]
        classes[label]["count"] += figures["count"]
    return dict(sorted(classes.items(), key=lambda kv: -kv[1]["ms"]))


def print_classes(classes: dict[str, dict]) -> None:
    for name, figures in classes.items():
        print(f"    {name:12s} {figures['ms']:8.2f} ms  {figures['count']:7.0f} launches", flush=True)


def top(kernels: dict[str, dict], n: int = 15, table=KERNEL_CLASSES) -> list[dict]:
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])[:n]
    return [{"kernel": name[:140], "class": kernel_class(name, table), **figures} for name, figures in ranked]


def timed(device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def decode_profile(model, prompts, *, fused: bool, steps: int, device, gen: dict, options: dict) -> dict:
    """Wall ms per graph-replayed step, and the per-step kernels without graphs (profiled).

    ``options``: further FastGenerator settings (the decode attention's launch configuration, ...)."""
    out = {}
    graphs = device.type == "cuda"
    engine = FastGenerator(
        model, max_batch_size=len(prompts), fused_kernels=fused, use_cuda_graphs=graphs, **options
    )
    out["fused_kernels"] = engine.fused_status

    def run(new):
        return engine.generate(prompts, max_new_tokens=new, min_new_tokens=new, **gen)

    run(1 + steps)  # allocation, graph captures, Triton compiles

    def decode_s() -> float:  # the engine's own clock of its decode loop, without the prefill
        run(1 + steps)
        return sum(batch.decode_s for batch in engine.last_stats.batches)

    out["wall_ms_per_step"] = 1000 * min(decode_s() for _ in range(2)) / steps
    engine.close()

    engine = FastGenerator(
        model, max_batch_size=len(prompts), fused_kernels=fused, use_cuda_graphs=False, **options
    )
    run(1 + steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof_short:
        run(1)
    with profile(activities=activities) as prof_long:
        run(1 + steps)
    engine.close()
    kernels = per_step(kernel_times(prof_long), kernel_times(prof_short), steps)
    out["kernel_ms_per_step"] = sum(k["ms"] for k in kernels.values())
    out["launches_per_step"] = sum(k["count"] for k in kernels.values())
    out["gpu_idle_ms_per_step"] = out["wall_ms_per_step"] - out["kernel_ms_per_step"]
    out["classes"] = by_class(kernels)
    out["top_kernels"] = top(kernels)
    return out


def prefill_profile(model, prompts, *, chunks: list[int], device, gen: dict, eager: bool = True) -> dict:
    """Prefill wall time (generate with 1 new token) and kernels: eager ops (unless not ``eager``), then Triton per
    chunk size."""
    out = {"prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)), "runs": {}}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for fused, tokens in ([(False, chunks[0])] if eager else []) + [(None, c) for c in chunks]:
        engine = FastGenerator(
            model, max_batch_size=len(prompts), prefill_tokens=tokens, use_cuda_graphs=False, fused_kernels=fused
        )

        def run(engine=engine):
            return engine.generate(prompts, max_new_tokens=1, **gen)

        run()
        wall = min(timed(device, run) for _ in range(2))
        with profile(activities=activities) as prof:
            run()
        engine.close()
        kernels = kernel_times(prof)
        label = f"{'triton' if engine.fused else 'eager'} chunk {tokens}"
        out["runs"][label] = {
            "wall_s": wall,
            "prompt_tokens_per_s": out["prompt_tokens"] / wall,
            "kernel_s": sum(k["ms"] for k in kernels.values()) / 1000,
            "classes": by_class(kernels),
            "top_kernels": top(kernels),
        }
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--rows", type=int, default=440)
    parser.add_argument("--context", type=int, default=262, help="prompt length of the decode rows")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill-rows", type=int, default=440)
    parser.add_argument("--prefill-chunks", default="16384,65536", help="prefill_tokens values to time")
    parser.add_argument(
        "--decode-attention",
        action="append",
        default=None,
        help="also profile the Triton path with this decode attention configuration "
        "(bench.tune_decode_attention's best:, e.g. block_n=32,num_warps=4,splits=2); repeatable",
    )
    parser.add_argument(
        "--fuse-projections",
        action="store_true",
        help="also profile the Triton path with one GEMM for q/k/v and one for gate/up (with each "
        "--decode-attention too)",
    )
    parser.add_argument("--skip-prefill", action="store_true", help="profile the decode step only")
    parser.add_argument(
        "--skip-eager",
        action="store_true",
        help="profile the Triton paths only (at the eval's 1,319 rows the eager decode and prefill take a minute)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    config = common.smoke_config() if args.smoke else common.qwen3_4b_config()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, context, steps = (4, 12, 2) if args.smoke else (args.rows, args.context, args.steps)
    model = common.build_random_model(config, device=str(device), dtype=dtype, seed=0)
    gen = {"stop_token_ids": [config.eos_token_id], "pad_token_id": config.pad_token_id}
    vocab = config.vocab_size
    decode_prompts = common.synthetic_prompts(
        rows, vocab_size=vocab, min_len=context, max_len=context, seed=1
    )
    lo, hi = (8, 16) if args.smoke else (120, 200)
    prefill_prompts = common.synthetic_prompts(
        4 if args.smoke else args.prefill_rows, vocab_size=vocab, min_len=lo, max_len=hi, seed=2
    )
    result = {
        "benchmark": "profile_decode",
        "smoke": args.smoke,
        "date": common.utc_now(),
        "device": common.device_info(device),
        "libraries": common.library_versions("triton"),
        "rows": rows,
        "context": context,
        "steps": steps,
        "decode": {},
    }
    attention = {f" {spec}": {"decode_attention": DecodeAttentionConfig.parse(spec)} for spec in args.decode_attention or []}
    variants = ([] if args.skip_eager else [("eager", False, {})]) + [("triton", True, {})] + [
        (f"triton{label}", True, options) for label, options in attention.items()
    ]
    if args.fuse_projections:
        variants += [
            (f"triton{label} + fused projections", True, {**options, "fuse_projections": True})
            for label, options in {"": {}, **attention}.items()
        ]
    with torch.no_grad():
        for label, fused, options in variants:
            result["decode"][label] = decode_profile(
                model, decode_prompts, fused=fused, steps=steps, device=device, gen=gen, options=options
            )
            d = result["decode"][label]
            print(
                f"decode {label}: {d['wall_ms_per_step']:.2f} ms/step wall, {d['kernel_ms_per_step']:.2f} ms "
                f"kernels ({d['launches_per_step']:.0f} launches), {d['fused_kernels']}",
                flush=True,
            )
            print_classes(d["classes"])
            # Written after every stage: a run stopped by its time limit keeps what it finished.
            common.write_result("profile_decode.json", result, args.out)
        chunks = [int(c) for c in args.prefill_chunks.split(",")]
        if not args.skip_prefill:
            result["prefill"] = prefill_profile(
                model, prefill_prompts, chunks=chunks, device=device, gen=gen, eager=not args.skip_eager
            )
    for label, figures in result.get("prefill", {"runs": {}})["runs"].items():
        print(
            f"prefill {label}: {figures['wall_s']:.3f}s, {figures['prompt_tokens_per_s']:,.0f} tok/s, "
            f"kernels {figures['kernel_s']:.3f}s",
            flush=True,
        )
        print_classes(figures["classes"])
    common.write_result("profile_decode.json", result, args.out)
    return result


if __name__ == "__main__":
    main()
