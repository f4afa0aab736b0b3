"""The run dir's artifacts, read once, and the template context every card and note is rendered from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from eval_artifacts.arithmetic import chain_checks_out
from eval_artifacts.hub_dataset import SAMPLE_COLUMNS, SPLIT, SUMMARY_COLUMNS, SUMMARY_CONFIG
from eval_artifacts.metrics import check_metrics_match_samples, read_metrics
from eval_artifacts.records import is_rl, model_kind, model_level, other_seed_of, read_samples
from eval_artifacts.rundir import RunDir, epochs_trained, iter_jsonl, read_json
from eval_artifacts.study.config import LOCAL_ENDPOINT, StudyConfig
from eval_artifacts.study.errors import ArtifactError
from eval_artifacts.study.levels import LEVELS, STOCK_ANSWER_LINES, build_prompt
from eval_artifacts.summary import SWEET_SPOT_ALPHA, read_summary, sweet_spot
from hub_tools.cards.format import (
    CI_METHODS,
    MODEL_COLUMN,
    RESULT_COLUMNS,
    SFT_VS_RL_COLUMNS,
    TEST_NAMES,
    TRAINING_SEED_COLUMNS,
    VS_BASE_COLUMNS,
    branch_of,
    fmt_accuracy,
    fmt_change,
    fmt_ci,
    fmt_count,
    fmt_delta,
    fmt_fraction,
    fmt_mean_sd,
    fmt_median,
    fmt_p,
    fmt_plain,
    fmt_tokens,
    model_label,
)
from hub_tools.cards.state import Published, published_from_state

PUBLIC_HUB = "https://huggingface.co"
# Cards link the plot relative to their repo, where publishing uploads it under this name.
PLOT_FILE = "pareto.png"
EXAMPLE_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
SAMPLE_COLUMN_DOCS = {column.name: column.doc for column in SAMPLE_COLUMNS}
SUMMARY_COLUMN_DOCS = {column.name: column.doc for column in SUMMARY_COLUMNS}

EVAL_RESULTS_DIR = ".eval_results"
ROLLOUT_ENGINES = {
    "hf": "sampled with transformers' generate on the training policy",
    "fast": "sampled with cot-compress's fast engine (the policy's current LoRA merged into {merged_into})",
}
"""How an RL adapter's rollouts were generated (``rl.rollout_engine``; training.json before it had ``hf``)."""


@dataclass(frozen=True)
class StudyArtifacts:
    """Everything a card says, read once from the run dir, and whether metrics agree with their samples."""

    metrics: dict[str, dict]
    summary: dict
    stats: dict
    training: dict[int, dict]
    rl_training: dict[int, dict]
    """The training.json of each ``rl.levels`` level's RL adapter (``adapters/rl_l<n>/``)."""
    examples: dict[str, dict | None]
    """Per adapter with a card (``card_model``): its example output."""
    evaluated_with: dict[str, dict]
    """Per model: the dtype it was evaluated in and whether the adapter was merged (eval/generation_log.jsonl)."""
    base_build: dict | None
    """The tiny base's build.json (``base/``); None for a Hub base."""
    published: Published
    """What publishing knows (Hub URL, collection slug, commits); empty before the first publish."""
    # One message per model whose metrics.json disagrees with its samples.jsonl. Collected, not raised:
    # a card rendered from such metrics must still render, so that validation can name the disagreement.
    sample_mismatches: tuple[str, ...]


