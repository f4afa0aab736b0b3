"""The evaluate stage: generate for the stock model and every adapter, stream sample records, compute metrics.

For each model and seed, the test problems are planned into batches once (by prompt length, so a resumed
run batches exactly as an uninterrupted one and greedy outputs match token for token), and every batch's
records are appended to ``eval/<model>/samples.jsonl`` as soon as it is generated. A rerun repairs a
torn last line, skips batches whose records are all there and writes only the missing records of the
others, so ``kill -9`` loses at most the batch in flight. Metrics, the summary and the Pareto plot are
then recomputed from the samples alone.

Under ``accelerate launch`` / ``torchrun`` with N processes, rank r takes batches r, r+N, r+2N, … of that
same plan (on its own GPU), so every problem is generated in the batch it would share on one GPU and the
samples do not depend on the number of GPUs. Each rank appends to ``samples.rank<r>-of-<N>.jsonl`` beside
``samples.jsonl``. When every rank is done, rank 0 merges the shards into ``samples.jsonl`` in the order
one process would have written it and removes them. Shards left by a killed run (of any N) are merged
before generating, so their records count as done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from eval_artifacts.faultpoints import maybe_crash
from eval_artifacts.records import SampleRecord, model_level
from eval_artifacts.rundir import RunDir, append_jsonl, iter_jsonl, read_json, repair_jsonl_tail, write_jsonl
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.errors import ArtifactError, ConfigError
from eval_artifacts.study.levels import build_prompt, parse_response
from training import distributed
from training.data import load_problems
from training.generate import Engine, Generation, GenerationEngine, select_backend
from training.gsm8k import Problem, grade
from training.tokens import think_tokens


def run(
    config: StudyConfig,
    run_dir: RunDir | Path | str,
    *,
    models: list[str] | None = None,
    seeds: list[int] | None = None,
) -> dict:
    """Evaluate ``models`` (default: base and every level) for ``seeds`` (default: ``eval.seeds``).

    Returns the summary written to ``eval/summary.json`` (on every rank when launched with several).

    Raises:
        ConfigError: a model name is not ``base`` or a level of the study.
        ArtifactError: a level's adapter has not been trained, or base has no samples to compare with.
    """
    from training.models import resolve_base_model

    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    process = distributed.setup()  # a world of one unless a launcher started several processes
    models = _check_models(config, models)
    seeds = list(seeds) if seeds is not None else list(config.eval.seeds)
    for model in models:
        if model != "base":
            _adapter_dir(run_dir, model)  # fail before loading anything
    problems = load_problems(config, "test")[: config.eval.max_problems]

    backend = select_backend(config.eval.backend)
    tiny = config.base_model.id == "tiny"
    engine: Engine = GenerationEngine(
        resolve_base_model(config), revision=None if tiny else config.base_model.revision
    )
    if backend == "fast":
        from training.fast_generate import FastGenerationEngine

        engine = FastGenerationEngine(engine)
    try:
        for model in models:
            if model != "base":
                engine.load_adapter(model, _adapter_dir(run_dir, model))
        if process.is_main:  # shards of a killed run: their records count as done
            merge_all_shards(engine, run_dir, problems, config=config, seeds=seeds)
        distributed.barrier()
        for model in models:
            plan = engine.plan(model_prompts(problems, model), batch_size=config.eval.batch_size)
            for seed in seeds:
                evaluate_model(
                    engine,
                    run_dir,
                    problems,
                    model=model,
                    seed=seed,
                    config=config,
                    process=process,
                    plan=plan,
                    check_adapter=seed == seeds[0],
                )
        maybe_crash("evaluate.generated")
        distributed.barrier()
        if process.is_main:
            merge_all_shards(engine, run_dir, problems, config=config, seeds=seeds)
    finally:
        engine.close()  # the KV cache, graphs and weights go before the next stage needs the GPU
    if process.is_main:
        summary = write_eval_artifacts(config, run_dir, problem_ids={p.id for p in problems})
    distributed.barrier()
    if not process.is_main:
        summary = read_json(
            run_dir.summary, what="eval summary", hint="rank 0 failed to write it; see its error"
        )
    return summary


def evaluate_model(
    engine: Engine,
    run_dir: RunDir,
    problems: list[Problem],
    *,
    model: str,
    seed: int,
    config: StudyConfig,
    process: distributed.Process | None = None,
    plan: list[list[int]] | None = None,
    check_adapter: bool = True,
) -> None:
    """Generate the missing records of one (model, seed) and append them batch by batch.

    With several processes, this one takes its share of the plan's batches and appends to its shard file;
    records in ``samples.jsonl`` and in the shard both count as done. ``plan`` is the engine's plan of the
    model's prompts, when the caller has it already (it is the same for every seed). With
    ``check_adapter``, an adapter's first batch is checked against the stock model (``check_adapter_applied``).

    Raises:
        ArtifactError: the adapter changed none of its first batch's completions.
    """
    import torch
    from tqdm import tqdm

    process = process or distributed.current()
    path = shard_path(run_dir, model, process) if process.distributed else run_dir.samples(model)
    repair_jsonl_tail(path)
    done = _done_ids(run_dir.samples(model), seed) | _done_ids(path, seed)
    level = model_level(model)
    prompts = model_prompts(problems, model)
    if plan is None:
        plan = engine.plan(prompts, batch_size=config.eval.batch_size)
    plan = [
        batch
        for batch in distributed.rank_share(plan, process)
        if not all(problems[i].id in done for i in batch)
    ]
    pending = sum(1 for batch in plan for i in batch if problems[i].id not in done)
    if not pending:
        return
    # Greedy decoding draws nothing; seeded anyway so that a sampling backend stays reproducible.
    torch.manual_seed(seed)
    correct = tokens = written = 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tqdm(total=pending, desc=f"{model} seed {seed}", unit="sample", dynamic_ncols=True) as bar:
        for number, batch in enumerate(plan):
            generations = engine.generate_batch(
                [prompts[i] for i in batch],
                adapter=None if level is None else model,
                max_new_tokens=config.eval.max_new_tokens,
            )
            if level is not None and check_adapter and number == 0:
                checked = time.perf_counter()
                check_adapter_applied(engine, [prompts[i] for i in batch], generations, model=model)
                started += time.perf_counter() - checked  # the check's own decoding is not this model's
            records = [
                make_record(engine, problems[i], prompts[i], generation, model=model, level=level, seed=seed)
                for i, generation in zip(batch, generations, strict=True)
                if problems[i].id not in done
            ]
            append_jsonl(path, records)
            maybe_crash("evaluate.batch_appended", model)
            correct += sum(record["correct"] for record in records)
            written += len(records)  # not the bar's count: TQDM_DISABLE=1 leaves that at 0
            tokens += sum(generation.completion_tokens for generation in generations)
            bar.update(len(records))
            bar.set_postfix(
                acc=f"{correct / max(written, 1):.1%}",
                tok_s=f"{tokens / (time.perf_counter() - started):.0f}",
            )
    wall = time.perf_counter() - started
    append_jsonl(
        run_dir.generation_log,
        [
            {
                "model": model,
                "seed": seed,
                "rank": process.rank,
                "world_size": process.world_size,
                "samples": pending,
                "generated_tokens": tokens,
                "wall_time_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
                "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
                if torch.cuda.is_available()
                else None,
                "max_new_tokens": config.eval.max_new_tokens,
                **engine.describe(),
            }
        ],
    )


def check_adapter_applied(
    engine: Engine, prompts: list[str], generations: list[Generation], *, model: str
) -> None:
    """Fail when ``model``'s adapter changed none of these completions: the stock model's are the same.

    Fast engines elsewhere have silently decoded the base model instead of the adapter; a run like that
    would publish the stock model's numbers under the adapter's name. The stock model decodes the same
    prompts, in the same batch, up to the longest adapter completion: greedy decoding of a batch is
    deterministic and a shorter ``max_new_tokens`` only cuts it, so a row equals the adapter's exactly
    when the adapter had no effect on it.

    Raises:
        ArtifactError: every row equals the stock model's, token for token.
    """
    longest = max(generation.completion_tokens for generation in generations)
    stock = engine.generate_batch(prompts, adapter=None, max_new_tokens=longest)
    if all(a.token_ids == b.token_ids for a, b in zip(generations, stock, strict=True)):
        raise ArtifactError(
            f"{model}: the adapter changed none of the {len(prompts)} completions of its first batch, which "
            "equal the stock model's token for token, so its weights are zero or the engine did not apply "
            f"them: retrain it with `cot-compress train --levels {model_level(model)} --force`, or set "
            "eval.backend to 'hf' to rule out the fast engine"
        )


def _done_ids(path: Path, seed: int) -> set[str]:
    if not path.is_file():
        return set()
    return {row["id"] for row in iter_jsonl(path, what="samples") if row.get("seed") == seed}


def model_prompts(problems: list[Problem], model: str) -> list[str]:
    """The user messages of ``model``: the bare question for the stock model, the level prompt for adapters."""
    level = model_level(model)
    return [p.question if level is None else build_prompt(level, p.question) for p in problems]


# ---- shards of a multi-process run ----
def shard_path(run_dir: RunDir, model: str, process: distributed.Process) -> Path:
    """Where rank r of N appends: ``eval/<model>/samples.rank<r>-of-<N>.jsonl``."""
    return run_dir.samples(model).with_name(f"samples.rank{process.rank}-of-{process.world_size}.jsonl")


def merge_all_shards(
    engine: Engine,
    run_dir: RunDir,
    problems: list[Problem],
    *,
    config: StudyConfig,
    seeds: list[int],
) -> None:
    """Merge the shard files of every model of the study that has some (rank 0 only)."""
    for model in config.model_keys:
        if _shards(run_dir, model):
            merge_shards(
                run_dir, model, order=write_order(engine, problems, model, config=config, seeds=seeds)
            )


def write_order(
    engine: Engine, problems: list[Problem], model: str, *, config: StudyConfig, seeds: list[int]
) -> Callable[[dict], tuple]:
    """Sort key putting records in the order one process writes them: by seed, then by its batch plan."""
    plan = engine.plan(model_prompts(problems, model), batch_size=config.eval.batch_size)
    position = {problems[i].id: n for n, i in enumerate(i for batch in plan for i in batch)}

    def key(row: dict) -> tuple:
        seed = row.get("seed")
        listed = seed in seeds
        return (
            not listed,
            seeds.index(seed) if listed else seed,
            position.get(row["id"], len(position)),
            row["id"],
        )

    return key


def merge_shards(run_dir: RunDir, model: str, *, order: Callable[[dict], tuple]) -> int:
    """Fold ``model``'s shard files into ``samples.jsonl`` and remove them; returns the records added.

    Records already in ``samples.jsonl`` keep their place; the shards' new (id, seed) pairs follow, sorted by
    ``order``; duplicates are dropped. The merged file replaces the old one atomically and the shards go only
    after that, so a kill at any point leaves every record somewhere and the rerun merges again.
    """
    path = run_dir.samples(model)
    shards = _shards(run_dir, model)
    if not shards:
        return 0
    rows = _read_repaired(path)
    seen = {(row["id"], row["seed"]) for row in rows}
    added = []
    for shard in shards:
        for row in _read_repaired(shard):
            if (row["id"], row["seed"]) not in seen:
                seen.add((row["id"], row["seed"]))
                added.append(row)
    write_jsonl(path, rows + sorted(added, key=order))
    maybe_crash("evaluate.shards_merged", model)
    for shard in shards:
        shard.unlink()
    return len(added)


def _shards(run_dir: RunDir, model: str) -> list[Path]:
    return sorted(run_dir.samples(model).parent.glob("samples.rank*-of-*.jsonl"))


def _read_repaired(path: Path) -> list[dict]:
    repair_jsonl_tail(path)
    return list(iter_jsonl(path, what="samples")) if path.is_file() else []


def make_record(
    engine: Engine,
    problem: Problem,
    prompt: str,
    generation: Generation,
    *,
    model: str,
    level: int | None,
    seed: int,
) -> dict:
    """The validated sample record of one completion, graded by the stock model's final-answer rule for base
    and by the level format's for every other model (``training.gsm8k.grade``)."""
    graded = grade(
        generation.text,
        problem.gold,
        finish_reason=generation.finish_reason,
        kind="stock" if level is None else "adapter",
    )
    return SampleRecord(
        id=problem.id,
        question=problem.question,
        gold=problem.gold,
        prompt=prompt,
        completion=generation.text,
        reasoning=parse_response(generation.text).reasoning,
        predicted=graded.predicted,
        extractor=graded.extractor,
        correct=graded.correct,
        correct_lenient=graded.correct_lenient,
        grade_reason=graded.reason,
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

    from eval_artifacts.metrics import write_metrics
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
    level = model_level(model)
    path = run_dir.adapter_dir(level)
    if not (path / "adapter_config.json").is_file():
        raise ArtifactError(
            f"no adapter for {model} at {path}: run `cot-compress train --levels {level}` first"
        )
    return path
