"""Multi-GPU benchmark: training tokens/s and evaluation wall time on 1 GPU against N GPUs (default 2).

Random weights of the real Qwen3-4B shape, nothing downloaded. Every measured run is a fresh
``accelerate launch --num_processes K`` (``--multi_gpu`` when K > 1), NCCL with NVLink multicast off
(``NCCL_NVLS_ENABLE=0``):

1. evaluation: the base model and five random LoRA adapters (``level_1`` … ``level_5``) on the same 1,319
   synthetic prompts (120-200 token ids), output lengths forced as in bench_eval (300, 200, 100, 60, 40 and
   15 new tokens). The problems are planned as ``cot-compress evaluate`` plans them (length-sorted batches of
   the study's ``eval.batch_size``, the same for any number of GPUs) and rank r takes batches r, r+N, …, on
   its own GPU, with the fast engine (``--engine hf`` for HF ``generate``). Wall time runs from the first barrier
   after the model is built to the last rank's finish (engine start included). The N-GPU samples are
   compared with the 1-GPU samples, problem by problem.
2. training: the study recipe (configs/qwen3-4b-gsm8k.yaml: LoRA r16 on every linear layer, completion-only
   loss, per-GPU batch and accumulation as configured) through ``training.sft`` (load_base → build_trainer →
   train) under DDP, once per ``--quantization`` (default: nf4, the study's QLoRA, then bf16 LoRA), on
   GSM8K-length rows (~250 tokens). Same per-GPU batch and the same number of optimizer steps on 1 and on N
   GPUs, so N GPUs see N times the rows; tokens/s counts real tokens summed over ranks.

The JSON is rewritten after each part, so a run cut short keeps what it measured.

    python -m bench.bench_multigpu                 # on a machine with >= 2 CUDA GPUs; $OUT/bench_multigpu.json
    python -m bench.bench_multigpu --smoke         # CPU check: 2 processes, gloo, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bench import common
from bench import train_qlora as tq
from eval_artifacts.study.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE_PROFILES = {"base": 6, "level_1": 4}
GOAL_SPEEDUP = 1.8
GOAL_IDENTICAL = 0.99


# ---------------------------------------------------------------- orchestration
def main(argv=None) -> dict:
    """One rank of a run (``--worker``), or: options, header, the eval on 1 and N GPUs, training, the JSON."""
    options = parse_args(argv)
    if options.worker == "train":
        return train_worker(options)
    if options.worker == "eval":
        return eval_worker(options)
    resolve_defaults(options)
    result = describe_run(options)
    out = common.default_out("bench_multigpu.json", options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-multigpu-") as scratch:
        if "eval" not in options.skip:
            result["eval"] = measure_eval(options, Path(scratch) / "eval")
            write_result(result, out)
        if "train" not in options.skip:
            measure_every_training(options, Path(scratch) / "train", result, out)
    result["finished"] = common.utc_now()
    write_result(result, out)
    print(json.dumps({"written": str(out), **result["goals_met"]}), flush=True)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    """The command line's options, the internal ones of a worker rank included."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="GPUs (processes) for the multi-GPU runs")
    parser.add_argument("--smoke", action="store_true", help="CPU check: 2 processes, gloo, tiny shapes")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per training run (default 30)"
    )
    parser.add_argument("--problems", type=int, default=None, help="eval problems (default 1319, GSM8K test)")
    parser.add_argument(
        "--quantization",
        choices=["nf4", "none"],
        nargs="+",
        default=None,
        help="training bases, each measured on 1 and N GPUs (default: nf4 none; smoke: none)",
    )
    parser.add_argument("--engine", choices=["fast", "hf"], default="fast", help="eval generation backend")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="eval rows per batch (default: the study's eval.batch_size)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output JSON (default $OUT/ or bench/results/)"
    )
    parser.add_argument(
        "--skip", choices=["train", "eval"], action="append", default=[], help=argparse.SUPPRESS
    )
    # Internal: one rank of one measured run.
    parser.add_argument("--worker", choices=["train", "eval"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_defaults(options: argparse.Namespace) -> None:
    """Fill the sizes left unset (smaller with ``--smoke``); stop if the machine has too few GPUs."""
    if options.smoke:
        options.gpus = 2
    elif torch.cuda.device_count() < options.gpus:
        sys.exit(
            f"needs {options.gpus} CUDA GPUs, sees {torch.cuda.device_count()}; use --smoke for the CPU check"
        )
    options.steps = options.steps or (2 if options.smoke else 30)
    options.problems = options.problems or (12 if options.smoke else 1319)
    options.batch_size = options.batch_size or (
        3 if options.smoke else load_config(tq.STUDY_CONFIG).eval.batch_size
    )
    options.quantization = options.quantization or (["none"] if options.smoke else ["nf4", "none"])


def describe_run(options: argparse.Namespace) -> dict:
    """The result's header: mode, devices, launcher, library versions and the goals."""
    device = torch.device("cuda" if torch.cuda.is_available() and not options.smoke else "cpu")
    return {
        "benchmark": "bench_multigpu",
        "mode": "smoke" if options.smoke else "qwen3-4b-shape",
        "started": common.utc_now(),
        "device": common.device_info(device),
        "device_names": [torch.cuda.get_device_name(i) for i in range(options.gpus)]
        if device.type == "cuda"
        else [],
        "gpus": options.gpus,
        "launcher": "accelerate launch --num_processes K (--multi_gpu when K > 1)",
        "nccl_nvls_enable": "0",
        "library_versions": common.library_versions(),
        "goals": {
            "train_speedup": GOAL_SPEEDUP,
            "eval_speedup": GOAL_SPEEDUP,
            "eval_identical": GOAL_IDENTICAL,
        },
    }


def measure_every_training(options: argparse.Namespace, workdir: Path, result: dict, out: Path) -> None:
    """Random weights saved once, then each ``--quantization`` on 1 and N GPUs, written after each."""
    shape = common.SMOKE if options.smoke else common.QWEN3_4B
    # Saved once in bf16 and loaded by every run, so 1 and N GPUs train the same weights.
    parameters = tq.save_random_model(
        shape, tq.bench_tokenizer(), workdir / "model", on_gpu=not options.smoke
    )
    model = {**shape, "parameters": parameters, "weights": "random, saved in bf16 and reloaded"}
    result["train"] = {}
    for quantization in options.quantization:
        runs = measure_training(options, workdir, quantization)
        result["train"][quantization] = {"model": model, **runs}
        write_result(result, out)


def write_result(result: dict, out: Path) -> None:
    """Judge the goals on what has been measured so far and (re)write the JSON."""
    trained = result.get("train", {})
    result["goals_met"] = {
        **{f"train_speedup_{q}": run["speedup"] >= GOAL_SPEEDUP for q, run in trained.items()},
        "eval_speedup": result.get("eval", {}).get("speedup", 0) >= GOAL_SPEEDUP,
        "eval_identical": result.get("eval", {}).get("identical_share", 0) >= GOAL_IDENTICAL,
    }
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def launch(
    options: argparse.Namespace, worker: str, processes: int, workdir: Path, quantization: str = "none"
) -> None:
    """One measured run: ``accelerate launch -m`` of ``processes`` ranks of this module in ``--worker`` mode."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={processes}",
        *(["--multi_gpu"] if processes > 1 else []), "--num_machines=1", "--mixed_precision=no",
        "--dynamo_backend=no", f"--main_process_port={port}", "-m", "bench.bench_multigpu",
        "--worker", worker, "--workdir", str(workdir), "--steps", str(options.steps),
        "--problems", str(options.problems), "--quantization", quantization,
        "--engine", options.engine, "--batch-size", str(options.batch_size),
        *(["--smoke"] if options.smoke else []),
    ]  # fmt: skip
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    if options.smoke:
        env["OMP_NUM_THREADS"] = "1"
    else:
        # Exactly the GPUs of this run: a single process that sees two would get DataParallel from the Trainer.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in range(processes))
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True)  # the ranks import ``bench`` from the root
    print(f"[{worker} x{processes} {quantization}] {time.perf_counter() - started:.1f} s", flush=True)


def measure_training(options: argparse.Namespace, workdir: Path, quantization: str) -> dict:
    """The recipe on 1 and on N GPUs from the model saved in ``workdir/model``."""
    runs = {}
    for processes in (1, options.gpus):
        run_dir = workdir / f"{quantization}-{processes}"
        run_dir.mkdir(parents=True)
        launch(options, "train", processes, run_dir, quantization)
        runs[processes] = json.loads((run_dir / "result.json").read_text())
    one, many = runs[1], runs[options.gpus]
    return {
        "recipe": one["recipe"],
        "runs": {str(k): v for k, v in runs.items()},
        "speedup": round(many["tokens_per_s"] / one["tokens_per_s"], 3),
        "steady_speedup": round(many["steady_tokens_per_s"] / one["steady_tokens_per_s"], 3)
        if one["steady_tokens_per_s"]
        else None,
    }


def measure_eval(options: argparse.Namespace, workdir: Path) -> dict:
    runs, outputs = {}, {}
    for processes in (1, options.gpus):
        run_dir = workdir / f"eval-{processes}"
        run_dir.mkdir(parents=True)
        launch(options, "eval", processes, run_dir)
        ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(processes)]
        if len({rank["weights_fingerprint"] for rank in ranks}) != 1:
            raise RuntimeError(f"the {processes} ranks built different random weights: {ranks}")
        outputs[processes] = {key: value for rank in ranks for key, value in rank["outputs"].items()}
        runs[str(processes)] = {
            "wall_s": max(rank["wall_s"] for rank in ranks),
            "rank_generate_s": [rank["generate_s"] for rank in ranks],
            "rank_problems": [rank["problems"] for rank in ranks],
            "rank_batch_rows": [rank["batch_rows"] for rank in ranks],
            "generated_tokens": sum(rank["generated_tokens"] for rank in ranks),
            "engine": ranks[0]["engine"],
            "weights_fingerprint": ranks[0]["weights_fingerprint"],
        }
    one, many = outputs[1], outputs[options.gpus]
    if set(one) != set(many):
        raise RuntimeError("the 1-GPU and N-GPU runs generated different (model, problem) sets")
    identical = sum(one[key] == many[key] for key in one)
    weights_same = runs["1"]["weights_fingerprint"] == runs[str(options.gpus)]["weights_fingerprint"]
    return {
        "problems": options.problems,
        "models": SMOKE_PROFILES if options.smoke else common.EVAL_PROFILES,
        "runs": runs,
        "speedup": round(runs["1"]["wall_s"] / runs[str(options.gpus)]["wall_s"], 3),
        "samples": len(one),
        "identical_samples": identical,
        "identical_share": round(identical / len(one), 4),
        "same_weights_on_1_and_n": weights_same,
    }


# ---------------------------------------------------------------- one rank of a run
def train_worker(options: argparse.Namespace) -> dict:
    """One DDP rank training the study recipe for ``--steps`` steps; rank 0 writes result.json."""
    from training import sft

    (quantization,) = options.quantization  # launch() passes the one this run measures
    world = int(os.environ.get("WORLD_SIZE", "1"))
    study = load_config(tq.STUDY_CONFIG)
    training = tq.recipe_training(
        study, steps=options.steps, smoke=options.smoke, logging_steps=1 if options.smoke else 5
    )
    rows_per_step = training.batch_size * training.gradient_accumulation_steps * world
    rows, lengths = tq.gsm8k_length_rows(
        tq.bench_tokenizer(), count=rows_per_step * options.steps, row_tokens=250
    )
    run = tq.train_recipe(
        model_dir=options.workdir.parent / "model",  # saved by main()
        rows=rows,
        training=training,
        quantization=quantization,
        output_dir=options.workdir / "checkpoints",
    )
    curve = sft.loss_curve(run.trainer)
    result = {
        "world_size": sft.hardware(run.trainer)["world_size"],
        "per_gpu_batch_size": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "rows_per_step": rows_per_step,
        "precision": run.precision,
        "quantization": quantization,
        "base_loaded_in_4bit": bool(
            getattr(run.model, "is_loaded_in_4bit", False)
        ),  # what was really trained
        "recipe": str(tq.STUDY_CONFIG.relative_to(ROOT)),
        **tq.timing_fields(run, lengths),
        "final_loss": curve[-1]["loss"] if curve else None,
    }
    if run.trainer.is_world_process_zero():
        (options.workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    run.trainer.accelerator.wait_for_everyone()
    return result


def eval_worker(options: argparse.Namespace) -> dict:
    """One rank generating its share of the plan's batches for every model; writes rank<r>.json."""
    from bench.bench_eval import adapter_context, hf_generate
    from training import distributed
    from training.generate import plan_batches

    process = distributed.setup()  # pins cuda:{local_rank}
    cuda = torch.cuda.is_available() and not options.smoke
    device = torch.device("cuda", process.local_rank) if cuda else torch.device("cpu")
    config = common.smoke_config() if options.smoke else common.qwen3_4b_config()
    dtype = torch.bfloat16 if cuda else torch.float32
    stop_ids = (config.eos_token_id,) if options.smoke else common.QWEN3_STOP_IDS
    pad_id = config.pad_token_id
    profiles = SMOKE_PROFILES if options.smoke else common.EVAL_PROFILES
    model = common.build_random_model(config, device=str(device), dtype=dtype, seed=0)
    model = common.add_random_adapters(model, [name for name in profiles if name != "base"], seed=0)
    with torch.no_grad():
        fingerprint = f"{sum(float(p.double().sum()) for p in list(model.parameters())[:8]):.6e}"
    lengths = (8, 16) if options.smoke else (120, 200)
    prompts = common.synthetic_prompts(
        options.problems, vocab_size=config.vocab_size, min_len=lengths[0], max_len=lengths[1]
    )
    # The plan of `cot-compress evaluate`: the same length-sorted batches for any number of GPUs, shared out.
    plan = plan_batches([len(p) for p in prompts], options.batch_size)
    mine = distributed.rank_share(plan, process)

    distributed.barrier()
    started = time.perf_counter()
    outputs, tokens, batch_rows = {}, 0, {}
    if options.engine == "fast":
        from training.fast_generate import FastGenerator

        # The separate q/k/v and gate/up GEMMs, as measured in bench/results/bench_multigpu*.json (2026-11-26);
        # the evaluate stage's engine fuses them on a GPU since 2026-12-02, a per-GPU change this comparison of
        # one GPU against several does not depend on.
        engine = FastGenerator(model)
    for name, new in profiles.items():
        batch_rows[name] = []
        adapter = None if name == "base" else name
        with nullcontext() if options.engine == "fast" else adapter_context(model, name):
            for batch in mine:
                batch_prompts = [prompts[i] for i in batch]
                if options.engine == "fast":
                    completions = engine.generate(
                        batch_prompts,
                        adapter=adapter,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        stop_token_ids=stop_ids,
                        pad_token_id=pad_id,
                    )
                    rows = [list(c.token_ids) for c in completions]
                    batch_rows[name] += [b.rows for b in engine.last_stats.batches]
                else:
                    rows = hf_generate(
                        model, batch_prompts, max_new=new, min_new=new, stop_ids=stop_ids, pad_id=pad_id
                    )
                    batch_rows[name].append(len(batch))
                for i, row in zip(batch, rows, strict=True):
                    outputs[f"{name}/{i}"] = row
                    tokens += len(row)
    if cuda:
        torch.cuda.synchronize(device)
    generate_s = time.perf_counter() - started
    distributed.barrier()
    wall = time.perf_counter() - started
    result = {
        "rank": process.rank,
        "problems": sum(len(batch) for batch in mine),
        "generate_s": round(generate_s, 3),
        "wall_s": round(wall, 3),
        "generated_tokens": tokens,
        "batch_rows": batch_rows,
        "engine": options.engine,
        "weights_fingerprint": fingerprint,
        "outputs": outputs,
    }
    (options.workdir / f"rank{process.rank}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
