"""The evaluate stage: generate for the stock model, every adapter (each training seed's) and the prompt-only
baselines, stream sample records, compute metrics.

Models: ``base`` (bare question), ``level_<n>`` / ``level_<n>_seed<s>`` (level prompt, adapter of a training
seed), ``prompt_l<n>`` (level prompt, no adapter). Greedy decoding gives one record per (problem, seed);
``eval.sampling`` gives ``samples_per_problem`` draws, record ``sample`` 0…k-1, each batch drawing from a
generator seeded by (evaluation seed, sample, batch), so a resumed run draws what an uninterrupted one would.

For each model and draw, the test problems are planned into batches once (by prompt length, so a resumed
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
from eval_artifacts.records import SampleRecord, is_rl, model_kind, model_level, other_seed_of, row_key
from eval_artifacts.rundir import RunDir, append_jsonl, iter_jsonl, read_json, repair_jsonl_tail, write_jsonl
from eval_artifacts.study.config import SamplingConfig, StudyConfig
from eval_artifacts.study.errors import ArtifactError, ConfigError
from eval_artifacts.study.levels import build_baseline_prompt, build_prompt, parse_response
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
    """Evaluate ``models`` (default: ``config.model_keys``) for ``seeds`` (default: ``eval.seeds``).

    Returns the summary written to ``eval/summary.json`` (on every rank when launched with several).

    Raises:
        ConfigError: a model name is not a model of the study, or several seeds with greedy decoding.
        ArtifactError: an adapter has not been trained, or base has no samples to compare with.
    """
    from training.models import resolve_base_model

    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    process = distributed.setup()  # a world of one unless a launcher started several processes
    models = _check_models(config, models)
    if seeds is not None:  # validated like the config's: greedy decoding takes one seed
        config = config.with_overrides(**{"eval.seeds": list(seeds)})
    seeds = list(config.eval.seeds)
    for model in models:
        if model_kind(model) == "adapter":
            _adapter_dir(run_dir, model)  # fail before loading anything
    problems = load_problems(config, "test")[: config.eval.max_problems]

    backend = select_backend(config.eval.backend, sampling=config.eval.sampling is not None)
    tiny = config.base_model.id == "tiny"
    engine: Engine = GenerationEngine(
        resolve_base_model(config), revision=None if tiny else config.base_model.revision
    )
    if backend == "fast":
        from training.fast_generate import FastGenerationEngine

        engine = FastGenerationEngine(engine)
    try:
        for model in models:
            if model_kind(model) == "adapter":
                engine.load_adapter(model, _adapter_dir(run_dir, model))
        if process.is_main:  # shards of a killed run: their records count as done
            merge_all_shards(engine, run_dir, problems, config=config, seeds=seeds)
        distributed.barrier()
        for model in models:
            plan = engine.plan(model_prompts(problems, model), batch_size=config.eval.batch_size)
            for seed in seeds:
                for sample in range(config.eval.samples_per_problem):
                    evaluate_model(
                        engine,
                        run_dir,
                        problems,
                        model=model,
                        seed=seed,
                        sample=sample,
                        config=config,
                        process=process,
                        plan=plan,
                        check_adapter=seed == seeds[0] and sample == 0,
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
    sample: int = 0,
    process: distributed.Process | None = None,
    plan: list[list[int]] | None = None,
    check_adapter: bool = True,
) -> None:
    """Generate the missing records of one (model, seed, sample) and append them batch by batch.

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
    done = _done_ids(run_dir.samples(model), seed, sample) | _done_ids(path, seed, sample)
    level = model_level(model)
    adapter = model if model_kind(model) == "adapter" else None
    sampling = config.eval.sampling
    prompts = model_prompts(problems, model)
    if plan is None:
        plan = engine.plan(prompts, batch_size=config.eval.batch_size)
    # Each batch keeps its number in the whole plan: it seeds the batch's draws, whichever rank runs it.
    numbered = [
        (number, batch)
        for number, batch in distributed.rank_share(list(enumerate(plan)), process)
        if not all(problems[i].id in done for i in batch)
    ]
    pending = sum(1 for _, batch in numbered for i in batch if problems[i].id not in done)
    if not pending:
        return
    correct = tokens = written = 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    named_seed = other_seed_of(model)
    training_seed = None if adapter is None else (config.first_training_seed if named_seed is None else named_seed)
    desc = f"{model} seed {seed}" + (f" sample {sample}" if sampling else "")
    with tqdm(total=pending, desc=desc, unit="sample", dynamic_ncols=True) as bar:
        for position, (number, batch) in enumerate(numbered):
            if sampling is not None:
                torch.manual_seed(draw_seed(seed, sample, number))
            generations = engine.generate_batch(
                [prompts[i] for i in batch],
                adapter=adapter,
                max_new_tokens=config.eval.max_new_tokens,
                sampling=sampling,
            )
            if adapter is not None and check_adapter and position == 0:
                checked = time.perf_counter()
                check_adapter_applied(
                    engine,
                    [prompts[i] for i in batch],
                    generations,
                    model=model,
                    draw=sampling,
                    max_new_tokens=config.eval.max_new_tokens,
                )
                started += time.perf_counter() - checked  # the check's own decoding is not this model's
            records = [
                make_record(
                    engine,
                    problems[i],
                    prompts[i],
                    generation,
                    model=model,
                    level=level,
                    training_seed=training_seed,
                    seed=seed,
                    sample=sample,
                )
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
                "sample": sample,
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
    engine: Engine,
    prompts: list[str],
    generations: list[Generation],
    *,
    model: str,
    draw: SamplingConfig | None = None,
    max_new_tokens: int = 0,
) -> None:
    """Fail when ``model``'s adapter changed none of these completions: the stock model's are the same.

    Sampled ``generations`` differ from run to run, so with sampling the adapter's batch is decoded again
    greedily for the comparison.

    Fast engines elsewhere have silently decoded the base model instead of the adapter; a run like that
    would publish the stock model's numbers under the adapter's name. The stock model decodes the same
    prompts, in the same batch, up to the longest adapter completion: greedy decoding of a batch is
    deterministic and a shorter ``max_new_tokens`` only cuts it, so a row equals the adapter's exactly
    when the adapter had no effect on it.

    Raises:
        ArtifactError: every row equals the stock model's, token for token.
    """
    if draw is not None:
        generations = engine.generate_batch(prompts, adapter=model, max_new_tokens=max_new_tokens)
    longest = max(generation.completion_tokens for generation in generations)
    stock = engine.generate_batch(prompts, adapter=None, max_new_tokens=longest)
    if all(a.token_ids == b.token_ids for a, b in zip(generations, stock, strict=True)):
        raise ArtifactError(
            f"{model}: the adapter changed none of the {len(prompts)} completions of its first batch, which "
            "equal the stock model's token for token, so its weights are zero or the engine did not apply "
            f"them: retrain it with `cot-compress train --levels {model_level(model)} --force`, or set "
            "eval.backend to 'hf' to rule out the fast engine"
        )


