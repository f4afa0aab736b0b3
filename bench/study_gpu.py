"""The real study in miniature, through the real CLI, on one GPU: every stage at the Qwen3-4B shape.

What a user runs is ``cot-compress train-and-publish --config configs/qwen3-4b-gsm8k.yaml``. This script runs
exactly that command, as a subprocess, on a config that differs from the shipped one only in what a
machine without network access needs (a local base of random weights, a local GSM8K folder, the embedded
hub) and in size (rows, problems, new tokens):

1. Random weights of the Qwen3-4B shape, saved in bf16 as a local base folder with a Qwen-format BPE
   tokenizer trained on GSM8K text. As in the real Qwen, the embedding has more rows (151,936) than the
   tokenizer has tokens, so the model generates ids the tokenizer does not know.
2. ``train-and-publish`` twice, each in one process: once with the study's NF4 QLoRA, once with a bf16
   base. Both publish to the embedded hub.
3. On the NF4 run: an unchanged republish (0 commits expected), ``regenerate-cards`` and ``push-eval``.

For each stage it records wall time, tokens/s, peak GPU memory, the engine (fast or hf), and whether CUDA
graphs and the fused kernels were on, from the run directory's own records (``training.json``,
``eval/generation_log.jsonl``) and the command's output, timestamped line by line.

    python -m bench.study_gpu              # one CUDA GPU; writes $OUT/ or bench/results/study_gpu.json + .log
    python -m bench.study_gpu --smoke      # the same on a CPU with a tiny shape (tests run it)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench import common
from bench.train_qlora import save_random_model
from eval_artifacts.rundir import RunDir, iter_jsonl, read_json
from training.gsm8k import load_local_split
from training.tiny import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STUDY_CONFIG = ROOT / "configs" / "qwen3-4b-gsm8k.yaml"
STAGE_LINE = re.compile(r"^\[(prepare-data|train|evaluate|render-cards|publish)\] (running|current, skipped)")
REPO_LINE = re.compile(r"^(\S+/\S+): (created|committed|pull request|unchanged)\b")
COMMITTED = ("created", "committed", "pull request")


def main() -> None:
    """Options, the random base, ``train-and-publish`` per run, the republish commands, then the JSON."""
    options = parse_args()
    out = common.default_out("study_gpu.json", options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Log(out.with_suffix(".log"))
    work = options.work or Path(tempfile.mkdtemp(prefix="study_gpu-"))
    result = describe_run(smoke=options.smoke)
    result["base"] = make_base(work, options, log)
    for quantization in options.runs:
        train_and_publish(result, quantization, work, options, out, log)
    result["after"] = rerun_after(work / f"study-{options.runs[0]}.yaml", result, out, log)
    result["ok"] = True
    write(out, result)
    log(f"wrote {out}")
    if not options.work:
        shutil.rmtree(work, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    """The command line's options, sizes defaulted (smaller with ``--smoke``); a GPU unless ``--smoke``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shape, no NF4: a check of the script")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k")
    parser.add_argument(
        "--train-rows", type=int, default=None, help="data.max_train_rows (default 128; 64 smoke)"
    )
    parser.add_argument("--problems", type=int, default=None, help="eval.max_problems (default 128; 8 smoke)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="eval.max_new_tokens (default 256)")
    parser.add_argument("--runs", default=None, help="comma-separated: nf4,bf16 (smoke: none)")
    parser.add_argument(
        "--training-seeds", default=None, help="comma-separated training.seeds (default: the config's)"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="where the base and run dirs go (default: temp)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT or bench/results)")
    options = parser.parse_args()
    smoke = options.smoke
    options.train_rows = options.train_rows or (64 if smoke else 128)
    options.problems = options.problems or (8 if smoke else 128)
    options.max_new_tokens = options.max_new_tokens or (16 if smoke else 256)
    options.runs = (options.runs or ("none" if smoke else "nf4,bf16")).split(",")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("study_gpu needs a CUDA GPU; --smoke runs it on a CPU")
    return options


def describe_run(*, smoke: bool) -> dict:
    """The result's header: date, mode, device, libraries, the CLI and the shipped config."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    return {
        "date": common.utc_now(),
        "smoke": smoke,
        "device": common.device_info(device),
        "libraries": common.library_versions("trl", "bitsandbytes", "datasets", "huggingface_hub"),
        "cli": " ".join(cli()),
        "study_config": str(STUDY_CONFIG.relative_to(ROOT)),
        "changed": {},
        "runs": {},
    }


def make_base(work: Path, options: argparse.Namespace, log: Log) -> dict:
    """The random base in ``work/base``, timed and logged."""
    log(f"building the base in {work}")
    started = time.perf_counter()
    base = build_base(work / "base", options.data_dir, smoke=options.smoke)
    base |= {"build_s": round(time.perf_counter() - started, 1)}
    log(json.dumps(base))
    return base


def train_and_publish(
    result: dict, quantization: str, work: Path, options: argparse.Namespace, out: Path, log: Log
) -> None:
    """One ``train-and-publish`` on its own config, recorded in ``result`` and written; stops on failure."""
    run_dir = work / f"run-{quantization}"
    config_path, changed = write_config(
        work / f"study-{quantization}.yaml",
        base=Path(result["base"]["path"]),
        data_dir=options.data_dir,
        run_dir=run_dir,
        quantization="none" if quantization in ("bf16", "none") else quantization,
        train_rows=options.train_rows,
        problems=options.problems,
        max_new_tokens=options.max_new_tokens,
        training_seeds=options.training_seeds,
    )
    result["changed"][quantization] = changed
    command = run_cli(["train-and-publish", "--config", str(config_path)], log)
    result["runs"][quantization] = {
        "command": command,
        "stages": stage_figures(command, RunDir(run_dir)),
    }
    write(out, result)
    if command["exit_code"]:
        raise SystemExit(f"train-and-publish ({quantization}) failed: see {log.path}")


def rerun_after(config_path: Path, result: dict, out: Path, log: Log) -> dict:
    """The first run again: republish unchanged, re-render every card, push the eval dataset; stops on failure."""
    after = {}
    for name in ("publish", "regenerate-cards", "push-eval"):
        after[name] = run_cli([name, "--config", str(config_path)], log)
        if after[name]["exit_code"]:
            write(out, result | {"after": after})
            raise SystemExit(f"{name} failed: see {log.path}")
    return after


# ---------------------------------------------------------------- the base and the config
def build_base(path: Path, data_dir: Path, *, smoke: bool) -> dict:
    """Random weights of the Qwen3-4B shape (SMOKE's with --smoke) and a BPE tokenizer trained on GSM8K."""
    rows = load_local_split(data_dir, "train")
    texts = [p.question for p in rows] + [p.answer for p in rows]
    # ~4k merges give Qwen-like token counts on GSM8K text (a question ~60 tokens, a solution ~100).
    tokenizer = train_tokenizer(texts, vocab_size=300 if smoke else 4096)
    # Two random layers with tied embeddings only copy the last token ("\n" after the chat prompt) forever,
    # whatever a few LoRA steps do, and evaluate's adapter check would rightly stop the run. Untied, the
    # smoke model's picks depend on the weights, as the real shape's do.
    shape = common.SMOKE | {"tie_word_embeddings": False} if smoke else common.QWEN3_4B
    parameters = save_random_model(shape, tokenizer, path, on_gpu=not smoke)
    if not smoke:
        torch.cuda.empty_cache()
    return {
        "path": str(path),
        "shape": "smoke" if smoke else "Qwen3-4B",
        "parameters": parameters,
        "embedding_rows": shape["vocab_size"],
        "tokenizer_tokens": len(tokenizer),
    }


def write_config(
    path: Path,
    *,
    base: Path,
    data_dir: Path,
    run_dir: Path,
    quantization: str,
    train_rows: int,
    problems: int,
    max_new_tokens: int,
    training_seeds: str | None = None,
) -> tuple[Path, dict]:
    """The shipped study config with only these keys changed; returns its path and the changes."""
    config = yaml.safe_load(STUDY_CONFIG.read_text())
    changed = {
        "base_model.id": str(base),
        # The random weights stand in for this repo's shape; publish needs a Hub id to name as the base.
        "base_model.hub_id": config["base_model"]["id"],
        "base_model.quantization": quantization,
        "data.source": "local",
        "data.local_dir": str(data_dir.resolve()),
        "data.max_train_rows": train_rows,
        "eval.max_problems": problems,
        "eval.max_new_tokens": max_new_tokens,
        "hub.endpoint": "local",
        "run_dir": str(run_dir),
    }
    if training_seeds:
        changed["training.seeds"] = [int(seed) for seed in training_seeds.split(",")]
    for dotted, value in changed.items():
        *parents, key = dotted.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, changed


# ---------------------------------------------------------------- running the CLI
class Log:
    """The benchmark's log: every line of every command, stamped with seconds since the script started."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.perf_counter()
        path.write_text("")

    def __call__(self, line: str) -> float:
        now = time.perf_counter() - self.start
        with self.path.open("a") as handle:
            handle.write(f"[{now:9.1f}s] {line}\n")
        print(f"[{now:9.1f}s] {line}", flush=True)
        return now


def cli() -> list[str]:
    """The installed ``cot-compress`` script, or the same entry point through this interpreter."""
    script = shutil.which("cot-compress")
    return [script] if script else [sys.executable, "-m", "hub_tools.cli"]


def run_cli(arguments: list[str], log: Log) -> dict:
    """Run one ``cot-compress`` command; returns its exit code, wall time, stage marks and repo lines."""
    command = [*cli(), *arguments]
    log("$ cot-compress " + " ".join(arguments))
    env = os.environ | {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    marks, repos = [], {}
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            line = line.rstrip("\n")
            at = time.perf_counter() - started
            log(line)
            if match := STAGE_LINE.match(line):
                marks.append({"stage": match[1], "ran": match[2] == "running", "at_s": round(at, 2)})
            if match := REPO_LINE.match(line):
                repos[match[1]] = match[2]
    wall = time.perf_counter() - started
    log(f"exit {process.returncode} after {wall:.1f} s")
    return {
        "arguments": arguments,
        "exit_code": process.returncode,
        "wall_s": round(wall, 2),
        "marks": marks,
        "repos": repos,
        "commits": sum(status in COMMITTED for status in repos.values()),
    }


# ---------------------------------------------------------------- figures
def stage_figures(command: dict, run_dir: RunDir) -> dict:
    """Per stage: wall time from the command's stage lines, and what the run directory recorded."""
    marks = command["marks"]
    ends = [mark["at_s"] for mark in marks[1:]] + [command["wall_s"]]
    stages = {
        mark["stage"]: {"ran": mark["ran"], "wall_s": round(end - mark["at_s"], 2)}
        for mark, end in zip(marks, ends, strict=True)
    }
    if "train" in stages:
        stages["train"] |= train_figures(run_dir)
    if "evaluate" in stages:
        stages["evaluate"] |= eval_figures(run_dir)
    if "publish" in stages:
        stages["publish"] |= {"commits": command["commits"], "repos": len(command["repos"])}
    return stages


def train_figures(run_dir: RunDir) -> dict:
    adapters = {}  # one per (level, training seed)
    for path in sorted(run_dir.root.glob("adapters/level_*/training.json")):
        payload = read_json(path, what="training.json", hint="")
        adapters[payload["model"]] = {
            "steps": payload["steps"],
            "tokens_seen": payload["tokens_seen"],
            "train_wall_s": payload["wall_time_s"],
            "tokens_per_s": payload["tokens_per_s"],
            "peak_gpu_memory_gib": payload["hardware"].get("peak_gpu_memory_gib"),
            "quantization": payload["quantization"],
            "precision": payload["precision"],
        }
    tokens = sum(adapter["tokens_seen"] for adapter in adapters.values())
    seconds = sum(adapter["train_wall_s"] for adapter in adapters.values())
    peaks = [adapter["peak_gpu_memory_gib"] for adapter in adapters.values() if adapter["peak_gpu_memory_gib"]]
    return {
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "peak_gpu_memory_gib": max(peaks) if peaks else None,
        "adapters": adapters,
    }


def eval_figures(run_dir: RunDir) -> dict:
    if not run_dir.generation_log.is_file():
        return {}
    rows = list(iter_jsonl(run_dir.generation_log, what="generation log"))
    tokens = sum(row["generated_tokens"] for row in rows)
    seconds = sum(row["wall_time_s"] for row in rows)
    peaks = [row["peak_gpu_memory_gib"] for row in rows if row["peak_gpu_memory_gib"] is not None]
    return {
        "engine": sorted({row["engine"] for row in rows}),
        "cuda_graphs": sorted({row["cuda_graphs"] for row in rows}),
        "fused_kernels": sorted({row["fused_kernels"] for row in rows}),
        # Rows written before 2026-12-02 have no such key: their evaluate never fused the projections.
        "fused_projections": sorted({row.get("fused_projections", False) for row in rows}),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "peak_gpu_memory_gib": max(peaks) if peaks else None,
        "models": rows,
    }


def write(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
