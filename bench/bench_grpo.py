"""GRPO benchmark: the RL stage's steps at the Qwen3-4B shape (random weights, NF4), and where their time goes.

The study's own code path: ``sft.load_base`` (NF4 with double quant on the GPU), a level-4 "SFT adapter" (the study's
LoRA shape, random non-zero B) continued trainable by ``rl.continued_adapter``, ``rl.build_trainer`` with the
study's ``rl:`` settings and reward. Prompts are level-4 prompts of synthetic GSM8K problems. Random weights
rarely emit a stop token, so every completion runs to ``rl.max_new_tokens``: the figures are the worst case of
generation length. Steps are timed by a callback; tokens/s counts generated tokens only.

Each rollout engine of ``--rollouts`` (``rl.rollout_engine``) runs the same steps from the same adapter, one after
the other in one process (peak memory is reset between them):
    hf:   TRL's own generate; timed inside the policy's ``generate`` (what TRL calls for each rollout batch);
          tokens are the generated width times the rows (TRL's batch decodes that many).
    fast: ``training.rollouts.FastRollouts`` (TRL's ``rollout_func``); timed around the whole call, and split
          into the engine's LoRA merge, CUDA-graph captures, prefill and decode (``FastGenerator.last_stats``);
          tokens are the rows times the decode steps the engine ran. Its first step (reported apart, left out
          of the means like every engine's) makes the engine and, for NF4, the one-off dequantized bf16 copy.

    python -m bench.bench_grpo            # one CUDA GPU, both engines; writes $OUT/grpo_gpu.json or bench/results/
    python -m bench.bench_grpo --smoke    # CPU check of the script: tiny shapes, 3 steps, no NF4, both engines
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench import common
from bench.train_qlora import STUDY_CONFIG, bench_tokenizer, save_random_model
from eval_artifacts.rundir import RunDir, write_jsonl
from eval_artifacts.study.config import StudyConfig, load_config
from eval_artifacts.study.levels import build_prompt, build_response
from training import rl, sft
from training.synthetic import generate_problems

LEVEL = 4
RESULT_NAME = "grpo_gpu.json"


def main() -> None:
    """Options, the study's RL settings, a random base with its level-4 adapter, the timed steps, the JSON."""
    options = parse_args()
    config = bench_config(smoke=options.smoke, steps=options.steps)
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as work:
        run_dir, model_dir, parameters = build_run(Path(work), smoke=options.smoke)
        timings = {
            engine: time_grpo_steps(
                config.with_overrides(**{"rl.rollout_engine": engine}), run_dir, model_dir
            )
            for engine in options.rollouts
        }
    write_payload(summarise(config, timings, parameters, smoke=options.smoke), options.out)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few steps, no NF4 (CPU)")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps timed (default 6; smoke 3)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--rollouts",
        default="hf,fast",
        help="rollout engines to time, comma-separated: hf, fast (default both)",
    )
    options = parser.parse_args()
    options.rollouts = [engine.strip() for engine in options.rollouts.split(",") if engine.strip()]
    unknown = sorted(set(options.rollouts) - {"hf", "fast"})
    if unknown or not options.rollouts:
        parser.error(f"--rollouts takes hf and/or fast, comma-separated; got {unknown or 'nothing'}")
    if not options.smoke and not torch.cuda.is_available():
        sys.exit("the GRPO benchmark needs a CUDA GPU; use --smoke for the CPU check")
    return options


def bench_config(*, smoke: bool, steps: int | None) -> StudyConfig:
    """The real study's config with RL on for level 4 (its own rl: settings), smaller in smoke mode."""
    study = load_config(STUDY_CONFIG)
    changes: dict = {
        "rl.levels": [LEVEL],
        "rl.max_steps": steps or (3 if smoke else 6),
        "rl.save_steps": 10**6,
    }
    if smoke:
        changes |= {"base_model.quantization": "none", "rl.prompts_per_step": 2, "rl.num_generations": 2}
        changes |= {"rl.max_new_tokens": 8}
    return study.with_overrides(**changes)


