"""Problems for a study config, from whichever source it names: synthetic, a local folder, or the Hub."""

from __future__ import annotations

from training.config import StudyConfig
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
        problems = load_hub_split(data.dataset_id, data.config_name, data.revision, split)
    cap = data.max_train_rows if split == "train" else data.max_test_rows
    return problems[:cap] if cap else problems


def _synthetic_split(config: StudyConfig, split: str) -> list[Problem]:
    spec = config.data.synthetic
    test = generate_problems(spec.n_test, seed=spec.seed, max_number=spec.max_number, split="test")
    if split == "test":
        return test
    # Train never holds a test question: draw extra problems and drop the overlap.
    held_out = {problem.question for problem in test}
    train = generate_problems(
        spec.n_train + spec.n_test, seed=spec.seed, max_number=spec.max_number, split="train"
    )
    kept = [problem for problem in train if problem.question not in held_out][: spec.n_train]
    return [
        Problem(id=f"train-{index:05d}", question=p.question, answer=p.answer, gold=p.gold)
        for index, p in enumerate(kept)
    ]
