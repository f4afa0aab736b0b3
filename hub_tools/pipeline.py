"""train-and-publish: prepare data → train → evaluate → render cards → publish, skipping what is current.

A stage is current when the hash of its inputs and the hashes of its outputs match what
``study.lock.json`` recorded the last time it finished. The lock also records what a reviewer needs to
reproduce the study: the resolved config and its hash, the code's git sha and dirty flag, library versions.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eval_artifacts.rundir import SCHEMA_VERSION, RunDir, file_sha256, library_versions, read_json, write_json
from eval_artifacts.study.config import StudyConfig

STAGES = ("prepare-data", "train", "rl", "evaluate", "render-cards")
LIBRARIES = ("cot-compress", "torch", "transformers", "peft", "trl", "datasets", "huggingface_hub", "accelerate")


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: Callable[[StudyConfig, RunDir], object]
    """Whatever the stage's result depends on, as JSON-able data (hashed)."""
    outputs: Callable[[StudyConfig, RunDir], list[Path]]
    run: Callable[[StudyConfig, RunDir], object]
    applies: Callable[[StudyConfig], bool] = lambda config: True
    """Whether the study has this stage at all (the RL stage only when ``rl.levels`` names a level)."""


def _hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _hashes(paths: list[Path], root: Path) -> dict[str, str | None]:
    return {str(path.relative_to(root)): file_sha256(path) if path.is_file() else None for path in paths}


# ---------------------------------------------------------------- the stages


def _data_outputs(config: StudyConfig, run_dir: RunDir) -> list[Path]:
    return [run_dir.data_stats] + [run_dir.train_file(level) for level in config.levels]


def _adapter_models(config: StudyConfig) -> list[str]:
    """Every adapter of the study: one per (level, training seed)."""
    return [model for level in config.levels for model, _ in config.adapter_models(level)]


def _adapter_outputs(config: StudyConfig, run_dir: RunDir) -> list[Path]:
    paths = []
    for model in _adapter_models(config):
        paths += [run_dir.training_json(model), run_dir.adapter_dir(model) / "adapter_model.safetensors"]
    return paths


def _rl_outputs(config: StudyConfig, run_dir: RunDir) -> list[Path]:
    paths = []
    for level in config.rl.levels:
        paths += [run_dir.rl_training_json(level), run_dir.rl_adapter_dir(level) / "adapter_model.safetensors"]
    return paths


def _eval_outputs(config: StudyConfig, run_dir: RunDir) -> list[Path]:
    paths = [run_dir.summary, run_dir.pareto_png]
    for model in config.model_keys:
        paths += [run_dir.samples(model), run_dir.metrics(model)]
    return paths


def _card_outputs(config: StudyConfig, run_dir: RunDir) -> list[Path]:
    names = [config.base_repo_id.split("/")[1]] if config.tiny_base else []
    for level in config.levels:
        repos = [config.adapter_repo_id(level)] + ([config.rl_repo_id(level)] if level in config.rl.levels else [])
        names += [repo.split("/")[1] for repo in repos]
    return [run_dir.card(name) for name in names + [config.eval_repo_id.split("/")[1]]]


def _templates_hash(templates_dir: Path | None) -> str:
    from importlib import resources

    folder = Path(templates_dir) if templates_dir else Path(str(resources.files("cards_templates")))
    return _hash({path.name: file_sha256(path) for path in sorted(folder.glob("*.j2"))})


def _run_prepare(config: StudyConfig, run_dir: RunDir) -> None:
    from training import prepare_data

    prepare_data.run(config, run_dir)


def _run_train(config: StudyConfig, run_dir: RunDir) -> None:
    from training import sft

    sft.run(config, run_dir)


def _run_rl(config: StudyConfig, run_dir: RunDir) -> None:
    from training import rl

    rl.run(config, run_dir)


def _run_evaluate(config: StudyConfig, run_dir: RunDir) -> None:
    from training import evaluate

    evaluate.run(config, run_dir)


def _run_render(config: StudyConfig, run_dir: RunDir, templates_dir: Path | None = None) -> None:
    from hub_tools import cards
    from hub_tools.publishing.spec import render_cards

    # Links and commits come from publish/state.json once a publish recorded them; rendering without them
    # would make every rerun differ from what publish wrote, so the stage would never be current.
    rendered, _, _ = render_cards(config, run_dir, templates_dir=templates_dir)
    cards.write_cards(run_dir, rendered)


