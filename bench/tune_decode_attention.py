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

``--resources`` needs no GPU: it compiles every configuration of the grid for an sm_90 GPU ahead of time
(Triton ships ptxas) and reports registers per thread, spilled bytes and shared memory, nothing timed.

    python -m bench.tune_decode_attention          # one CUDA GPU; writes $OUT/tune_decode_attention.json
    python -m bench.tune_decode_attention --resources   # any machine: each configuration's registers and spills
    TRITON_INTERPRET=1 python -m bench.tune_decode_attention --smoke  # CPU, tiny shapes (tests run it)
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile
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
    """Every combination of the grid's values, as ``DecodeAttentionConfig.parse`` strings: the default first,
    and only there (the default is the grid's best of an earlier sweep)."""
    keys = list(grid)
    values = [[v for v in grid[k].split(",") if v] for k in keys]
    specs = [",".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    return [""] + [spec for spec in specs if DecodeAttentionConfig.parse(spec) != DecodeAttentionConfig()]


def compile_ahead(
    kernel, signature: dict[str, str], constexprs: dict, *, divisible: tuple[str, ...] = (), arch: int = 90, **options
) -> dict:
    """Compile a Triton kernel for an sm_<arch> NVIDIA GPU, on any machine (Triton ships ptxas and
    cuobjdump); its registers per thread, spilled (stack) bytes, shared memory and whether its loops load
    asynchronously (software pipelining, ``num_stages``).

    ``divisible`` names the arguments known to be multiples of 16 (bytes for pointers): Triton's JIT finds
    that out at launch (torch's allocations, the cache's strides) and only then may pipeline the loads, so
    they are declared here as the launch would specialise them. ``signature`` is in the kernel's order.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    names = list(signature) + list(constexprs)
    source = triton.compiler.ASTSource(
        fn=kernel,
        signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
        constexprs=constexprs,
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in divisible},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    return {
        "registers": int(found.group(1)),
        "spilled_bytes": int(found.group(2)),
        "shared_bytes": compiled.metadata.shared,
        "pipelined": "async_copy_global_to_local" in compiled.asm["ttgir"],
    }


def attention_resources(config: DecodeAttentionConfig, *, groups: int = 4, head_dim: int = 128) -> dict:
    """``compile_ahead`` of the decode attention (and, split, its reduction) at the eval's shape in bf16, as
    the engine launches it: writing the step's new K/V to the cache."""
    from training import fused_kernels

    pointers = dict.fromkeys(("Q", "K", "V", "OUT"), "*bf16") | dict.fromkeys(
        ("PART_ACC", "PART_M", "PART_SUM"), "*fp32"
    )
    new_kv = {"K_NEW": "*bf16", "V_NEW": "*bf16", "stride_k_new": "i64", "stride_v_new": "i64"}
    constexprs = {"G": groups, "G_PAD": max(16, 1 << (groups - 1).bit_length()), "D": head_dim}
    options = {k: v for k, v in (("num_warps", config.num_warps), ("num_stages", config.num_stages)) if v}
    strides = ("stride_row", "stride_head", "stride_slot")
    out = compile_ahead(
        fused_kernels._decode_attention_kernel,
        pointers | {"PAD": "*i64", "POS": "*i64", "scale": "fp32"} | dict.fromkeys(strides, "i64") | new_kv,
        constexprs
        | {"BLOCK_N": config.block_n, "SPLITS": config.splits, "NATIVE_DOT": config.native_dot, "PRECISION": "tf32"}
        | {"WRITE_NEW": True},
        divisible=(*pointers, "PAD", "POS", *strides, *new_kv),
        **options,
    )
    if config.splits > 1:
        reduction = compile_ahead(
            fused_kernels._decode_attention_reduce,
            {"OUT": "*bf16", "PART_ACC": "*fp32", "PART_M": "*fp32", "PART_SUM": "*fp32", "n_kv": "i32"},
            constexprs | {"SPLITS": config.splits},
            divisible=("OUT", "PART_ACC", "PART_M", "PART_SUM"),
        )
        out["reduction"] = reduction
    return out


def resources_only(grid: dict[str, str], out: Path | None) -> dict:
    """Every configuration's registers, spills and shared memory on sm_90, compiled ahead of time."""
    result = {
        "benchmark": "tune_decode_attention --resources",
        "date": common.utc_now(),
        "libraries": common.library_versions("triton"),
        "target": "sm_90, compiled ahead of time (no GPU)",
        "configs": [],
    }
    for spec in grid_specs(grid):
        config = DecodeAttentionConfig.parse(spec)
        entry = {"spec": config.spec(), **attention_resources(config)}
        result["configs"].append(entry)
        print(
            f"{entry['spec']:60s} {entry['registers']:4d} registers, {entry['spilled_bytes']:4d} bytes spilled, "
            f"{entry['shared_bytes']:6d} bytes shared{', pipelined' if entry['pipelined'] else ''}",
            flush=True,
        )
    common.write_result("tune_decode_attention_resources.json", result, out)
    return result


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
    parser.add_argument(
        "--resources", action="store_true", help="no timing: registers and spills of each configuration on sm_90"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.resources:
        return resources_only({k: getattr(args, k) or GRID[k] for k in GRID}, args.out)
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
    # Launched as the engine launches it, handed the step's K/V to write at slot pos: the values already
    # there, so every call attends over the same cache.
    new_k, new_v = (cache[:, :, pos.item()].contiguous() for cache in (k, v))
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
            run = lambda config=config: fused_decode_attention(  # noqa: E731
                q, k, v, pad, pos, scale=scale, config=config, new_k=new_k, new_v=new_v
            )
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