def load_artifacts(
    config: StudyConfig, run_dir: RunDir, *, published: Published | None = None
) -> StudyArtifacts:
    """Read metrics, summary, data stats, training.json and one example output per level, then check
    every model's metrics against its samples.

    Args:
        published: what the publish under way knows; by default what the last one recorded in
            ``publish/state.json``, so that ``render-cards`` writes the cards that were pushed.

    Raises:
        ArtifactError: an artifact is missing or malformed; the message names the command that makes it.
    """
    metrics = {model: read_metrics(run_dir, model) for model in config.model_keys}
    summary = read_summary(run_dir)
    missing = [m for m in config.model_keys if m not in {row["model"] for row in summary["models"]}]
    if missing:
        raise ArtifactError(
            f"summary {run_dir.summary} has no row for {missing[0]}: rerun `cot-compress evaluate`"
        )
    stats = read_json(
        run_dir.data_stats, what="data stats", hint="run `cot-compress prepare-data` to write it"
    )
    training = {
        level: read_json(
            run_dir.training_json(level),
            what=f"training.json of level {level}",
            hint=f"run `cot-compress train --levels {level}` to train the adapter",
        )
        for level in config.levels
    }
    for level in config.levels:
        if str(level) not in stats.get("levels", {}):
            raise ArtifactError(
                f"data stats {run_dir.data_stats} have no level {level}: run `cot-compress prepare-data`"
            )
    if not run_dir.pareto_png.is_file():
        raise ArtifactError(f"the Pareto plot {run_dir.pareto_png} is missing: rerun `cot-compress evaluate`")
    rl_training = {
        level: read_json(
            run_dir.rl_training_json(level),
            what=f"training.json of level {level}'s RL adapter",
            hint=f"run `cot-compress rl --levels {level}` to train it",
        )
        for level in config.rl.levels
    }
    examples = {card_model(level, rl): _example(run_dir, card_model(level, rl)) for level, rl in adapter_cards(config)}
    base_build = None
    if config.tiny_base:
        base_build = read_json(
            run_dir.base_dir / "build.json",
            what="the tiny base model",
            hint="run `cot-compress train` to build it into the run directory",
        )
    return StudyArtifacts(
        metrics=metrics,
        summary=summary,
        stats=stats,
        training=training,
        rl_training=rl_training,
        examples=examples,
        evaluated_with=_evaluated_with(config, run_dir, training),
        base_build=base_build,
        published=published if published is not None else published_from_state(config, run_dir),
        sample_mismatches=tuple(
            mismatch for model in config.model_keys if (mismatch := _sample_mismatch(run_dir, model))
        ),
    )


def adapter_cards(config: StudyConfig) -> list[tuple[int, bool]]:
    """``(level, rl)`` of every adapter repo with a card: each level's SFT adapter, followed by its RL adapter
    when ``rl.levels`` names the level."""
    return [(n, rl) for n in config.levels for rl in ((False, True) if n in config.rl.levels else (False,))]


def card_model(level: int, rl: bool) -> str:
    """The model an adapter card is about: ``level_<n>``, or ``rl_l<n>`` for the RL adapter's."""
    return LEVELS[level].rl_key if rl else LEVELS[level].key


def card_repo_id(config: StudyConfig, level: int, rl: bool) -> str:
    """The repo of an adapter card: ``{prefix}-l<n>``, or ``{prefix}-l<n>-rl`` for the RL adapter."""
    return config.rl_repo_id(level) if rl else config.adapter_repo_id(level)


def adapter_repo_of(config: StudyConfig, model: str) -> str:
    """The repo an adapter model is published in: ``level_<n>`` and its seeds' in ``{prefix}-l<n>``, ``rl_l<n>``
    in ``{prefix}-l<n>-rl``."""
    return card_repo_id(config, model_level(model), is_rl(model))


def _example(run_dir: RunDir, model: str) -> dict | None:
    """The card's example output: the first correct sample by (seed, id) whose chain's arithmetic checks out
    (``chain_checks_out``: every equation holds and the chain ends at the answer); None when none does.

    A right answer is not enough: two arithmetic errors can cancel (``s=14+5=18→a=18-8=11``).
    """
    rows = sorted(read_samples(run_dir.samples(model), model=model), key=lambda r: (r["seed"], r["id"]))
    checked = (row for row in rows if row["correct"] and chain_checks_out(row["reasoning"], row["predicted"]))
    return next(checked, None)


def _evaluated_with(config: StudyConfig, run_dir: RunDir, training: dict[int, dict]) -> dict[str, dict]:
    """Per model, how it was evaluated: the dtype and whether the adapter was merged into the base weights
    (the fast engine merges; transformers' generate runs LoRA unmerged), from the generation log. A run dir
    without a log states the training precision, the dtype the hf engine uses on the same device."""
    logged: dict[str, dict] = {}
    if run_dir.generation_log.is_file():
        for row in iter_jsonl(run_dir.generation_log, what="generation log"):
            logged[row["model"]] = {"dtype": row["dtype"], "merged": row.get("engine") == "fast"}
    first = training[config.levels[0]]
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(first["precision"], "float32")
    return {
        model: logged.get(model, {"dtype": dtype, "merged": False}) | {"date": _date_of(run_dir.samples(model))}
        for model in config.model_keys
    }


