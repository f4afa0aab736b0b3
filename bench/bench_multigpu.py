"""Multi-GPU benchmark: training tokens/s and evaluation wall time on 1 GPU against N GPUs (default 2).

Random weights of the real Qwen3-4B shape, nothing downloaded. Every measured run is a fresh
``python -m torch.distributed.run --nproc_per_node K`` (what ``accelerate launch`` starts), NCCL with
NVLink multicast off (``NCCL_NVLS_ENABLE=0``):

1. training: the study recipe (configs/qwen3-4b-gsm8k.yaml: LoRA r16 on every linear layer, completion-only
   loss, per-GPU batch and accumulation as configured) through ``training.sft`` (load_base → build_trainer →
   train) under DDP, in bf16 LoRA by default (``--quantization nf4`` for QLoRA, needs bitsandbytes), on
   GSM8K-length rows (~250 tokens). Same per-GPU batch and the same number of optimizer steps on 1 and on N
   GPUs, so N GPUs see N times the rows; tokens/s counts real tokens summed over ranks.
2. evaluation: the base model and one random LoRA adapter (``level_1``) on the same synthetic prompts
   (120-200 token ids), output lengths forced as in bench_eval (base 300, level_1 200 new tokens). Each rank
   takes problems r, r+N, … as ``cot-compress evaluate`` shards them, on its own GPU, with the fast engine
   (``--engine hf`` for HF ``generate``). Wall time runs from the first barrier after the model is built to
   the last rank's finish (engine start included). The N-GPU samples are compared with the 1-GPU samples,
   problem by problem.

    python bench/bench_multigpu.py                 # on a machine with >= 2 CUDA GPUs; $OUT/bench_multigpu.json
    python bench/bench_multigpu.py --smoke         # CPU check: 2 processes, gloo, tiny shapes
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench import train_qlora as tq  # noqa: E402

EVAL_PROFILES = {"base": 300, "level_1": 200}
SMOKE_PROFILES = {"base": 6, "level_1": 4}
GOAL_SPEEDUP = 1.8
GOAL_IDENTICAL = 0.99


# ---------------------------------------------------------------- orchestration
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="GPUs (processes) for the multi-GPU runs")
    parser.add_argument("--smoke", action="store_true", help="CPU check: 2 processes, gloo, tiny shapes")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per training run (default 30)"
    )
    parser.add_argument("--problems", type=int, default=None, help="eval problems (default 1319, GSM8K test)")
    parser.add_argument("--quantization", choices=["none", "nf4"], default="none", help="training base")
    parser.add_argument("--engine", choices=["fast", "hf"], default="fast", help="eval generation backend")
    parser.add_argument("--batch-size", type=int, default=64, help="eval rows per batch (HF engine)")
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


def main(argv=None) -> dict:
    options = parse_args(argv)
    if options.worker == "train":
        return train_worker(options)
    if options.worker == "eval":
        return eval_worker(options)
    if options.smoke:
        options.gpus = 2
    elif torch.cuda.device_count() < options.gpus:
        sys.exit(
            f"needs {options.gpus} CUDA GPUs, sees {torch.cuda.device_count()}; use --smoke for the CPU check"
        )
    options.steps = options.steps or (2 if options.smoke else 30)
    options.problems = options.problems or (12 if options.smoke else 1319)

    device = torch.device("cuda" if torch.cuda.is_available() and not options.smoke else "cpu")
    result: dict = {
        "benchmark": "bench_multigpu",
        "mode": "smoke" if options.smoke else "qwen3-4b-shape",
        "started": common.utc_now(),
        "device": common.device_info(device),
        "device_names": [torch.cuda.get_device_name(i) for i in range(options.gpus)]
        if device.type == "cuda"
        else [],
        "gpus": options.gpus,
        "launcher": "python -m torch.distributed.run (the launcher under accelerate launch)",
        "nccl_nvls_enable": "0",
        "library_versions": common.library_versions(),
        "goals": {
            "train_speedup": GOAL_SPEEDUP,
            "eval_speedup": GOAL_SPEEDUP,
            "eval_identical": GOAL_IDENTICAL,
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-multigpu-") as scratch:
        workdir = Path(scratch)
        if "train" not in options.skip:
            result["train"] = measure_training(options, workdir)
        if "eval" not in options.skip:
            result["eval"] = measure_eval(options, workdir)
    result["goals_met"] = {
        "train_speedup": result.get("train", {}).get("speedup", 0) >= GOAL_SPEEDUP,
        "eval_speedup": result.get("eval", {}).get("speedup", 0) >= GOAL_SPEEDUP,
        "eval_identical": result.get("eval", {}).get("identical_share", 0) >= GOAL_IDENTICAL,
    }
    result["finished"] = common.utc_now()
    out = options.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else common.RESULTS_DIR)
    out = out / "bench_multigpu.json" if out.suffix != ".json" else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"written": str(out), **result["goals_met"]}), flush=True)
    return result


def launch(options: argparse.Namespace, worker: str, processes: int, workdir: Path) -> None:
    """One measured run: ``processes`` ranks of this script in ``--worker`` mode."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1", f"--master_port={port}", str(Path(__file__).resolve()),
        "--worker", worker, "--workdir", str(workdir), "--steps", str(options.steps),
        "--problems", str(options.problems), "--quantization", options.quantization,
        "--engine", options.engine, "--batch-size", str(options.batch_size),
        *(["--smoke"] if options.smoke else []),
    ]  # fmt: skip
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONPATH": str(ROOT)}
    if options.smoke:
        env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    print(f"[{worker} x{processes}] {time.perf_counter() - started:.1f} s", flush=True)


