"""Shared pytest fixtures, and the ``realdata`` marker's skip."""

from __future__ import annotations

import os

import pytest

REALDATA_REASON = "set COT_GSM8K_DIR to the real GSM8K folder"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``realdata`` need the real GSM8K: skipped unless ``COT_GSM8K_DIR`` names its folder."""
    if os.environ.get("COT_GSM8K_DIR"):
        return
    skip = pytest.mark.skip(reason=REALDATA_REASON)
    for item in items:
        if item.get_closest_marker("realdata"):
            item.add_marker(skip)


@pytest.fixture
def local_hub(tmp_path):
    """A local Hub on a free port with this process's huggingface_hub/datasets pointed at it."""
    from hubtools import clients_for, isolated_hf_caches

    from hub_tools.local_hub import running_hub

    with (
        running_hub(tmp_path / "hub-data") as hub,
        clients_for(hub),
        isolated_hf_caches(tmp_path / "hf-cache"),
    ):
        yield hub


@pytest.fixture(scope="session")
def fixture_run(tmp_path_factory):
    """A finished tiny study (levels 1-2, 20 problems) written from fixtures; tests copy it before changing it."""
    from fixtures_artifacts import write_fixture_study

    from eval_artifacts.study.config import load_config

    root = tmp_path_factory.mktemp("fixture-study") / "run"
    config = load_config().with_overrides(run_dir=str(root), levels=[1, 2])
    write_fixture_study(root, config=config, n_problems=20)
    return root


@pytest.fixture(scope="session", autouse=True)
def cot_compress_cache(tmp_path_factory):
    """One cache for the whole session (the tiny base is built at most once), never the user's home cache.

    A ``COT_COMPRESS_CACHE`` already set (CI reusing a cache between runs) is kept.
    """
    import os

    if os.environ.get("COT_COMPRESS_CACHE"):
        yield os.environ["COT_COMPRESS_CACHE"]
        return
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cot-compress-cache")
        patch.setenv("COT_COMPRESS_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def generation_base(tmp_path_factory):
    """The generation tests' saved model and tokenizer (``helpers.build_generation_base``); read-only."""
    from helpers import build_generation_base

    return build_generation_base(tmp_path_factory.mktemp("generation_base"))


@pytest.fixture(scope="session")
def training_base(tmp_path_factory):
    """The training tests' saved model and tokenizer (``helpers.build_training_base``); read-only."""
    from helpers import build_training_base

    return build_training_base(tmp_path_factory.mktemp("training_base"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: forked children must not enter their parent's OpenMP regions, and
    interrupted and uninterrupted runs must reduce floats in the same order to match."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