def _date_of(path) -> str:
    """The day (UTC) a model's samples were last written: when its evaluation finished."""
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).date().isoformat()


def _sample_mismatch(run_dir: RunDir, model: str) -> str | None:
    try:
        check_metrics_match_samples(run_dir, model)
    except ArtifactError as error:
        return str(error)
    return None


def hub_url(config: StudyConfig, published: Published | None = None) -> str:
    """The Hub the cards link: the one the study was published to; before that ``hub.endpoint``, or the public
    Hub for the embedded local one (whose address is known only once it runs)."""
    if published is not None and published.hub_url:
        return published.hub_url
    return PUBLIC_HUB if config.hub.endpoint == LOCAL_ENDPOINT else config.hub.endpoint


def collections_url(hub: str, owner_or_slug: str) -> str:
    """A namespace's collections page, or one collection by its slug."""
    return f"{hub}/collections/{owner_or_slug}"


def study_links(config: StudyConfig, published: Published) -> dict[str, Any]:
    """Every URL a card may contain, by role.

    The study's own repos and collection are linked on the Hub it was published to; the base model and the
    source dataset, which the study does not publish, on the public Hub. The collection's URL is known only
    once publishing created it; until then the card links the namespace's collections page.
    """
    hub = hub_url(config, published)
    base = config.base_hub_id
    slug = published.collection_slug
    return {
        "hub": hub,
        "collection": collections_url(hub, slug or config.hub.namespace),
        "eval_dataset": f"{hub}/datasets/{config.eval_repo_id}",
        "adapters": {str(n): f"{hub}/{config.adapter_repo_id(n)}" for n in config.levels},
        "rl_adapters": {str(n): f"{hub}/{config.rl_repo_id(n)}" for n in config.rl.levels},
        "base_model": None if base is None else f"{hub if config.tiny_base else PUBLIC_HUB}/{base}",
        "source_dataset": None if config.synthetic_data else f"{PUBLIC_HUB}/datasets/{config.data.dataset_id}",
        "plot": PLOT_FILE,
    }


def _table(
    art: StudyArtifacts, columns: dict[str, Any], models: list[str], highlight: str | None
) -> dict[str, Any]:
    """A model table for the templates: header labels, and per model its label and formatted cells."""
    return {
        "columns": [MODEL_COLUMN, *columns],
        "rows": [
            {
                "model": model,
                "highlight": model == highlight,
                "cells": [model_label(model) + (" (this adapter)" if model == highlight else "")]
                + [fmt(art.metrics[model]) for fmt in columns.values()],
            }
            for model in models
        ],
    }


def results_columns(art: StudyArtifacts) -> dict[str, Any]:
    return RESULT_COLUMNS


def table_models(config: StudyConfig) -> list[str]:
    """An adapter card's results table: base, the published adapters and the prompt-only baselines (the other
    training seeds' adapters have their own table)."""
    return [model for model in config.model_keys if other_seed_of(model) is None]


def seed_spread(art: StudyArtifacts, level: int) -> dict[str, Any]:
    """The level's ``training_seeds`` entry of summary.json."""
    return next(entry for entry in art.summary["training_seeds"] if entry["level"] == level)


def _training_seeds(config: StudyConfig, art: StudyArtifacts, level: int) -> dict[str, Any]:
    spread = seed_spread(art, level)
    models = spread["models"]
    return {
        "count": len(models),
        "seeds": ", ".join(fmt_count(seed) for seed in spread["training_seeds"]),
        "first": fmt_count(config.first_training_seed),
        "accuracy": fmt_mean_sd(spread["accuracy"], fmt_accuracy),
        "think_mean": fmt_mean_sd(spread["think_tokens_mean"], fmt_tokens),
        "table": _table(art, TRAINING_SEED_COLUMNS, models, LEVELS[level].key),
        "branches": [
            {
                "name": branch_of(model),
                "seed": fmt_count(art.metrics[model]["training_seed"]),
                "accuracy": fmt_accuracy(art.metrics[model]["accuracy"]),
                "ci95": fmt_ci(art.metrics[model]["ci95"]),
                "think_mean": fmt_tokens(art.metrics[model]["think_tokens"]["mean"]),
            }
            for model in models[1:]
        ],
    }


