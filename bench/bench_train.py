"""Training benchmark: the study's SFT recipe against TRL's defaults, as NF4 QLoRA and as bf16 LoRA.

Random weights of the real Qwen3-4B shape (built once, saved in bf16, reloaded per setup exactly as the
study loads a base), 2,000 GSM8K-length rows (~250 tokens, prompt/completion in chat form). Each of the
four setups trains LoRA r16 on all linear layers for the same number of rows; tokens/s counts real
(non-padding) tokens after the first 20% of steps; MFU counts 4N FLOPs per token against the GPU's dense
bf16 peak; peak memory is torch's max allocated during training.

    python -m bench.bench_train            # one CUDA GPU; writes $OUT/bench_train.json or bench/results/
    python -m bench.bench_train --smoke    # CPU check of the script: tiny shapes, 2 steps, no NF4
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from bench import common
from bench.train_qlora import (
    STUDY_CONFIG,
    StepClock,
    bench_tokenizer,
    gsm8k_length_rows,
    save_random_model,
)
from eval_artifacts.study.config import TrainingConfig, load_config
from training import sft

ROWS = 2000
# The study recipe's variants (overrides of its training section), by setup name prefix. "ours" is the
# recipe as configured; the others add Liger's kernels, and a larger batch with them.
RECIPES = {
    "ours": {},
    "ours_liger": {"liger_kernel": True},
    "ours_liger_b32": {"liger_kernel": True, "batch_size": 32},
}
# Largest relative difference allowed between the loss curves with and without Liger's kernels, step by step
# (same seed, data order and LoRA init): bf16 rounding differs inside the fused kernels, nothing else.
LOSS_TOLERANCE = 0.01


@dataclass
class TrainInputs:
    """What every setup shares: the study's training section, the rows, and the model to build."""

    smoke: bool
    training: TrainingConfig
    rows_to_train: int
    tokenizer: PreTrainedTokenizerFast
    rows: list[dict]
    lengths: list[int]
    shape: dict
    setups: list[tuple[str, str]]


def trl_defaults_trainer(
    *, model, tokenizer, dataset, lora, output_dir: Path, max_steps: int, precision: str
):
    """What a user gets from TRL with only the required arguments: SFTConfig's own defaults."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        report_to=[],
        save_strategy="no",
        include_num_input_tokens_seen="non_padding",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
    )
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )


def run_setup(
    *, name: str, recipe: str, quantization: str, model_dir: str, rows, training, rows_to_train: int
):
    precision = sft.choose_precision()
    ours = recipe != "trl_defaults"
    if ours:  # the study recipe, with the setup's overrides (Liger's kernels, a batch)
        training = training.model_copy(update=RECIPES[recipe])
    batch = training.batch_size * training.gradient_accumulation_steps if ours else 8
    max_steps = max(2, rows_to_train // batch)
    model, tokenizer = sft.load_base(
        model_path=model_dir, revision="main", quantization=quantization, precision=precision,
        gradient_checkpointing=training.gradient_checkpointing if ours else True,
    )  # fmt: skip
    dataset = sft.chat_dataset(rows)
    with tempfile.TemporaryDirectory() as output_dir:
        if ours:
            # The loss of every step, for the loss-curve comparison (the step clock syncs every step anyway).
            training = training.model_copy(
                update={"max_steps": max_steps, "save_steps": 10**9, "logging_steps": 1}
            )
            trainer = sft.build_trainer(
                model=model, tokenizer=tokenizer, dataset=dataset, training=training,
                seed=training.seeds[0], precision=precision, output_dir=Path(output_dir),
            )  # fmt: skip
        else:
            trainer = trl_defaults_trainer(
                model=model, tokenizer=tokenizer, dataset=dataset, lora=training.lora,
                output_dir=Path(output_dir), max_steps=max_steps, precision=precision,
            )  # fmt: skip
        clock = StepClock()
        trainer.add_callback(clock)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        wall = sft.train(trainer).wall_time_s
    result = {
        "setup": name,
        "recipe": f"study config (configs/qwen3-4b-gsm8k.yaml) + {RECIPES[recipe]}"
        if ours
        else "TRL SFTConfig defaults",
        "liger_kernel": training.liger_kernel if ours else False,
        "quantization": quantization,
        "precision": precision,
        "batch_size": batch,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)
        if not ours
        else training.gradient_checkpointing,
        "steps": trainer.state.global_step,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "wall_time_s": round(wall, 2),
        "steady_tokens_per_s": clock.steady_tokens_per_s(),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "loss_curve": [point["loss"] for point in sft.loss_curve(trainer)] if ours else None,
    }
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    """Options, inputs, the four setups (two in smoke), then the comparison written as JSON."""
    options = parse_args()
    inputs = build_inputs(smoke=options.smoke, rows_per_setup=options.rows_per_setup)
    parameters, results = train_every_setup(inputs)
    payload = compare_setups(inputs, parameters, results)
    write_payload(payload, options.out)


def parse_args() -> argparse.Namespace:
    """The command line's options; without ``--smoke`` a CUDA GPU is required."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few rows, no NF4 (CPU)")
    parser.add_argument(
        "--rows-per-setup", type=int, default=None, help="rows trained per setup (default 480; smoke 16)"
    )
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    if not options.smoke and not torch.cuda.is_available():
        sys.exit("the training benchmark needs a CUDA GPU; use --smoke for the CPU check")
    return options


