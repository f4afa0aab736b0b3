"""Security: the token never leaks, templates cannot leave their sandbox, model output stays inert on the Hub.

The token scan publishes a whole study with a distinctive token through the real CLI (a subprocess, with
huggingface_hub's debug logging on) and then searches every file of the run directory, stdout, stderr and the
error line of each failing case for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
import yaml
from click.testing import CliRunner
from hubtools import clients_for, isolated_hf_caches
from huggingface_hub import DatasetCard, HfApi, ModelCard
from markdown_it import MarkdownIt

from eval_artifacts.rundir import RunDir
from hub_tools.cli import main
from hub_tools.local_hub import running_hub

SECRET = "hf_SECRET_token_9f3c1e7a5b2d4c6e8a0b"
USERS = {"cot-compress": SECRET, "stranger": "hf_stranger_token"}
CLI = Path(sys.executable).with_name("cot-compress")
TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
HOSTILE = (
    "---\nlicense: evil\nbase_model: attacker/model\n---\n"
    "<script>alert('x')</script><img src=x onerror=alert(1)>\n{{ 7*7 }} {% if true %}jinja{% endif %}\n"
    "````` fence\n# heading\n[link](https://evil.example.com)\n"
)


@pytest.fixture
def study(fixture_run, tmp_path, monkeypatch):
    """A copy of the fixture study, its config file (levels 1-2), and no token or login cache around."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run = RunDir(tmp_path / "run")
    shutil.copytree(fixture_run, run.root)
    raw = yaml.safe_load(TINY.read_text())
    raw["levels"] = [1, 2]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "study.yaml", run