def _setup_rows(config: StudyConfig, art: StudyArtifacts, training: dict) -> dict[str, tuple[str, str]]:
    """The rows every training-details table shares (SFT and RL adapters alike), from one training.json."""
    hw = training["hardware"]
    hardware = "CPU" if hw["device"] == "cpu" else f"{hw['gpu_count']} × {hw['gpu_name'] or 'CUDA GPU'}"
    quantization = "4-bit NF4, double quantization (bitsandbytes)" if training["quantization"] == "nf4" else "none"
    libraries = ", ".join(f"{name} {version}" for name, version in training["library_versions"].items())
    return {
        "base": ("Base model", f"{base_id(config)} (revision {base_revision(config, art)})"),
        "quantization": ("Quantization", quantization),
        "precision": ("Precision", training["precision"]),
        "hardware": ("Hardware", hardware),
        "steps": ("Steps", fmt_count(training["steps"])),
        "seed": ("Seed", fmt_count(training["seed"])),
        "libraries": ("Libraries", libraries),
    }


def training_rows(config: StudyConfig, art: StudyArtifacts, level: int) -> list[tuple[str, str]]:
    """The training-details table of one adapter: (setting, value), all from training.json and stats.json."""
    t = art.training[level]
    stats = art.stats["levels"][str(level)]
    hp, adapter = t["hyperparameters"], t["adapter"]
    shared = _setup_rows(config, art, t)
    targets = adapter["target_modules"]
    dropped = ", ".join(f"{reason}: {count}" for reason, count in sorted(stats["dropped"].items())) or "none"
    rows = [
        shared["base"],
        shared["quantization"],
        (
            "Adapter",
            f"{adapter['method']}, r = {adapter['r']}, alpha = {adapter['alpha']}, dropout = {fmt_plain(adapter['dropout'])}",
        ),
        ("Target modules", targets if isinstance(targets, str) else ", ".join(targets)),
        shared["precision"],
        shared["hardware"],
        ("Teacher", stats.get("teacher", art.stats.get("teacher", "rule"))),
        ("Training rows", f"{stats['kept']} kept of {stats['total']} (dropped: {dropped})"),
        (
            "Reasoning length",
            f"{fmt_tokens(stats['reasoning_chars']['mean'])} chars mean, {fmt_median(stats['reasoning_chars']['median'])} median",
        ),
        (
            "Loss",
            "completion only (prompt tokens masked)"
            if t["loss"] == "completion_only"
            else "full sequence (prompt and completion)",
        ),
        ("Epochs", fmt_plain(trained_epochs(t))),
        shared["steps"],
        (
            "Learning rate",
            f"{fmt_plain(hp['learning_rate'])} ({hp['lr_scheduler']}, warmup ratio {fmt_plain(hp['warmup_ratio'])})",
        ),
        ("Effective batch size", fmt_count(hp["effective_batch_size"])),
        ("Max sequence length", fmt_count(hp["max_seq_length"])),
        ("Optimizer", hp["optimizer"]),
        shared["seed"],
        ("Tokens seen", fmt_count(t["tokens_seen"])),
        ("Wall time", f"{fmt_tokens(t['wall_time_s'])} s ({fmt_tokens(t['tokens_per_s'])} tokens/s)"),
        shared["libraries"],
    ]
    return rows


def trained_epochs(training: dict) -> float:
    """Passes over the data the adapter was trained for (steps × effective batch ÷ rows), as training.json
    records it; computed the same way for a training.json written before it did."""
    if "epochs_trained" in training:
        return training["epochs_trained"]
    hp = training["hyperparameters"]
    return epochs_trained(training["steps"], hp["effective_batch_size"], training["train_rows"])