def measure_training(options: argparse.Namespace, workdir: Path) -> dict:
    shape = tq.SMOKE if options.smoke else tq.QWEN3_4B
    model_dir = workdir / "model"
    # Saved once in bf16 and loaded by every run, so 1 and N GPUs train the same weights.
    parameters = tq.save_random_model(shape, tq.bench_tokenizer(), model_dir, on_gpu=not options.smoke)
    runs = {}
    for processes in (1, options.gpus):
        run_dir = workdir / f"train-{processes}"
        run_dir.mkdir()
        launch(options, "train", processes, run_dir)
        runs[processes] = json.loads((run_dir / "result.json").read_text())
    one, many = runs[1], runs[options.gpus]
    return {
        "model": {**shape, "parameters": parameters, "weights": "random, saved in bf16 and reloaded"},
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
        run_dir.mkdir()
        launch(options, "eval", processes, run_dir)
        ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(processes)]
        if len({rank["weights_fingerprint"] for rank in ranks}) != 1:
            raise RuntimeError(f"the {processes} ranks built different random weights: {ranks}")
        outputs[processes] = {key: value for rank in ranks for key, value in rank["outputs"].items()}
        runs[str(processes)] = {
            "wall_s": max(rank["wall_s"] for rank in ranks),
            "rank_generate_s": [rank["generate_s"] for rank in ranks],
            "rank_problems": [rank["problems"] for rank in ranks],
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
        "models": SMOKE_PROFILES if options.smoke else EVAL_PROFILES,
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
    from training.config import load_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    study = load_config(tq.STUDY_CONFIG)
    update = {"max_steps": options.steps, "logging_steps": 1 if options.smoke else 5, "save_steps": 10**9}
    if options.smoke:
        update["batch_size"] = 2
    training = study.training.model_copy(update=update)
    rows_per_step = training.batch_size * training.gradient_accumulation_steps * world
    model_dir = options.workdir.parent / "model"
    tokenizer = tq.bench_tokenizer()
    rows, lengths = tq.gsm8k_length_rows(tokenizer, count=rows_per_step * options.steps, row_tokens=250)
    precision = sft.choose_precision()
    model, tokenizer = sft.load_base(
        model_path=str(model_dir),
        revision="main",
        quantization="none" if options.smoke else options.quantization,
        precision=precision,
        gradient_checkpointing=training.gradient_checkpointing,
    )
    trainer = sft.build_trainer(
        model=model,
        tokenizer=tokenizer,
        dataset=sft.chat_dataset(rows),
        training=training,
        precision=precision,
        output_dir=options.workdir / "checkpoints",
    )
    clock = tq.StepClock()
    trainer.add_callback(clock)
    outcome = sft.train(trainer)
    result = {
        "world_size": trainer.accelerator.num_processes,
        "per_gpu_batch_size": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "rows_per_step": rows_per_step,
        "precision": precision,
        "quantization": "none" if options.smoke else options.quantization,
        "recipe": str(tq.STUDY_CONFIG.relative_to(ROOT)),
        "steps": trainer.state.global_step,
        "dataset_tokens": sum(lengths),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "wall_time_s": round(outcome.wall_time_s, 3),
        "tokens_per_s": round(outcome.session_tokens / outcome.wall_time_s, 1),
        "steady_tokens_per_s": clock.steady_tokens_per_s(),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if torch.cuda.is_available()
        else None,
        "final_loss": sft.loss_curve(trainer)[-1]["loss"] if sft.loss_curve(trainer) else None,
    }
    if trainer.is_world_process_zero():
        (options.workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    return result


def eval_worker(options: argparse.Namespace) -> dict:
    """One rank generating its shard (problems r, r+N, …) for every model; writes rank<r>.json."""
    from training import distributed

    process = distributed.setup()  # pins cuda:{local_rank}
    cuda = torch.cuda.is_available() and not options.smoke
    device = torch.device("cuda", process.local_rank) if cuda else torch.device("cpu")
    config = common.smoke_config() if options.smoke else common.qwen3_4b_config()
    dtype = torch.bfloat16 if cuda else torch.float32
    stop_ids = (config.eos_token_id,) if options.smoke else common.QWEN3_STOP_IDS
    pad_id = config.pad_token_id
    profiles = SMOKE_PROFILES if options.smoke else EVAL_PROFILES
    model = common.build_random_model(config, device=str(device), dtype=dtype, seed=0)
    model = common.add_random_adapters(model, [name for name in profiles if name != "base"], seed=0)
    with torch.no_grad():
        fingerprint = f"{sum(float(p.double().sum()) for p in list(model.parameters())[:8]):.6e}"
    lengths = (8, 16) if options.smoke else (120, 200)
    prompts = common.synthetic_prompts(
        options.problems, vocab_size=config.vocab_size, min_len=lengths[0], max_len=lengths[1]
    )
    mine = list(range(process.rank, len(prompts), process.world_size))

    distributed.barrier()
    started = time.perf_counter()
    outputs, tokens = {}, 0
    if options.engine == "fast":
        from training.fast_generate import FastGenerator

        engine = FastGenerator(model)
    for name, new in profiles.items():
        shard = [prompts[i] for i in mine]
        if options.engine == "fast":
            rows = [
                list(c.token_ids)
                for c in engine.generate(
                    shard,
                    adapter=None if name == "base" else name,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    stop_token_ids=stop_ids,
                    pad_token_id=pad_id,
                )
            ]
        else:
            rows = hf_shard(
                model, shard, name=name, new=new, stop_ids=stop_ids, pad_id=pad_id, batch=options.batch_size
            )
        for i, row in zip(mine, rows, strict=True):
            outputs[f"{name}/{i}"] = row
            tokens += len(row)
    if cuda:
        torch.cuda.synchronize(device)
    generate_s = time.perf_counter() - started
    distributed.barrier()
    wall = time.perf_counter() - started
    result = {
        "rank": process.rank,
        "problems": len(mine),
        "generate_s": round(generate_s, 3),
        "wall_s": round(wall, 3),
        "generated_tokens": tokens,
        "engine": options.engine,
        "weights_fingerprint": fingerprint,
        "outputs": outputs,
    }
    (options.workdir / f"rank{process.rank}.json").write_text(json.dumps(result))
    return result


def hf_shard(model, prompts, *, name: str, new: int, stop_ids, pad_id: int, batch: int) -> list[list[int]]:
    """HF ``generate`` over one shard in length-sorted batches; rows back in shard order."""
    from bench.bench_eval import adapter_context, hf_generate

    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    rows: list[list[int] | None] = [None] * len(prompts)
    with adapter_context(model, name):
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            out = hf_generate(
                model, [prompts[i] for i in chunk], max_new=new, min_new=new, stop_ids=stop_ids, pad_id=pad_id
            )
            for i, row in zip(chunk, out, strict=True):
                rows[i] = row
    return rows  # type: ignore[return-value]


if __name__ == "__main__":
    main()
