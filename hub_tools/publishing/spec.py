"""The wanted state of each repo: its files (adapter, eval dataset shards, plot) and its rendered card."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import DatasetCard
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash, sha_fileobj

from eval_artifacts.hub_dataset import SPLIT, SUMMARY_CONFIG, build_eval_dataset
from eval_artifacts.metrics import check_metrics_match_samples
from eval_artifacts.rundir import ADAPTER_FILES, RunDir
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.errors import ArtifactError
from eval_artifacts.study.levels import LEVELS
from hub_tools import cards
from hub_tools import collection as collections

PUSHED_ADAPTER_FILES = (*ADAPTER_FILES, "training.json")  # the weights and how they were trained
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


def _adapter_specs(
    config: StudyConfig, run_dir: RunDir, level: int, readme: str, plot: LocalFile
) -> list[RepoSpec]:
    """The level's repo: the first training seed's adapter on ``main``, each other seed's on ``seed-<s>``.

    Every branch carries the same card (which lists every seed's numbers and branch), plot and data stats.
    """
    specs = []
    for model, seed in config.adapter_models(level):
        files = {name: LocalFile.from_path(name, run_dir.adapter_dir(model) / name) for name in PUSHED_ADAPTER_FILES}
        files[DATA_STATS] = LocalFile.from_path(DATA_STATS, run_dir.data_stats)
        files[README] = _readme(readme)
        files[cards.PLOT_FILE] = plot
        branch = MAIN if model == LEVELS[level].key else seed_branch(seed)
        message = f"Publish {config.name} level {level} (training seed {seed}): adapter, card and plot"
        specs.append(RepoSpec(config.adapter_repo_id(level), "model", files, message, branch=branch))
    return specs


def adapter_branches(config: StudyConfig, level: int) -> list[str]:
    """The branches of the level's repo that the study publishes: ``main`` first."""
    return [MAIN] + [seed_branch(seed) for _, seed in config.adapter_models(level)[1:]]


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
    config: StudyConfig, run_dir: RunDir, *, rendered: dict[str, cards.RenderedCard], adapters: bool
) -> list[RepoSpec]:
    """
    The wanted files of every repo a publish pushes: each adapter repo (with ``adapters``), then the eval dataset.

    Args:
        config (`StudyConfig`):
            The study, with the Hub overrides already applied.
        run_dir (`RunDir`):
            The run directory the files are read from (the eval dataset's shards are built from its samples).
        rendered (`dict[str, RenderedCard]`):
            The rendered cards (``render_cards``), pushed as each repo's README.
        adapters (`bool`):
            Whether the adapter repos are part of the push (``publish``) or only the eval dataset (``push-eval``).

    Returns:
        `list[RepoSpec]`: adapters first in level order (each repo's ``main``, then its ``seed-<s>``
        branches), then the eval dataset.
    """
    readmes = _readmes(config, rendered)
    plot = LocalFile.from_path(cards.PLOT_FILE, run_dir.pareto_png)
    specs = []
    if adapters:
        for level in config.levels:
            specs += _adapter_specs(config, run_dir, level, readmes[config.adapter_repo_id(level)], plot)
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
        `list[RepoSpec]`: one per branch (adapters in level order, each repo's ``main`` then its seed
        branches, then the eval dataset), each with only a README.
    """
    readmes = _readmes(config, rendered)
    ids = [
        (config.adapter_repo_id(level), "model", branch)
        for level in config.levels
        for branch in adapter_branches(config, level)
    ]
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
    if adapters:
        for level in config.levels:
            for model, _ in config.adapter_models(level):
                for name in PUSHED_ADAPTER_FILES:
                    if not (run_dir.adapter_dir(model) / name).is_file():
                        raise ArtifactError(
                            f"{model} has no {name} in {run_dir.adapter_dir(model)}: "
                            f"run `cot-compress train --levels {level}` before publishing"
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
    config: StudyConfig, run_dir: RunDir, *, templates_dir: Path | None, collection_url: str | None
) -> tuple[dict[str, cards.RenderedCard], dict[str, str]]:
    """
    Render and validate every card and collection note from the run directory's artifacts.

    Args:
        config (`StudyConfig`):
            The study.
        run_dir (`RunDir`):
            The run directory whose artifacts the cards are rendered from.
        templates_dir (`Path`, *optional*):
            A folder of the user's own templates; `None` for the shipped ones.
        collection_url (`str`, *optional*):
            The collection the cards link (``card_collection_url``); `None` while it does not exist.

    Returns:
        `tuple[dict[str, RenderedCard], dict[str, str]]`: the cards by name, and the collection notes by repo id.

    Raises:
        [`CardValidationError`]:
            A card or a note fails validation.
    """
    rendered = cards.render_study_cards(
        config, run_dir, templates_dir=templates_dir, collection_url=collection_url
    )
    notes = cards.render_collection_notes(config, run_dir, templates_dir=templates_dir)
    cards.validate_all(rendered, config=config, run_dir=run_dir, notes=notes)
    collections.wanted_items(config, notes)
    return rendered, notes


def card_collection_url(config: StudyConfig, slug: str | None) -> str | None:
    """The collection link cards carry, on the Hub the cards name (huggingface.co for the local hub)."""
    return f"{cards.hub_url(config)}/collections/{slug}" if slug else None


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