def base_id(config: StudyConfig) -> str:
    """The base model as the cards name it: its Hub id (the published tiny base for the tiny study)."""
    return config.base_hub_id or config.base_model.id


def base_revision(config: StudyConfig, art: StudyArtifacts) -> str:
    """The base's commit the adapters were trained on: the published tiny base's commit, or the sha training
    resolved; the configured revision only while neither is known."""
    if config.tiny_base:
        return art.published.base_commit or config.base_model.revision
    trained = art.training[config.levels[0]].get("base_model_hub") or {}
    return trained.get("sha") or config.base_model.revision


def dataset_revision(config: StudyConfig, art: StudyArtifacts) -> str:
    """The source dataset's commit prepare-data resolved (data/stats.json), else the configured revision."""
    return (art.stats.get("source") or {}).get("sha") or config.data.revision


def eval_dataset(config: StudyConfig, art: StudyArtifacts, model: str) -> dict[str, str | None]:
    """Where a model's results live: GSM8K's test split at its pinned commit, or for synthetic problems the
    study's own eval dataset (its config for the model), which is not a benchmark."""
    if config.synthetic_data:
        return {"id": config.eval_repo_id, "name": config.eval_repo_id.split("/")[1], "config": model,
                "task_id": model, "revision": None}
    return {"id": config.data.dataset_id, "name": "GSM8K", "config": config.data.config_name,
            "task_id": config.data.task_id, "revision": dataset_revision(config, art)}


def eval_results_path(dataset: dict[str, str | None]) -> str:
    """Where an adapter repo keeps its Hub eval results for a dataset: ``.eval_results/<dataset name>.yaml``."""
    return f"{EVAL_RESULTS_DIR}/{dataset['id'].split('/')[1]}.yaml"


def accuracy_percent(accuracy: float) -> float:
    """An ``.eval_results`` value: the Hub reads it on the benchmark's scale, which for GSM8K is percent
    (its leaderboard lists 58.0, not 0.58); the study's own eval dataset uses the same scale."""
    return round(100 * accuracy, 2)


def _level_info(level: int, art: StudyArtifacts) -> dict[str, Any]:
    """A level's spec, with the measured reasoning length of its training data beside the spec's label."""
    spec = LEVELS[level]
    chars = art.stats["levels"][str(level)]["reasoning_chars"]
    return {
        "number": spec.number,
        "name": spec.name,
        "style": spec.style,
        "typical_length": spec.typical_length,
        "measured_mean": fmt_tokens(chars["mean"]),
        "measured_median": fmt_median(chars["median"]),
        "example": spec.example,
        "label": model_label(spec.key),
    }


def _decoding(config: StudyConfig, art: StudyArtifacts) -> dict[str, Any]:
    """How the answers were drawn, and the interval method the metrics used."""
    sampling = config.eval.sampling
    base = art.metrics["base"]
    return {
        "sampled": sampling is not None,
        "temperature": None if sampling is None else fmt_plain(sampling.temperature),
        "top_p": None if sampling is None else fmt_plain(sampling.top_p),
        "top_k": None if sampling is None else fmt_count(sampling.top_k),
        "draws": fmt_count(base["samples_per_problem"]),
        "eval_seeds": ", ".join(fmt_count(seed) for seed in base["seeds"]),
        "ci_method": CI_METHODS[base["ci_method"]],
    }


def _caveats(config: StudyConfig, art: StudyArtifacts) -> dict[str, Any]:
    spot = sweet_spot(art.summary, margin=config.eval.sweet_spot_margin, alpha=SWEET_SPOT_ALPHA)
    n_problems = art.metrics["base"]["n_problems"]
    return {
        "decoding": _decoding(config, art),
        "prompt_baselines": config.eval.prompt_baselines,
        "sweet_spot": None if spot is None else _level_info(model_level(spot), art),
        "sweet_spot_tokens": None if spot is None else fmt_tokens(art.metrics[spot]["think_tokens"]["mean"]),
        "margin": fmt_accuracy(config.eval.sweet_spot_margin),
        "alpha": f"{SWEET_SPOT_ALPHA:.2f}",
        "synthetic_data": config.synthetic_data,
        "n_problems": fmt_count(n_problems),
        "truncated": [
            {
                "label": model_label(model),
                "count": fmt_fraction(m["truncated"], m["n_total"]),
                "unanswered": fmt_fraction(m["n_truncated"], m["n_total"]),
            }
            for model, m in art.metrics.items()
            if m["truncated"]
        ],
        "max_new_tokens": fmt_count(config.eval.max_new_tokens),
    }


