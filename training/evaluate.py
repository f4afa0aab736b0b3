"""The evaluate stage: generate for the stock model and every adapter, stream sample records, compute metrics.

For each model and seed, the test problems are planned into batches once (by prompt length, so a resumed
run batches exactly as an uninterrupted one and greedy outputs match token for token), and every batch's
records are appended to ``eval/<model>/samples.jsonl`` as soon as it is generated. A rerun repairs a
torn last line, skips batches whose records are all there and writes only the missing records of the
others, so ``kill -9`` loses at most the batch in flight. Metrics, the summary and the Pareto plot are
then recomputed from the samples alone.
"""

from __future__ import annotations

import time
from pathlib import Path

from eval_artifacts.errors import ArtifactError, ConfigError
from eval_artifacts.faultpoints import maybe_crash
from eval_artifacts.records import SampleRecord
from eval_artifacts.rundir import RunDir, append_jsonl, iter_jsonl, repair_jsonl_tail
from training.config import StudyConfig
from training.data import load_problems
from training.generate import Generation, GenerationEngine, select_backend
from training.gsm8k import Problem, extract_answer, numbers_equal
from training.levels import build_prompt, parse_response
from training.tokens import think_tokens


def run(
    config: StudyConfig,
    run_dir: RunDir | Path | str,
    *,
    models: list[str] | None = None,
    seeds: list[int] | None = None,
) -> dict:
    """Evaluate ``models`` (default: base and every level) for ``seeds`` (default: ``eval.seeds``).

    Returns the summary written to ``eval/summary.json``.

    Raises:
        ConfigError: a model name is not ``base`` or a level of the study.
        ArtifactError: a level's adapter has not been trained, or base has no samples to compare with.
    """
    from training.models import resolve_base_model

    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    models = _check_models(config, models)
    seeds = list(seeds) if seeds is not None else list(config.eval.seeds)
    for model in models:
        if model != "base":
            _adapter_dir(run_dir, model)  # fail before loading anything
    problems = load_problems(config, "test")[: config.eval.max_problems]

    backend = select_backend(config.eval.backend)
    tiny = config.base_model.id == "tiny"
    engine = GenerationEngine(
        resolve_base_model(config), revision=None if tiny else config.base_model.revision
    )
    if backend == "fast":
        from training.fast_generate import FastGenerationEngine

        engine = FastGenerationEngine(engine)
    for model in models:
        if model != "base":
            engine.load_adapter(model, _adapter_dir(run_dir, model))
    for model in models:
        for seed in seeds:
            evaluate_model(engine, run_dir, problems, model=model, seed=seed, config=config)
    maybe_crash("evaluate.generated")
    return write_eval_artifacts(config, run_dir, problem_ids={p.id for p in problems})


def evaluate_model(
    engine: GenerationEngine,
    run_dir: RunDir,
    problems: list[Problem],
    *,
    model: str,
    seed: int,
    config: StudyConfig,
) -> None:
    """Generate the missing records of one (model, seed) and append them batch by batch."""
    import torch
    from tqdm import tqdm

    path = run_dir.samples(model)
    repair_jsonl_tail(path)
    done = (
        {row["id"] for row in iter_jsonl(path, what="samples") if row.get("seed") == seed}
        if path.is_file()
        else set()
    )
    level = None if model == "base" else int(model.removeprefix("level_"))
    prompts = [p.question if level is None else build_prompt(level, p.question) for p in problems]
    plan = [
        batch
        for batch in engine.plan(prompts, batch_size=config.eval.batch_size)
        if not all(problems[i].id in done for i in batch)
    ]
    pending = sum(1 for batch in plan for i in batch if problems[i].id not in done)
    if not pending:
        return
    # Greedy decoding draws nothing; seeded anyway so that a sampling backend stays reproducible.
    torch.manual_seed(seed)
    correct = tokens = 0
    started = time.perf_counter()
    with tqdm(total=pending, desc=f"{model} seed {seed}", unit="sample", dynamic_ncols=True) as bar:
        for batch in plan:
            generations = engine.generate_batch(
                [prompts[i] for i in batch],
                adapter=None if level is None else model,
                max_new_tokens=config.eval.max_new_tokens,
            )
            records = [
                make_record(engine, problems[i], prompts[i], generation, model=model, level=level, seed=seed)
                for i, generation in zip(batch, generations, strict=True)
                if problems[i].id not in done
            ]
            append_jsonl(path, records)
            maybe_crash("evaluate.batch_appended", model)
            correct += sum(record["correct"] for record in records)
            tokens += sum(generation.completion_tokens for generation in generations)
            bar.update(len(records))
            bar.set_postfix(
                acc=f"{correct / bar.n:.1%}", tok_s=f"{tokens / (time.perf_counter() - started):.0f}"
            )


