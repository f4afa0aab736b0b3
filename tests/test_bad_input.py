"""Bad input through the real CLI: one actionable line on stderr, exit code 2, and nothing pushed.

One table, one row per case: what is broken (config, template, artifact, repo id, token, data file), the
command, and a fragment of the one-line error. Publishing cases run against a local hub whose request log must
hold no write at all afterwards. Cases already covered elsewhere are not repeated here (tests/test_config.py:
24 config files, tests/test_prepare_data.py: a GSM8K row without 'answer' and an unknown --levels,
tests/test_publish.py: bad/missing/read-only tokens and namespace through the library, stale accuracy, a missing
adapter file, a hand-typed number; tests/test_cards.py: template problems and sandbox escapes at render time).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hubtools import clients_for, isolated_hf_caches

from eval_artifacts.rundir import RunDir
from hub_tools.cli import main
from hub_tools.local_hub import running_hub

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
USERS = {"cot-compress": "hf_writer_token", "stranger": "hf_stranger_token", "reader": "hf_reader_token"}
# Requests that change nothing (paths-info and validate-yaml are POSTs that only read).
READ_ONLY = re.compile(r"^(GET|HEAD) |^POST /api/(validate-yaml|(models|datasets)/.+/paths-info/.+)$")


@dataclass
class Case:
    """``setup(ctx)`` breaks something and returns the CLI arguments; the error line must contain ``message``."""

    kind: str
    name: str
    setup: Callable[[Ctx], list[str]]
    message: str
    token: str | None = "hf_writer_token"


@dataclass
class Ctx:
    tmp: Path
    run: RunDir
    endpoint: str

    def config(self, **changes) -> Path:
        """The tiny config (levels 1-2) with dotted-key ``changes``, written to a file."""
        raw = yaml.safe_load(TINY.read_text())
        raw["levels"] = [1, 2]
        for key, value in changes.items():
            *parents, last = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        path = self.tmp / "study.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def publish(self, *extra: str, config: Path | None = None) -> list[str]:
        config = config or self.config()
        args = ["publish", "--config", str(config), "--run-dir", str(self.run.root)]
        return [*args, "--endpoint", self.endpoint, *extra]

    def templates(self, name: str, text: str, *, append: bool = True) -> Path:
        folder = self.tmp / "templates"
        if not folder.exists():
            shutil.copytree(Path(str(resources.files("cards_templates"))), folder)
        path = folder / name
        path.write_text((path.read_text() if append else "") + text)
        return folder

    def data_dir(self, train: str | None) -> list[str]:
        folder = self.tmp / "gsm8k"
        folder.mkdir()
        if train is not None:
            (folder / "train.jsonl").write_text(train)
        (folder / "test.jsonl").write_text('{"question": "1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n')
        args = ["prepare-data", "--config", str(self.config()), "--run-dir", str(self.tmp / "fresh")]
        return [*args, "--data-dir", str(folder)]


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def truncate_last_line(path: Path) -> None:
    data = path.read_bytes().rstrip(b"\n")
    path.write_bytes(data[: data.rfind(b"\n") + 1 + 40])


def edit_first_sample(path: Path, change: Callable[[dict], None]) -> None:
    lines = path.read_text().splitlines()
    row = json.loads(lines[0])
    change(row)
    path.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")


def then(action, result):
    """Run ``action`` (a side effect) and return ``result``: keeps the table rows one expression each."""
    action()
    return result


GOOD_ROW = '{"question": "Tom has 3 pens and buys 2. How many?", "answer": "3 + 2 = 5\\n#### 5"}\n'

CASES = [
    # ---- configs
    Case("config", "private not a bool", lambda c: c.publish(config=c.config(**{"hub.private": "maybe"})),
         "'hub.private'"),
    Case("config", "levels as a string", lambda c: c.publish(config=c.config(levels="1,2")), "'levels'"),
    Case("config", "tab-indented YAML", lambda c: c.publish(config=then(
        lambda: (c.tmp / "tab.yaml").write_text("name: tiny\nhub:\n\tnamespace: x\n"), c.tmp / "tab.yaml")),
         "not valid YAML"),
    Case("config", "eval batch size 0", lambda c: c.publish(config=c.config(**{"eval.batch_size": 0})),
         "'eval.batch_size'"),
    Case("config", "evaluate an unknown model", lambda c: ["evaluate", "--run-dir", str(c.run.root),
         "--models", "level_9"], "unknown model 'level_9'"),
    # ---- templates
    Case("template", "Jinja syntax error", lambda c: c.publish("--templates", str(
        c.templates("adapter_card.md.j2", "\n{% if %}\n"))), "template adapter_card.md.j2 line"),
    Case("template", "syntax error in an included template", lambda c: c.publish("--templates", str(then(
        lambda: (c.templates("adapter_card.md.j2", '\n{% include "part.j2" %}\n') / "part.j2").write_text(
            "{% for %}\n"), c.tmp / "templates"))), "template part.j2 (included by adapter_card.md.j2) line 1"),
    Case("template", "template that includes itself", lambda c: c.publish("--templates", str(c.templates(
        "adapter_card.md.j2", '\n{% include "adapter_card.md.j2" %}\n'))), "includes itself"),
    Case("template", "misspelled variable", lambda c: c.publish("--templates", str(
        c.templates("eval_dataset_card.md.j2", "\n{{ headline.acuracy }}\n"))), "undefined variable"),
    Case("template", "note over 500 characters", lambda c: c.publish("--templates", str(
        c.templates("collection_note.txt.j2", "word " * 120))), "the Hub allows 500"),
    Case("template", "templates folder without templates", lambda c: c.publish("--templates", str(
        then(lambda: (c.tmp / "empty").mkdir(), c.tmp / "empty"))), "adapter_card.md.j2 is missing"),
    Case("template", "raw HTML in the card", lambda c: c.publish("--templates", str(
        c.templates("adapter_card.md.j2", "\n<div>hi</div>\n"))), "raw HTML"),
    # ---- artifacts
    Case("artifact", "truncated samples.jsonl", lambda c: then(
        lambda: truncate_last_line(c.run.samples("level_1")), c.publish()), "truncated"),
    Case("artifact", "missing samples.jsonl", lambda c: then(
        lambda: c.run.samples("base").unlink(), c.publish()), "base has no samples"),
    Case("artifact", "missing metrics.json", lambda c: then(
        lambda: c.run.metrics("level_2").unlink(), c.publish()), "metrics not found"),
    Case("artifact", "metrics.json not JSON", lambda c: then(
        lambda: c.run.metrics("level_1").write_text('{"accuracy": 0.5'), c.publish()), "not valid JSON"),
    Case("artifact", "metrics disagree: n_correct", lambda c: then(
        lambda: edit_json(c.run.metrics("base"), lambda m: m.update(n_correct=m["n_correct"] + 1)), c.publish()),
         "disagree with their samples"),
    Case("artifact", "metrics disagree: think tokens", lambda c: then(
        lambda: edit_json(c.run.metrics("level_2"), lambda m: m["think_tokens"].update(mean=1.0)), c.publish()),
         "disagree with their samples"),
    Case("artifact", "sample with a non-boolean 'correct'", lambda c: then(
        lambda: edit_first_sample(c.run.samples("level_1"), lambda r: r.update(correct="yes")), c.publish()),
         "field 'correct' must be bool"),
    Case("artifact", "sample for another model", lambda c: then(
        lambda: edit_first_sample(c.run.samples("level_2"), lambda r: r.update(model="level_1")), c.publish()),
         "field 'level' is 2 but model 'level_1'"),
    Case("artifact", "duplicated sample", lambda c: then(
        lambda: c.run.samples("base").write_text(c.run.samples("base").read_text() * 2), c.publish()),
         "duplicates id"),
    Case("artifact", "missing summary.json", lambda c: then(lambda: c.run.summary.unlink(), c.publish()),
         "summary.json is missing"),
    Case("artifact", "missing pareto.png", lambda c: then(lambda: c.run.pareto_png.unlink(), c.publish()),
         "pareto.png is missing"),
    Case("artifact", "missing training.json", lambda c: then(lambda: c.run.training_json(2).unlink(),
         c.publish()), "level_2 has no training.json"),
    Case("artifact", "training.json not JSON", lambda c: then(lambda: c.run.training_json(1).write_text("{"),
         c.publish()), "training.json of level 1"),
    Case("artifact", "missing adapter_config.json", lambda c: then(
        lambda: (c.run.adapter_dir(1) / "adapter_config.json").unlink(), c.publish()),
         "level_1 has no adapter_config.json"),
    Case("artifact", "missing data/stats.json", lambda c: then(lambda: c.run.data_stats.unlink(), c.publish()),
         "data stats not found"),
    Case("artifact", "train without SFT data", lambda c: ["train", "--config", str(c.config()), "--run-dir",
         str(c.tmp / "empty-run")], "no SFT data for level 1"),
    # ---- repo ids
    Case("repo id", "namespace with a space", lambda c: c.publish("--namespace", "bad name"), "namespace"),
    Case("repo id", "namespace with '--'", lambda c: c.publish("--namespace", "a--b"), "namespace"),
    Case("repo id", "namespace with a slash", lambda c: c.publish("--namespace", "org/team"), "namespace"),
    Case("repo id", "namespace the token cannot write", lambda c: c.publish("--namespace", "stranger"),
         "cannot write to namespace 'stranger'"),
    Case("repo id", "prefix over 96 characters", lambda c: c.publish(config=c.config(**{"hub.repo_prefix":
         "p" * 97})), "hub.repo_prefix"),
    Case("repo id", "endpoint neither local nor http", lambda c: ["publish", "--run-dir", str(c.run.root),
         "--endpoint", "ftp://hub.example"], "neither 'local' nor an http(s) URL"),
    Case("repo id", "endpoint nobody listens on", lambda c: ["publish", "--config", str(c.config()), "--run-dir",
         str(c.run.root), "--endpoint", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
    # ---- tokens
    Case("token", "missing", lambda c: c.publish(), "no Hugging Face token", token=None),
    Case("token", "read-only", lambda c: c.publish(), "is read-only", token="hf_reader_token"),
    Case("token", "a stranger's, for the study's namespace", lambda c: c.publish(),
         "cannot write to namespace 'cot-compress'", token="hf_stranger_token"),
    Case("token", "empty string", lambda c: c.publish(), "no Hugging Face token", token=""),
    # ---- data files (GSM8K rows)
    Case("data", "row that is not JSON", lambda c: c.data_dir(GOOD_ROW + "{question: 1}\n"), "line 2 is not valid JSON"),
    Case("data", "answer without '####'", lambda c: c.data_dir(
        GOOD_ROW + '{"question": "q?", "answer": "it is 4"}\n'), "row 2: GSM8K answer has no parsable"),
    Case("data", "final answer not a number", lambda c: c.data_dir(
        '{"question": "q?", "answer": "#### four"}\n'), "row 1: GSM8K answer has no parsable"),
    Case("data", "question not a string", lambda c: c.data_dir('{"question": 12, "answer": "#### 4"}\n'),
         "'question'"),
    Case("data", "row that is a list", lambda c: c.data_dir(GOOD_ROW + '["q", "#### 4"]\n'), "row 2"),
    Case("data", "no train.jsonl", lambda c: c.data_dir(None), "no train.jsonl"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}: {c.name}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_pushes_nothing(case, fixture_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no login cache to fall back on
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run = RunDir(tmp_path / "run")
    shutil.copytree(fixture_run, run.root)
    with (
        running_hub(tmp_path / "hub", users=USERS, read_only_tokens={"hf_reader_token"}) as hub,
        clients_for(hub),
        isolated_hf_caches(tmp_path / "cache"),
    ):
        args = case.setup(Ctx(tmp_path, run, hub.endpoint))
        env = {"HF_TOKEN": case.token} if case.token is not None else {}
        result = CliRunner().invoke(main, args, env=env)
        writes = [f"{e['method']} {e['path']}" for e in hub.request_log]
        assert [w for w in writes if not READ_ONLY.match(w)] == []
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.message in lines[0], lines[0]
    if case.token:
        assert case.token not in result.output + result.stderr
    assert not run.publish_state.exists()


def test_train_and_publish_checks_the_hub_before_any_stage(tmp_path, monkeypatch):
    """A token that cannot publish fails in seconds, before data preparation, training and evaluation."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run = RunDir(tmp_path / "run")
    with (
        running_hub(tmp_path / "hub", users=USERS, read_only_tokens={"hf_reader_token"}) as hub,
        clients_for(hub),
        isolated_hf_caches(tmp_path / "cache"),
    ):
        config = Ctx(tmp_path, run, hub.endpoint).config()
        args = ["train-and-publish", "--config", str(config), "--run-dir", str(run.root), "--endpoint", hub.endpoint]
        for token, message in ((None, "no Hugging Face token"), ("hf_reader_token", "is read-only")):
            result = CliRunner().invoke(main, args, env={"HF_TOKEN": token} if token else {})
            assert result.exit_code == 2, (result.output, result.exception)
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and message in lines[0], result.stderr
        writes = [f"{e['method']} {e['path']}" for e in hub.request_log]
        assert [w for w in writes if not READ_ONLY.match(w)] == []
    assert not run.data_stats.exists() and not run.adapter_dir(1).exists() and not run.eval_dir.exists()


def test_the_table_covers_every_kind_with_thirty_cases():
    kinds = {case.kind for case in CASES}
    assert kinds == {"config", "template", "artifact", "repo id", "token", "data"}
    assert len(CASES) >= 30
    assert len({(case.kind, case.name) for case in CASES}) == len(CASES)
