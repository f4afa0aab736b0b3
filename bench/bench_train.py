"""Training benchmark: the study's SFT recipe against TRL's defaults, as NF4 QLoRA and as bf16 LoRA.

Random weights of the real Qwen3-4B shape (built once, saved in bf16, reloaded per setup exactly as the
study loads a base), 2,000 GSM8K-length rows (~250 tokens, prompt/completion in chat form). Each of the
four setups trains LoRA r16 on all linear layers for the same number of rows; tokens/s counts real
(non-padding) tokens after the first 20% of steps; MFU counts 4N FLOPs per token against the GPU's dense
bf16 peak; peak memory is torch's max allocated during training.

    python -m bench.bench_train            # one CUDA GPU; writes $OUT/bench_train.json or bench/results/
    python -m bench.bench_train --smoke    # CPU check of the script: tiny shapes, 2 steps, no NF4
    python -m bench.bench_train --setups ours_nf4,ours_liger_nf4,ours_liger_pf_flex_nf4   # chosen setups

Issue 19's candidates (``--setups``; none runs by default): padding-free batches (``_pf``: TRL's
``padding_free``, every row of a batch in one packed sequence; transformers 5 masks each row off from the
others from the position ids, for SDPA as for flex attention), flex attention (``_flex``), and larger
batches (``_b20``, ``_b24``, ``_b32``), and each decoder layer compiled (``_layers``: training.compile_layers, regional
``torch.compile``, for a step that profile_train found host-bound). Every setup's loss curve is compared step by step with the unfused recipe at
the same batch and quantization (``ours`` or ``ours_b<N>``) when that setup ran too.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
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
# The study recipe's variants, by setup name prefix: overrides of its training section, plus the benchmark's
# own switches "padding_free" (TRL's, for SFTConfig), "compile" (the Trainer's torch_compile of the whole model)
# and "attention" (transformers' attn_implementation). "_layers": training.compile_layers, each decoder layer
# compiled (regional compilation).
# "ours" is the recipe as configured; the others add Liger's kernels, padding-free batches, flex attention
# and larger batches.
RECIPES = {
    "ours": {},
    "ours_liger": {"liger_kernel": True},
    "ours_liger_b32": {"liger_kernel": True, "batch_size": 32},
    "ours_b20": {"batch_size": 20},
    "ours_b24": {"batch_size": 24},
    "ours_b32": {"batch_size": 32},
    "ours_pf": {"padding_free": True},
    "ours_pf_flex": {"padding_free": True, "attention": "flex_attention"},
    "ours_liger_pf": {"liger_kernel": True, "padding_free": True},
    "ours_liger_pf_flex": {"liger_kernel": True, "padding_free": True, "attention": "flex_attention"},
    "ours_liger_b24": {"liger_kernel": True, "batch_size": 24},
    "ours_liger_pf_b24": {"liger_kernel": True, "padding_free": True, "batch_size": 24},
    "ours_liger_pf_b32": {"liger_kernel": True, "padding_free": True, "batch_size": 32},
    "ours_compile": {"compile": True},
    "ours_liger_compile": {"liger_kernel": True, "compile": True},
    "ours_layers": {"compile_layers": True},
    "ours_layers_b24": {"compile_layers": True, "batch_size": 24},
    "ours_layers_b32": {"compile_layers": True, "batch_size": 32},
    "ours_pf_flex_layers": {"padding_free": True, "attention": "flex_attention", "compile_layers": True},
    "ours_liger_layers": {"liger_kernel": True, "compile_layers": True},
    "ours_liger_layers_b24": {"liger_kernel": True, "compile_layers": True, "batch_size": 24},
    "ours_liger_layers_b32": {"liger_kernel": True, "compile_layers": True, "batch_size": 32},
    "ours_liger_pf_flex_layers": {
        "liger_kernel": True, "padding_free": True, "attention": "flex_attention", "compile_layers": True,
    },
    "ours_liger_pf_flex_layers_b24": {
        "liger_kernel": True, "padding_free": True, "attention": "flex_attention", "compile_layers": True,
        "batch_size": 24,
    },
    "ours_liger_pf_flex_b20": {
        "liger_kernel": True, "padding_free": True, "attention": "flex_attention", "batch_size": 20,
    },
    "ours_liger_pf_flex_b24": {
        "liger_kernel": True, "padding_free": True, "attention": "flex_attention", "batch_size": 24,
    },
    "ours_liger_pf_flex_b32": {
        "liger_kernel": True, "padding_free": True, "attention": "flex_attention", "batch_size": 32,
    },
}  # fmt: skip
# Issue 19's bars: today's recipe's peak memory (bench/README.md, 2026-12-01), NF4 tokens/s, bf16 MFU.
MEMORY_BAR_GIB = {"nf4": 44.8, "bf16": 40.6}
NF4_TOKENS_PER_S_GOAL = 11_000
BF16_MFU_GOAL = 0.25
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


def recipe_parts(recipe: str) -> tuple[dict, dict, str | None]:
    """A recipe's training-section overrides, its SFTConfig overrides and its attention backend."""
    overrides = dict(RECIPES[recipe])
    attention = overrides.pop("attention", None)
    # Padding-free batches are one packed row: TRL refuses max_length there (it would not be enforced); the
    # GSM8K-length rows are far below the study's max_seq_length anyway.
    sft_overrides = {"padding_free": True, "max_length": None} if overrides.pop("padding_free", False) else {}
    if overrides.pop("compile", False):
        # The Trainer compiles the model (torch.compile, inductor): fewer, fused kernels for a step that
        # profile_train found host-bound (41% GPU idle in NF4).
        sft_overrides["torch_compile"] = True
    return overrides, sft_overrides, attention