def build_run(work: Path, *, smoke: bool) -> tuple[RunDir, Path, int]:
    """A run dir holding what the RL stage reads: the base, the level's SFT rows, the level's SFT adapter."""
    from peft import LoraConfig, get_peft_model

    tokenizer = bench_tokenizer()
    model_dir = work / "base"
    parameters = save_random_model(
        common.SMOKE if smoke else common.QWEN3_4B, tokenizer, model_dir, on_gpu=not smoke
    )
    run_dir = RunDir(work / "run")
    problems = generate_problems(256, seed=5, split="train")
    rows = [
        {
            "id": f"train-{index:05d}",
            "prompt": build_prompt(LEVEL, p.question),
            "completion": build_response("m=1+2=3→t=3*2=6", p.gold),
            "reasoning": "m=1+2=3→t=3*2=6",
            "answer": p.gold,
            "teacher": "bench",
        }
        for index, p in enumerate(problems)
    ]
    write_jsonl(run_dir.train_file(LEVEL), rows)
    lora = load_config(STUDY_CONFIG).training.lora
    base, _ = sft.load_base(
        model_path=str(model_dir), revision="main", quantization="none", precision="fp32" if smoke else "bf16",
        gradient_checkpointing=False,
    )  # fmt: skip
    adapter = get_peft_model(
        base,
        LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules, task_type="CAUSAL_LM"
        ),
    )
    with torch.no_grad():
        for name, weight in adapter.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.01)
    adapter.save_pretrained(run_dir.adapter_dir(LEVEL))
    del adapter, base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return run_dir, model_dir, parameters


@dataclass
class Timing:
    engine: str
    generate_s: list[float] = field(default_factory=list)
    generated_tokens: list[int] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    parts_s: list[dict] = field(default_factory=list)
    """fast only, per rollout call: merge, capture, prefill and decode seconds."""
    setup_s: float = 0.0
    peak_memory_gib: float | None = None
    precision: str = ""
    hardware: dict = field(default_factory=dict)


class _StepClock(TrainerCallback):
    def __init__(self, timing: Timing) -> None:
        self.timing, self.began = timing, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.timing.step_s.append(time.perf_counter() - self.began)


def time_grpo_steps(config: StudyConfig, run_dir: RunDir, model_dir: Path) -> Timing:
    """The RL stage's trainer for ``rl.max_steps`` steps, with its rollouts and steps timed."""
    timing = Timing(engine=config.rl.rollout_engine, precision=sft.choose_precision())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    base, tokenizer = sft.load_base(
        model_path=str(model_dir), revision="main",
        quantization=config.base_model.quantization, precision=timing.precision,
        gradient_checkpointing=config.training.gradient_checkpointing,
    )  # fmt: skip
    policy = rl.continued_adapter(base, run_dir.adapter_dir(LEVEL))
    rows = rl.training_rows(run_dir, LEVEL)
    design = rl.RewardDesign.for_level(LEVEL, tokenizer, rows, weights=config.rl.reward_weights)
    with tempfile.TemporaryDirectory() as checkpoints:
        began = _clock()
        trainer = rl.build_trainer(
            policy=policy, tokenizer=tokenizer, dataset=rl.prompt_dataset(rows), config=config, design=design,
            precision=timing.precision, output_dir=Path(checkpoints),
        )  # fmt: skip
        timing.setup_s = _clock() - began
        if trainer.rollout_func is None:
            policy.generate = _timed_generate(policy.generate, timing)
        else:
            trainer.rollout_func = _timed_rollouts(trainer.rollout_func, timing)
        trainer.add_callback(_StepClock(timing))
        trainer.train()
        timing.hardware = sft.hardware(trainer)
        del trainer
    if torch.cuda.is_available():
        timing.peak_memory_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del policy, base
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return timing


