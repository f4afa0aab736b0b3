"""QLoRA training benchmark: random weights of the real Qwen3-4B shape, 50 steps through training.sft.

The real base cannot be downloaded here, so the script builds Qwen3-4B's architecture with random weights,
saves it in bf16, and reloads it the way the study does (4-bit NF4, double quant, bitsandbytes). Training
runs through the same functions as ``cot-compress train`` (load_base → chat_dataset → build_trainer →
train) with the real study's recipe (configs/qwen3-4b-gsm8k.yaml), on GSM8K-length rows (~250 tokens)
of synthetic text. Tokens/s counts real (non-padding) tokens; peak memory is torch's max allocated.

    python -m bench.train_qlora            # on one CUDA GPU; writes $OUT/train_qlora.json or bench/results/
    python -m bench.train_qlora --smoke    # CPU check of the script: 2 layers, hidden 64, 2 steps, no NF4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, TrainerCallback

from bench import common
from eval_artifacts.study.config import TrainingConfig, load_config
from eval_artifacts.study.levels import build_prompt, build_response
from training import sft
from training.synthetic import generate_problems
from training.tiny import stock_response, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STUDY_CONFIG = ROOT / "configs" / "qwen3-4b-gsm8k.yaml"


@dataclass
class Plan:
    """The timed run: the study's recipe cut to its steps, the base's quantization and the model shape."""

    smoke: bool
    training: TrainingConfig
    quantization: str
    shape: dict
    rows_per_step: int


def main() -> None:
    """Options, the recipe and its rows, training on random weights, then the JSON."""
    options = parse_args()
    plan = plan_run(smoke=options.smoke, steps=options.steps)
    tokenizer = bench_tokenizer()
    rows, lengths = gsm8k_length_rows(
        tokenizer, count=plan.rows_per_step * options.steps, row_tokens=options.row_tokens
    )
    run, parameters, build_s = train_on_random_weights(plan, tokenizer, rows)
    result = collect_result(plan, run, lengths=lengths, parameters=parameters, build_s=build_s)
    write_result(result, options.out)


def parse_args() -> argparse.Namespace:
    """The command line's options, ``--steps`` defaulted; without ``--smoke`` a CUDA GPU is required."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="2 layers, hidden 64, 2 steps, no NF4 (runs on a CPU)"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 50; smoke 2)")
    parser.add_argument("--row-tokens", type=int, default=250, help="tokens per row, chat template included")
    parser.add_argument(
        "--out", type=Path, default=None, help="output JSON (default $OUT/ or bench/results/)"
    )
    options = parser.parse_args()
    options.steps = options.steps or (2 if options.smoke else 50)
    if not options.smoke and not torch.cuda.is_available():
        sys.exit("the QLoRA benchmark needs a CUDA GPU; use --smoke for the CPU check")
    return options


def plan_run(*, smoke: bool, steps: int) -> Plan:
    """The study's recipe for ``steps`` steps; NF4 and the Qwen3-4B shape, or no quantization and SMOKE's."""
    study = load_config(STUDY_CONFIG)
    training = recipe_training(study, steps=steps, smoke=smoke, logging_steps=1 if smoke else 10)
    return Plan(
        smoke=smoke,
        training=training,
        quantization="none" if smoke else study.base_model.quantization,
        shape=common.SMOKE if smoke else common.QWEN3_4B,
        rows_per_step=training.batch_size * training.gradient_accumulation_steps,
    )


def train_on_random_weights(
    plan: Plan, tokenizer: PreTrainedTokenizerFast, rows: list[dict]
) -> tuple[RecipeRun, int, float]:
    """The recipe on ``rows`` over random weights saved as a base: the run, parameters, build seconds."""
    with tempfile.TemporaryDirectory(prefix="qwen3-4b-random-") as model_dir:
        started = time.perf_counter()
        parameters = save_random_model(plan.shape, tokenizer, Path(model_dir), on_gpu=not plan.smoke)
        build_s = time.perf_counter() - started
        run = train_recipe(
            model_dir=Path(model_dir), rows=rows, training=plan.training, quantization=plan.quantization,
            output_dir=Path(model_dir) / "checkpoints",
        )  # fmt: skip
    return run, parameters, build_s


