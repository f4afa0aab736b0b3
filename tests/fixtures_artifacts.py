"""A fixed, realistic study written into a run dir: everything the stages after evaluation read.

``write_fixture_study(root, config=config)`` writes data/stats.json, adapters/level_<n>/ (training.json, a
small adapter_config.json + adapter_model.safetensors; adapters/rl_l<n>/ likewise for ``rl.levels``), eval/<model>/samples.jsonl, metrics.json (through
``eval_artifacts.metrics.write_metrics``), eval/summary.json and eval/pareto.png. Same inputs, same bytes.

The default shape is that of a real study: the stock model thinks longest, shorter levels lose accuracy,
and an adapter's right answers are mostly problems base also gets right (paired structure), so that low
levels are significantly below base and the sweet spot (margin 0.05) is L2. ``profiles`` pins a model's
exact numbers, e.g. the published Level-4 adapter's 765 / 1319 correct, 39.05 mean and 35 median think tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from eval_artifacts.metrics import write_metrics
from eval_artifacts.plots import plot_pareto
from eval_artifacts.records import SampleRecord, is_rl, model_kind, model_level, other_seed_of
from eval_artifacts.rundir import SCHEMA_VERSION, RunDir, append_jsonl, epochs_trained, write_json
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.levels import LEVELS, build_prompt, build_response, parse_response
from eval_artifacts.summary import write_summary
from training.gsm8k import grade
from training.synthetic import generate_problems
from training.teachers import rule_teacher


@dataclass(frozen=True)
class ModelProfile:
    """One model's numbers on one seed: exact correct count, think-token sum and median."""

    n_correct: int
    think_total: int
    think_median: int
    overlap: float = 0.9
    """Share of the right answers taken from problems base gets right (paired structure)."""
    truncated: int = 0
    """Wrong answers cut by the token limit before their final answer (graded ``truncated``)."""


# (accuracy, mean think tokens, median think tokens, truncated per 200) per model.
DEFAULT_SHAPE = {
    "base": (0.62, 182.35, 171, 2),
    "level_1": (0.64, 96.4, 92, 0),
    "level_2": (0.61, 49.8, 47, 0),
    "level_3": (0.555, 31.2, 29, 0),
    "level_4": (0.52, 19.6, 18, 0),
    "level_5": (0.31, 5.3, 5, 0),
}
ANSWER_OVERHEAD = {"base": 7, "level": 11}
"""Completion tokens beyond the think tokens: answer line, think tags, end of sequence."""
SEED_SHIFT = [0, 3, -2, 4, -1]
FIXTURE_BASE_SHA = "0123456789abcdef0123456789abcdef01234567"
"""The commit a Hub base resolves to in the fixture's training.json."""
"""Per-seed change of n_correct, so several seeds have a real spread."""


PROMPT_ONLY_SHAPE = {1: (0.6, 150.2, 140, 2), 2: (0.55, 120.4, 110, 1), 3: (0.5, 90.6, 85, 1), 4: (0.45, 80.1, 70, 1), 5: (0.4, 60.3, 55, 0)}
"""Prompt-only baselines: the stock model asked for a level's style shortens its reasoning far less."""
TRAINING_SEED_SHIFT = {43: (-0.015, 1.1), 44: (0.01, 0.95)}
"""Other training seeds' adapters: accuracy change and think-token factor against the published one."""
RL_SHIFT = (0.04, 0.97)
"""RL adapters (``rl_l<n>``): accuracy change and think-token factor against their SFT sibling."""


def default_profile(model: str, n_problems: int) -> ModelProfile:
    kind, level, seed = model_kind(model), model_level(model), other_seed_of(model)
    if kind == "prompt":
        accuracy, mean, median, truncated = PROMPT_ONLY_SHAPE[level]
    else:
        accuracy, mean, median, truncated = DEFAULT_SHAPE["base" if level is None else f"level_{level}"]
    if seed is not None or is_rl(model):
        change, factor = RL_SHIFT if is_rl(model) else TRAINING_SEED_SHIFT.get(seed, (0.005 * (seed % 5) - 0.01, 1.0))
        accuracy, mean, median = accuracy + change, mean * factor, round(median * factor)
    return ModelProfile(
        n_correct=round(accuracy * n_problems),
        think_total=round(mean * n_problems),
        think_median=median,
        truncated=round(truncated * n_problems / 200),
    )


