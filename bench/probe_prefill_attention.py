"""Issue 19: the fast engine's prefill of the eval's 1,319 prompts (one batch, per-chunk padding), cold and warm.

    python -m bench.probe_prefill_attention cudnn     # SDPA as it comes (cuDNN's attention first on an H200)
    python -m bench.probe_prefill_attention nocudnn   # cuDNN's SDPA switched off

Each line it prints is one prefill of every prompt (``max_new_tokens=1``) in the same process: cold, then warm
twice; then a profile of a fresh engine's prefill of 300 prompts (new chunk shapes). Run on 2026-12-02 before
the prefill left cuDNN (35a5cb8); its log (bench/results/probe_prefill_attention.log) is the evidence for that
change. Needs a CUDA GPU.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import common
from training.fast_generate import FastGenerator


def prefill_once(engine: FastGenerator, prompts, config) -> float:
    torch.cuda.synchronize()
    began = time.perf_counter()
    engine.generate(
        prompts, max_new_tokens=1, stop_token_ids=[config.eos_token_id], pad_token_id=config.pad_token_id
    )
    torch.cuda.synchronize()
    return time.perf_counter() - began


def main(mode: str) -> None:
    if mode == "nocudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    config = common.qwen3_4b_config()
    model = common.build_random_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    prompts = common.synthetic_prompts(1319, vocab_size=config.vocab_size, min_len=120, max_len=200, seed=0)
    engine = FastGenerator(model)
    for attempt in range(3):
        wall = prefill_once(engine, prompts, config)
        prefills = [round(batch.prefill_s, 2) for batch in engine.last_stats.batches]
        print(mode, attempt, f"{wall:.2f}s", "prefill", prefills, flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill_once(FastGenerator(model), prompts[:300], config)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cudnn")
