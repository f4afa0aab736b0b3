"""Cards rendered from the eval artifacts: golden files, validation against the artifacts, mutations, the
sandbox, inert free text, the published Level-4 numbers, and the `render-cards` command.

Golden files live in tests/golden/. After an intended change to a template or to the fixture study,
regenerate them with ``UPDATE_GOLDEN=1 pytest tests/test_cards.py`` and review the diff before committing.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from fixtures_artifacts import FIXTURE_BASE_SHA, ModelProfile, write_fixture_study
from helpers import tiny_qwen3
from huggingface_hub import DatasetCard, ModelCard
from markdown_it import MarkdownIt

from eval_artifacts.records import read_samples
from eval_artifacts.rundir import RunDir, read_json, write_json
from eval_artifacts.study.config import load_config
from eval_artifacts.study.errors import CardValidationError, TemplateError
from eval_artifacts.study.levels import build_prompt, build_response
from hub_tools import cards
from hub_tools.cards.format import fmt_change, label_model, model_label
from hub_tools.cli import main

GOLDEN = Path(__file__).parent / "golden"
REPO_ROOT = Path(__file__).parent.parent
QWEN_CONFIG = REPO_ROOT / "configs" / "qwen3-4b-gsm8k.yaml"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"golden file {path} missing: run UPDATE_GOLDEN=1 pytest tests/test_cards.py"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny config's study with the fixture artifacts, rendered once (read-only for tests)."""
    root = tmp_path_factory.mktemp("study")
    config = load_config().with_overrides(run_dir=str(root))
    run_dir = write_fixture_study(root, config=config)
    rendered = cards.render_study_cards(config, run_dir)
    cards.write_cards(run_dir, rendered)
    return config, run_dir, rendered


@pytest.fixture
def study_copy(study, tmp_path):
    """A private copy of the study's run dir, for tests that mutate artifacts."""
    config, run_dir, _ = study
    root = tmp_path / "run"
    shutil.copytree(run_dir.root, root)
    return config.with_overrides(run_dir=str(root)), RunDir(root)


