"""Problems for a study config, from whichever source it names: synthetic, a local folder, or the Hub."""

from __future__ import annotations

from eval_artifacts.study.config import StudyConfig
from training.gsm8k import Problem, load_hub_split, load_local_split
from training.synthetic import generate_problems


def load_problems(config: StudyConfig, split: str) -> list[Problem]:
    """The ``train`` or ``test`` problems of the study, capped by ``max_train_rows``/``max_test_rows``."""
    data = config.data
    if data.source == "synthetic":
        problems = _synthetic_split(config, split)
    elif data.source == "local":
        problems = load_local_split(data.local_dir, split)
    else:
        revision = dataset_revision(config) or data.revision  # what is recorded is what is read
        problems = load_hub_split(data.dataset_id, data.config_name, revision, split)
    cap = data.max_train_rows if split == "train" else data.max_test_rows
    return problems[:cap] if cap else problems


def dataset_revision(config: StudyConfig) -> str | None:
    """The commit of the study's data: the Hub dataset's sha (asked when first read), a local copy's snapshot
    sha or its stated ``data.revision`` when that is a sha; None for synthetic data or when nothing says."""
    from training.models import as_sha, local_snapshot_sha, resolve_revision

    data = config.data
    if data.source == "synthetic":
        return None
    if data.source == "local":
        return local_snapshot_sha(data.local_dir) or as_sha(data.revision)
    return resolve_revision(data.dataset_id, data.revision, repo_type="dataset")


def synthetic_without_test(config: StudyConfig, n: int, *, split: str) -> list[Problem]:
    """``n`` synthetic problems of ``split`` (seeded like the study's), none of them a test question.

    Extra problems are drawn and the overlap with the test set dropped, so no training text holds a test
    question.
    """
    spec = config.data.synthetic
    test = generate_problems(spec.n_test, seed=spec.seed, max_number=spec.max_number, split="test")
    held_out = {problem.question for problem in test}
    pool = generate_problems(n + spec.n_test, seed=spec.seed, max_number=spec.max_number, split=split)
    return [problem for problem in pool if problem.question not in held_out][:n]


def _synthetic_split(config: StudyConfig, split: str) -> list[Problem]:
    spec = config.data.synthetic
    if split == "test":
        return generate_problems(spec.n_test, seed=spec.seed, max_number=spec.max_number, split="test")
    kept = synthetic_without_test(config, spec.n_train, split="train")
    return [
        Problem(id=f"train-{index:05d}", question=p.question, answer=p.answer, gold=p.gold)
        for index, p in enumerate(kept)
    ]