def leaks(root: Path, secret: str = SECRET) -> list[str]:
    """Files under ``root`` holding the secret (as text or bytes)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


# ---------------------------------------------------------------- the token


def test_token_appears_in_no_file_log_or_output_of_a_full_publish(study, tmp_path):
    config_path, run = study
    env = {
        **os.environ,
        "HF_TOKEN": SECRET,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_VERBOSITY": "debug",  # the client's own logging at its most verbose
        "HF_HUB_DISABLE_XET": "1",
    }
    outputs = []
    with running_hub(tmp_path / "hub", users=USERS) as hub:
        base = [
            str(CLI),
            "--config",
            str(config_path),
            "--run-dir",
            str(run.root),
            "--endpoint",
            hub.endpoint,
        ]
        for command in (
            ["publish"],
            ["publish"],
            ["push-eval"],
            ["regenerate-cards"],
            ["publish", "--dry-run"],
        ):
            args = [base[0], *command, *base[1:]]
            done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr
            outputs.append(done.stdout + done.stderr)
        assert hub.commit_count("model", "cot-compress/tiny-cot-l1") == 2  # it really published
        assert "Authorization" not in str(hub.request_log)  # the server's log keeps no headers either
    assert "cot-compress/tiny-cot-l2: created" in outputs[0] and "unchanged" in outputs[1]
    assert [SECRET in text for text in outputs] == [False] * 5
    assert SECRET[3:] not in "".join(outputs)  # not even without its prefix
    assert leaks(run.root) == [] and leaks(tmp_path / "hf-home") == []


FAILURES = {
    "namespace it cannot write": (
        {"args": ["--namespace", "stranger"]},
        "cannot write to namespace 'stranger'",
    ),
    "403 on commit": ({"fault": ("POST", r"/commit/", {"status": 403})}, "HTTP 403"),
    "412 on commit, 3 times": (
        {"fault": ("POST", r"/commit/", {"status": 412, "times": 3})},
        "changed on the Hub since planning",
    ),
    "401 for the token": ({"token": SECRET + "x"}, "was rejected"),
    "500 on whoami, 3 times": (
        {"fault": ("GET", r"whoami", {"status": 500, "times": 3})},
        "cannot check the token",
    ),
    "connection dropped on repo info, 3 times": (
        {"fault": ("GET", r"^/api/models/", {"drop": True, "times": 3})},
        "cannot read cot-compress/",
    ),
    "500 on repo info, 3 times": (
        {"fault": ("GET", r"^/api/models/", {"status": 500, "times": 3})},
        "HTTP 500",
    ),
}


@pytest.mark.parametrize("case", FAILURES, ids=list(FAILURES))
def test_error_text_never_holds_the_token(study, tmp_path, caplog, monkeypatch, case):
    from hub_tools import hub_client

    monkeypatch.setattr(hub_client, "time", SimpleNamespace(sleep=lambda seconds: None))  # retries
    config_path, run = study
    setup, expected = FAILURES[case]
    caplog.set_level("DEBUG")
    with (
        running_hub(tmp_path / "hub", users=USERS) as hub,
        clients_for(hub),
        isolated_hf_caches(tmp_path / "c"),
    ):
        if "fault" in setup:
            method, path, options = setup["fault"]
            hub.faults.add(method, path, **options)
        args = [
            "publish",
            "--config",
            str(config_path),
            "--run-dir",
            str(run.root),
            "--endpoint",
            hub.endpoint,
        ]
        token = setup.get("token", SECRET)
        result = CliRunner().invoke(main, [*args, *setup.get("args", [])], env={"HF_TOKEN": token})
    assert result.exit_code == 2, (result.output, result.exception)
    assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for text in (result.output, result.stderr, caplog.text):
        assert token not in text and SECRET not in text
    assert leaks(run.root, token) == []


# ---------------------------------------------------------------- the template sandbox


ESCAPES = {
    "subclasses walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals of a helper": "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "format string attribute": "{{ '{0.__class__.__init__.__globals__}'.format(study) }}",
    "object dict": "{{ study.__dict__ }}",
    "template context": "{{ self._TemplateReference__context }}",
    "mutating a list": "{% set _ = study.levels.pop() %}",
    "include outside the folder": "{% include '../../../../../../etc/passwd' %}",
    "include an absolute path": "{% include '/etc/passwd' %}",
    "huge range": "{{ range(10 ** 9) | list | length }}",
}


@pytest.mark.parametrize("payload", ESCAPES.values(), ids=list(ESCAPES))
def test_template_escapes_are_refused(study, tmp_path, payload, monkeypatch):
    config_path, run = study
    monkeypatch.chdir(tmp_path)
    templates = tmp_path / "templates"
    shutil.copytree(Path(str(resources.files("cards_templates"))), templates)
    card = templates / "adapter_card.md.j2"
    card.write_text(card.read_text() + f"\n{payload}\n")
    for command in ("render-cards", "publish"):
        args = [
            command,
            "--config",
            str(config_path),
            "--run-dir",
            str(run.root),
            "--templates",
            str(templates),
        ]
        if command == "publish":
            args += ["--endpoint", "local"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (result.output, result.exception)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: template adapter_card.md.j2"), result.stderr
        assert "root:" not in result.output + result.stderr  # /etc/passwd was not read
    assert not (tmp_path / "PWNED").exists()
    assert not run.hub_data_dir.exists() or not any(run.hub_data_dir.rglob("refs.json"))  # nothing published


# ---------------------------------------------------------------- hostile model output, read back from the Hub


def test_hostile_model_output_is_inert_in_the_published_cards(study, tmp_path):
    config_path, run = study
    for model in ("level_1", "level_2", "base"):
        path = run.samples(model)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row["completion"] = HOSTILE + row["completion"]
            row["question"] = HOSTILE + row["question"]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = yaml.safe_load(config_path.read_text())
    raw["title"] = "---\nlicense: evil\n--- <script>x</script> {{ 7*7 }}"
    config_path.write_text(yaml.safe_dump(raw))

    with (
        running_hub(tmp_path / "hub", users=USERS) as hub,
        clients_for(hub),
        isolated_hf_caches(tmp_path / "c"),
    ):
        args = [
            "publish",
            "--config",
            str(config_path),
            "--run-dir",
            str(run.root),
            "--endpoint",
            hub.endpoint,
        ]
        result = CliRunner().invoke(main, args, env={"HF_TOKEN": SECRET})
        assert result.exit_code == 0, result.stderr
        api = HfApi(endpoint=hub.endpoint, token=SECRET)
        for repo_id, repo_type, card_class in (
            ("cot-compress/tiny-cot-l1", "model", ModelCard),
            ("cot-compress/tiny-cot-eval", "dataset", DatasetCard),
        ):
            path = api.hf_hub_download(repo_id, "README.md", repo_type=repo_type, cache_dir=tmp_path / "dl")
            text = Path(path).read_text()
            assert text == run.card(repo_id.split("/")[1]).read_text()  # what was rendered is what was pushed
            card = card_class(text)
            metadata = card.data.to_dict()
            assert metadata["license"] == "mit" and "attacker" not in json.dumps(metadata)
            if repo_type == "model":
                assert metadata["base_model"] == "tiny"
            info = api.repo_info(repo_id, repo_type=repo_type)
            assert info.card_data.to_dict()["license"] == "mit"  # the Hub parsed the same front matter
            html = MarkdownIt("commonmark").enable("table").render(card.text)
            assert "<script" not in html
            assert "<img src=x" not in html and '<img src="x"' not in html
            assert 'href="https://evil.example.com"' not in html and "<h1>heading</h1>" not in html
            # Jinja in the title (both cards) and in model output (the model card's example) stays text
            assert "7*7" in text.replace("\\", "")
            assert repo_type == "dataset" or "{% if true %}jinja{% endif %}" in text.replace("\\", "")
        # the hub's own pages render the cards too: no live script or image there either
        for url in (
            hub.url_for("model", "cot-compress/tiny-cot-l1"),
            hub.url_for("dataset", "cot-compress/tiny-cot-eval"),
        ):
            body = httpx2.get(url).text
            assert "<script>alert" not in body and "<img src=x" not in body