def draw_seed(seed: int, sample: int, batch: int) -> int:
    """The torch seed of one sampled batch: distinct for every (evaluation seed, sample, batch of the plan)."""
    return (seed * 1_000_003 + sample) * 1_000_003 + batch


def _done_ids(path: Path, seed: int, sample: int) -> set[str]:
    if not path.is_file():
        return set()
    return {
        row["id"]
        for row in iter_jsonl(path, what="samples")
        if row.get("seed") == seed and row.get("sample", 0) == sample
    }


def model_prompts(problems: list[Problem], model: str) -> list[str]:
    """The user messages of ``model``: the bare question for the stock model, the level prompt for adapters,
    and for prompt-only baselines the level prompt with the style and answer format spelled out."""
    level = model_level(model)
    if level is None:
        return [p.question for p in problems]
    build = build_baseline_prompt if model_kind(model) == "prompt" else build_prompt
    return [build(level, p.question) for p in problems]


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
    """Sort key putting records in the order one process writes them: by seed and sample, then by its batch plan."""
    plan = engine.plan(model_prompts(problems, model), batch_size=config.eval.batch_size)
    position = {problems[i].id: n for n, i in enumerate(i for batch in plan for i in batch)}

    def key(row: dict) -> tuple:
        seed = row.get("seed")
        listed = seed in seeds
        return (
            not listed,
            seeds.index(seed) if listed else seed,
            row["sample"],
            position.get(row["id"], len(position)),
            row["id"],
        )

    return key


def merge_shards(run_dir: RunDir, model: str, *, order: Callable[[dict], tuple]) -> int:
    """Fold ``model``'s shard files into ``samples.jsonl`` and remove them; returns the records added.

    Records already in ``samples.jsonl`` keep their place; the shards' new (id, seed, sample) keys follow, sorted by
    ``order``; duplicates are dropped. The merged file replaces the old one atomically and the shards go only
    after that, so a kill at any point leaves every record somewhere and the rerun merges again.
    """
    path = run_dir.samples(model)
    shards = _shards(run_dir, model)
    if not shards:
        return 0
    rows = _read_repaired(path)
    seen = {row_key(row) for row in rows}
    added = []
    for shard in shards:
        for row in _read_repaired(shard):
            if row_key(row) not in seen:
                seen.add(row_key(row))
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
    training_seed: int | None,
    seed: int,
    sample: int = 0,
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
        think_tokens=think_tokens(engine.tokenizer, generation.text, finish_reason=generation.finish_reason),
        completion_tokens=generation.completion_tokens,
        finish_reason=generation.finish_reason,
        model=model,
        level=level,
        training_seed=training_seed,
        seed=seed,
        sample=sample,
    ).to_row()


def write_eval_artifacts(config: StudyConfig, run_dir: RunDir, *, problem_ids: set[str]) -> dict:
    """Metrics for every model whose samples cover ``problem_ids`` for each evaluation seed and sample, then
    the summary and the Pareto plot, all from the samples. A model left half-done by an interrupted run is
    left out (and named on stderr) rather than summarised on part of the test set."""
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
        by_draw: dict[tuple[int, int], set[str]] = {}
        for row in iter_jsonl(path, what="samples"):
            by_draw.setdefault((row["seed"], row.get("sample", 0)), set()).add(row["id"])
        draws = {(seed, sample) for seed in config.eval.seeds for sample in range(config.eval.samples_per_problem)}
        if by_draw and draws <= set(by_draw) and all(problem_ids <= ids for ids in by_draw.values()):
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
    path = run_dir.adapter_dir(model)
    if not (path / "adapter_config.json").is_file():
        stage = "rl" if is_rl(model) else "train"
        raise ArtifactError(f"no adapter for {model} at {path}: run `cot-compress {stage} --levels {level}` first")
    return path