def study_context(config: StudyConfig, art: StudyArtifacts) -> dict[str, Any]:
    """What every template sees: the study, its links, the results, the caveats. Values are card text."""
    base = art.metrics["base"]
    return {
        "study": {
            "name": config.name,
            "title": config.title,
            "collection_title": config.hub.collection_title,
            "license": config.hub.license,
            "citation": config.hub.citation.strip(),
            "base_model": base_id(config),
            "base_revision": base_revision(config, art),
            "base_is_tiny": config.tiny_base,
            "eval_repo_id": config.eval_repo_id,
            "synthetic_data": config.synthetic_data,
            "source_dataset": config.data.dataset_id,
            "source_config": config.data.config_name,
            "source_revision": dataset_revision(config, art),
            "levels": [_level_info(n, art) | {"repo_id": config.adapter_repo_id(n)} for n in config.levels],
            "rl_levels": ", ".join(fmt_count(n) for n in config.rl.levels),
        },
        "links": study_links(config, art.published),
        "base": {
            "accuracy": fmt_accuracy(base["accuracy"]),
            "accuracy_lenient": fmt_accuracy(base["accuracy_lenient"]),
            "ci95": fmt_ci(base["ci95"]),
            "think_mean": fmt_tokens(base["think_tokens"]["mean"]),
            "n_total": fmt_count(base["n_total"]),
        },
        "caveats": _caveats(config, art),
        "grading": {"stock_answer_lines": fmt_count(STOCK_ANSWER_LINES)},
    }


def _comparison(comparison: dict | None) -> dict[str, str] | None:
    if comparison is None:
        return None
    return {
        "delta": fmt_delta(comparison["delta"]),
        "ci95": fmt_ci(comparison["ci95"]),
        "p": fmt_p(comparison["p_value"]),
        "test": TEST_NAMES[comparison["test"]],
    }


def _headline(art: StudyArtifacts, model: str) -> dict[str, Any]:
    m = art.metrics[model]
    return {
        "accuracy": fmt_accuracy(m["accuracy"]),
        "ci95": fmt_ci(m["ci95"]),
        "fraction": fmt_fraction(m["n_correct"], m["n_total"]),
        "accuracy_lenient": fmt_accuracy(m["accuracy_lenient"]),
        "think_mean": fmt_tokens(m["think_tokens"]["mean"]),
        "think_median": fmt_median(m["think_tokens"]["median"]),
        "completion_mean": fmt_tokens(m["completion_tokens"]["mean"]),
        "delta": fmt_delta(m["vs_base"]["delta"]),
        "delta_ci95": fmt_ci(m["vs_base"]["ci95"]),
        "p": fmt_p(m["vs_base"]["p_value"]),
        "test": TEST_NAMES[m["vs_base"]["test"]],
        "vs_prompt": _comparison(m["vs_prompt"]),
        "on_frontier": next(r["on_frontier"] for r in art.summary["models"] if r["model"] == model),
    }


def compared_models(config: StudyConfig) -> list[str]:
    """The comparison-with-base table: published adapters, then prompt-only baselines."""
    return [model for model in table_models(config) if model != "base"]


def _evaluation(art: StudyArtifacts, model: str) -> dict[str, Any]:
    evaluated = art.evaluated_with[model]
    return {"dtype": evaluated["dtype"], "merged": evaluated["merged"]}