def make_trainer(
    *, recipe: str, quantization: str, model_dir: str, rows, training, rows_to_train: int, output_dir,
    max_steps: int | None = None,
):  # fmt: skip
    """The setup's trainer through ``training/sft.py`` (TRL's own defaults for ``trl_defaults``), for
    ``rows_to_train`` rows or ``max_steps`` steps; returns it, the training section it ran with, its batch
    and precision."""
    precision = sft.choose_precision()
    ours = recipe != "trl_defaults"
    overrides, sft_overrides, attention = recipe_parts(recipe) if ours else ({}, {}, None)
    training = training.model_copy(update=overrides)
    batch = training.batch_size * training.gradient_accumulation_steps if ours else 8
    max_steps = max_steps or max(2, rows_to_train // batch)
    model, tokenizer = sft.load_base(
        model_path=model_dir, revision="main", quantization=quantization, precision=precision,
        gradient_checkpointing=training.gradient_checkpointing if ours else True, attn_implementation=attention,
    )  # fmt: skip
    dataset = sft.chat_dataset(rows)
    if ours:
        # The loss of every step, for the loss-curve comparison (the step clock syncs every step anyway).
        training = training.model_copy(update={"max_steps": max_steps, "save_steps": 10**9, "logging_steps": 1})
        trainer = sft.build_trainer(
            model=model, tokenizer=tokenizer, dataset=dataset, training=training, seed=training.seeds[0],
            precision=precision, output_dir=Path(output_dir), sft_overrides=sft_overrides,
        )  # fmt: skip
    else:
        trainer = trl_defaults_trainer(
            model=model, tokenizer=tokenizer, dataset=dataset, lora=training.lora,
            output_dir=Path(output_dir), max_steps=max_steps, precision=precision,
        )  # fmt: skip
    return trainer, training, batch, precision


def run_setup(
    *, name: str, recipe: str, quantization: str, model_dir: str, rows, training, rows_to_train: int
):
    ours = recipe != "trl_defaults"
    # Each setup compiles its own model's layers: no compiled code or recompile budget left from the last one.
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, training, batch, precision = make_trainer(
            recipe=recipe, quantization=quantization, model_dir=model_dir, rows=rows, training=training,
            rows_to_train=rows_to_train, output_dir=output_dir,
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
        "compile_layers": training.compile_layers if ours else False,
        "padding_free": bool(trainer.args.padding_free),
        "attention": trainer.model.config._attn_implementation,
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
        "tokens_per_s_after_compiles": clock.tokens_per_s_after_compiles(),
        "step_s": clock.step_seconds(),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "loss_curve": [point["loss"] for point in sft.loss_curve(trainer)] if ours else None,
    }
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def mfu_4n(tokens_per_s: float, parameters: int, peak_flops: float) -> float:
    """Model FLOPs utilisation at 4N FLOPs a token (forward and input gradients; the frozen base has no weight
    gradients), the measure issue 19's bf16 bar is set in."""
    return round(tokens_per_s * 4 * parameters / peak_flops, 4)


def rates_from_log(text: str, *, from_step: int, parameters: int, peak_flops: float) -> dict[str, dict]:
    """Each setup's tokens/s over steps ``from_step`` to its last, read from a bench_train log: the Trainer logs
    every step's ``num_input_tokens_seen`` and ``train_runtime`` (10 ms resolution). For setups whose first
    steps compile (compiled layers: ~25-95 s a compile, in steps 1, 2 and 7 of the 2026-12-02 runs), the steps
    after the last compile are their speed; the JSON's steady window (after the first 20% of steps) is not."""
    sections = re.split(r"\[bench_train\] (\S+) \.\.\.", text)
    rates = {}
    for name, body in zip(sections[1::2], sections[2::2], strict=True):
        marks: list[tuple[int, float]] = []
        for tokens, runtime in re.findall(r"'num_input_tokens_seen': (\d+), 'train_runtime': '([0-9.]+)'", body):
            mark = (int(tokens), float(runtime))
            if not marks or marks[-1] != mark:  # progress bars print the same log line again
                marks.append(mark)
        if len(marks) <= from_step:
            continue
        (tokens_0, time_0), (tokens_1, time_1) = marks[from_step - 2], marks[-1]
        per_s = (tokens_1 - tokens_0) / (time_1 - time_0)
        rates[name] = {
            "steps": [from_step, len(marks)],
            "s_per_step": round((time_1 - time_0) / (len(marks) - from_step + 1), 3),
            "tokens_per_s": round(per_s, 1),
            "mfu_4n": mfu_4n(per_s, parameters, peak_flops),
        }
    return rates


def main() -> None:
    """Options, inputs, the four setups (two in smoke), then the comparison written as JSON."""
    options = parse_args()
    if options.rates_from_log:
        text = options.rates_from_log.read_text(encoding="utf-8")
        run = json.loads(options.rates_from_log.with_suffix(".json").read_text(encoding="utf-8"))
        rates = rates_from_log(
            text, from_step=options.from_step, parameters=run["parameters"], peak_flops=run["dense_bf16_peak_flops"]
        )
        print(json.dumps(rates, indent=1))
        return
    inputs = build_inputs(smoke=options.smoke, rows_per_setup=options.rows_per_setup, chosen=options.setups)
    # The JSON is rewritten after every setup, so a run stopped by a time limit keeps what it measured.
    parameters, results = train_every_setup(
        inputs, on_result=lambda parameters, done: write_payload(compare_setups(inputs, parameters, done), options.out)
    )
    write_payload(compare_setups(inputs, parameters, results), options.out)


def parse_args() -> argparse.Namespace:
    """The command line's options; without ``--smoke`` a CUDA GPU is required."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few rows, no NF4 (CPU)")
    parser.add_argument(
        "--rows-per-setup", type=int, default=None, help="rows trained per setup (default 480; smoke 16)"
    )
    parser.add_argument(
        "--setups",
        default=None,
        help="comma-separated setup names, <recipe>_<nf4|bf16> with a recipe of RECIPES or trl_defaults "
        "(default: TRL defaults, the recipe and the recipe with Liger, in NF4 and bf16, and Liger at batch 32 "
        "in bf16); the ones without Liger run first",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--rates-from-log", type=Path, default=None,
        help="print each setup's tokens/s over steps --from-step..last from a bench_train log (beside its JSON)",
    )  # fmt: skip
    parser.add_argument("--from-step", type=int, default=8, help="first step --rates-from-log counts (default 8)")
    options = parser.parse_args()
    if not options.smoke and not options.rates_from_log and not torch.cuda.is_available():
        sys.exit("the training benchmark needs a CUDA GPU; use --smoke for the CPU check")
    return options


def build_inputs(*, smoke: bool, rows_per_setup: int | None, chosen: str | None = None) -> TrainInputs:
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
        setups=parse_setups(chosen) if chosen else setups(smoke),
    )


def parse_setups(chosen: str) -> list[tuple[str, str]]:
    """``--setups`` as (recipe, quantization), the ones without Liger first (Liger patches transformers'
    Qwen3 classes for the rest of the process)."""
    parsed = []
    for name in filter(None, (part.strip() for part in chosen.split(","))):
        recipe, _, kind = name.rpartition("_")
        if kind not in ("nf4", "bf16") or (recipe not in RECIPES and recipe != "trl_defaults"):
            sys.exit(
                f"unknown setup {name!r}: use <recipe>_<nf4|bf16> with a recipe among trl_defaults, "
                + ", ".join(RECIPES)
            )
        parsed.append((recipe, "nf4" if kind == "nf4" else "none"))
    return sorted(parsed, key=lambda setup: RECIPES.get(setup[0], {}).get("liger_kernel", False))


def setups(smoke: bool) -> list[tuple[str, str]]:
    """(recipe, quantization) in run order. Liger patches transformers' Qwen3 classes for the rest of the
    process, so every unfused setup runs first. The larger batch only in bf16."""
    quantizations = ["none"] if smoke else ["nf4", "none"]
    unfused = [(recipe, q) for q in quantizations for recipe in ("trl_defaults", "ours")]
    if smoke:  # Liger's kernels and flex attention's backward need a CUDA GPU
        return unfused + [("ours_pf", "none")]
    return unfused + [("ours_liger", q) for q in quantizations] + [("ours_liger_b32", "none")]


def train_every_setup(inputs: TrainInputs, on_result=None) -> tuple[int, list[dict]]:
    """Random weights saved once, then TRL's defaults and the study recipe per quantization;
    ``on_result(parameters, results so far)`` after each setup."""
    results = []
    with tempfile.TemporaryDirectory(prefix="qwen3-4b-random-") as model_dir:
        parameters = save_random_model(
            inputs.shape, inputs.tokenizer, Path(model_dir), on_gpu=not inputs.smoke
        )
        for recipe, quantization in inputs.setups:
            name = f"{recipe}_{'nf4' if quantization == 'nf4' else 'bf16'}"
            print(f"[bench_train] {name} ...", flush=True)
            try:
                result = run_setup(
                    name=name, recipe=recipe, quantization=quantization, model_dir=model_dir,
                    rows=inputs.rows, training=inputs.training, rows_to_train=inputs.rows_to_train,
                )  # fmt: skip
            except Exception as error:  # one scarce GPU run: a failing candidate must not take the others
                if inputs.smoke:
                    raise
                result = {"setup": name, "error": repr(error)[:500]}
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            print(f"[bench_train] {json.dumps(result)}", flush=True)
            results.append(result)
            if on_result:
                on_result(parameters, results)
    return parameters, results


def compare_setups(inputs: TrainInputs, parameters: int, results: list[dict]) -> dict:
    """Each setup's MFU and the study recipe's speed-up over TRL's defaults, in the JSON payload."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = common.device_peaks(gpu or "")["bf16_flops"]
    failed = {r["setup"]: r["error"] for r in results if "error" in r}
    results = [r for r in results if "error" not in r]
    for result in results:
        result["mfu_4n"] = mfu_4n(result["steady_tokens_per_s"], parameters, peak) if peak else None
        after = result.get("tokens_per_s_after_compiles")
        result["mfu_4n_after_compiles"] = mfu_4n(after, parameters, peak) if peak and after else None
    by_name = {r["setup"]: r for r in results}
    speedups = {
        kind: round(
            by_name[f"ours_{kind}"]["steady_tokens_per_s"]
            / by_name[f"trl_defaults_{kind}"]["steady_tokens_per_s"],
            2,
        )
        for kind in ("nf4", "bf16")
        if f"ours_{kind}" in by_name
        and f"trl_defaults_{kind}" in by_name
        and by_name[f"trl_defaults_{kind}"]["steady_tokens_per_s"]
    }
    loss_match = {
        kind: compare_losses(by_name[f"ours_{kind}"], by_name[f"ours_liger_{kind}"])
        for kind in ("nf4", "bf16")
        if f"ours_{kind}" in by_name and f"ours_liger_{kind}" in by_name
    }
    loss_match_all = {
        name: compare_losses(by_name[reference], by_name[name])
        for name, reference in ((r["setup"], unfused_reference(r, inputs.training.batch_size)) for r in results)
        if reference in by_name and reference != name
    }
    liger_speedups = {
        f"{name}_vs_ours": round(
            by_name[name]["steady_tokens_per_s"]
            / by_name[f"ours_{name.rsplit('_', 1)[1]}"]["steady_tokens_per_s"],
            2,
        )
        for name in by_name
        if name.startswith("ours_liger") and f"ours_{name.rsplit('_', 1)[1]}" in by_name
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
        "failed_setups": failed,
        "speedup_ours_vs_trl_defaults": speedups,
        "speedup_liger": liger_speedups,
        "loss_match_liger_vs_unfused": loss_match,
        "loss_match_vs_unfused": loss_match_all,
        "goals_issue_19": goals(results, loss_match_all),
        "library_versions": sft.trained_with(),
        "date": time.strftime("%Y-%m-%d"),
    }


def unfused_reference(result: dict, recipe_batch: int) -> str | None:
    """The setup a candidate's loss curve is checked against: the recipe without Liger, padding-free batches
    or flex attention, at the same batch and quantization (None for TRL's defaults)."""
    if result["setup"].startswith("trl_defaults"):
        return None
    kind = result["setup"].rsplit("_", 1)[1]
    batch = "" if result["batch_size"] == recipe_batch else f"_b{result['batch_size']}"
    return f"ours{batch}_{kind}"


def goals(results: list[dict], loss_match: dict) -> dict:
    """Issue 19's training bars per setup of the study recipe: NF4 >= 11,000 tokens/s, bf16 >= 25% MFU (4N),
    peak memory at most today's recipe's, and the loss curve within tolerance of the unfused recipe's. Speed is
    read after the last compile when a setup has one (a training run pays it once), else over the steady
    window."""
    out = {}
    for r in results:
        if r["setup"].startswith("trl_defaults"):
            continue
        kind = r["setup"].rsplit("_", 1)[1]
        tokens_per_s = r.get("tokens_per_s_after_compiles") or r["steady_tokens_per_s"]
        mfu = r.get("mfu_4n_after_compiles") or r["mfu_4n"] or 0
        speed = tokens_per_s >= NF4_TOKENS_PER_S_GOAL if kind == "nf4" else mfu >= BF16_MFU_GOAL
        memory = r["peak_memory_gib"] is not None and r["peak_memory_gib"] <= MEMORY_BAR_GIB[kind]
        check = loss_match.get(r["setup"])
        out[r["setup"]] = {
            "speed": speed,
            "memory": memory,
            "loss_curve": None if check is None else check["passed"],
            "all": speed and memory and bool(check and check["passed"]),
        }
    return out


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
        "loss_match_vs_unfused": {k: v["passed"] for k, v in payload["loss_match_vs_unfused"].items()},
        "goals_issue_19": payload["goals_issue_19"],
        "written": str(out),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
