"""``kill -9`` at named points of prepare-data, train, evaluate and publish; a rerun converges, nothing is lost.

Each kill is a real SIGKILL (``eval_artifacts.faultpoints.maybe_crash``, armed by ``COT_COMPRESS_KILL_AT``):
no ``finally`` runs, nothing is flushed. prepare-data, train and evaluate are killed in a forked child of the
test process (the heavy imports are already done, so a kill costs a second, not a fresh interpreter); publish
is killed as the real ``cot-compress publish`` CLI in a subprocess, against a local hub living in this process.
The rerun (what a user does: the same command again, ``train --resume``) must reach the artifacts of an
uninterrupted run, and every complete record written before the kill must still be there exactly once.

Torch runs single-threaded here: a forked child must not enter OpenMP regions of its parent, and the uninterrupted
run, the killed run and the rerun must all reduce floats in the same order for outputs to match byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fixtures_artifacts import write_fixture_study
from helpers import build_training_base, checkpoint_kill_hook, edited_templates, hub_state, killed_at, repos
from hubtools import clients_for, isolated_hf_caches, publish_to
from safetensors.torch import load_file

from eval_artifacts import faultpoints
from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import load_config
from hub_tools.local_hub import running_hub
from hub_tools.publishing.commands import Scope
from training import evaluate, prepare_data, sft

CLI = Path(sys.executable).with_name("cot-compress")
TIMING = ("wall_time_s", "tokens_per_s")  # the only training.json fields a rerun may change


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def complete_lines(path: Path) -> list[str]:
    """The records on disk that a reader would accept: complete, newline-terminated lines."""
    if not path.is_file():
        return []
    return [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


# ---------------------------------------------------------------- the study and its uninterrupted run


def untie_head(path: Path) -> Path:
    """Give the saved model at ``path`` its own random output head (std 0.1), in place."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.1
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def untied_training_base(tmp_path_factory) -> Path:
    """The training tests' 2-layer Qwen3 (``helpers.build_training_base``), with its own output head.

    Tied to the (scaled-up) embeddings, the head makes greedy decoding repeat the prompt's last token
    whatever an adapter does, and evaluate rightly refuses adapters that change nothing.
    """
    return untie_head(build_training_base(tmp_path_factory.mktemp("untied_training_base")))


def study(base: Path, run_dir: Path):
    """Two levels, 48 training rows, 8 steps with a checkpoint every 4; 12 test problems in batches of 4."""
    return load_config().with_overrides(
        **{
            "base_model.id": str(base),
            "run_dir": str(run_dir),
            "levels": [1, 2],
            "data.synthetic.n_train": 48,
            "data.synthetic.n_test": 12,
            "training.max_steps": 8,
            "training.batch_size": 8,
            "training.logging_steps": 2,
            "training.save_steps": 4,
            "training.learning_rate": 0.01,
            "eval.max_new_tokens": 12,
            "eval.batch_size": 4,
            "eval.backend": "hf",
        }
    )


@pytest.fixture(scope="module")
def straight(untied_training_base, tmp_path_factory):
    """The uninterrupted run: its run dir after each stage (data, adapters, eval)."""
    root = tmp_path_factory.mktemp("straight")
    config = study(untied_training_base, root / "run")
    run_dir = RunDir(config.run_dir)
    prepare_data.run(config, run_dir)
    shutil.copytree(run_dir.root, root / "after-data")
    sft.run(config, run_dir)
    shutil.copytree(run_dir.root, root / "after-train")
    evaluate.run(config, run_dir)
    return {"config": config, "root": root, "run": run_dir}


def copy_of(straight: dict, stage: str, dest: Path):
    """A run dir holding the uninterrupted run's outputs up to ``stage`` ("" for none), and its config."""
    if stage:
        shutil.copytree(straight["root"] / f"after-{stage}", dest)
    config = straight["config"].with_overrides(run_dir=str(dest))
    return config, RunDir(dest)


# ---------------------------------------------------------------- prepare-data


@pytest.mark.parametrize(
    "point",
    [
        "prepare_data.before_replace:level_1",  # the level file is complete under its temporary name
        "prepare_data.level_written:1",  # level 1 in place, level 2 not started
        "write_json:stats.json",  # every level written, stats not in place
        "wrote_json:stats.json",  # the very end
    ],
)
def test_prepare_data_killed(straight, tmp_path, point):
    config, run_dir = copy_of(straight, "", tmp_path / "run")
    killed_at(point, lambda: prepare_data.run(config, run_dir))
    prepare_data.run(config, run_dir)
    want = files_under(straight["root"] / "after-data" / "data")
    assert files_under(run_dir.data_dir) == want  # no temporary file left either


# ---------------------------------------------------------------- train