def _sft_vs_rl(config: StudyConfig, art: StudyArtifacts, level: int, rl: bool) -> dict[str, Any] | None:
    """SFT against SFT+RL for a level with an RL adapter (None otherwise): both adapters' accuracy, CI and
    think tokens, and the RL adapter's paired comparison with its SFT sibling (``vs_sft``)."""
    if level not in config.rl.levels:
        return None
    sft, rl_model = LEVELS[level].key, LEVELS[level].rl_key
    vs_sft = art.metrics[rl_model]["vs_sft"]
    return {
        "sft_repo_id": config.adapter_repo_id(level),
        "rl_repo_id": config.rl_repo_id(level),
        "table": _table(art, SFT_VS_RL_COLUMNS, [sft, rl_model], card_model(level, rl)),
        "vs_sft": _comparison(vs_sft),
        "sft_better": fmt_count(vs_sft["b"]),
        "rl_better": fmt_count(vs_sft["c"]),
        "n_paired": fmt_count(vs_sft["n_paired"]),
        "think_change": fmt_change(
            art.metrics[rl_model]["think_tokens"]["mean"], art.metrics[sft]["think_tokens"]["mean"]
        ),
        "steps": fmt_count(art.rl_training[level]["steps"]),
    }


def rl_training_rows(config: StudyConfig, art: StudyArtifacts, level: int) -> list[tuple[str, str]]:
    """The training-details table of an RL adapter: (setting, value), all from its training.json."""
    t = art.rl_training[level]
    hp, reward = t["hyperparameters"], t["reward"]
    if "spec_think_tokens" not in reward:
        raise ArtifactError(
            f"adapters/rl_l{level}/training.json predates the reward's capped length target: "
            f"rerun `cot-compress rl --config C --levels {level} --force`, then render the cards"
        )
    shared = _setup_rows(config, art, t)
    weights = reward["weights"]
    return [
        shared["base"],
        ("Continued from", f"{config.adapter_repo_id(level)} ({model_label(LEVELS[level].key)}, its SFT adapter)"),
        ("Method", f"{t['method']} (TRL GRPOTrainer), loss type {hp['loss_type']}"),
        shared["quantization"],
        shared["precision"],
        shared["hardware"],
        ("Training rows", f"{fmt_count(t['train_rows'])} (the level's training split)"),
        shared["steps"],
        (
            "Rollouts per step",
            f"{fmt_count(hp['prompts_per_step'])} problems × {fmt_count(hp['num_generations'])} completions, "
            f"temperature {fmt_plain(hp['temperature'])}, top-k {fmt_count(hp['top_k'])}, "
            f"at most {fmt_count(hp['max_new_tokens'])} new tokens, "
            + ROLLOUT_ENGINES[hp.get("rollout_engine", "hf")].format(
                merged_into="a dequantized bf16 copy of the NF4 base"
                if t["quantization"] == "nf4"
                else "the base's own weights, restored bit for bit afterwards"
            ),
        ),
        ("Learning rate", fmt_plain(hp["learning_rate"])),
        ("KL β", fmt_plain(hp["beta"])),
        (
            "Reward",
            f"{fmt_plain(weights['correct'])} × correct + {fmt_plain(weights['format'])} × format − "
            f"{fmt_plain(weights['length'])} × length, the length term growing past "
            f"{fmt_count(reward['target_think_tokens'])} think tokens (the level's {fmt_count(reward['target_chars'])} "
            f"chars, {fmt_count(reward['spec_think_tokens'])} tokens, but never above its SFT reasoning's mean of "
            f"{fmt_plain(reward['sft_think_tokens'])})",
        ),
        shared["seed"],
        ("Wall time", f"{fmt_tokens(t['wall_time_s'])} s"),
        shared["libraries"],
    ]


def _hub_results(config: StudyConfig, art: StudyArtifacts, model: str) -> dict[str, Any]:
    """What the adapter's ``.eval_results`` file tells the Hub, and where the Hub shows it."""
    dataset = eval_dataset(config, art, model)
    return {
        "path": eval_results_path(dataset),
        "value": fmt_plain(accuracy_percent(art.metrics[model]["accuracy"])),
        "dataset_id": dataset["id"],
        "task_id": dataset["task_id"],
        "benchmark": not config.synthetic_data,
        "private": config.hub.private,
    }


