"""The wanted state of each repo: its files (adapter, eval dataset shards, plot) and its rendered card."""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import DatasetCard
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash, sha_fileobj

from eval_artifacts.hub_dataset import SPLIT, SUMMARY_CONFIG, build_eval_dataset
from eval_artifacts.metrics import check_metrics_match_samples
from eval_artifacts.rundir import ADAPTER_FILES, RunDir
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.errors import ArtifactError, ConfigError
from eval_artifacts.study.levels import LEVELS
from hub_tools import cards
from hub_tools import collection as collections

PUSHED_ADAPTER_FILES = (*ADAPTER_FILES, "training.json")  # the weights and how they were trained
ADAPTER_CONFIG = "adapter_config.json"  # pushed rewritten: see published_adapter_config
# The study's data stats travel with every adapter: with training.json they are all an adapter card needs
# beyond the eval dataset, so `regenerate-cards --from-hub` can rebuild the cards from the Hub alone.
DATA_STATS = "data_stats.json"
README = "README.md"
# Above this size the Hub always stores a file in LFS, so its git blob sha1 is never needed.
LFS_ALWAYS = 10 * 1024 * 1024


@dataclass(frozen=True)
class LocalFile:
    """One file as it should be in a repo: where its bytes are, its size and the hashes the Hub compares."""

    path: str
    size: int
    sha256: str
    git_sha1: str | None
    data: bytes | None = None
    source: Path | None = None

    @classmethod
    def from_bytes(cls, path: str, data: bytes) -> LocalFile:
        """A file held in memory (a rendered card, a parquet shard)."""
        return cls(path, len(data), sha_fileobj(io.BytesIO(data)).hex(), git_hash(data), data=data)

    @classmethod
    def from_path(cls, path: str, source: Path) -> LocalFile:
        """A file of the run directory, hashed now and uploaded from disk."""
        size = source.stat().st_size
        with source.open("rb") as handle:
            sha256 = sha_fileobj(handle).hex()
        sha1 = git_hash(source.read_bytes()) if size < LFS_ALWAYS else None
        return cls(path, size, sha256, sha1, source=source)

    def content(self) -> bytes | str:
        """What ``CommitOperationAdd`` uploads: the bytes, or the path to read them from."""
        return self.data if self.data is not None else str(self.source)

    def text(self) -> str:
        return (self.data if self.data is not None else self.source.read_bytes()).decode("utf-8", "replace")

    def matches(self, remote: RepoFile) -> bool:
        """Whether the Hub already holds these bytes: by sha256 for LFS files, by git blob sha1 otherwise."""
        if remote.lfs is not None:
            return remote.lfs.sha256 == self.sha256
        return self.git_sha1 is not None and remote.blob_id == self.git_sha1


MAIN = "main"


def seed_branch(training_seed: int) -> str:
    """The branch of an adapter repo that holds another training seed's adapter: ``seed-43``."""
    return f"seed-{training_seed}"


@dataclass
class RepoSpec:
    """The wanted state of one branch of one repo (``main``, or an adapter repo's ``seed-<s>``)."""

    repo_id: str
    repo_type: str  # "model" | "dataset"
    files: dict[str, LocalFile]
    message: str
    branch: str = MAIN

    @property
    def key(self) -> str:
        """Where ``publish/state.json`` records this branch: the repo id, ``@<branch>`` after it off main."""
        return self.repo_id if self.branch == MAIN else f"{self.repo_id}@{self.branch}"


def shard_path(config_name: str) -> str:
    """Where ``DatasetDict.push_to_hub(config_name=...)`` puts a config's only shard (so both agree)."""
    return f"{config_name}/{SPLIT}-00000-of-00001.parquet"


def dataset_readme(card_text: str, config_names: list[str]) -> str:
    """The card with ``configs:`` metadata naming each config's shards, which ``load_dataset`` reads."""
    card = DatasetCard(card_text)
    wanted = [
        {"config_name": name, "data_files": [{"split": SPLIT, "path": f"{name}/{SPLIT}-*"}]}
        for name in config_names
    ]
    if card.data.to_dict().get("configs") == wanted:
        return card_text
    card.data.configs = wanted
    return str(card)


def _readme(text: str) -> LocalFile:
    return LocalFile.from_bytes(README, text.encode())


