"""Launch configurations of the Triton decode attention, timed on the bench_eval decode shape.

One layer's decode attention as the fast engine runs it at 440 rows (``--rows``): 8 KV heads, each shared
by 4 query heads of 128, left-padded rows whose real slots average ``--context`` (262) tokens. For every
configuration in the grid (slots per block, warps, pipeline stages, flash-decoding splits, native-dtype
dot) it

- checks the output against SDPA in ulps of the largest term, with the fast engine's start-up limit
  (``training.fast_generate.ulp_report`` / ``ulp_limit``); a configuration that fails, or fails to compile,
  is reported and never chosen;
- times ``--iters`` back-to-back launches with CUDA events (one decode step runs 36 of them) and reports
  the KV bytes read per second against the datasheet bandwidth (H200: 4.8 TB/s).

The fastest passing configuration is printed as ``best: <spec>``; ``--decode-attention <spec>`` hands it to
``bench.bench_eval`` and ``bench.profile_decode``.

    python -m bench.tune_decode_attention          # one CUDA GPU; writes $OUT/tune_decode_attention.json
    TRITON_INTERPRET=1 python -m bench.tune_decode_attention --smoke  # CPU, tiny shapes (tests run it)
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import torch

from bench import common
from training.fast_generate import decode_attention_reference, ulp_limit, ulp_report
from training.fused_kernels import DecodeAttentionConfig, fused_decode_attention

# In this order the last key varies fastest: block sizes and splits are tried first, so a budget that runs
# out still has covered them.
GRID = {
    "native_dot": "0,1",
    "num_stages": "2,3",
    "num_warps": "4,8",
    "block_n": "32,64,128",
    "splits": "1,2,4",
}
SMOKE_GRID = {"native_dot": "0", "num_stages": "2", "num_warps": "4", "block_n": "16,32", "splits": "1,3"}


def grid_specs(grid: dict[str, str]) -> list[str]:
    """Every combination of the grid's values, as ``DecodeAttentionConfig.parse`` strings (default first)."""
    keys = list(grid)
    values = [[v for v in grid[k].split(",") if v] for k in keys]
    specs = [",".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    return [""] + specs


def decode_case(args, device, dtype, gen):
    """q, the K/V cache of one layer, pad and pos: rows with ``context`` real slots on average."""
    spread = args.pad_spread
    pos = args.context - 1 + spread // 2
    slots = pos + 64  # the engine's cache runs past the current position
    k = torch.randn((args.rows, args.kv_heads, slots, args.head_dim), generator=gen, device=device).to(dtype)
    v = torch.randn(k.shape, generator=gen, device=device).to(dtype)
    q = torch.randn((args.rows, args.kv_heads * args.groups * args.head_dim), generator=gen, device=device)
    pad = torch.randint(0, spread + 1, (args.rows,), generator=gen, device=device)
    return q.to(dtype), k, v, pad, torch.tensor([pos], device=device)


def time_launches(device, fn, iters: int) -> float:
    """Seconds per call of ``fn``, over ``iters`` back-to-back calls after two warm-ups."""
    fn(), fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000 / iters


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, Triton's interpreter on the CPU")
    parser.add_argument("--rows", type=int, default=440)
    parser.add_argument("--context", type=int, default=262, help="mean real slots per row")
    parser.add_argument("--pad-spread", type=int, default=32, help="left padding varies over [0, this]")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument(
        "--budget-s", type=float, default=300, help="stop trying new configurations after this many seconds"
    )
    for key, values in GRID.items():
        parser.add_argument(f"--{key.replace('_', '-')}", default=None, help=f"values to try (default {values})")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":  # triton.jit reads it when the kernels are defined
            parser.error("--smoke runs the kernels in Triton's CPU interpreter: set TRITON_INTERPRET=1")
        args.rows, args.context, args.pad_spread, args.kv_heads, args.head_dim, args.iters = 6, 40, 8, 2, 32, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16
    grid = {k: getattr(args, k) or (SMOKE_GRID if args.smoke else GRID)[k] for k in GRID}
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, pad, pos = decode_case(args, device, dtype, gen)
    scale = args.head_dim**-0.5
    ref, largest = decode_attention_reference(q, k, v, pad, pos, scale=scale)
    real_slots = (pos + 1 - pad).sum().item()
    kv_bytes = 2 * real_slots * args.kv_heads * args.head_dim * dtype.itemsize
    peaks = common.device_peaks(common.device_info(device)["name"] if device.type == "cuda" else "cpu")
    limit = ulp_limit("decode attention", dtype)
    result = {
        "benchmark": "tune_decode_attention",
        "smoke": args.smoke,
        "date": common.utc_now(),
        "device": common.device_info(device),
        "libraries": common.library_versions("triton"),
        "shape": {
            "rows": args.rows,
            "kv_heads": args.kv_heads,
            "query_heads_per_kv_head": args.groups,
            "head_dim": args.head_dim,
            "position": pos.item(),
            "mean_real_slots": real_slots / args.rows,
            "dtype": str(dtype),
        },
        "kv_bytes_per_call": kv_bytes,
        "bandwidth_datasheet": peaks["bandwidth"],
        "ulp_limit": limit,
        "configs": [],
    }
    print(f"{args.rows} rows, mean {real_slots / args.rows:.0f} real slots, {kv_bytes / 1e6:.1f} MB a call", flush=True)
    t0 = time.perf_counter()
    for spec in grid_specs(grid):
        if time.perf_counter() - t0 > args.budget_s:
            result["stopped_at_budget"] = True
            print(f"budget of {args.budget_s:.0f}s spent: the rest of the grid was not tried", flush=True)
            break
        config = DecodeAttentionConfig.parse(spec)
        entry = {"spec": config.spec(), "default": spec == ""}
        try:
            run = lambda config=config: fused_decode_attention(q, k, v, pad, pos, scale=scale, config=config)  # noqa: E731
            entry.update(ulp_report(run(), ref, largest, dtype))
            entry["ok"] = entry["max_ulps_of_largest_term"] <= limit
            seconds = time_launches(device, run, args.iters)
            entry.update(ms=1000 * seconds, gb_per_s=kv_bytes / seconds / 1e9)
            if peaks["bandwidth"]:
                entry["share_of_bandwidth"] = kv_bytes / seconds / peaks["bandwidth"]
        except Exception as error:  # out of shared memory, a compile failure: report it and go on
            entry.update(ok=False, error=repr(error)[:300])
        result["configs"].append(entry)
        print(
            f"{entry['spec']:60s} "
            + (
                f"{entry['ms']:.3f} ms {entry['gb_per_s']:,.0f} GB/s, {entry['max_ulps_of_largest_term']:.2g} ulps"
                if "ms" in entry
                else entry.get("error", "")
            )
            + ("" if entry["ok"] else "  REJECTED"),
            flush=True,
        )
    passing = [c for c in result["configs"] if c["ok"] and "ms" in c]
    default = result["configs"][0]
    if passing:
        best = min(passing, key=lambda c: c["ms"])
        result["best"] = best
        result["best_spec"] = best["spec"]
        if "ms" in default:
            result["best_vs_default"] = default["ms"] / best["ms"]
        print(f"default: {default.get('ms', float('nan')):.3f} ms; best: {best['spec']}", flush=True)
    common.write_result("tune_decode_attention.json", result, args.out)
    return result


if __name__ == "__main__":
    main()
