"""The `cot-compress` command line. Thin: each command parses options and calls one function per stage.

Errors from the library (`CotCompressError`) become one line on stderr and exit code 2; the library itself
never exits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from eval_artifacts.study.errors import CotCompressError

if TYPE_CHECKING:  # the publishing modules load huggingface_hub and datasets: only the commands import them
    from hub_tools.publishing.commands import Scope

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Study config YAML (default: the embedded tiny study).",
)
RUN_DIR_OPTION = click.option(
    "--run-dir", type=click.Path(path_type=Path, file_okay=False), default=None, help="Override the run directory."
)
DATA_DIR_OPTION = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Use a local folder of train.jsonl/test.jsonl as the data source.",
)


def parse_int_list(value: str | None, what: str) -> list[int] | None:
    """Parse '1,3,5' into [1, 3, 5]; None stays None."""
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {value!r}") from None


def load_study(
    config_path: Path | None,
    run_dir: Path | None = None,
    data_dir: Path | None = None,
    *,
    endpoint: str | None = None,
    namespace: str | None = None,
):
    """Load the config and apply the command-line overrides; None leaves the config's value.

    ``--endpoint`` and ``--namespace`` are folded in here, once: the cards link the Hub they are published to,
    so every later step reads the Hub from the config alone.
    """
    from eval_artifacts.study.config import load_config

    config = load_config(config_path)
    overrides: dict[str, object] = {"run_dir": run_dir, "hub.endpoint": endpoint, "hub.namespace": namespace}
    if data_dir is not None:
        overrides.update({"data.source": "local", "data.local_dir": data_dir})
    return config.with_overrides(**overrides)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CotCompressError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)


@click.group(cls=_Group)
@click.version_option(package_name="cot-compress")
def main() -> None:
    """Run a chain-of-thought compression study end to end and publish it to the Hugging Face Hub."""


@main.command("prepare-data")
@CONFIG_OPTION
@RUN_DIR_OPTION
@DATA_DIR_OPTION
@click.option("--levels", default=None, help="Comma-separated levels (default: the config's).")
@click.option("--teacher", type=click.Choice(["rule", "model"]), default=None, help="Override the config's teacher.")
def prepare_data_command(config_path, run_dir, data_dir, levels, teacher):
    """Write teacher-written SFT data per level and data/stats.json."""
    from eval_artifacts.rundir import RunDir
    from training import prepare_data

    config = load_study(config_path, run_dir, data_dir)
    prepare_data.run(config, RunDir(config.run_dir), levels=parse_int_list(levels, "--levels"), teacher=teacher)


from hub_tools.hub_cli import hub  # noqa: E402

main.add_command(hub)


@main.command("render-cards")
@CONFIG_OPTION
@RUN_DIR_OPTION
@click.option(
    "--templates",
    "templates_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder with your own adapter_card.md.j2, eval_dataset_card.md.j2, collection_note.txt.j2 and base_card.md.j2.",
)
@click.option("--check", is_flag=True, help="Exit with code 2 on the first card that fails validation.")
def render_cards_command(config_path, run_dir, templates_dir, check):
    """Render every card into cards/<repo>/README.md from the eval artifacts, and validate them."""
    from eval_artifacts.rundir import RunDir
    from hub_tools import cards

    config = load_study(config_path, run_dir)
    study = RunDir(config.run_dir)
    art = cards.load_artifacts(config, study)  # links and commits: what the last publish recorded
    rendered = cards.render_study_cards(config, study, templates_dir=templates_dir, artifacts=art)
    notes = cards.render_collection_notes(config, study, templates_dir=templates_dir, artifacts=art)
    for path in cards.write_cards(study, rendered):
        click.echo(f"wrote {path}")
    if check:
        cards.validate_all(rendered, config=config, run_dir=study, notes=notes, artifacts=art)
        click.echo(f"{len(rendered)} cards and {len(notes)} collection notes are valid")
        return
    for problem in cards.all_problems(rendered, config=config, run_dir=study, notes=notes, artifacts=art):
        click.echo(f"problem: {problem}", err=True)


def options(*decorators):
    """Several click options as one decorator, applied in the order listed (as ``--help`` shows them)."""

    def decorate(command):
        for option in reversed(decorators):
            command = option(command)
        return command

    return decorate


def training_options(levels_default: str, adapter: str):
    """The options of a training stage (``train``, ``rl``): which levels, resume, force."""
    return options(
        CONFIG_OPTION,
        RUN_DIR_OPTION,
        click.option("--levels", default=None, help=f"Comma-separated levels (default: {levels_default})."),
        click.option("--resume", is_flag=True, help="Continue each level from its last checkpoint."),
        click.option("--force", is_flag=True, help=f"Retrain levels whose {adapter} is already up to date."),
    )


@main.command("train")
@training_options("the config's", "adapter")
def train_command(config_path, run_dir, levels, resume, force):
    """Train one LoRA adapter per level into adapters/level_<n>/ (with training.json)."""
    from training import sft

    config = load_study(config_path, run_dir)
    sft.run(config, config.run_dir, levels=parse_int_list(levels, "--levels"), resume=resume, force=force)


@main.command("rl")
@training_options("the config's rl.levels", "RL adapter")
def rl_command(config_path, run_dir, levels, resume, force):
    """Continue each rl.levels SFT adapter with GRPO into adapters/rl_l<n>/ (with training.json)."""
    from training import rl

    config = load_study(config_path, run_dir)
    rl.run(config, config.run_dir, levels=parse_int_list(levels, "--levels"), resume=resume, force=force)


# ---- publishing: publish, push-eval, regenerate-cards (hub_tools/publishing/)
publishing_options = options(
    CONFIG_OPTION,
    RUN_DIR_OPTION,
    click.option("--endpoint", default=None, metavar="URL|local", help="Hub to publish to (default: the config's)."),
    click.option("--namespace", default=None, metavar="NS", help="User or org to publish under."),
    click.option("--dry-run", is_flag=True, help="Print the plan and README diffs; push nothing."),
    click.option("--create-pr", is_flag=True, help="Open (or update) one PR per changed repo."),
    click.option(
        "--templates",
        "templates_dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="Folder with your own card and note templates (as for render-cards).",
    ),
)
"""The options every publishing command takes."""


def run_publishing(
    scope: Scope,
    config_path: Path | None,
    run_dir: Path | None,
    endpoint: str | None,
    namespace: str | None,
    **options: object,
) -> None:
    """Load the study with the Hub overrides, open its Hub and run one publishing command on it."""
    from eval_artifacts.rundir import RunDir
    from hub_tools.publishing.commands import PublishOptions, open_target, publish

    config = load_study(config_path, run_dir, endpoint=endpoint, namespace=namespace)
    study = RunDir(config.run_dir)
    with open_target(config, study) as target:
        publish(config, study, target=target, scope=scope, options=PublishOptions(**options), echo=click.echo)


@main.command("publish")
@publishing_options
def publish_command(**options):
    """Publish the adapters, the eval dataset and the collection: one commit per changed repo."""
    from hub_tools.publishing.commands import Scope

    run_publishing(Scope.ALL, **options)


@main.command("push-eval")
@publishing_options
def push_eval_command(**options):
    """Push the eval dataset (one config per model plus summary), its card and the plot."""
    from hub_tools.publishing.commands import Scope

    run_publishing(Scope.EVAL, **options)


@main.command("regenerate-cards")
@publishing_options
@click.option(
    "--from-hub", is_flag=True, help="Rebuild an empty run dir's eval results from the published eval dataset."
)
def regenerate_cards_command(**options):
    """Re-render every card and note; push only the READMEs and notes that changed (never weights)."""
    from hub_tools.publishing.commands import Scope

    run_publishing(Scope.CARDS, **options)


@main.command("evaluate")
@CONFIG_OPTION
@RUN_DIR_OPTION
@DATA_DIR_OPTION
@click.option("--models", default=None, help="Comma-separated models, e.g. base,level_1 (default: base and every level).")
@click.option("--seeds", default=None, help="Comma-separated seeds (default: the config's eval.seeds).")
def evaluate_command(config_path, run_dir, data_dir, models, seeds):
    """Generate on the test set for base and each adapter, then write metrics, summary.json and pareto.png."""
    from training import distributed, evaluate

    config = load_study(config_path, run_dir, data_dir)
    names = [name.strip() for name in models.split(",") if name.strip()] if models else None
    summary = evaluate.run(config, config.run_dir, models=names, seeds=parse_int_list(seeds, "--seeds"))
    if not distributed.current().is_main:  # under accelerate launch / torchrun, rank 0 reports
        return
    for row in summary["models"]:
        lo, hi = row["ci95"]
        click.echo(
            f"{row['model']:<14} accuracy {row['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] "
            f"(lenient {row['accuracy_lenient']:.1%})  "
            f"think tokens {row['think_tokens']['mean']:.1f}  completion tokens {row['completion_tokens']['mean']:.1f}"
        )


@main.command("train-and-publish")
@publishing_options
@DATA_DIR_OPTION
@click.option(
    "--force-stage",
    "force_stages",
    multiple=True,
    type=click.Choice(["prepare-data", "train", "evaluate", "render-cards"]),
    help="Rerun this stage even if its outputs are current (repeatable).",
)
def train_and_publish_command(config_path, run_dir, endpoint, namespace, data_dir, force_stages, **options):
    """Prepare data, train, evaluate, render cards and publish; stages that are current are skipped."""
    from eval_artifacts.rundir import RunDir
    from eval_artifacts.study.config import LOCAL_ENDPOINT
    from eval_artifacts.summary import read_summary
    from hub_tools import cards
    from hub_tools.cards.format import branch_of
    from hub_tools.pipeline import run_stages
    from hub_tools.publishing.commands import PublishOptions, Scope, open_target, publish

    config = load_study(config_path, run_dir, data_dir, endpoint=endpoint, namespace=namespace)
    study = RunDir(config.run_dir)
    options = PublishOptions(**options)
    # Opened (and the token checked) before the first stage, so a token that cannot publish fails in seconds,
    # not after hours of training; the publish then uses the same Hub.
    with open_target(config, study) as target:
        run_stages(
            config,
            study,
            force_stages=tuple(force_stages),
            templates_dir=options.templates_dir,
            echo=click.echo,
        )
        click.echo("[publish] running")
        report = publish(config, study, target=target, scope=Scope.ALL, options=options, echo=click.echo)
    from hub_tools.hub_client import LOCAL_PAGES_PORT

    local = config.hub.endpoint == LOCAL_ENDPOINT

    def shown(url: str) -> str:
        # The embedded hub stopped with the run; local URLs are those of `hub serve` below once it runs.
        return f"http://127.0.0.1:{LOCAL_PAGES_PORT}{url.removeprefix(report.endpoint)}" if local else url

    urls = {(result.repo_id, result.branch): shown(result.url) for result in report.repos}
    click.echo("")
    click.echo(f"{'model':<16} {'accuracy [95% CI]':<26} {'think tokens':>12}  repo")
    for row in read_summary(study)["models"]:
        lo, hi = row["ci95"]
        if row["kind"] == "adapter":
            repo_id = cards.adapter_repo_of(config, row["model"])
            where = urls.get((repo_id, branch_of(row["model"])), repo_id)
        else:  # the stock model, alone or given a level's prompt
            where = config.base_model.id + (" (prompt only)" if row["kind"] == "prompt" else "")
        accuracy = f"{row['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
        click.echo(f"{row['model']:<16} {accuracy:<26} {row['think_tokens']['mean']:>12.2f}  {where}")
    eval_url = urls.get((config.eval_repo_id, "main"), config.eval_repo_id)
    click.echo(f"eval dataset: {eval_url}")
    if local and report.collection_url:
        click.echo(f"collection:   {shown(report.collection_url)}")
    if local:
        click.echo(
            f"Open the pages: cot-compress hub serve --data {study.hub_data_dir} --port {LOCAL_PAGES_PORT}"
        )


if __name__ == "__main__":  # `accelerate launch -m hub_tools.cli …` / `python -m hub_tools.cli …`
    main()