def _clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _timed_generate(generate, timing: Timing):
    """The policy's ``generate`` (TRL's hf rollouts), timed; tokens: rows times the generated width."""

    def timed(*args, **kwargs):
        began = _clock()
        output = generate(*args, **kwargs)
        timing.generate_s.append(_clock() - began)
        prompt_length = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        timing.generated_tokens.append(int(sequences[:, prompt_length:].numel()))
        return output

    return timed


def _timed_rollouts(rollout_func, timing: Timing):
    """The fast engine's ``rollout_func``, timed whole and by the engine's parts; tokens: rows times steps."""

    def timed(prompts, trainer):
        began = _clock()
        output = rollout_func(prompts, trainer)
        timing.generate_s.append(_clock() - began)
        stats = rollout_func.engine.last_stats
        timing.generated_tokens.append(sum(batch.rows * batch.steps for batch in stats.batches))
        timing.parts_s.append(
            {
                "merge": stats.merge_s,
                "capture": stats.capture_s,
                "prefill": sum(batch.prefill_s for batch in stats.batches),
                "decode": sum(batch.decode_s for batch in stats.batches),
            }
        )
        return output

    return timed


def engine_figures(timing: Timing) -> dict:
    """Per step: wall time, its rollout share, and generation tokens/s (the first step, warm-up, left out)."""
    steady = slice(1, None) if len(timing.step_s) > 1 else slice(None)
    step_s, generate_s = timing.step_s[steady], timing.generate_s[steady]
    tokens = timing.generated_tokens[steady]
    figures = {
        "steps": len(timing.step_s),
        "steps_timed": len(step_s),
        "trainer_setup_s": round(timing.setup_s, 3),
        "first_step_s": round(timing.step_s[0], 3),
        "step_time_s": {
            "mean": round(statistics.fmean(step_s), 3),
            "per_step": [round(s, 3) for s in step_s],
        },
        "generation_time_s_per_step": round(statistics.fmean(generate_s), 3),
        "generation_share_of_step": round(sum(generate_s) / sum(step_s), 3),
        "generated_tokens_per_step": round(statistics.fmean(tokens), 1),
        "generation_tokens_per_s": round(sum(tokens) / sum(generate_s), 1),
        "peak_memory_gib": timing.peak_memory_gib,
    }
    if timing.parts_s:
        parts = timing.parts_s[steady]
        figures["rollout_parts_s_per_step"] = {
            name: round(statistics.fmean(p[name] for p in parts), 4) for name in parts[0]
        }
    return figures


def summarise(config: StudyConfig, timings: dict[str, Timing], parameters: int, *, smoke: bool) -> dict:
    """The setup once, then each rollout engine's figures."""
    first = next(iter(timings.values()))
    rl_settings = config.rl
    return {
        "benchmark": "bench_grpo",
        "mode": "smoke" if smoke else "qwen3-4b-shape",
        "device": common.device_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "parameters": parameters,
        "quantization": config.base_model.quantization,
        "precision": first.precision,
        "rl": {
            "prompts_per_step": rl_settings.prompts_per_step,
            "num_generations": rl_settings.num_generations,
            "completions_per_step": rl_settings.prompts_per_step * rl_settings.num_generations,
            "prompts_per_pass": rl_settings.prompts_per_pass,
            "passes_per_step": rl_settings.passes_per_step,
            "max_new_tokens": rl_settings.max_new_tokens,
            "temperature": rl_settings.temperature,
            "top_k": rl_settings.top_k,
            "beta": rl_settings.beta,
            "loss_type": rl_settings.loss_type,
        },
        "rollouts": {engine: engine_figures(timing) for engine, timing in timings.items()},
        "hardware": first.hardware,
        "library_versions": common.library_versions("trl", "bitsandbytes"),
        "date": common.utc_now(),
    }


def write_payload(payload: dict, out: Path | None) -> None:
    out = common.default_out(RESULT_NAME, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    keys = ("step_time_s", "generation_share_of_step", "generation_tokens_per_s", "peak_memory_gib")
    summary = {engine: {k: figures[k] for k in keys} for engine, figures in payload["rollouts"].items()}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