def adapter_context(config: StudyConfig, art: StudyArtifacts, level: int, *, rl: bool = False) -> dict[str, Any]:
    """An adapter card's variables: the level's SFT adapter's, or with ``rl`` its RL adapter's."""
    model = card_model(level, rl)
    example = art.examples[model]
    rows = rl_training_rows(config, art, level) if rl else training_rows(config, art, level)
    return {
        **study_context(config, art),
        "rl": rl,
        "level": _level_info(level, art) | {"repo_id": card_repo_id(config, level, rl), "label": model_label(model)},
        "headline": _headline(art, model),
        "results": _table(art, results_columns(art), table_models(config), model),
        "vs_base": _table(art, VS_BASE_COLUMNS, compared_models(config), model),
        "sft_vs_rl": _sft_vs_rl(config, art, level, rl),
        "hub_results": _hub_results(config, art, model),
        "training_seeds": _training_seeds(config, art, level),
        "training": [{"setting": s, "value": v} for s, v in rows],
        "evaluation": _evaluation(art, model),
        "example": None
        if example is None
        else {"question": example["question"], "completion": example["completion"], "id": example["id"]},
        "usage": {
            "base_id": base_id(config),
            "base_revision": base_revision(config, art),
            "adapter_id": card_repo_id(config, level, rl),
            "question": EXAMPLE_QUESTION,
            "prompt": build_prompt(level, EXAMPLE_QUESTION),
            "max_new_tokens": config.eval.max_new_tokens,
            "nf4": config.base_model.quantization == "nf4",
        },
    }


def _produced_by(config: StudyConfig, art: StudyArtifacts, model: str) -> dict[str, str]:
    """Which adapter commit and base revision produced a config's rows (known once the adapters are pushed)."""
    if model == "base":
        adapter = "none (stock model)"
    elif model_kind(model) == "prompt":
        adapter = "none (stock model, prompt only)"
    else:
        commit = art.published.adapter_commits.get(model)
        adapter = f"{adapter_repo_of(config, model)}@{commit}" if commit else "not published yet"
    return {"adapter": adapter, "base": f"{base_id(config)}@{base_revision(config, art)}"}


def dataset_context(config: StudyConfig, art: StudyArtifacts) -> dict[str, Any]:
    return {
        **study_context(config, art),
        "results": _table(art, results_columns(art), config.model_keys, None),
        "configs": [
            {
                "name": model,
                "label": model_label(model),
                "rows": fmt_count(art.metrics[model]["n_total"]),
                "evaluation": _evaluation(art, model),
                **_produced_by(config, art, model),
            }
            for model in config.model_keys
        ],
        "summary_config": {
            "name": SUMMARY_CONFIG,
            "label": "one row per model: headline metrics",
            "rows": fmt_count(len(config.model_keys)),
        },
        "join_level": LEVELS[config.levels[-1]].key,  # an adapter: the snippet counts what it gets right
        "columns": [{"name": name, "doc": doc} for name, doc in SAMPLE_COLUMN_DOCS.items()],
        "summary_columns": [{"name": name, "doc": doc} for name, doc in SUMMARY_COLUMN_DOCS.items()],
        "split": SPLIT,
    }


def base_context(config: StudyConfig, art: StudyArtifacts) -> dict[str, Any]:
    """The tiny base's card: what it is, how it was built (build.json), how to load it."""
    build = art.base_build or {}
    tiny = build.get("tiny_model", {})
    curve = build.get("loss_curve") or []
    return {
        **study_context(config, art),
        "model": {
            "repo_id": config.base_repo_id,
            "parameters": fmt_count(build.get("parameters", 0)),
            "vocab_size": fmt_count(build.get("vocab_size", 0)),
            "layers": fmt_count(tiny.get("num_layers", 0)),
            "hidden_size": fmt_count(tiny.get("hidden_size", 0)),
            "pretrain_rows": fmt_count(build.get("pretrain_rows", 0)),
            "pretrain_steps": fmt_count(tiny.get("pretrain_steps", 0)),
            "loss_first": fmt_tokens(curve[0]["loss"]) if curve else None,
            "loss_last": fmt_tokens(curve[-1]["loss"]) if curve else None,
            "wall_time_s": fmt_tokens(build.get("wall_time_s", 0.0)),
            "dtype": art.evaluated_with["base"]["dtype"],
        },
        "usage": {"question": EXAMPLE_QUESTION, "max_new_tokens": config.eval.max_new_tokens},
    }
