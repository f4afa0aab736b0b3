"""Where a training step of the study recipe spends its GPU time, by kernel class.

The same setups as ``bench.bench_train`` (default: the recipe, ``ours_nf4`` and ``ours_bf16``; any of its
``--setups`` names), built through ``bench_train.make_trainer``, so through ``training/sft.py``'s code path
(``load_base`` -> ``chat_dataset`` -> ``build_trainer`` -> train) on random weights of the real Qwen3-4B shape.
Each setup trains ``--warmup`` steps, then ``--steps`` steps under ``torch.profiler``: GPU time per step by
kernel class (GEMMs, NF4 dequantisation, attention, norms/SwiGLU/RoPE, TRL's chunked LM-head loss,
optimizer, copies, other elementwise), the wall time per step (synchronised) and the GPU idle time
between kernels (wall minus kernel time). The LM head's own GEMMs count as GEMMs: kernel names do not say
which layer launched them.

    python -m bench.profile_train            # one CUDA GPU; writes $OUT/profile_train.json or bench/results/
    python -m bench.profile_train --smoke    # CPU check: tiny shapes, CPU ops' self time instead of kernels
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from bench import common
from bench.bench_train import build_inputs, make_trainer, parse_setups
from bench.profile_decode import by_class, kernel_times, top
from bench.train_qlora import save_random_model
from training import sft

# Kernel classes of a training step, by the first pattern that matches the kernel's (or CPU op's) name.
# Liger's kernels are named after their op (_rms_norm_forward_kernel, _swiglu_..., _triton_rope); TRL's
# chunked log-prob kernels are plain _forward_kernel/_backward_kernel, so norms are matched first.
TRAIN_CLASSES = (
    ("nf4 dequant", r"dequant|kgemm_4bit|bnb|4bit"),
    # Inductor names flex attention's kernels after its template (triton_tem_...): nothing else is compiled.
    ("attention", r"flash|fmha|attention|sdpa|flex|cutlassf|cutlassb|cudnn|triton_tem"),
    ("norms, swiglu, rope", r"rms_norm|rmsnorm|layer_norm|swiglu|silu|rope|rotary"),
    ("loss, lm head (TRL)", r"^_forward_kernel|^_backward_kernel|log_softmax|logsumexp|nll_loss|cross_entropy"),
    ("optimizer", r"multi_tensor|adam|_foreach|lerp"),
    ("gemm", r"gemm|gemv|cutlass|nvjet|xmma|sm90_|sm80_|cublas|aten::mm$|aten::addmm|aten::bmm"),
    ("copies", r"memcpy|memset|copy|cat|index|gather|scatter|fill"),
    ("elementwise, reductions", r"elementwise|vectorized|unrolled|reduce|pointwise|triton|aten::"),
)


class ProfiledSteps(TrainerCallback):
    """Times every step (synchronised) and runs ``torch.profiler`` over steps [warmup, warmup + steps)."""

    def __init__(self, *, warmup: int, steps: int, cuda: bool) -> None:
        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.profiler = profile(activities=activities)
        self.warm_s: list[float] = []
        self.profiled_s: list[float] = []
        self.tokens = [0, 0]

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step == self.warmup:
            self.tokens[0] = state.num_input_tokens_seen
            self.profiler.__enter__()
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        elapsed = time.perf_counter() - self.began
        (self.profiled_s if state.global_step > self.warmup else self.warm_s).append(elapsed)
        if state.global_step == self.warmup + self.steps:
            self.profiler.__exit__(None, None, None)
            self.tokens[1] = state.num_input_tokens_seen


def profile_setup(*, recipe: str, quantization: str, model_dir: str, inputs, warmup: int, steps: int) -> dict:
    """One setup's profiled steps: wall and kernel time per step, by class, and its top kernels."""
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, training, batch, precision = make_trainer(
            recipe=recipe, quantization=quantization, model_dir=model_dir, rows=inputs.rows,
            training=inputs.training, rows_to_train=0, max_steps=warmup + steps, output_dir=output_dir,
        )  # fmt: skip
        clock = ProfiledSteps(warmup=warmup, steps=steps, cuda=cuda)
        trainer.add_callback(clock)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sft.train(trainer)
    kernels = kernel_times(clock.profiler, cpu_ops=not cuda)
    kernels = {name: {"ms": f["ms"] / steps, "count": f["count"] / steps} for name, f in kernels.items()}
    wall_ms = 1000 * sum(clock.profiled_s) / len(clock.profiled_s)
    kernel_ms = sum(k["ms"] for k in kernels.values())
    classes = by_class(kernels, TRAIN_CLASSES)
    for figures in classes.values():
        figures["share_of_wall"] = figures["ms"] / wall_ms
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return {
        "batch_size": batch,
        "precision": precision,
        "liger_kernel": training.liger_kernel,
        "profiled_steps": steps,
        "warm_ms_per_step": 1000 * sum(clock.warm_s[1:]) / max(1, len(clock.warm_s) - 1),
        "wall_ms_per_step": wall_ms,
        "kernel_ms_per_step": kernel_ms,
        "gpu_idle_ms_per_step": wall_ms - kernel_ms if cuda else None,
        "tokens_per_step": (clock.tokens[1] - clock.tokens[0]) / steps,
        "tokens_per_s_profiled": (clock.tokens[1] - clock.tokens[0]) / sum(clock.profiled_s),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "classes": classes,
        "top_kernels": top(kernels, 25, TRAIN_CLASSES),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CPU ops, no kernels)")
    parser.add_argument("--setups", default=None, help="bench_train setup names (default ours_nf4,ours_bf16)")
    parser.add_argument("--warmup", type=int, default=4, help="steps trained before the profile")
    parser.add_argument("--steps", type=int, default=4, help="steps profiled")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("the training profile needs a CUDA GPU; use --smoke for the CPU check")
    chosen = args.setups or ("ours_bf16" if args.smoke else "ours_nf4,ours_bf16")
    warmup, steps = (2, 1) if args.smoke else (args.warmup, args.steps)
    inputs = build_inputs(smoke=args.smoke, rows_per_setup=None, chosen=chosen)
    result = {
        "benchmark": "profile_train",
        "smoke": args.smoke,
        "date": common.utc_now(),
        "device": common.device_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "libraries": common.library_versions("trl", "bitsandbytes", "liger_kernel"),
        "warmup_steps": warmup,
        "setups": {},
    }
    with tempfile.TemporaryDirectory(prefix="qwen3-4b-random-") as model_dir:
        save_random_model(inputs.shape, inputs.tokenizer, Path(model_dir), on_gpu=not args.smoke)
        for recipe, quantization in parse_setups(chosen):
            name = f"{recipe}_{'nf4' if quantization == 'nf4' else 'bf16'}"
            print(f"[profile_train] {name} ...", flush=True)
            figures = profile_setup(
                recipe=recipe, quantization=quantization, model_dir=model_dir, inputs=inputs,
                warmup=warmup, steps=steps,
            )  # fmt: skip
            result["setups"][name] = figures
            print(
                f"[profile_train] {name}: {figures['wall_ms_per_step']:.1f} ms/step wall "
                f"({figures['warm_ms_per_step']:.1f} unprofiled), {figures['kernel_ms_per_step']:.1f} ms kernels, "
                f"{figures['tokens_per_s_profiled']:,.0f} tokens/s",
                flush=True,
            )
            for label, c in figures["classes"].items():
                print(f"    {label:24s} {c['ms']:8.1f} ms  {c['share_of_wall']:6.1%}  {c['count']:7.0f} launches")
    common.write_result("profile_train.json", result, args.out)
    return result


if __name__ == "__main__":
    main()