def custom_templates(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """A copy of the shipped templates with one substitution in ``name``."""
    directory = tmp_path / "templates"
    directory.mkdir(exist_ok=True)
    for template in cards.TEMPLATES:
        shutil.copy(cards.default_templates_dir() / template, directory / template)
    text = (directory / name).read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {name}"
    (directory / name).write_text(text.replace(old, new, 1), encoding="utf-8")
    return directory


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score interval, written out independently of eval_artifacts."""
    z = 1.959963984540054
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


# ---------------------------------------------------------------- golden files and clean validation


def test_cards_match_golden_files(study):
    config, run_dir, rendered = study
    assert list(rendered) == ["tiny-cot-base"] + [f"tiny-cot-l{n}" for n in range(1, 6)] + ["tiny-cot-eval"]
    check_golden("base_card_tiny-cot-base.md", rendered["tiny-cot-base"].text)
    check_golden("adapter_card_tiny-cot-l4.md", rendered["tiny-cot-l4"].text)
    check_golden("adapter_card_tiny-cot-l1.md", rendered["tiny-cot-l1"].text)
    check_golden("eval_dataset_card_tiny-cot-eval.md", rendered["tiny-cot-eval"].text)
    notes = cards.render_collection_notes(config, run_dir)
    check_golden("collection_notes.json", json.dumps(notes, indent=2, ensure_ascii=False) + "\n")


def test_fixture_study_validates_cleanly(study):
    config, run_dir, rendered = study
    notes = cards.render_collection_notes(config, run_dir)
    assert cards.all_problems(rendered, config=config, run_dir=run_dir, notes=notes) == []
    cards.validate_all(rendered, config=config, run_dir=run_dir, notes=notes)


def test_written_card_reads_back_metadata_and_eval_results(study):
    config, run_dir, _ = study
    card = ModelCard.load(run_dir.card("tiny-cot-l3"))
    metrics = read_json(run_dir.metrics("level_3"), what="metrics", hint="")
    data = card.data
    # Synthetic problems: the study's own eval dataset, never GSM8K; no training data on any Hub to list.
    assert data.base_model == "cot-compress/tiny-cot-base"
    assert data.base_model_relation == "adapter"
    assert (data.library_name, data.pipeline_tag, data.license) == ("peft", "text-generation", "mit")
    assert data.datasets is None
    assert "gsm8k" not in data.tags
    [result] = data.eval_results
    assert result.metric_value == metrics["accuracy"] == 111 / 200
    assert (result.dataset_type, result.dataset_config, result.dataset_split, result.dataset_revision) == (
        "cot-compress/tiny-cot-eval",
        "level_3",
        "test",
        None,
    )
    assert "gsm8k" not in card.content.lower().split("## usage")[0].split("\n# ")[1].split("\n")[0]
    dataset = DatasetCard.load(run_dir.card("tiny-cot-eval")).data.to_dict()
    assert "source_datasets" not in dataset and "gsm8k" not in dataset["tags"]
    assert [c["config_name"] for c in dataset["configs"]] == [
        "base",
        "level_1",
        "level_2",
        "level_3",
        "level_4",
        "level_5",
        *[f"prompt_l{n}" for n in range(1, 6)],
        "summary",
    ]
    assert dataset["license"] == "mit"


def test_adapter_card_content(study):
    _, _, rendered = study
    text = rendered["tiny-cot-l4"].text
    # This level highlighted, every other row plain.
    assert "| **L4 Ultra-compact (this adapter)** | **0.520** | **[0.451, 0.588]** | **104 / 200** |" in text
    assert "| L2 Concise | 0.610 | [0.541, 0.675] | 122 / 200 | 0.610 | 0 | 0 | 49.80 | 47 | 60.80 |" in text
    # Strict accuracy headlines; the lenient one stands beside it (base's 2 cut outputs end on gold).
    assert "| Base (stock model) | 0.620 | [0.551, 0.684] | 124 / 200 | 0.630 | 0 | 2 |" in text
    assert "by the lenient rule, which also credits the last number of unfinished reasoning, it is 0.520 and " \
        "the stock model's 0.630." in text
    assert "in its last 5 lines. An output without one is wrong" in text
    assert "![Accuracy against mean think tokens, with the Pareto frontier](pareto.png)" in text
    assert "[cot-compress/tiny-cot-eval](https://huggingface.co/datasets/cot-compress/tiny-cot-eval)" in text
    assert "the level's spec says \\~45 chars; its training data measures 44.81 chars mean, 45 median" in text
    # Caveats computed from the data: greedy, one training seed, sweet spot L2 (margin 0.05), truncations.
    assert "evaluation seed(s)" not in text and "Decoding: greedy. Greedy decoding draws nothing" in text
    assert "Trained with one seed (42): the spread across training seeds was not measured" in text
    # The prompt-only baselines: rows of their own, and this adapter's paired delta against its level's.
    assert "| P4 Ultra-compact, prompt only | 0.450 | [0.383, 0.519] | 90 / 200 |" in text
    assert (
        "Against its prompt-only baseline (the stock model asked in words for the same Level 4 style and answer "
        "format, no adapter), paired on the same problems, this adapter's accuracy differs by +0.070 (95% CI [-0.010, 0.148], exact McNemar p "
        "0.109)" in text
    )
    assert "is **L2 Concise** (49.80 mean think tokens)" in text
    assert "Base (stock model): 2 / 200 outputs hit the 96-token limit; 2 / 200 stopped before a final answer" in text
    assert "| Training rows | 1988 kept of 2000 (dropped: no\\_annotations: 12) |" in text
    assert "| Loss | completion only (prompt tokens masked) |" in text
    assert "```bibtex\n@misc{cot-compress-tiny," in text
    # The sweet spot's own card says so.
    assert "(49.80 mean think tokens), this adapter." in rendered["tiny-cot-l2"].text


def test_usage_snippet_parses_and_uses_the_level_prompt(study):
    _, _, rendered = study
    body = rendered["tiny-cot-l4"].card.text
    fences = [t for t in MarkdownIt("commonmark").parse(body) if t.type == "fence" and t.info == "python"]
    tree = ast.parse(fences[0].content)
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert "cot-compress/tiny-cot-l4" in strings
    assert build_prompt(4, cards.EXAMPLE_QUESTION) in strings
    calls = {
        n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    assert {"from_pretrained", "apply_chat_template", "generate", "decode"} <= calls


def test_collection_notes_state_level_and_numbers(study):
    config, run_dir, _ = study
    notes = cards.render_collection_notes(config, run_dir)
    # The tiny base first, then the levels in order, then the eval dataset: the collection's order.
    assert list(notes) == ["cot-compress/tiny-cot-base"] + [f"cot-compress/tiny-cot-l{n}" for n in range(1, 6)] + [
        "cot-compress/tiny-cot-eval"
    ]
    assert all(0 < len(note) <= 500 for note in notes.values())
    assert notes["cot-compress/tiny-cot-l4"].startswith("L4 Ultra-compact:")
    assert (
        "Accuracy 0.520 [0.451, 0.588] (104 / 200) at 19.60 mean think tokens"
        in notes["cot-compress/tiny-cot-l4"]
    )
    assert "Sweet spot" in notes["cot-compress/tiny-cot-l2"]


def test_dataset_card_documents_every_column():
    from eval_artifacts.hub_dataset import SAMPLE_FEATURES, SUMMARY_FEATURES

    assert list(cards.SAMPLE_COLUMN_DOCS) == list(SAMPLE_FEATURES)
    assert list(cards.SUMMARY_COLUMN_DOCS) == list(SUMMARY_FEATURES)


def test_formatting_is_one_place():
    assert cards.fmt_accuracy(765 / 1319) == "0.580"
    assert cards.fmt_tokens(51507 / 1319) == "39.05"
    assert cards.fmt_median(35.0) == "35"
    assert cards.fmt_median(35.5) == "35.50"
    assert cards.fmt_ci([0.55312, 0.60649]) == "[0.553, 0.606]"
    assert cards.fmt_p(0.0004) == "< 0.001"
    assert cards.fmt_delta(-0.1) == "-0.100"


# ---------------------------------------------------------------- mutations: numbers


def test_changed_metric_fails_validation_naming_the_number(study, study_copy):
    _, _, rendered = study
    config, run_dir = study_copy
    metrics = read_json(run_dir.metrics("level_3"), what="metrics", hint="")
    metrics["accuracy"] = 0.575
    write_json(run_dir.metrics("level_3"), metrics)
    problems = cards.validate_card(rendered["tiny-cot-l4"], config=config, run_dir=run_dir)
    assert problems[0] == (
        "results table row 'L3 Equations' column 'Accuracy' shows 0.555, the artifacts give 0.575"
    )
    with pytest.raises(CardValidationError, match=r"^card tiny-cot-l1: results table row 'L3 Equations'"):
        cards.validate_all(rendered, config=config, run_dir=run_dir)
    # The adapter's own model-index is checked too.
    own = cards.validate_card(rendered["tiny-cot-l3"], config=config, run_dir=run_dir)
    assert any(
        p.startswith("model-index accuracy on cot-compress/tiny-cot-eval is 0.555, metrics.json gives 0.575")
        for p in own
    )


@pytest.mark.parametrize(
    ("field", "value", "column", "shown", "given"),
    [
        ("accuracy_lenient", 0.6, "Lenient accuracy", "0.555", "0.600"),
        ("n_truncated", 7, "Truncated", "0", "7"),
        ("n_no_answer", 3, "No answer", "0", "3"),
    ],
)
def test_changed_grading_count_fails_validation_naming_the_number(
    study, study_copy, field, value, column, shown, given
):
    _, _, rendered = study
    config, run_dir = study_copy
    metrics = read_json(run_dir.metrics("level_3"), what="metrics", hint="")
    metrics[field] = value
    write_json(run_dir.metrics("level_3"), metrics)
    problems = cards.validate_card(rendered["tiny-cot-l4"], config=config, run_dir=run_dir)
    assert problems[0] == (
        f"results table row 'L3 Equations' column '{column}' shows {shown}, the artifacts give {given}"
    )
    assert f"disagree with their samples at field '{field}'" in problems[-1]


def test_card_rendered_from_tampered_metrics_fails_against_samples(study_copy):
    config, run_dir = study_copy
    metrics = read_json(run_dir.metrics("level_5"), what="metrics", hint="")
    metrics["think_tokens"]["mean"] = 4.1
    write_json(run_dir.metrics("level_5"), metrics)
    rendered = cards.render_study_cards(config, run_dir)
    problems = cards.validate_card(rendered["tiny-cot-l5"], config=config, run_dir=run_dir)
    # summary.json (written from the untampered metrics) no longer agrees either.
    assert len(problems) == 2 and "training-seed spread of level 5 disagrees" in problems[0]
    assert (
        "disagree with their samples at field 'think_tokens.mean' (stored 4.1, samples give 5.3"
        in problems[1]
    )


def test_changed_training_json_fails_naming_the_setting(study, study_copy):
    _, _, rendered = study
    config, run_dir = study_copy
    training = read_json(run_dir.training_json(2), what="training", hint="")
    training["steps"] = 121
    write_json(run_dir.training_json(2), training)
    problems = cards.validate_card(rendered["tiny-cot-l2"], config=config, run_dir=run_dir)
    assert problems == ["training table 'Steps' shows 120, training.json gives 121"]


def test_hand_typed_number_in_template_is_caught(study, tmp_path):
    config, run_dir, _ = study
    templates = custom_templates(
        tmp_path, cards.ADAPTER_TEMPLATE, "## Caveats\n", "## Caveats\n\nIt is 0.999 accurate.\n"
    )
    rendered = cards.render_study_cards(config, run_dir, templates_dir=templates)
    problems = cards.validate_card(rendered["tiny-cot-l4"], config=config, run_dir=run_dir)
    assert problems == ["number 0.999 in 'It is 0.999 accurate.' is not any artifact value"]


def test_edited_model_index_value_is_caught(study):
    config, run_dir, rendered = study
    card = rendered["tiny-cot-l4"]
    text = card.text.replace("value: 0.52\n", "value: 0.62\n", 1)
    assert text != card.text
    broken = cards.RenderedCard(card.repo_id, card.repo_type, text, ModelCard(text))
    problems = cards.validate_card(broken, config=config, run_dir=run_dir)
    assert problems == [
        "model-index accuracy on cot-compress/tiny-cot-eval is 0.62, metrics.json gives 0.52 (0.520)"
    ]


# ---------------------------------------------------------------- mutations: text, links, placeholders


@pytest.mark.parametrize(
    ("insert", "expected"),
    [
        ("TODO: write more", "placeholder text 'TODO'"),
        ("Seeds: None", "placeholder text 'None'"),
        ("See [elsewhere](https://example.com/x).", "link https://example.com/x points outside the study"),
        ("Also try `someone/other-model`.", "repo id someone/other-model is not a repo of this study"),
        ("<b>bold</b>", "raw HTML '<b>'"),
        ("| a | b |\n|---|---|\n| x |  |", "empty table cell in row 'x'"),
    ],
)
def test_template_problems_are_reported(study, tmp_path, insert, expected):
    config, run_dir, _ = study
    templates = custom_templates(
        tmp_path, cards.ADAPTER_TEMPLATE, "## License\n", f"{insert}\n\n## License\n"
    )
    rendered = cards.render_study_cards(config, run_dir, templates_dir=templates)
    problems = cards.validate_card(rendered["tiny-cot-l4"], config=config, run_dir=run_dir)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_snippet_that_does_not_parse_is_reported(study, tmp_path):
    config, run_dir, _ = study
    templates = custom_templates(tmp_path, cards.ADAPTER_TEMPLATE, "import torch\n", "import torch(\n")
    rendered = cards.render_study_cards(config, run_dir, templates_dir=templates)
    problems = cards.validate_card(rendered["tiny-cot-l4"], config=config, run_dir=run_dir)
    assert len(problems) == 1
    assert problems[0].startswith("python snippet 1 is not valid Python (line 1:")


def test_long_collection_note_is_reported(study, tmp_path):
    config, run_dir, _ = study
    templates = custom_templates(
        tmp_path,
        cards.NOTE_TEMPLATE,
        '{% elif item == "adapter" %}\n',
        '{% elif item == "adapter" %}\n' + "x" * 480,
    )
    notes = cards.render_collection_notes(config, run_dir, templates_dir=templates)
    problems = cards.validate_note(
        "cot-compress/tiny-cot-l1", notes["cot-compress/tiny-cot-l1"], config=config, run_dir=run_dir
    )
    assert problems[0].startswith("the note has 6") and problems[0].endswith("the Hub allows 500")


# ---------------------------------------------------------------- the sandbox and strict variables


def test_misspelled_variable_fails_naming_it_and_the_template(study, tmp_path):
    config, run_dir, _ = study
    templates = custom_templates(
        tmp_path, cards.ADAPTER_TEMPLATE, "{{ headline.think_mean }}", "{{ headline.think_maen }}"
    )
    with pytest.raises(TemplateError) as caught:
        cards.render_study_cards(config, run_dir, templates_dir=templates)
    message = str(caught.value)
    assert message.startswith("template adapter_card.md.j2 line 7: undefined variable:")
    assert "'think_maen'" in message and "\n" not in message

    templates = custom_templates(
        tmp_path, cards.ADAPTER_TEMPLATE, "{{ study.title | md }}", "{{ studdy.title | md }}"
    )
    with pytest.raises(
        TemplateError, match=r"adapter_card\.md\.j2 line \d+: undefined variable: 'studdy' is undefined"
    ):
        cards.render_study_cards(config, run_dir, templates_dir=templates)


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ lipsum.__globals__ }}",
        "{{ study.__class__.__init__ }}",
        "{{ study.levels.append(1) }}",
    ],
)
def test_sandbox_refuses_attribute_escapes(study, tmp_path, expression):
    config, run_dir, _ = study
    templates = custom_templates(
        tmp_path, cards.DATASET_TEMPLATE, "## Configs\n", f"## Configs\n{expression}\n"
    )
    with pytest.raises(
        TemplateError, match=r"^template eval_dataset_card\.md\.j2 line \d+ was refused by the sandbox"
    ):
        cards.render_study_cards(config, run_dir, templates_dir=templates)


def test_templates_dir_missing_a_template_is_an_error(study, tmp_path):
    config, run_dir, _ = study
    templates = custom_templates(tmp_path, cards.ADAPTER_TEMPLATE, "## License", "## License")
    (templates / cards.NOTE_TEMPLATE).unlink()
    with pytest.raises(
        TemplateError, match=r"^template collection_note\.txt\.j2 is missing from .*templates"
    ):
        cards.render_study_cards(config, run_dir, templates_dir=templates)


def test_template_override_is_used(study, tmp_path):
    config, run_dir, _ = study
    templates = custom_templates(tmp_path, cards.ADAPTER_TEMPLATE, "## Caveats", "## Caveats and limits")
    rendered = cards.render_study_cards(config, run_dir, templates_dir=templates)
    assert "## Caveats and limits" in rendered["tiny-cot-l3"].text
    assert cards.validate_card(rendered["tiny-cot-l3"], config=config, run_dir=run_dir) == []


# ---------------------------------------------------------------- hostile model output and free text

HOSTILE = (
    "---\nlicense: evil\nbase_model: attacker/model\n---\n"
    "<script>alert('x')</script>\n{{ 7*7 }} {% if true %}jinja{% endif %}\n"
    "````` fence\n# heading\n[link](https://evil.example.com)\n"
)


def _rewrite_reasoning(run_dir: RunDir, model: str, chains: dict[str, str]) -> None:
    """Give these samples (by id) another reasoning chain, their grading and final answer unchanged."""
    path = run_dir.samples(model)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        if row["id"] in chains:
            row["reasoning"] = chains[row["id"]]
            row["completion"] = build_response(chains[row["id"]], row["predicted"])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_showcased_example_is_a_correct_answer_whose_arithmetic_checks_out(study, study_copy):
    _, _, clean = study
    config, run_dir = study_copy
    assert "on evaluation problem test-00001," in clean["tiny-cot-l4"].text  # "c=9-7=2", gold 2
    # Right answer, two arithmetic errors that cancel (9+1 is not 11, 11-8 is not 2): not an example.
    _rewrite_reasoning(run_dir, "level_4", {"test-00001": "s=9+1=11→c=11-8=2"})
    text = cards.render_study_cards(config, run_dir)["tiny-cot-l4"].text
    assert "test-00001" not in text and "s=9+1=11" not in text
    second = next(
        row for row in read_samples(run_dir.samples("level_4"))
        if row["correct"] and row["id"] != "test-00001"
    )  # fmt: skip
    assert f"on evaluation problem {second['id']}, a correct answer whose every equation holds" in text
    assert second["reasoning"] in text


def test_card_says_so_when_no_example_checks_out(study_copy):
    config, run_dir = study_copy
    wrong = {row["id"]: "a=1+1=3" for row in read_samples(run_dir.samples("level_4")) if row["correct"]}
    _rewrite_reasoning(run_dir, "level_4", wrong)
    rendered = cards.render_study_cards(config, run_dir)
    text = rendered["tiny-cot-l4"].text
    assert "No example output is shown: no correct answer of this adapter has a chain whose every" in text
    assert "a=1+1=3" not in text and "Example output of this adapter" not in text
    assert cards.validate_card(rendered["tiny-cot-l4"], config=config, run_dir=run_dir) == []


def test_model_output_and_free_text_render_inert(study, study_copy):
    _, _, clean = study
    config, run_dir = study_copy
    path = run_dir.samples("level_4")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row["question"] = HOSTILE + row["question"]
        row["completion"] = HOSTILE + row["completion"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = config.with_overrides(
        title="---\nlicense: evil\n--- <script>x</script> {{ 7*7 }}",
        **{"hub.collection_title": "# {% raw %} **x** |"},
    )
    rendered = cards.render_study_cards(config, run_dir)
    card = rendered["tiny-cot-l4"]

    assert cards.validate_card(card, config=config, run_dir=run_dir) == []
    # Front matter: the same metadata as the clean card.
    assert ModelCard(card.text).data.to_dict() == clean["tiny-cot-l4"].card.data.to_dict()
    # The body's rendered HTML holds no live script, link or heading from the hostile text.
    rendered_html = MarkdownIt("commonmark").enable("table").render(card.card.text)
    assert "<script" not in rendered_html and "&lt;script&gt;" in rendered_html
    assert 'href="https://evil.example.com"' not in rendered_html
    assert "<h1>heading</h1>" not in rendered_html
    assert rendered_html.count("<h2>") == MarkdownIt("commonmark").render(
        clean["tiny-cot-l4"].card.text
    ).count("<h2>")
    # Jinja in data is never evaluated; it survives only inside code blocks, as text.
    assert "49" not in card.text.split("\n## The study")[0]
    assert "```\n---\nlicense: evil" not in card.text  # the fence is longer than the 5-backtick run
    assert (
        "``````text\n---\nlicense: evil\nbase_model: attacker/model\n---\n<script>alert('x')</script>\n{{ 7*7 }}"
        in card.text
    )
    [title_line] = [
        line for line in card.card.text.splitlines() if "one adapter per compression level" in line
    ]
    assert title_line.startswith(
        "\\-\\-\\- license: evil \\-\\-\\- &lt;script&gt;x&lt;/script&gt; \\{\\{ 7\\*7 \\}\\}:"
    )
    assert "49" not in title_line
    assert (
        "[\\# \\{\\% raw \\%\\} \\*\\*x\\*\\* \\|](https://huggingface.co/collections/cot-compress)"
        in card.text
    )
    # The dataset card's pretty_name carries the hostile title safely inside YAML.
    dataset = DatasetCard(rendered["tiny-cot-eval"].text).data.to_dict()
    assert (
        dataset["pretty_name"] == "---\nlicense: evil\n--- <script>x</script> {{ 7*7 }}: evaluation outputs"
    )
    assert dataset["license"] == "mit"


def test_inline_and_block_filters():
    assert cards.md_inline("---") == "\\-\\-\\-"
    assert cards.md_inline("<b>{{ x }}</b>") == "&lt;b&gt;\\{\\{ x \\}\\}&lt;/b&gt;"
    assert cards.md_inline("1. item") == "1\\. item"
    assert cards.code_block("a ``` b ```` c", "text") == "`````text\na ``` b ```` c\n`````"
    assert cards.code_span("a`b") == "``a`b``"


# ---------------------------------------------------------------- the published Level-4 adapter's numbers


def test_published_level4_numbers(tmp_path):
    config = load_config(QWEN_CONFIG).with_overrides(run_dir=str(tmp_path), **{"eval.seeds": [0]})
    profile = ModelProfile(n_correct=765, think_total=51507, think_median=35)  # 51507 / 1319 = 39.0500…
    run_dir = write_fixture_study(tmp_path, config=config, n_problems=1319, profiles={"level_4": profile})
    rendered = cards.render_study_cards(config, run_dir)
    text = rendered["qwen3-4b-gsm8k-cot-l4"].text
    low, high = wilson(765, 1319)
    assert f"[{low:.3f}, {high:.3f}]" == "[0.553, 0.606]"
    row = (
        "| **L4 Ultra-compact (this adapter)** | **0.580** | **[0.553, 0.606]** | **765 / 1319** | **0.580** "
        "| **0** | **0** | **39.05** | **35** |"
    )
    assert row in text
    assert (
        "On 1319 evaluation problems it answers 765 / 1319 correctly: accuracy 0.580 (95% CI [0.553, 0.606]) "
        "with 39.05 mean and 35 median think tokens" in text
    )
    assert cards.validate_card(rendered["qwen3-4b-gsm8k-cot-l4"], config=config, run_dir=run_dir) == []
    data = ModelCard(text).data
    assert data.base_model == "Qwen/Qwen3-4B-Instruct-2507" and data.license == "apache-2.0"
    assert data.eval_results[0].metric_value == 765 / 1319
    # .eval_results on GSM8K's own scale (percent), and where a reader finds the adapter on its leaderboard
    path, results_yaml = cards.eval_results_file(config, cards.load_artifacts(config, run_dir), 4)
    assert path == ".eval_results/gsm8k.yaml" and yaml.safe_load(results_yaml)[0]["value"] == 58.0
    assert (
        "this repo's `.eval_results/gsm8k.yaml` gives this accuracy as 58, in percent (the benchmark's scale), for "
        "`openai/gsm8k` (task `main`)" in text
    )
    assert 'get_dataset_leaderboard("openai/gsm8k", base_model_only=False)` lists this one once the repo is public' in text
    assert "[Qwen/Qwen3-4B\\-Instruct\\-2507]" not in text  # single hyphens stay readable
    assert "[Qwen/Qwen3-4B-Instruct-2507](https://huggingface.co/Qwen/Qwen3-4B-Instruct-2507)" in text
    assert "base_id = 'Qwen/Qwen3-4B-Instruct-2507'" in text
    assert "| Quantization | 4-bit NF4, double quantization (bitsandbytes) |" in text
    assert "| Hardware | 1 × NVIDIA H100 80GB HBM3 |" in text


def test_training_seeds_give_mean_sd_each_seeds_ci_paired_tests_and_branches(tmp_path):
    config = load_config(QWEN_CONFIG).with_overrides(run_dir=str(tmp_path))
    assert (config.training.seeds, config.eval.seeds, config.eval.sampling) == ([42, 43, 44], [0], None)
    run_dir = write_fixture_study(tmp_path, config=config, n_problems=60)
    rendered = cards.render_study_cards(config, run_dir)
    text = rendered["qwen3-4b-gsm8k-cot-l2"].text
    seeds = {s: read_json(run_dir.metrics(m), what="metrics", hint="") for m, s in config.adapter_models(2)}
    # The published adapter is the first seed's: the headline and model-index are its numbers.
    assert f"accuracy {seeds[42]['accuracy']:.3f} (95% CI" in text
    assert ModelCard(text).data.eval_results[0].metric_value == seeds[42]["accuracy"]
    accuracies = [seeds[s]["accuracy"] for s in (42, 43, 44)]
    think = [seeds[s]["think_tokens"]["mean"] for s in (42, 43, 44)]
    mean, sd = statistics.mean(accuracies), statistics.stdev(accuracies)
    assert sd > 0 and f"accuracy is {mean:.3f} ± {sd:.3f}" in text
    assert f"mean think tokens {statistics.mean(think):.2f} ± {statistics.stdev(think):.2f}" in text
    assert "variance is measured across training seeds instead (Training seeds, above)" in text
    for seed, m in seeds.items():
        low, high = wilson(m["n_correct"], m["n_total"])
        branch = "main" if seed == 42 else f"seed-{seed}"
        vs, vp = m["vs_base"], m["vs_prompt"]
        cells = [f"{m['accuracy']:.3f}", f"[{low:.3f}, {high:.3f}]", f"{m['think_tokens']['mean']:.2f}"]
        cells += [f"{vs['delta']:+.3f}", cards.fmt_p(vs["p_value"]), f"{vp['delta']:+.3f}", cards.fmt_p(vp["p_value"])]
        assert f"| {seed} | {branch} | " + " | ".join(cells) + " |" in text.replace("**", "")
        if seed != 42:
            assert f"- `seed-{seed}`: training seed {seed}, accuracy {m['accuracy']:.3f} (95% CI [{low:.3f}, {high:.3f}])" in text
    assert "evaluation seed(s)" not in text and "L2 Concise, seed 43" not in text.split("## Training seeds")[0]
    assert cards.all_problems(rendered, config=config, run_dir=run_dir) == []

    # A card whose spread was edited by hand is caught against the seeds' metrics.
    edited = text.replace(f"accuracy is {mean:.3f} ± {sd:.3f}", f"accuracy is {mean:.3f} ± {sd / 2:.3f}")
    card = dataclasses.replace(rendered["qwen3-4b-gsm8k-cot-l2"], text=edited)
    problems = cards.validate_card(card, config=config, run_dir=run_dir)
    assert any(f"does not state the accuracy across training seeds, {mean:.3f} ± {sd:.3f}" in p for p in problems)


def test_rl_record_from_before_the_capped_length_target_is_one_actionable_error(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "tiny-rl.yaml").with_overrides(run_dir=str(tmp_path))
    run_dir = write_fixture_study(tmp_path, config=config, n_problems=60)
    record = read_json(run_dir.rl_training_json(4), what="training.json", hint="")
    del record["reward"]["spec_think_tokens"], record["reward"]["sft_think_tokens"]
    write_json(run_dir.rl_training_json(4), record)
    result = CliRunner().invoke(main, ["render-cards", "--config", str(REPO_ROOT / "configs" / "tiny-rl.yaml"),
                                       "--run-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2
    assert "rl_l4/training.json predates the reward's capped length target: rerun `cot-compress rl" in result.stderr
    assert "Traceback" not in result.output + result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_rl_adapter_and_its_sft_sibling_both_show_sft_against_sft_plus_rl(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "tiny-rl.yaml").with_overrides(run_dir=str(tmp_path))
    assert config.rl.levels == [3, 4]
    run_dir = write_fixture_study(tmp_path, config=config, n_problems=60)
    rendered = cards.render_study_cards(config, run_dir)
    names = list(rendered)
    assert names[names.index("tiny-cot-l3") : names.index("tiny-cot-l5")] == [
        "tiny-cot-l3", "tiny-cot-l3-rl", "tiny-cot-l4", "tiny-cot-l4-rl",
    ]  # fmt: skip
    assert "tiny-cot-l2-rl" not in names
    assert [label_model(model_label(m) + this) for m in ("rl_l4", "level_4") for this in ("", " (this adapter)")] == [
        "rl_l4", "rl_l4", "level_4", "level_4",
    ]  # fmt: skip
    sft_m = read_json(run_dir.metrics("level_4"), what="metrics", hint="")
    rl_m = read_json(run_dir.metrics("rl_l4"), what="metrics", hint="")
    # The paired comparison recomputed here from the two models' samples (greedy: exact McNemar).
    sft_right = {r["id"] for r in read_samples(run_dir.samples("level_4")) if r["correct"]}
    rl_right = {r["id"] for r in read_samples(run_dir.samples("rl_l4")) if r["correct"]}
    b, c = len(sft_right - rl_right), len(rl_right - sft_right)
    delta = (c - b) / 60
    p = min(1.0, 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c))
    assert (rl_m["vs_sft"]["b"], rl_m["vs_sft"]["c"]) == (b, c) and rl_m["vs_sft"]["p_value"] == pytest.approx(p)
    change = (rl_m["think_tokens"]["mean"] - sft_m["think_tokens"]["mean"]) / sft_m["think_tokens"]["mean"]
    sentence = (
        f"SFT+RL's accuracy differs from SFT's by {delta:+.3f} (95% CI {cards.fmt_ci(rl_m['vs_sft']['ci95'])}, "
        f"exact McNemar p {cards.fmt_p(p)}; SFT alone better on {b} problems, SFT+RL on {c}), with "
        f"{change:+.1%} mean think tokens"
    )
    rows = []
    for m, label in ((sft_m, "L4 Ultra-compact"), (rl_m, "L4 Ultra-compact + RL")):
        low, high = wilson(m["n_correct"], m["n_total"])
        rows.append((label, f" | {m['accuracy']:.3f} | [{low:.3f}, {high:.3f}] | {m['n_correct']} / {m['n_total']} |"))
    for name in ("tiny-cot-l4", "tiny-cot-l4-rl"):
        text = rendered[name].text
        shown = re.sub(r"\\(.)", r"\1", text.replace("**", ""))
        assert "## SFT against SFT+RL" in text and sentence in shown, name
        for label, cells in rows:
            this = " (this adapter)" if label.endswith("+ RL") == name.endswith("-rl") else ""
            assert f"| {label}{this}{cells}" in shown, (name, label)
    rl_card = rendered["tiny-cot-l4-rl"]
    assert rl_card.text.startswith("---") and "# cot-compress/tiny-cot-l4-rl: L4 Ultra-compact + RL" in rl_card.text
    assert f"accuracy {rl_m['accuracy']:.3f} (95% CI" in rl_card.text
    assert ModelCard(rl_card.text).data.eval_results[0].metric_value == rl_m["accuracy"]
    assert f"| KL β | {config.rl.beta:g} |" in rl_card.text and "| Continued from | cot-compress/tiny-cot-l4 " in rl_card.text
    assert "adapter_id = 'cot-compress/tiny-cot-l4-rl'" in rl_card.text
    # The reward's length target as training.json records it: the spec's 45 chars (23 tokens), capped at the
    # mean of the level's SFT reasoning (12.4 tokens in the fixture).
    assert (
        "the length term growing past 13 think tokens (the level's 45 chars, 23 tokens, but never above its SFT "
        "reasoning's mean of 12.4)" in rl_card.text.replace("\n", " ")
    )
    assert "which was not measured for this adapter (one RL run)" in rl_card.text
    assert "new tokens, sampled with transformers' generate on the training policy |" in rl_card.text
    assert "## SFT against SFT+RL" not in rendered["tiny-cot-l2"].text
    assert "`rl_l<n>` (the level's SFT adapter continued with GRPO" in rendered["tiny-cot-eval"].text
    notes = cards.render_collection_notes(config, run_dir)
    assert cards.all_problems(rendered, config=config, run_dir=run_dir, notes=notes) == []

    # A hand-edited paired delta or SFT+RL row is caught on either card.
    for name in ("tiny-cot-l4", "tiny-cot-l4-rl"):
        edited = rendered[name].text.replace(f"by {delta:+.3f} (95% CI", f"by {delta + 0.01:+.3f} (95% CI")
        problems = cards.validate_card(dataclasses.replace(rendered[name], text=edited), config=config, run_dir=run_dir)
        assert any("does not state SFT+RL against SFT" in problem for problem in problems), name
    before, section = rl_card.text.split("## SFT against SFT+RL")
    cell = "+ RL (this adapter)** | **{:.3f}** |"
    edited = before + "## SFT against SFT+RL" + section.replace(
        cell.format(rl_m["accuracy"]), cell.format(rl_m["accuracy"] + 0.1), 1
    )
    assert edited != rl_card.text
    problems = cards.validate_card(dataclasses.replace(rl_card, text=edited), config=config, run_dir=run_dir)
    assert any("SFT-against-SFT+RL table row" in problem for problem in problems)


# ---------------------------------------------------------------- the command


def test_render_cards_command_writes_and_checks(study_copy):
    config, run_dir = study_copy
    shutil.rmtree(run_dir.cards_dir, ignore_errors=True)
    runner = CliRunner()
    result = runner.invoke(main, ["render-cards", "--run-dir", str(run_dir.root), "--check"])
    assert result.exit_code == 0, result.output
    assert run_dir.card("tiny-cot-l4").is_file() and run_dir.card("tiny-cot-eval").is_file()
    assert "7 cards and 7 collection notes are valid" in result.output

    metrics = read_json(run_dir.metrics("level_1"), what="metrics", hint="")
    metrics["n_correct"] = 129
    write_json(run_dir.metrics("level_1"), metrics)
    result = runner.invoke(main, ["render-cards", "--run-dir", str(run_dir.root), "--check"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: card tiny-cot-l1: metrics ")
    assert "disagree with their samples at field 'n_correct'" in lines[0]
    # Without --check the cards are still written and every problem is listed, exit 0.
    result = runner.invoke(main, ["render-cards", "--run-dir", str(run_dir.root)])
    assert result.exit_code == 0
    assert result.stderr.count("problem: ") == 6


def test_render_cards_command_with_broken_template(study_copy, tmp_path):
    config, run_dir = study_copy
    templates = custom_templates(
        tmp_path, cards.ADAPTER_TEMPLATE, "{{ headline.fraction }}", "{{ headline.fractoin }}"
    )
    result = CliRunner().invoke(
        main, ["render-cards", "--run-dir", str(run_dir.root), "--templates", str(templates)]
    )
    assert result.exit_code == 2
    assert re.fullmatch(
        r"error: template adapter_card\.md\.j2 line \d+: undefined variable: 'dict object' has no attribute "
        r"'fractoin'; .*\n",
        result.stderr,
    )


# ---------------------------------------------------------------- the usage snippet runs


def _tiny_hub_models(root: Path) -> tuple[Path, Path]:
    """A 1-layer Qwen3 with a char-level tokenizer and Qwen's chat format, plus a LoRA adapter for it."""
    import string

    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(set(string.printable)))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: characters
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    base, adapter = root / "base", root / "adapter"
    tokenizer.save_pretrained(base)
    tiny_qwen3(
        len(vocab), tie=False, layers=1, hidden=32, intermediate=64, heads=2, kv_heads=1, eos_token_id=2,
        pad_token_id=2,
    ).save_pretrained(base)  # fmt: skip
    model = Qwen3ForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).save_pretrained(adapter)
    return base, adapter