def build_inputs(*, smoke: bool, rows_per_setup: int | None) -> TrainInputs:
    """The study's training section (2-row batches in smoke), the tokenizer and the GSM8K-length rows."""
    study = load_config(STUDY_CONFIG)
    training = study.training.model_copy(update={"logging_steps": 10**6})
    if smoke:
        training = training.model_copy(update={"batch_size": 2})
    tokenizer = bench_tokenizer()
    rows, lengths = gsm8k_length_rows(tokenizer, count=40 if smoke else ROWS, row_tokens=250)
    return TrainInputs(
        smoke=smoke,
        training=training,
        rows_to_train=rows_per_setup or (16 if smoke else 480),
        tokenizer=tokenizer,
        rows=rows,
        lengths=lengths,
        shape=common.SMOKE if smoke else common.QWEN3_4B,
        setups=setups(smoke),
    )


def setups(smoke: bool) -> list[tuple[str, str]]:
    """(recipe, quantization) in run order. Liger patches transformers' Qwen3 classes for the rest of the
    process, so every unfused setup runs first. The larger batch only in bf16."""
    quantizations = ["none"] if smoke else ["nf4", "none"]
    unfused = [(recipe, q) for q in quantizations for recipe in ("trl_defaults", "ours")]
    if smoke:  # Liger's kernels need a CUDA GPU
        return unfused
    return unfused + [("ours_liger", q) for q in quantizations] + [("ours_liger_b32", "none")]


def train_every_setup(inputs: TrainInputs) -> tuple[int, list[dict]]:
    """Random weights saved once, then TRL's defaults and the study recipe per quantization."""
    results = []
    with tempfile.TemporaryDirectory(prefix="qwen3-4b-random-") as model_dir:
        parameters = save_random_model(
            inputs.shape, inputs.tokenizer, Path(model_dir), on_gpu=not inputs.smoke
        )
        for recipe, quantization in inputs.setups:
            name = f"{recipe}_{'nf4' if quantization == 'nf4' else 'bf16'}"
            print(f"[bench_train] {name} ...", flush=True)
            result = run_setup(
                name=name, recipe=recipe, quantization=quantization, model_dir=model_dir,
                rows=inputs.rows, training=inputs.training, rows_to_train=inputs.rows_to_train,
            )  # fmt: skip
            print(f"[bench_train] {json.dumps(result)}", flush=True)
            results.append(result)
    return parameters, results


def compare_setups(inputs: TrainInputs, parameters: int, results: list[dict]) -> dict:
    """Each setup's MFU and the study recipe's speed-up over TRL's defaults, in the JSON payload."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = common.device_peaks(gpu or "")["bf16_flops"]
    for result in results:
        result["mfu_4n"] = round(result["steady_tokens_per_s"] * 4 * parameters / peak, 4) if peak else None
    by_name = {r["setup"]: r for r in results}
    speedups = {
        kind: round(
            by_name[f"ours_{kind}"]["steady_tokens_per_s"]
            / by_name[f"trl_defaults_{kind}"]["steady_tokens_per_s"],
            2,
        )
        for kind in ("nf4", "bf16")
        if f"ours_{kind}" in by_name and by_name[f"trl_defaults_{kind}"]["steady_tokens_per_s"]
    }
    loss_match = {
        kind: compare_losses(by_name[f"ours_{kind}"], by_name[f"ours_liger_{kind}"])
        for kind in ("nf4", "bf16")
        if f"ours_{kind}" in by_name and f"ours_liger_{kind}" in by_name
    }
    liger_speedups = {
        f"{name}_vs_ours": round(
            by_name[name]["steady_tokens_per_s"]
            / by_name[f"ours_{name.rsplit('_', 1)[1]}"]["steady_tokens_per_s"],
            2,
        )
        for name in by_name
        if name.startswith("ours_liger")
    }
    return {
        "benchmark": "bench_train",
        "mode": "smoke" if inputs.smoke else "qwen3-4b-shape",
        "gpu_name": gpu,
        "parameters": parameters,
        "dataset_rows": len(inputs.rows),
        "tokens_per_row": round(sum(inputs.lengths) / len(inputs.lengths), 1),
        "rows_per_setup": inputs.rows_to_train,
        "dense_bf16_peak_flops": peak,
        "setups": results,
        "speedup_ours_vs_trl_defaults": speedups,
        "speedup_liger": liger_speedups,
        "loss_match_liger_vs_unfused": loss_match,
        "library_versions": sft.trained_with(),
        "date": time.strftime("%Y-%m-%d"),
    }


def compare_losses(unfused: dict, liger: dict) -> dict:
    """Step-by-step loss curves of the recipe without and with Liger's kernels, against LOSS_TOLERANCE."""
    pairs = list(zip(unfused["loss_curve"], liger["loss_curve"], strict=True))
    relative = [abs(b - a) / abs(a) for a, b in pairs]
    return {
        "steps": len(pairs),
        "max_abs_diff": round(max(abs(b - a) for a, b in pairs), 5),
        "max_relative_diff": round(max(relative), 5),
        "mean_relative_diff": round(sum(relative) / len(relative), 5),
        "tolerance": LOSS_TOLERANCE,
        "passed": max(relative) <= LOSS_TOLERANCE,
    }


def write_payload(payload: dict, out: Path | None) -> None:
    """Write the JSON (``--out``, else $OUT/ or bench/results/) and print the speed-ups."""
    out = common.default_out("bench_train.json", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    summary = {
        "speedup": payload["speedup_ours_vs_trl_defaults"],
        "liger": payload["speedup_liger"],
        "loss_match": payload["loss_match_liger_vs_unfused"],
        "written": str(out),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