def weights(run_dir: RunDir, level: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir.adapter_dir(level) / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "point",
    [
        "train.checkpoint_saved#1",  # level 1 at step 4 of 8
        "train.checkpoint_saved#3",  # level 1 done, level 2 at step 4
        "write_json:training.json",  # level 1 adapter saved, training.json not in place
        "wrote_json:training.json",  # level 1 recorded, its checkpoints not yet removed
    ],
)
def test_train_killed_then_resumed(straight, tmp_path, point):
    config, run_dir = copy_of(straight, "data", tmp_path / "run")

    def train():
        checkpoint_kill_hook()
        sft.run(config, run_dir)

    killed_at(point, train)
    sft.run(config, run_dir, resume=True)  # `cot-compress train --resume`

    want_dir = RunDir(straight["root"] / "after-train")
    for level in config.levels:
        got, want = weights(run_dir, level), weights(want_dir, level)
        assert got.keys() == want.keys()
        for name in want:  # a resumed run matches to float rounding (test_sft states the same tolerance)
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
        record = json.loads(run_dir.training_json(level).read_text())
        expected = json.loads(want_dir.training_json(level).read_text())
        for key in TIMING:
            record.pop(key), expected.pop(key)
        curve, expected_curve = record.pop("loss_curve"), expected.pop("loss_curve")
        assert [p["step"] for p in curve] == [p["step"] for p in expected_curve]
        assert [p["loss"] for p in curve] == pytest.approx([p["loss"] for p in expected_curve], rel=1e-5)
        assert record == expected
        assert sorted(p.name for p in run_dir.adapter_dir(level).iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "training.json",
        ], "a checkpoint or a half-saved file was left behind"


# ---------------------------------------------------------------- evaluate


EVAL_POINTS = [
    "append_jsonl_torn:base",  # half of the first record on disk
    "evaluate.batch_appended:base",  # first batch of base complete
    "append_jsonl_torn:level_1#6",  # inside level 1's second batch: one complete record, then half a line
    "evaluate.batch_appended:level_2#3",  # every batch but the last
    "evaluate.generated",  # every sample written, no metrics yet
    "write_json:metrics.json#2",  # base's metrics in place, level 1's under a temporary name
    "write_json:summary.json",
    "wrote_json:summary.json",  # only the plot is missing
]


@pytest.mark.parametrize("point", EVAL_POINTS)
def test_evaluate_killed_then_rerun(straight, tmp_path, point):
    config, run_dir = copy_of(straight, "train", tmp_path / "run")
    killed_at(point, lambda: evaluate.run(config, run_dir))
    written = {model: complete_lines(run_dir.samples(model)) for model in config.model_keys}
    evaluate.run(config, run_dir)

    want = straight["run"]
    for model in config.model_keys:
        lines = run_dir.samples(model).read_text().splitlines(keepends=True)
        assert sorted(lines) == sorted(want.samples(model).read_text().splitlines(keepends=True))
        ids = [json.loads(line)["id"] for line in lines]
        assert len(ids) == len(set(ids)) == 12  # nothing duplicated
        assert all(lines.count(line) == 1 for line in written[model])  # nothing written before the kill lost
        assert run_dir.metrics(model).read_bytes() == want.metrics(model).read_bytes()
    assert run_dir.summary.read_bytes() == want.summary.read_bytes()
    assert run_dir.pareto_png.read_bytes() == want.pareto_png.read_bytes()


# ---------------------------------------------------------------- publish (the real CLI, in a subprocess)


@pytest.fixture(scope="module")
def publishing(tmp_path_factory):
    """A fixture study (levels 1-2), its config file, and the hub state a clean publish reaches."""
    root = tmp_path_factory.mktemp("publish")
    config = load_config().with_overrides(run_dir=str(root / "study"), levels=[1, 2])
    write_fixture_study(root / "study", config=config, n_problems=20)
    raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tiny.yaml").read_text())
    raw["levels"] = [1, 2]
    (root / "study.yaml").write_text(yaml.safe_dump(raw))
    templates = edited_templates(root / "templates")
    finals = {}
    for name, steps in {"fresh": [None], "update": [None, templates]}.items():
        run_dir = RunDir(root / f"ref-{name}")
        shutil.copytree(root / "study", run_dir.root)
        with running_hub(root / f"hub-{name}") as hub, clients_for(hub), isolated_hf_caches(root / "cache"):
            for templates_dir in steps:
                publish_to(hub.endpoint, config, run_dir, token=hub.default_token, scope=Scope.ALL,
                           templates_dir=templates_dir, echo=lambda line: None)  # fmt: skip
            finals[name] = hub_state(hub, config)
    return {"root": root, "config": config, "templates": templates, "finals": finals}


def cli_publish(publishing: dict, run_dir: RunDir, hub, point: str, *extra: str) -> None:
    env = {
        **os.environ,
        "HF_TOKEN": hub.default_token,
        "HF_HOME": str(run_dir.root.parent / "hf-home"),
        "HF_HUB_DISABLE_XET": "1",
        faultpoints.ENV: point,
    }
    args = [str(CLI), "publish", "--config", str(publishing["root"] / "study.yaml")]
    args += ["--run-dir", str(run_dir.root), "--endpoint", hub.endpoint, *extra]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, f"{point} was never reached: {done.stdout}{done.stderr}"


