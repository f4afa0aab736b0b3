"""Restoring an empty run dir's eval results from the Hub, for ``regenerate-cards --from-hub``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
from huggingface_hub.errors import HfHubHTTPError

from eval_artifacts.hub_dataset import restore_run_dir_from_eval_dataset
from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.errors import ArtifactError, HubError
from eval_artifacts.summary import write_summary
from hub_tools.hub_client import HubTarget, describe
from hub_tools.publishing.spec import DATA_STATS, MAIN, adapter_branches


def restore_run_dir_from_hub(
    target: HubTarget, config: StudyConfig, run_dir: RunDir, *, echo: Callable[[str], None]
) -> None:
    """
    Rebuild the eval results of an empty run directory from what the study published.

    Samples come from the eval dataset's configs (metrics, summary and plot are recomputed from them, never
    trusted from the Hub); training.json and the data stats, which the dataset cannot hold, come from the
    adapter repos, and the tiny base's build.json from its repo.

    Args:
        target (`HubTarget`):
            The opened Hub the study was published to.
        config (`StudyConfig`):
            The study, whose repo ids say where to read.
        run_dir (`RunDir`):
            The run directory to fill; it must hold no eval results yet.
        echo (`Callable[[str], None]`):
            Where the one-line summary goes.

    Raises:
        [`ArtifactError`]:
            The run directory already holds eval results, or the eval dataset lacks a model of the study.
        [`HubError`]:
            The eval dataset or an adapter repo's file cannot be downloaded.
    """
    # Imported here: matplotlib would slow every publishing command down, and only this path plots.
    from eval_artifacts.plots import plot_pareto

    if any(run_dir.eval_dir.glob("*/samples.jsonl")):
        raise ArtifactError(
            f"{run_dir.eval_dir} already holds eval results: drop --from-hub to render from them, "
            "or pass an empty --run-dir"
        )
    repo_id, token = config.eval_repo_id, target.token
    cache = run_dir.cache_dir / "from_hub"
    try:
        names = datasets.get_dataset_config_names(repo_id, token=token)
        configs = {
            name: datasets.load_dataset(repo_id, name, token=token, cache_dir=str(cache)) for name in names
        }
    except (HfHubHTTPError, FileNotFoundError, ValueError) as error:
        raise HubError(
            f"cannot load the eval dataset {repo_id} from {target.endpoint}: {describe(error, token)}; "
            "push it with `cot-compress push-eval`"
        ) from None
    models = restore_run_dir_from_eval_dataset(run_dir, configs)
    missing = [model for model in config.model_keys if model not in models]
    if missing:
        raise ArtifactError(
            f"the eval dataset {repo_id} has no config for {', '.join(missing)}: run push-eval"
        )
    plot_pareto(write_summary(run_dir, study=config.name, models=config.model_keys), run_dir.pareto_png)
    downloads = [
        (config.adapter_repo_id(n), branch, "training.json", run_dir.training_json(model))
        for n in config.levels
        for (model, _), branch in zip(config.adapter_models(n), adapter_branches(config, n), strict=True)
    ]
    downloads += [(config.rl_repo_id(n), MAIN, "training.json", run_dir.rl_training_json(n)) for n in config.rl.levels]
    downloads.append((config.adapter_repo_id(config.levels[0]), MAIN, DATA_STATS, run_dir.data_stats))
    if config.tiny_base:  # how the published base was built, which its card states
        downloads.append((config.base_repo_id, MAIN, "build.json", run_dir.base_dir / "build.json"))
    for adapter_repo, branch, name, destination in downloads:
        try:
            path = target.api.hf_hub_download(
                adapter_repo, name, revision=branch, cache_dir=cache, token=token
            )
        except HfHubHTTPError as error:
            raise HubError(
                f"cannot download {name} of {adapter_repo} (branch {branch}): {describe(error, token)}; "
                "run `cot-compress publish`"
            ) from None
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(Path(path).read_bytes())
    echo(f"Restored {len(models)} model(s), training.json and data stats from {target.endpoint}")