def published_adapter_config(config: StudyConfig, art: cards.StudyArtifacts, path: Path) -> bytes:
    """The adapter's ``adapter_config.json`` as published: its base named by Hub id and pinned revision, never
    the local path training loaded it from, so that ``AutoPeftModelForCausalLM`` loads it anywhere."""
    from peft import PeftConfig

    adapter_config = PeftConfig.from_json_file(str(path))
    adapter_config["base_model_name_or_path"] = config.base_hub_id
    adapter_config["revision"] = cards.base_revision(config, art)
    return (json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode()


def _adapter_specs(
    config: StudyConfig,
    run_dir: RunDir,
    art: cards.StudyArtifacts,
    level: int,
    readme: str,
    plot: LocalFile,
) -> list[RepoSpec]:
    """The level's repo: the first training seed's adapter on ``main``, each other seed's on ``seed-<s>``.

    Every branch carries the same card (which lists every seed's numbers and branch), plot and data stats;
    the eval-results file, which the Hub reads from ``main``, only on ``main``: it scores that adapter.
    """
    specs = []
    for model, seed in config.adapter_models(level):
        files = _adapter_files(config, run_dir, art, run_dir.adapter_dir(model), readme, plot)
        if model == LEVELS[level].key:
            branch = MAIN
            results_path, results_yaml = cards.eval_results_file(config, art, level)
            files[results_path] = LocalFile.from_bytes(results_path, results_yaml.encode())
            message = f"Publish {config.name} level {level}: adapter, card, plot and eval results"
        else:
            branch = seed_branch(seed)
            message = f"Publish {config.name} level {level} (training seed {seed}): adapter, card and plot"
        specs.append(RepoSpec(config.adapter_repo_id(level), "model", files, message, branch=branch))
    return specs


def _adapter_files(
    config: StudyConfig, run_dir: RunDir, art: cards.StudyArtifacts, directory: Path, readme: str, plot: LocalFile
) -> dict[str, LocalFile]:
    """What every branch of an adapter repo holds: the weights, training.json, the rewritten adapter config,
    the data stats, the card and the plot."""
    files = {name: LocalFile.from_path(name, directory / name) for name in PUSHED_ADAPTER_FILES}
    files[ADAPTER_CONFIG] = LocalFile.from_bytes(
        ADAPTER_CONFIG, published_adapter_config(config, art, directory / ADAPTER_CONFIG)
    )
    files[DATA_STATS] = LocalFile.from_path(DATA_STATS, run_dir.data_stats)
    files[README] = _readme(readme)
    files[cards.PLOT_FILE] = plot
    return files


def _rl_spec(
    config: StudyConfig, run_dir: RunDir, art: cards.StudyArtifacts, level: int, readme: str, plot: LocalFile
) -> RepoSpec:
    """The level's RL adapter in its own repo ``{prefix}-l<n>-rl``, on ``main``, with its eval-results file."""
    files = _adapter_files(config, run_dir, art, run_dir.rl_adapter_dir(level), readme, plot)
    results_path, results_yaml = cards.eval_results_file(config, art, level, rl=True)
    files[results_path] = LocalFile.from_bytes(results_path, results_yaml.encode())
    message = f"Publish {config.name} level {level} SFT+RL (GRPO): adapter, card, plot and eval results"
    return RepoSpec(config.rl_repo_id(level), "model", files, message)


def adapter_branches(config: StudyConfig, level: int) -> list[str]:
    """The branches of the level's repo that the study publishes: ``main`` first."""
    return [MAIN] + [seed_branch(seed) for _, seed in config.adapter_models(level)[1:]]


def _base_spec(config: StudyConfig, run_dir: RunDir, readme: str, plot: LocalFile) -> RepoSpec:
    """The tiny base as built (weights, tokenizer, chat template, build.json), its card and the study's plot."""
    files = {
        path.name: LocalFile.from_path(path.name, path)
        for path in sorted(run_dir.base_dir.iterdir())
        if path.is_file() and path.name != README
    }
    files[README] = _readme(readme)
    files[cards.PLOT_FILE] = plot
    return RepoSpec(config.base_repo_id, "model", files, f"Publish {config.name} base model, card and plot")


def _eval_spec(config: StudyConfig, run_dir: RunDir, readme: str, plot: LocalFile) -> RepoSpec:
    # The shards go into the same single commit as the card (``push_to_hub`` would make one per config),
    # where ``DatasetDict.push_to_hub(config_name=...)`` would put them, so either can update the other's.
    files = {}
    for name, dataset_dict in build_eval_dataset(run_dir, models=config.model_keys).items():
        buffer = io.BytesIO()
        dataset_dict[SPLIT].to_parquet(buffer)
        files[shard_path(name)] = LocalFile.from_bytes(shard_path(name), buffer.getvalue())
    files[README] = _readme(readme)
    files[cards.PLOT_FILE] = plot
    message = f"Publish {config.name} eval dataset, card and plot"
    return RepoSpec(config.eval_repo_id, "dataset", files, message)


def _readmes(config: StudyConfig, rendered: dict[str, cards.RenderedCard]) -> dict[str, str]:
    """repo id -> README text, the eval dataset's with the ``configs:`` metadata ``load_dataset`` needs."""
    text = {card.repo_id: card.text for card in rendered.values()}
    text[config.eval_repo_id] = dataset_readme(
        text[config.eval_repo_id], [*config.model_keys, SUMMARY_CONFIG]
    )
    return text


def repo_specs(
    config: StudyConfig,
    run_dir: RunDir,
    *,
    rendered: dict[str, cards.RenderedCard],
    artifacts: cards.StudyArtifacts,
    adapters: bool,
) -> list[RepoSpec]:
    """
    The wanted files of every repo a publish pushes: the tiny base and each adapter repo (with ``adapters``),
    then the eval dataset. The order is the order of the commits: the adapters pin the base's commit, and the
    eval dataset names the adapters' commits.

    Args:
        config (`StudyConfig`):
            The study, with the Hub overrides already applied.
        run_dir (`RunDir`):
            The run directory the files are read from (the eval dataset's shards are built from its samples).
        rendered (`dict[str, RenderedCard]`):
            The rendered cards (``render_cards``), pushed as each repo's README.
        artifacts (`StudyArtifacts`):
            The artifacts the cards were rendered from (the base revision and eval results come from them).
        adapters (`bool`):
            Whether the adapter repos are part of the push (``publish``) or only the eval dataset (``push-eval``).

    Returns:
        `list[RepoSpec]`: the base (tiny study), adapters in level order (each repo's ``main``, then its
        ``seed-<s>`` branches, then the level's RL adapter repo when it has one), then the eval dataset.
    """
    readmes = _readmes(config, rendered)
    plot = LocalFile.from_path(cards.PLOT_FILE, run_dir.pareto_png)
    specs = []
    if adapters and config.tiny_base:
        specs.append(_base_spec(config, run_dir, readmes[config.base_repo_id], plot))
    if adapters:
        for level in config.levels:
            specs += _adapter_specs(
                config, run_dir, artifacts, level, readmes[config.adapter_repo_id(level)], plot
            )
            if level in config.rl.levels:
                specs.append(_rl_spec(config, run_dir, artifacts, level, readmes[config.rl_repo_id(level)], plot))
    specs.append(_eval_spec(config, run_dir, readmes[config.eval_repo_id], plot))
    return specs


def readme_specs(config: StudyConfig, *, rendered: dict[str, cards.RenderedCard]) -> list[RepoSpec]:
    """
    Every repo's README alone, for ``regenerate-cards``: weights, shards and plots are never read nor touched.

    Args:
        config (`StudyConfig`):
            The study, with the Hub overrides already applied.
        rendered (`dict[str, RenderedCard]`):
            The rendered cards (``render_cards``).

    Returns:
        `list[RepoSpec]`: one per branch (the tiny base, adapters in level order, each repo's ``main`` then its
        seed branches, then the eval dataset), each with only a README.
    """
    readmes = _readmes(config, rendered)
    ids = [(config.base_repo_id, "model", MAIN)] if config.tiny_base else []
    ids += [
        (config.adapter_repo_id(level), "model", branch)
        for level in config.levels
        for branch in adapter_branches(config, level)
    ]
    ids += [(config.rl_repo_id(level), "model", MAIN) for level in config.rl.levels]
    ids.append((config.eval_repo_id, "dataset", MAIN))
    message = f"Regenerate the {config.name} card"
    return [
        RepoSpec(repo_id, repo_type, {README: _readme(readmes[repo_id])}, message, branch=branch)
        for repo_id, repo_type, branch in ids
    ]


def check_artifacts(config: StudyConfig, run_dir: RunDir, *, adapters: bool) -> None:
    """
    Check that every file the specs read is there and consistent, before anything is read from the Hub.

    Args:
        config (`StudyConfig`):
            The study.
        run_dir (`RunDir`):
            The run directory to check.
        adapters (`bool`):
            Also check each level's adapter files (only a push of the adapter repos reads them).

    Raises:
        [`ArtifactError`]:
            Naming the first missing or inconsistent artifact and the command that makes it.
    """
    if adapters and config.base_hub_id is None:
        raise ConfigError(
            f"base_model.id {config.base_model.id!r} is a local folder that names no Hub repo, so the published "
            "adapters could not be loaded: set base_model.hub_id (and base_model.revision) to the Hub repo it is a copy of"
        )
    if adapters and config.tiny_base and not (run_dir.base_dir / "build.json").is_file():
        raise ArtifactError(
            f"the tiny base model is not in {run_dir.base_dir}: run `cot-compress train` before publishing"
        )
    if adapters:
        for level in config.levels:
            for model, _ in config.adapter_models(level):
                for name in PUSHED_ADAPTER_FILES:
                    if not (run_dir.adapter_dir(model) / name).is_file():
                        raise ArtifactError(
                            f"{model} has no {name} in {run_dir.adapter_dir(model)}: "
                            f"run `cot-compress train --levels {level}` before publishing"
                        )
        for level in config.rl.levels:
            for name in PUSHED_ADAPTER_FILES:
                if not (run_dir.rl_adapter_dir(level) / name).is_file():
                    raise ArtifactError(
                        f"{LEVELS[level].rl_key} has no {name} in {run_dir.rl_adapter_dir(level)}: "
                        f"run `cot-compress rl --levels {level}` before publishing"
                    )
    for model in config.model_keys:
        if not run_dir.samples(model).is_file():
            raise ArtifactError(
                f"{model} has no samples at {run_dir.samples(model)}: run `cot-compress evaluate` before publishing"
            )
        check_metrics_match_samples(run_dir, model)
    for path in (run_dir.summary, run_dir.pareto_png):
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: run `cot-compress evaluate` before publishing")


def render_cards(
    config: StudyConfig,
    run_dir: RunDir,
    *,
    templates_dir: Path | None,
    published: cards.Published | None = None,
) -> tuple[dict[str, cards.RenderedCard], dict[str, str], cards.StudyArtifacts]:
    """
    Render and validate every card and collection note from the run directory's artifacts.

    Args:
        config (`StudyConfig`):
            The study.
        run_dir (`RunDir`):
            The run directory whose artifacts the cards are rendered from.
        templates_dir (`Path`, *optional*):
            A folder of the user's own templates; `None` for the shipped ones.
        published (`Published`, *optional*):
            What the publish under way knows (the Hub's URL, the collection's slug, the base's and adapters'
            commits); `None` for what the last publish recorded in ``publish/state.json``.

    Returns:
        `tuple`: the cards by name, the collection notes by repo id, and the artifacts they were rendered from.

    Raises:
        [`CardValidationError`]:
            A card or a note fails validation.
    """
    art = cards.load_artifacts(config, run_dir, published=published)
    rendered = cards.render_study_cards(config, run_dir, templates_dir=templates_dir, artifacts=art)
    notes = cards.render_collection_notes(config, run_dir, templates_dir=templates_dir, artifacts=art)
    cards.validate_all(rendered, config=config, run_dir=run_dir, notes=notes, artifacts=art)
    collections.wanted_items(config, notes)
    return rendered, notes, art


def write_pushed_cards(
    run_dir: RunDir, rendered: dict[str, cards.RenderedCard], specs: list[RepoSpec]
) -> None:
    """Keep ``cards/<repo>/README.md`` equal to exactly what is pushed."""
    pushed = {spec.repo_id: spec.files[README].text() for spec in specs}
    cards.write_cards(
        run_dir,
        {
            name: dataclasses.replace(card, text=pushed.get(card.repo_id, card.text))
            for name, card in rendered.items()
        },
    )
