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
    quantizations: list[str]


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
    ours = recipe == "ours"
    batch = training.batch_size * training.gradient_accumulation_steps if ours else 8
    max_steps = max(2, rows_to_train // batch)
    model, tokenizer = sft.load_base(
        model_path=model_dir, revision="main", quantization=quantization, precision=precision,
        gradient_checkpointing=training.gradient_checkpointing if ours else True,
    )  # fmt: skip
    dataset = sft.chat_dataset(rows)
    with tempfile.TemporaryDirectory() as output_dir:
        if ours:
            trainer = sft.build_trainer(
                model=model, tokenizer=tokenizer, dataset=dataset,
                training=training.model_copy(update={"max_steps": max_steps, "save_steps": 10**9}),
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
        "recipe": "study config (configs/qwen3-4b-gsm8k.yaml)" if ours else "TRL SFTConfig defaults",
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
        quantizations=["none"] if smoke else ["nf4", "none"],
    )


def train_every_setup(inputs: TrainInputs) -> tuple[int, list[dict]]:
    """Random weights saved once, then TRL's defaults and the study recipe per quantization."""
    results = []
    with tempfile.TemporaryDirectory(prefix="qwen3-4b-random-") as model_dir:
        parameters = save_random_model(
            inputs.shape, inputs.tokenizer, Path(model_dir), on_gpu=not inputs.smoke
        )
        for quantization in inputs.quantizations:
            for recipe in ("trl_defaults", "ours"):
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
        "library_versions": sft.trained_with(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_payload(payload: dict, out: Path | None) -> None:
    """Write the JSON (``--out``, else $OUT/ or bench/results/) and print the speed-ups."""
    out = common.default_out("bench_train.json", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"speedup": payload["speedup_ours_vs_trl_defaults"], "written": str(out)}), flush=True)


if __name__ == "__main__":
    main()