PUBLISH_POINTS = [
    ("fresh", "publish.collection_created"),  # the collection exists, state.json does not know it
    ("fresh", "publish.repo_created:tiny-cot-l1"),  # an empty repo
    ("fresh", "publish.after_commit:tiny-cot-l1"),  # committed, not recorded
    ("fresh", "publish.before_commit:tiny-cot-l2"),  # level 2 uploaded nothing yet
    ("fresh", "publish.after_commit:tiny-cot-eval"),  # every repo committed, collection still empty
    ("fresh", "collection.item_added#2"),  # two of three items
    ("fresh", "write_json:state.json#3"),  # a state update under its temporary name
    ("update", "publish.before_commit:tiny-cot-eval"),  # adapters updated, eval dataset not
    ("update", "collection.note_updated#1"),  # one of three notes changed
]


@pytest.mark.parametrize(("scenario", "point"), PUBLISH_POINTS, ids=[p for _, p in PUBLISH_POINTS])
def test_publish_killed_then_rerun(publishing, tmp_path, scenario, point):
    config = publishing["config"].with_overrides(run_dir=str(tmp_path / "run"))
    run_dir = RunDir(tmp_path / "run")
    shutil.copytree(publishing["root"] / "study", run_dir.root)
    templates = publishing["templates"]
    with running_hub(tmp_path / "hub") as hub, clients_for(hub), isolated_hf_caches(tmp_path / "cache"):
        extra = ()
        if scenario == "update":
            publish_to(
                hub.endpoint,
                config,
                run_dir,
                token=hub.default_token,
                scope=Scope.ALL,
                echo=lambda line: None,
            )
            extra = ("--templates", str(templates))
        before, final = hub_state(hub, config), publishing["finals"][scenario]
        cli_publish(publishing, run_dir, hub, point, *extra)
        # whatever the kill left, each head is the one before, a bare new repo or the complete new commit
        # (hub_state also checks that every blob a head names is stored with its hash)
        for repo_id, files in hub_state(hub, config)["repos"].items():
            bare = files is not None and set(files) == {".gitattributes"}
            assert bare or files in (before["repos"][repo_id], final["repos"][repo_id]), (
                f"{repo_id} is partial"
            )

        options = {"templates_dir": templates} if scenario == "update" else {}
        publish_to(hub.endpoint, config, run_dir, token=hub.default_token, scope=Scope.ALL,
                   echo=lambda line: None, **options)  # fmt: skip
        assert hub_state(hub, config) == final
        published = {"fresh": 2, "update": 3}[scenario]  # the repo's initial commit, then one per publish
        for repo_type, repo_id in repos(config):
            assert hub.commit_count(repo_type, repo_id) == published, f"{repo_id}: a commit was duplicated"
        mark = len(hub.request_log)
        again = publish_to(hub.endpoint, config, run_dir, token=hub.default_token, scope=Scope.ALL,
                           echo=lambda line: None, **options)  # fmt: skip
        assert again.commits == 0 and all(e["method"] in ("GET", "POST") for e in hub.request_log[mark:])
        state = json.loads(run_dir.publish_state.read_text())["hubs"][hub.endpoint]
        for repo_type, repo_id in repos(config):
            assert state["repos"][repo_id]["commit"] == hub.storage.resolve(repo_type, repo_id, "main")[0]


def test_publish_to_the_embedded_hub_killed_with_it(publishing, tmp_path):
    """``--endpoint local``: the kill takes the embedded hub down mid-publish; its storage stays consistent."""
    config = publishing["config"].with_overrides(run_dir=str(tmp_path / "run"))
    run_dir = RunDir(tmp_path / "run")
    shutil.copytree(publishing["root"] / "study", run_dir.root)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        faultpoints.ENV: "publish.after_commit:tiny-cot-l2",
    }
    env.pop("HF_TOKEN", None)
    args = [
        str(CLI),
        "publish",
        "--config",
        str(publishing["root"] / "study.yaml"),
        "--run-dir",
        str(run_dir.root),
    ]
    done = subprocess.run(
        [*args, "--endpoint", "local"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    env.pop(faultpoints.ENV)
    rerun = subprocess.run(
        [*args, "--endpoint", "local"], env=env, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "tiny-cot-l1: unchanged" in rerun.stdout and "tiny-cot-l2: unchanged" in rerun.stdout
    assert "tiny-cot-eval: created" in rerun.stdout
    with running_hub(run_dir.hub_data_dir) as hub, clients_for(hub), isolated_hf_caches(tmp_path / "cache"):
        state = hub_state(hub, config)
        final = publishing["finals"]["fresh"]
        for repo_type, repo_id in repos(config):
            assert hub.commit_count(repo_type, repo_id) == 2
            ours = {k: v for k, v in state["repos"][repo_id].items() if k != "README.md"}
            assert ours == {k: v for k, v in final["repos"][repo_id].items() if k != "README.md"}
        assert [[item[:2] for item in c] for c in state["collections"]] == [
            [item[:2] for item in c] for c in final["collections"]
        ]