def build_stages(templates_dir: Path | None = None) -> list[Stage]:
    return [
        Stage(
            "prepare-data",
            lambda c, r: {"data": c.data.model_dump(mode="json"), "teacher": c.teacher.model_dump(), "levels": c.levels},
            _data_outputs,
            _run_prepare,
        ),
        Stage(
            "train",
            lambda c, r: {
                "base": c.base_model.model_dump(),
                "tiny": c.tiny_model.model_dump() if c.tiny_model else None,
                "training": c.training.model_dump(mode="json"),
                "data": _hashes(_data_outputs(c, r), r.root),
            },
            _adapter_outputs,
            _run_train,
        ),
        Stage(
            "rl",
            lambda c, r: {"rl": c.rl.model_dump(mode="json"), "adapters": _hashes(_adapter_outputs(c, r), r.root)},
            _rl_outputs,
            _run_rl,
            applies=lambda c: c.rl.enabled,
        ),
        Stage(
            "evaluate",
            lambda c, r: {
                "eval": c.eval.model_dump(mode="json"),
                "data": c.data.model_dump(mode="json"),
                "adapters": _hashes(_adapter_outputs(c, r) + _rl_outputs(c, r), r.root),
            },
            _eval_outputs,
            _run_evaluate,
        ),
        Stage(
            "render-cards",
            lambda c, r: {
                "hub": c.hub.model_dump(mode="json"),
                "title": c.title,
                "templates": _templates_hash(templates_dir),
                "eval": _hashes(_eval_outputs(c, r), r.root),
                "training": _hashes(
                    [r.training_json(m) for m in _adapter_models(c)]
                    + [r.rl_training_json(level) for level in c.rl.levels]
                    + [r.data_stats],
                    r.root,
                ),
            },
            _card_outputs,
            lambda c, r: _run_render(c, r, templates_dir),
        ),
    ]


# ---------------------------------------------------------------- the lock


def code_version() -> dict:
    """The git sha of the code and whether the work tree differs from it (None outside a checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": None, "dirty": None}
    return {"git_sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def read_lock(run_dir: RunDir) -> dict:
    if not run_dir.lock.is_file():
        return {}
    return read_json(run_dir.lock, what="study lock", hint="delete study.lock.json to rerun every stage")


def resolved_revisions(config: StudyConfig, run_dir: RunDir) -> dict:
    """The commits the stages read: the base model's (training.json) and the dataset's (data/stats.json)."""
    base = None
    for level in config.levels:
        if run_dir.training_json(level).is_file():
            trained = read_json(run_dir.training_json(level), what="training.json", hint="rerun `cot-compress train`")
            base = trained.get("base_model_hub")
            break
    source = {}
    if run_dir.data_stats.is_file():
        stats = read_json(run_dir.data_stats, what="data stats", hint="rerun `cot-compress prepare-data`")
        source = stats.get("source") or {}
    synthetic = source.get("kind") in (None, "synthetic")
    dataset = None if synthetic else {"id": source.get("dataset_id"), "sha": source.get("sha")}
    return {"base_model": base, "dataset": dataset}


def write_lock(config: StudyConfig, run_dir: RunDir, stages: dict) -> None:
    write_json(
        run_dir.lock,
        {
            "schema_version": SCHEMA_VERSION,
            "study": config.name,
            "config": config.model_dump(mode="json"),
            "config_sha256": config.fingerprint(),
            "resolved": resolved_revisions(config, run_dir),
            "code": code_version(),
            "libraries": library_versions(LIBRARIES),
            "stages": stages,
        },
    )


def stage_is_current(stage: Stage, config: StudyConfig, run_dir: RunDir, recorded: dict | None) -> bool:
    if not recorded or recorded.get("inputs") != _hash(stage.inputs(config, run_dir)):
        return False
    outputs = _hashes(stage.outputs(config, run_dir), run_dir.root)
    return None not in outputs.values() and outputs == recorded.get("outputs")


def run_stages(
    config: StudyConfig,
    run_dir: RunDir,
    *,
    force_stages: tuple[str, ...] = (),
    templates_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """
    Run every stage that is not current, in order.

    Later stages hash the outputs of earlier ones into their inputs, so a stage that reran and changed its
    outputs makes every stage after it stale, and one that reran to identical bytes does not.

    Args:
        config (`StudyConfig`):
            The study.
        run_dir (`RunDir`):
            The run directory, with its ``study.lock.json``.
        force_stages (`tuple[str, ...]`, *optional*):
            Stages to rerun even if current.
        templates_dir (`Path`, *optional*):
            The user's own card templates, for the render-cards stage.
        echo (`Callable[[str], None]`, *optional*):
            Where the ``[stage] running`` / ``current, skipped`` lines go; stdout by default.

    Returns:
        `list[str]`: the names of the stages that ran.

    Raises:
        [`ConfigError`]:
            A name in ``force_stages`` is not a stage.
    """
    unknown = set(force_stages) - set(STAGES)
    if unknown:
        from eval_artifacts.study.errors import ConfigError

        raise ConfigError(f"--force-stage {sorted(unknown)} is not a stage; stages are {', '.join(STAGES)}")
    recorded_stages = dict(read_lock(run_dir).get("stages", {}))
    ran: list[str] = []
    for stage in build_stages(templates_dir):
        if not stage.applies(config):
            continue
        if stage.name not in force_stages and stage_is_current(
            stage, config, run_dir, recorded_stages.get(stage.name)
        ):
            echo(f"[{stage.name}] current, skipped")
            continue
        echo(f"[{stage.name}] running")
        stage.run(config, run_dir)
        recorded_stages[stage.name] = {
            "inputs": _hash(stage.inputs(config, run_dir)),
            "outputs": _hashes(stage.outputs(config, run_dir), run_dir.root),
        }
        write_lock(config, run_dir, recorded_stages)
        ran.append(stage.name)
    if not ran:
        write_lock(config, run_dir, recorded_stages)
    return ran