def token_values(n: int, *, total: int, median: int, rng: random.Random) -> list[int]:
    """``n`` non-negative ints with exactly this sum and median (shuffled)."""
    middle = 1 if n % 2 else 2
    below, above = (n - middle) // 2, (n - middle) // 2
    low = [rng.randint(median // 2, median) for _ in range(below)]
    high = [rng.randint(median, 2 * median + 1) for _ in range(above)]
    diff = total - (sum(low) + sum(high) + middle * median)
    if diff > 0:
        for index in range(above):
            high[index] += diff // above + (1 if index < diff % above else 0)
    for values, floor in ((high, median), (low, 0)):
        for index in range(len(values)):
            if diff >= 0:
                break
            take = min(values[index] - floor, -diff)
            values[index] -= take
            diff += take
    if diff < 0:
        raise ValueError(f"no {n} values with median {median} sum to {total}")
    values = low + [median] * middle + high
    rng.shuffle(values)
    return values


def _reasoning(level: int, problem) -> str:
    row = rule_teacher(level, problem)
    return row.reasoning if row.reasoning else LEVELS[level].example


def _wrong(gold: str) -> str:
    return str(int(float(gold)) + 1)


def _correct_set(n: int, k: int, base_right: set[int] | None, overlap: float, rng: random.Random) -> set[int]:
    if base_right is None:
        return set(rng.sample(range(n), k))
    base_wrong = [i for i in range(n) if i not in base_right]
    from_right = min(len(base_right), max(k - len(base_wrong), round(overlap * k)))
    chosen = rng.sample(sorted(base_right), from_right) + rng.sample(base_wrong, k - from_right)
    return set(chosen)


def _samples(model: str, level: int | None, problems, profile: ModelProfile, seed: int, base_right, first_seed: int):
    rng = random.Random(f"{model}:{seed}")
    n = len(problems)
    right = _correct_set(n, profile.n_correct, base_right, profile.overlap, rng)
    think = token_values(n, total=profile.think_total, median=profile.think_median, rng=rng)
    wrong = sorted(set(range(n)) - right)
    truncated = set(wrong[: profile.truncated])
    overhead = ANSWER_OVERHEAD["base" if level is None else "level"]
    records = []
    for index, problem in enumerate(problems):
        answer = problem.gold if index in right else (None if index in truncated else _wrong(problem.gold))
        finish = "length" if index in truncated else "stop"
        if level is None:
            body = problem.answer.split("####")[0].strip().replace("<<", "").replace(">>", " ")
            completion = body if answer is None else f"{body}\n#### {answer}"
            prompt = problem.question
        else:
            # An output cut by the token limit stops inside its think block.
            reasoning = _reasoning(level, problem)
            completion = f"<think>\n{reasoning}" if answer is None else build_response(reasoning, answer)
            prompt = build_prompt(level, problem.question)
        graded = grade(completion, problem.gold, finish_reason=finish, kind="stock" if level is None else "adapter")
        assert graded.correct == (index in right), (model, problem.id, graded)
        records.append(
            SampleRecord(
                id=problem.id,
                question=problem.question,
                gold=problem.gold,
                prompt=prompt,
                completion=completion,
                reasoning=parse_response(completion).reasoning,
                predicted=graded.predicted,
                extractor=graded.extractor,
                correct=graded.correct,
                correct_lenient=graded.correct_lenient,
                grade_reason=graded.reason,
                think_tokens=think[index],
                completion_tokens=think[index] + overhead,
                finish_reason=finish,
                model=model,
                level=level,
                training_seed=None
                if model_kind(model) != "adapter"
                else (first_seed if other_seed_of(model) is None else other_seed_of(model)),
                seed=seed,
                sample=0,
            ).to_row()
        )
    return records, right


def _training_json(config: StudyConfig, level: int, train_rows: int, model: str, seed: int) -> dict:
    t = config.training
    gpu = config.base_model.quantization == "nf4"
    steps = t.max_steps if t.max_steps > 0 else round(t.epochs * train_rows / t.batch_size)
    wall = round(41.7 + 3.1 * level + (900.0 if gpu else 0.0), 3)
    tokens = steps * t.batch_size * 96
    return {
        "schema_version": SCHEMA_VERSION,
        "level": level,
        "model": model,
        "base_model": {"id": config.base_model.id, "revision": config.base_model.revision},
        "base_model_hub": {"id": None, "sha": None}
        if config.tiny_base
        else {"id": config.base_hub_id, "sha": FIXTURE_BASE_SHA},
        "adapter": {
            "method": "LoRA",
            "r": t.lora.r,
            "alpha": t.lora.alpha,
            "dropout": t.lora.dropout,
            "target_modules": t.lora.target_modules,
        },
        "hyperparameters": {
            "epochs": t.epochs,
            "max_steps": t.max_steps,
            "learning_rate": t.learning_rate,
            "batch_size": t.batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "effective_batch_size": t.batch_size * t.gradient_accumulation_steps,
            "max_seq_length": t.max_seq_length,
            "warmup_ratio": t.warmup_ratio,
            "lr_scheduler": t.lr_scheduler,
            "optimizer": "adamw_torch_fused" if gpu else "adamw_torch",
        },
        "precision": "bf16" if gpu else "fp32",
        "quantization": config.base_model.quantization,
        "loss": "completion_only" if t.completion_only_loss else "full_sequence",
        "hardware": {"device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1}
        if gpu
        else {"device": "cpu", "gpu_name": None, "gpu_count": 0},
        "seed": seed,
        "train_rows": train_rows,
        "data_file": f"data/level_{level}/train.jsonl",
        "data_sha256": f"{level:x}" * 64,
        "tokens_seen": tokens,
        "steps": steps,
        "epochs_trained": epochs_trained(steps, t.batch_size * t.gradient_accumulation_steps, train_rows),
        "loss_curve": [{"step": s, "loss": round(2.5 / (1 + s / 20), 6)} for s in range(10, steps + 1, 10)],
        "wall_time_s": wall,
        "tokens_per_s": round(tokens / wall, 1),
        "library_versions": {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "trl": "1.16.0"},
    }


def _rl_training_json(config: StudyConfig, level: int, train_rows: int) -> dict:
    """``adapters/rl_l<n>/training.json`` as the RL stage writes it (training/rl.py ``training_payload``)."""
    rl = config.rl
    gpu = config.base_model.quantization == "nf4"
    target_chars = LEVELS[level].max_chars
    return {
        "schema_version": SCHEMA_VERSION,
        "model": LEVELS[level].rl_key,
        "level": level,
        "method": "GRPO",
        "continued_from": {"adapter": f"adapters/level_{level}", "adapter_sha256": f"{level:x}" * 64},
        "base_model": {"id": config.base_model.id, "revision": config.base_model.revision},
        "quantization": config.base_model.quantization,
        # The RL settings training.json records: every rl field but the levels, the reward (below) and bookkeeping.
        "hyperparameters": rl.model_dump(exclude={"levels", "reward_weights", "seed", "save_steps"}),
        "reward": {
            "formula": "w_correct*correct + w_format*format - w_length*length",
            "weights": rl.reward_weights.model_dump(),
            "target_chars": target_chars,
            "tokens_per_char": 0.5,
            "spec_think_tokens": -(-target_chars // 2),
            "sft_think_tokens": 12.4,
            "target_think_tokens": min(-(-target_chars // 2), 13),
        },
        "precision": "bf16" if gpu else "fp32",
        "hardware": {"device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1}
        if gpu
        else {"device": "cpu", "gpu_name": None, "gpu_count": 0},
        "seed": rl.seed,
        "train_rows": train_rows,
        "data_file": f"data/level_{level}/train.jsonl",
        "data_sha256": f"{level:x}" * 64,
        "inputs_sha256": f"{level + 1:x}" * 64,
        "steps": rl.max_steps,
        "log": [{"step": 1, "reward": 0.41, "correct": 0.5, "format": 0.9, "length": 0.3}],
        "wall_time_s": round(97.3 + 5.2 * level, 3),
        "library_versions": {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "trl": "1.16.0"},
    }


def _write_adapter_weights(directory: Path, config: StudyConfig, level: int, seed: int) -> None:
    """A small but loadable-looking PEFT adapter: adapter_config.json and LoRA A/B tensors."""
    import torch
    from safetensors.torch import save_file

    r = config.training.lora.r
    directory.mkdir(parents=True, exist_ok=True)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.base_model.id,
        "r": r,
        "lora_alpha": config.training.lora.alpha,
        "lora_dropout": config.training.lora.dropout,
        "target_modules": ["q_proj", "v_proj"],
    }
    (directory / "adapter_config.json").write_text(
        json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8"
    )
    generator = torch.Generator().manual_seed(level if seed == config.first_training_seed else level * 1000 + seed)
    tensors = {
        f"base_model.model.model.layers.0.self_attn.{name}.lora_{part}.weight": torch.randn(
            (r, 16) if part == "A" else (16, r), generator=generator
        )
        for name in ("q_proj", "v_proj")
        for part in ("A", "B")
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def _write_tiny_base(directory: Path, config: StudyConfig) -> None:
    """The tiny base as training leaves it in the run dir: a small config, weights and build.json."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tiny = config.tiny_model
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3"}, indent=2) + "\n", encoding="utf-8")
    save_file({"lm_head.weight": torch.ones(4, 4)}, str(directory / "model.safetensors"))
    build = {
        "code_version": "tiny-1",
        "tiny_model": tiny.model_dump(mode="json"),
        "synthetic": config.data.synthetic.model_dump(mode="json"),
        "parameters": 473184,
        "vocab_size": tiny.vocab_size,
        "pretrain_rows": tiny.pretrain_problems,
        "loss_curve": [{"step": 1, "loss": 5.9132}, {"step": tiny.pretrain_steps, "loss": 0.4417}],
        "wall_time_s": 118.4,
    }
    (directory / "build.json").write_text(json.dumps(build, indent=2) + "\n", encoding="utf-8")


def write_fixture_study(
    root: Path,
    *,
    config: StudyConfig,
    n_problems: int = 200,
    profiles: dict[str, ModelProfile] | None = None,
) -> RunDir:
    """Write a complete, consistent set of post-evaluation artifacts for ``config`` under ``root``.

    Args:
        n_problems: problems per seed (synthetic GSM8K-format test problems).
        profiles: per-model numbers replacing ``DEFAULT_SHAPE`` (seed shifts still apply to later seeds).
    """
    run_dir = RunDir(root)
    problems = generate_problems(n_problems, seed=0, max_number=20, split="test")
    train_total = 2000
    stats = {
        "schema_version": SCHEMA_VERSION,
        "teacher": "rule",
        "source": {"kind": config.data.source},
        "levels": {},
    }
    for level in config.levels:
        dropped = {"no_annotations": 3 * level} if level > 1 else {}
        kept = train_total - sum(dropped.values())
        stats["levels"][str(level)] = {
            "teacher": "rule",
            "total": train_total,
            "kept": kept,
            "dropped": dropped,
            "reasoning_chars": {
                "mean": [310.42, 121.07, 72.5, 44.81, 9.66][level - 1],
                "median": [301.0, 118.0, 71.0, 45.0, 9.0][level - 1],
            },
        }
        for model, seed in config.adapter_models(level):
            write_json(run_dir.training_json(model), _training_json(config, level, kept, model, seed))
            _write_adapter_weights(run_dir.adapter_dir(model), config, level, seed)
        if level in config.rl.levels:
            write_json(run_dir.rl_training_json(level), _rl_training_json(config, level, kept))
            _write_adapter_weights(run_dir.rl_adapter_dir(level), config, level, config.rl.seed)
    stats["source"]["train_rows"] = train_total
    write_json(run_dir.data_stats, stats)

    base_right: dict[int, set[int]] = {}
    run_dir.generation_log.unlink(missing_ok=True)
    for model in config.model_keys:
        level = model_level(model)
        profile = (profiles or {}).get(model) or default_profile(model, n_problems)
        path = run_dir.samples(model)
        path.unlink(missing_ok=True)
        for index, seed in enumerate(config.eval.seeds):
            shifted = ModelProfile(
                n_correct=profile.n_correct + SEED_SHIFT[index % len(SEED_SHIFT)],
                think_total=profile.think_total,
                think_median=profile.think_median,
                overlap=profile.overlap,
                truncated=profile.truncated,
            )
            rows, right = _samples(
                model, level, problems, shifted, seed, base_right.get(seed), config.first_training_seed
            )
            if model == "base":
                base_right[seed] = right
            append_jsonl(path, rows)
        gpu = config.base_model.quantization == "nf4"
        log = {"model": model, "engine": "fast" if gpu else "hf", "dtype": "bfloat16" if gpu else "float32"}
        append_jsonl(run_dir.generation_log, [log | {"seed": seed} for seed in config.eval.seeds])
    for model in config.model_keys:  # once every model's samples are there: adapters pair with their baselines
        write_metrics(run_dir, model, model_level(model))
    if config.tiny_base:
        _write_tiny_base(run_dir.base_dir, config)
    summary = write_summary(run_dir, study=config.name, models=config.model_keys)
    plot_pareto(summary, run_dir.pareto_png)
    return run_dir