def test_usage_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    """Execute the card's snippet verbatim; only the Hub downloads are redirected to local folders. The
    adapter folder holds the adapter_config.json that publishing pushes, so PEFT finds the base by itself."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hub_tools.publishing.spec import published_adapter_config

    config = load_config(QWEN_CONFIG).with_overrides(
        run_dir=str(tmp_path / "run"), **{"eval.seeds": [0], "eval.max_new_tokens": 6}
    )
    run_dir = write_fixture_study(tmp_path / "run", config=config, n_problems=20)
    art = cards.load_artifacts(config, run_dir)
    body = cards.render_study_cards(config, run_dir, artifacts=art)["qwen3-4b-gsm8k-cot-l3"].card.text
    [snippet] = [
        t.content for t in MarkdownIt("commonmark").parse(body) if t.type == "fence" and t.info == "python"
    ]

    base, adapter = _tiny_hub_models(tmp_path)
    config_file = adapter / "adapter_config.json"
    config_file.write_bytes(published_adapter_config(config, art, config_file))
    local = {"Qwen/Qwen3-4B-Instruct-2507": base, "your-username/qwen3-4b-gsm8k-cot-l3": adapter}
    requested = []

    def redirect(cls, method):
        original = getattr(cls, method).__func__

        def load(klass, repo_id, *args, **kwargs):
            requested.append((cls.__name__, repo_id, kwargs.get("revision")))
            return original(klass, str(local[repo_id]), *args, **kwargs)

        monkeypatch.setattr(cls, method, classmethod(load))

    redirect(AutoTokenizer, "from_pretrained")
    redirect(AutoModelForCausalLM, "from_pretrained")
    redirect(AutoPeftModelForCausalLM, "from_pretrained")
    namespace: dict = {}
    exec(compile(snippet, "usage-snippet", "exec"), namespace)  # noqa: S102 - the card's own snippet

    sha = FIXTURE_BASE_SHA  # the base's commit training resolved, pinned in the card and adapter_config.json
    assert requested == [
        ("AutoTokenizer", "Qwen/Qwen3-4B-Instruct-2507", sha),
        ("AutoPeftModelForCausalLM", "your-username/qwen3-4b-gsm8k-cot-l3", None),
        ("AutoModelForCausalLM", "Qwen/Qwen3-4B-Instruct-2507", sha),
    ]
    # The real study was evaluated on a bf16 base by the fast engine, which merges the adapter: so does the snippet.
    assert "dtype=torch.bfloat16" in snippet and "merge_and_unload()" in snippet
    assert not isinstance(namespace["model"], PeftModel)
    prompt_ids = namespace["inputs"]["input_ids"][0].tolist()
    assert "".join(namespace["tokenizer"].convert_ids_to_tokens(prompt_ids)) == (
        f"<|im_start|>user\n{build_prompt(3, cards.EXAMPLE_QUESTION)}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert namespace["output"].shape[1] <= len(prompt_ids) + 6
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize(
    ("new", "old", "shown"),
    [(14.14, 12.95, "+9.2%"), (15.70, 15.705, "0.0%"), (15.695, 15.705, "-0.1%"), (12, 12, "0.0%"), (3, 0, "n/a")],
)
def test_relative_changes_read_as_written(new, old, shown):
    """A change too small to show is 0.0%, never -0.0% (the RL card's think-token change of level 3 was)."""
    assert fmt_change(new, old) == shown