def collect_result(
    plan: Plan, run: RecipeRun, *, lengths: list[int], parameters: int, build_s: float
) -> dict:
    """The JSON payload: device, model, recipe, timings, memory, loss curve and library versions."""
    training = plan.training
    cuda = torch.cuda.is_available()
    return {
        "benchmark": "train_qlora",
        "mode": "smoke" if plan.smoke else "qwen3-4b-shape",
        **sft.hardware(run.trainer),
        "model": {**plan.shape, "parameters": parameters, "weights": "random, saved in bf16 and reloaded"},
        "quantization": plan.quantization,
        "precision": run.precision,
        "recipe": str(STUDY_CONFIG.relative_to(ROOT)),
        "lora": training.lora.model_dump(mode="json"),
        "completion_only_loss": training.completion_only_loss,
        "gradient_checkpointing": training.gradient_checkpointing,
        "rows_per_step": plan.rows_per_step,
        "tokens_per_row": round(sum(lengths) / len(lengths), 1),
        **timing_fields(run, lengths),
        "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "model_build_s": round(build_s, 1),
        "loss_curve": sft.loss_curve(run.trainer),
        "library_versions": sft.trained_with(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def write_result(result: dict, out: Path | None) -> None:
    """Write the JSON (``--out``, else $OUT/ or bench/results/) and print its headline figures."""
    out = common.default_out("train_qlora.json", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    summary = {k: result[k] for k in ("mode", "device", "steps", "tokens_per_s", "steady_tokens_per_s")}
    print(json.dumps(summary | {"peak_memory_gib": result["peak_memory_gib"], "written": str(out)}))


def recipe_training(study, *, steps: int, smoke: bool, logging_steps: int):
    """The study's training section for a timed run: ``steps`` steps, no checkpoints (2-row batches in smoke)."""
    update = {"max_steps": steps, "logging_steps": logging_steps, "save_steps": 10**9}
    if smoke:
        update["batch_size"] = 2
    return study.training.model_copy(update=update)


@dataclass
class RecipeRun:
    model: object
    trainer: object
    outcome: sft.TrainOutcome
    clock: StepClock
    precision: str


def train_recipe(
    *, model_dir: Path, rows: list[dict], training, quantization: str, output_dir: Path
) -> RecipeRun:
    """What ``cot-compress train`` does for a level (load_base → build_trainer → train) on ``rows``, clocked;
    peak memory counts from the first step."""
    precision = sft.choose_precision()
    model, tokenizer = sft.load_base(
        model_path=str(model_dir),
        revision="main",
        quantization=quantization,
        precision=precision,
        gradient_checkpointing=training.gradient_checkpointing,
    )
    trainer = sft.build_trainer(
        model=model,
        tokenizer=tokenizer,
        dataset=sft.chat_dataset(rows),
        training=training,
        seed=training.seeds[0],
        precision=precision,
        output_dir=output_dir,
    )
    clock = StepClock()
    trainer.add_callback(clock)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    outcome = sft.train(trainer)
    return RecipeRun(model=model, trainer=trainer, outcome=outcome, clock=clock, precision=precision)


def timing_fields(run: RecipeRun, lengths: list[int]) -> dict:
    """Steps, tokens, wall time, tokens/s (whole run and after warm-up) and peak memory of a run."""
    return {
        "steps": run.trainer.state.global_step,
        "dataset_tokens": sum(lengths),
        "tokens_seen": int(run.trainer.state.num_input_tokens_seen),
        "wall_time_s": round(run.outcome.wall_time_s, 3),
        "tokens_per_s": round(run.outcome.session_tokens / run.outcome.wall_time_s, 1),
        "steady_tokens_per_s": run.clock.steady_tokens_per_s(),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if torch.cuda.is_available()
        else None,
    }


def bench_tokenizer():
    """A fast BPE tokenizer with Qwen's role tokens and chat template (the tiny study's, trained here)."""
    problems = generate_problems(500, seed=0, split="train")
    texts = [p.question for p in problems] + [stock_response(p) for p in problems]
    texts += [build_prompt(1, p.question) for p in problems[:50]]
    return train_tokenizer(texts, vocab_size=384)


def gsm8k_length_rows(tokenizer, *, count: int, row_tokens: int) -> tuple[list[dict], list[int]]:
    """``count`` SFT rows of about ``row_tokens`` tokens each (a GSM8K problem and its full solution)."""
    problems = generate_problems(count * 8, seed=1, split="train")
    rows, lengths = [], []
    for index in range(count):
        group = problems[index * 8 : (index + 1) * 8]
        # Questions go in the prompt and worked solutions in the completion, one problem at a time,
        # until the rendered exchange reaches the target length (prompt ~40%, completion ~60%).
        question, reasoning, best = [], [], None
        for problem in group:
            question.append(problem.question)
            reasoning.append(stock_response(problem).split("\n####")[0])
            row = {
                "prompt": build_prompt(1, " ".join(question)),
                "completion": build_response(" ".join(reasoning), group[0].gold),
            }
            length = exchange_tokens(tokenizer, row)
            if best is None or abs(length - row_tokens) < abs(best[1] - row_tokens):
                best = (row, length)
            if length >= row_tokens:
                break
        rows.append(best[0])
        lengths.append(best[1])
    return rows, lengths


def exchange_tokens(tokenizer, row: dict) -> int:
    messages = [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["completion"]},
    ]
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def save_random_model(shape: dict, tokenizer, path: Path, *, on_gpu: bool) -> int:
    """Random weights of ``shape`` saved in bf16 with the tokenizer; returns the parameter count."""
    config = Qwen3Config(
        **shape,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    # Initialising 4B parameters is quick on the GPU and slow on the CPU.
    model = common.build_random_model(config, device="cuda" if on_gpu else "cpu", dtype=torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if on_gpu:
        torch.cuda.empty_cache()
    return parameters


class StepClock(TrainerCallback):
    """Per-step wall times and token counts, for tokens/s after warm-up (first 20% of steps left out)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.marks:
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    def steady_tokens_per_s(self) -> float:
        return self._tokens_per_s(self.marks[len(self.marks) // 5]) or 0.0

    def _tokens_per_s(self, start: tuple[float, int]) -> float | None:
        """Tokens/s from the mark ``start`` to the last one (None when no time passed)."""
        end = self.marks[-1]
        return round((end[1] - start[1]) / (end[0] - start[0]), 1) if end[0] > start[0] else None

    def step_seconds(self) -> list[float]:
        return [round(b[0] - a[0], 4) for a, b in zip(self.marks, self.marks[1:], strict=False)]

    def tokens_per_s_after_compiles(self) -> float | None:
        """Tokens/s over the steps after the last one that took over 5x the median step: a compile (compiled
        layers compile in their first steps and again when a new shape needs it), which a long run pays once."""
        steps = self.step_seconds()
        if len(steps) < 3:
            return None
        median = sorted(steps)[len(steps) // 2]
        last_slow = max((i for i, step in enumerate(steps) if step > 5 * median), default=-1)
        return self._tokens_per_s(self.marks[last_slow + 1])


if __name__ == "__main__":
    main()