def make_record(
    engine: GenerationEngine,
    problem: Problem,
    prompt: str,
    generation: Generation,
    *,
    model: str,
    level: int | None,
    seed: int,
) -> dict:
    """The validated sample record of one completion."""
    predicted, extractor = extract_answer(generation.text)
    return SampleRecord(
        id=problem.id,
        question=problem.question,
        gold=problem.gold,
        prompt=prompt,
        completion=generation.text,
        reasoning=parse_response(generation.text).reasoning,
        predicted=predicted,
        extractor=extractor,
        correct=numbers_equal(predicted, problem.gold),
        think_tokens=think_tokens(engine.tokenizer, generation.text),
        completion_tokens=generation.completion_tokens,
        finish_reason=generation.finish_reason,
        model=model,
        level=level,
        seed=seed,
    ).to_row()


def write_eval_artifacts(config: StudyConfig, run_dir: RunDir, *, problem_ids: set[str]) -> dict:
    """Metrics for every model whose samples cover ``problem_ids`` for each of their seeds, then the summary
    and the Pareto plot, all from the samples. A model left half-done by an interrupted run is left out
    (and named on stderr) rather than summarised on part of the test set."""
    import sys

    from eval_artifacts.metrics import model_level, write_metrics
    from eval_artifacts.plots import plot_pareto
    from eval_artifacts.summary import write_summary

    evaluated = []
    for model in config.model_keys:
        path = run_dir.samples(model)
        if not path.is_file():
            continue
        repair_jsonl_tail(path)
        by_seed: dict[int, set[str]] = {}
        for row in iter_jsonl(path, what="samples"):
            by_seed.setdefault(row["seed"], set()).add(row["id"])
        if by_seed and all(problem_ids <= ids for ids in by_seed.values()):
            evaluated.append(model)
        else:
            print(
                f"{model}: samples incomplete, left out: run `cot-compress evaluate --models {model}`",
                file=sys.stderr,
            )
    if "base" not in evaluated:
        raise ArtifactError(
            "every level is compared with the stock model, which has no samples yet: "
            "run `cot-compress evaluate --models base`"
        )
    for model in evaluated:
        write_metrics(run_dir, model, model_level(model))
    summary = write_summary(run_dir, study=config.name, models=evaluated)
    plot_pareto(summary, run_dir.pareto_png)
    return summary


def _check_models(config: StudyConfig, models: list[str] | None) -> list[str]:
    if models is None:
        return config.model_keys
    unknown = [model for model in models if model not in config.model_keys]
    if unknown:
        raise ConfigError(
            f"unknown model {unknown[0]!r} for --models; this study has {', '.join(config.model_keys)}"
        )
    return [model for model in config.model_keys if model in models]


def _adapter_dir(run_dir: RunDir, model: str) -> Path:
    level = int(model.removeprefix("level_"))
    path = run_dir.adapter_dir(level)
    if not (path / "adapter_config.json").is_file():
        raise ArtifactError(
            f"no adapter for {model} at {path}: run `cot-compress train --levels {level}` first"
        )
    return path
