"""``python -m bench.study_gpu --smoke``: the real study's CLI path, every stage, on a CPU with a tiny shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from eval_artifacts.records import read_samples
from eval_artifacts.rundir import RunDir, read_json
from eval_artifacts.study.config import load_config
from training.synthetic import generate_problems

ROOT = Path(__file__).resolve().parents[1]
CHANGED_KEYS = {
    "base_model.id", "base_model.hub_id", "base_model.quantization", "data.source", "data.local_dir", "data.max_train_rows",
    "eval.max_problems", "eval.max_new_tokens", "hub.endpoint", "run_dir",
}  # fmt: skip


def gsm8k_folder(tmp_path: Path) -> Path:
    """The real GSM8K when CI provides it, else synthetic problems in its file format."""
    if os.environ.get("COT_GSM8K_DIR"):
        return Path(os.environ["COT_GSM8K_DIR"])
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    for split, count in (("train", 200), ("test", 20)):
        rows = generate_problems(count, seed=0, split=split)
        lines = [json.dumps({"question": p.question, "answer": p.answer}) for p in rows]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_smoke_runs_every_stage_of_the_study_through_the_cli(tmp_path):
    out, work = tmp_path / "out" / "study_gpu.json", tmp_path / "work"
    command = [sys.executable, "-m", "bench.study_gpu", "--smoke", "--work", str(work), "--out", str(out)]
    command += ["--data-dir", str(gsm8k_folder(tmp_path))]
    subprocess.run(command, cwd=ROOT, check=True, timeout=900, capture_output=True)

    result = json.loads(out.read_text())
    assert result["ok"] and out.with_suffix(".log").read_text().count("$ cot-compress") == 4
    # The embedding has more rows than the tokenizer has tokens, as in the real Qwen.
    assert result["base"]["embedding_rows"] > result["base"]["tokenizer_tokens"]

    # The config is the shipped study's, with only the listed keys changed.
    shipped = flatten(yaml.safe_load((ROOT / "configs" / "qwen3-4b-gsm8k.yaml").read_text()))
    used = flatten(yaml.safe_load((work / "study-none.yaml").read_text()))
    assert set(result["changed"]["none"]) == CHANGED_KEYS
    assert {key for key in used.keys() | shipped.keys() if used.get(key) != shipped.get(key)} <= CHANGED_KEYS

    run = result["runs"]["none"]
    assert run["command"]["exit_code"] == 0
    stages = run["stages"]
    assert list(stages) == ["prepare-data", "train", "evaluate", "render-cards", "publish"]
    assert all(stage["ran"] and stage["wall_s"] >= 0 for stage in stages.values())
    # five adapters on main, ten more on the branches seed-43 and seed-44, and the eval dataset
    assert stages["publish"]["commits"] == 16

    # Figures recomputed from the run directory's own records: an adapter per (level, training seed).
    run_dir = RunDir(work / "run-none")
    config = load_config(work / "study-none.yaml")
    adapters = [model for n in config.levels for model, _ in config.adapter_models(n)]
    assert len(adapters) == 15 and len(stages["train"]["adapters"]) == 15
    payloads = [read_json(run_dir.training_json(model), what="", hint="") for model in adapters]
    tokens, seconds = sum(p["tokens_seen"] for p in payloads), sum(p["wall_time_s"] for p in payloads)
    assert stages["train"]["tokens_per_s"] == round(tokens / seconds, 1)
    samples = [row for model in config.model_keys for row in read_samples(run_dir.samples(model))]
    # base, 15 adapters and 5 prompt-only baselines, one greedy evaluation seed, eight problems
    assert len(samples) == 21 * 8
    assert stages["evaluate"]["generated_tokens"] == sum(row["completion_tokens"] for row in samples)
    assert stages["evaluate"]["engine"] == ["hf"] and stages["evaluate"]["cuda_graphs"] == [False]

    # Then: an unchanged republish, regenerate-cards and push-eval, none of which has anything to commit.
    after = result["after"]
    assert [(name, step["exit_code"], step["commits"]) for name, step in after.items()] == [
        ("publish", 0, 0), ("regenerate-cards", 0, 0), ("push-eval", 0, 0),
    ]  # fmt: skip
    assert all(status == "unchanged" for status in after["publish"]["repos"].values())
