"""The validator: every card and note checked against the artifacts before anything may be published."""

from __future__ import annotations

import ast
import contextlib
import html
import re
from dataclasses import dataclass
from typing import Any

from huggingface_hub import DatasetCard, ModelCard
from markdown_it import MarkdownIt

from eval_artifacts.hub_dataset import SUMMARY_CONFIG
from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.errors import ArtifactError, CardValidationError
from eval_artifacts.study.levels import LEVELS
from eval_artifacts.summary import mean_sd
from hub_tools.cards.context import (
    PLOT_FILE,
    StudyArtifacts,
    adapter_cards,
    adapter_context,
    base_context,
    base_id,
    card_model,
    card_repo_id,
    collections_url,
    compared_models,
    dataset_context,
    eval_dataset,
    load_artifacts,
    results_columns,
    rl_training_rows,
    seed_spread,
    study_links,
    table_models,
    training_rows,
)
from hub_tools.cards.format import (
    MODEL_COLUMN,
    SFT_VS_RL_COLUMNS,
    TEST_NAMES,
    TRAINING_SEED_COLUMNS,
    VS_BASE_COLUMNS,
    fmt_accuracy,
    fmt_change,
    fmt_ci,
    fmt_count,
    fmt_delta,
    fmt_mean_sd,
    fmt_p,
    fmt_tokens,
    label_model,
    model_label,
)
from hub_tools.cards.render import RenderedCard

# The Hub refuses a longer collection item note.
NOTE_MAX_CHARS = 500

_PLACEHOLDERS = re.compile(r"\[More Information Needed\]|\b(?:None|nan|NaN|null|TODO|inf)\b|\{\{|\{%|\{#")
_DECIMAL = re.compile(r"[-+]?\d+\.\d+")
_FRACTION = re.compile(r"\b(\d+) / (\d+)\b")
_URL = re.compile(r"https?://[^\s<>()\]\"'`]+")
_REPO_ID = re.compile(r"^[A-Za-z][\w.-]*/[\w.-]*[A-Za-z][\w.-]*$")
_MD = MarkdownIt("commonmark").enable(["table", "strikethrough"])
REQUIRED_MODEL_KEYS = (
    "base_model",
    "base_model_relation",
    "library_name",
    "pipeline_tag",
    "license",
    "datasets",
    "model-index",
)
REQUIRED_DATASET_KEYS = ("license", "configs", "pretty_name")


def _cell(text: str) -> str:
    """A table cell as text: emphasis and backslash escapes removed, entities decoded."""
    text = text.strip()
    while text.startswith("**") and text.endswith("**") and len(text) > 4:
        text = text[2:-2].strip()
    return html.unescape(re.sub(r"\\(.)", r"\1", text))


@dataclass
class _Parsed:
    tables: list[tuple[list[str], list[list[str]]]]
    prose: list[str]
    fences: list[tuple[str, str]]
    links: list[str]
    code_spans: list[str]
    html: list[str]


def _parse_body(body: str) -> _Parsed:
    parsed = _Parsed([], [], [], [], [], [])
    table: tuple[list[str], list[list[str]]] | None = None
    row: list[str] = []
    in_cell = False
    for token in _MD.parse(body):
        if token.type == "table_open":
            table = ([], [])
        elif token.type == "table_close" and table is not None:
            parsed.tables.append(table)
            table = None
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close" and table is not None:
            (table[1].append(row) if table[0] else table[0].extend(row))
        elif token.type in ("th_open", "td_open"):
            in_cell = True
        elif token.type in ("th_close", "td_close"):
            in_cell = False
        elif token.type == "fence":
            parsed.fences.append((token.info.strip(), token.content))
        elif token.type == "code_block":
            parsed.fences.append(("", token.content))
        elif token.type == "html_block":
            parsed.html.append(token.content.strip())
        elif token.type == "inline":
            if in_cell:
                row.append(token.content)
            else:
                parsed.prose.append(token.content)
            for child in token.children or []:
                if child.type == "link_open":
                    parsed.links.append(str(child.attrs.get("href", "")))
                elif child.type == "image":
                    parsed.links.append(str(child.attrs.get("src", "")))
                elif child.type == "code_inline":
                    parsed.code_spans.append(child.content)
                elif child.type == "html_inline":
                    parsed.html.append(child.content)
                elif child.type == "text":
                    parsed.links.extend(_URL.findall(child.content))
    return parsed


def _allowed(config: StudyConfig, art: StudyArtifacts) -> tuple[set[str], list[str], str]:
    """Repo ids and URL prefixes that count as inside the study, and its collections page."""
    links = study_links(config, art.published)
    repo_ids = {config.eval_repo_id, config.data.dataset_id, base_id(config)}
    repo_ids |= {card_repo_id(config, n, rl) for n, rl in adapter_cards(config)}
    exact = [links["eval_dataset"], *links["adapters"].values(), *links["rl_adapters"].values()]
    exact += [link for link in (links["source_dataset"], links["base_model"]) if link]
    return repo_ids, exact, collections_url(links["hub"], config.hub.namespace).rsplit("/", 1)[0]


def _link_problem(url: str, config: StudyConfig, exact: list[str], collections: str) -> str | None:
    if url == PLOT_FILE:
        return None
    if url.startswith(collections + "/"):
        return None
    if any(url == prefix or url.startswith(prefix + "/") for prefix in exact):
        return None
    return f"link {url} points outside the study (allowed: its repos, the base model, {config.data.dataset_id}, the collection)"


def _check_table(
    header: list[str], rows: list[list[str]], expected: dict[str, dict[str, str]], what: str
) -> list[str]:
    problems = []
    for row in rows:
        label = _cell(row[0])
        model = label_model(label)
        if model not in expected:
            problems.append(f"{what} row {label!r} is not a model of this study")
            continue
        for column, cell in zip(header[1:], row[1:], strict=False):
            want = expected[model].get(column)
            shown = _cell(cell)
            if want is None:
                problems.append(
                    f"{what} column {column!r} is not one render-cards can check against the artifacts"
                )
            elif shown != want:
                problems.append(
                    f"{what} row {label!r} column {column!r} shows {shown}, the artifacts give {want}"
                )
    return problems


def _expected(
    metrics: dict[str, dict], columns: dict[str, Any], models: list[str]
) -> dict[str, dict[str, str]]:
    return {model: {name: fmt(metrics[model]) for name, fmt in columns.items()} for model in models}


def _string_leaves(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _string_leaves(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _string_leaves(v)]
    return [value] if isinstance(value, str) else []


def _check_numbers(parsed: _Parsed, context: dict[str, Any], checked_tables: set[int]) -> list[str]:
    """Decimals and ``k / n`` counts in prose (and unrecognised tables) must be artifact values."""
    # The example output is model text inside a code block: its numbers prove nothing about the card's.
    strings = _string_leaves({key: value for key, value in context.items() if key != "example"})
    allowed = {d for s in strings for d in _DECIMAL.findall(s)}
    fractions = {(int(k), int(n)) for s in strings for k, n in _FRACTION.findall(s)}
    texts = list(parsed.prose)
    texts += [
        c
        for i, (h, rows) in enumerate(parsed.tables)
        if i not in checked_tables
        for r in [h, *rows]
        for c in r
    ]
    problems = []
    for text in texts:
        plain = _cell(text)
        for number in _DECIMAL.findall(plain):
            if number not in allowed:
                problems.append(f"number {number} in {plain[:60]!r} is not any artifact value")
        for k, n in _FRACTION.findall(plain):
            if (int(k), int(n)) not in fractions:
                problems.append(f"count {k} / {n} in {plain[:60]!r} is not any artifact count")
    return problems


def _check_text(body: str, parsed: _Parsed) -> list[str]:
    problems = []
    for text in parsed.prose + [c for h, rows in parsed.tables for r in [h, *rows] for c in r]:
        found = _PLACEHOLDERS.search(text)
        if found:
            problems.append(f"placeholder text {found.group()!r} in {text[:60]!r}")
    for header, rows in parsed.tables:
        for row in rows:
            if len(row) != len(header) or any(not _cell(cell) for cell in row):
                problems.append(
                    f"empty table cell in row {_cell(row[0]) if row else ''!r} of table {header[:2]}"
                )
    if parsed.html:
        problems.append(
            f"raw HTML {parsed.html[0][:40]!r} in the card: free text must go through the md filter"
        )
    if not body.strip():
        problems.append("the card body is empty")
    return problems


def _check_links(parsed: _Parsed, config: StudyConfig, art: StudyArtifacts) -> list[str]:
    repo_ids, exact, collections = _allowed(config, art)
    problems = [p for url in parsed.links if (p := _link_problem(url, config, exact, collections))]
    for span in parsed.code_spans:
        if _REPO_ID.match(span) and span not in repo_ids:
            problems.append(f"repo id {span} is not a repo of this study")
    return problems


def _check_snippets(parsed: _Parsed, config: StudyConfig, art: StudyArtifacts, repo_id: str) -> list[str]:
    """Every python block parses and names only study repos; the first one loads this card's repo."""
    snippets = [code for info, code in parsed.fences if info == "python"]
    if not snippets:
        return ["the card has no python usage snippet"]
    repo_ids, exact, collections = _allowed(config, art)
    problems: list[str] = []
    for number, snippet in enumerate(snippets, start=1):
        try:
            tree = ast.parse(snippet)
        except SyntaxError as error:
            problems.append(f"python snippet {number} is not valid Python (line {error.lineno}: {error.msg})")
            continue
        strings = [
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        for value in strings:
            if _URL.fullmatch(value) and _link_problem(value, config, exact, collections):
                problems.append(f"python snippet {number} links {value}, outside the study")
            elif _REPO_ID.match(value) and value not in repo_ids:
                problems.append(f"python snippet {number} names repo {value}, not a repo of this study")
        if number == 1 and repo_id not in strings:
            problems.append(f"the usage snippet does not load {repo_id}")
    return problems


def _check_model_metadata(card: ModelCard, config: StudyConfig, model: str, art: StudyArtifacts) -> list[str]:
    data = card.data.to_dict()
    required = [k for k in REQUIRED_MODEL_KEYS if k != "datasets" or not config.synthetic_data]
    problems = [f"front matter lacks {key!r}" for key in required if not data.get(key)]
    wanted = {
        "base_model": config.base_hub_id,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "license": config.hub.license,
    }
    problems += [
        f"front matter {k} is {data.get(k)!r}, expected {v!r}"
        for k, v in wanted.items()
        if data.get(k) and data.get(k) != v
    ]
    training_data = set() if config.synthetic_data else {config.data.dataset_id}
    problems += [
        f"front matter dataset {d} is not the study's training data"
        for d in data.get("datasets") or []
        if d not in training_data
    ]
    results = card.data.eval_results or []
    accuracy = art.metrics[model]["accuracy"]
    dataset = eval_dataset(config, art, model)
    if not results:
        problems.append("front matter model-index has no eval results")
    for result in results:
        where = f"model-index {result.metric_type} on {result.dataset_type}"
        if result.metric_type == "accuracy" and result.metric_value != accuracy:
            problems.append(
                f"{where} is {result.metric_value!r}, metrics.json gives {accuracy!r} ({fmt_accuracy(accuracy)})"
            )
        if result.dataset_type != dataset["id"] or result.dataset_revision != dataset["revision"]:
            problems.append(
                f"{where} names dataset {result.dataset_type}@{result.dataset_revision}, expected "
                f"{dataset['id']}@{dataset['revision']}"
            )
    return problems


def _check_dataset_metadata(card: DatasetCard, config: StudyConfig) -> list[str]:
    data = card.data.to_dict()
    problems = [f"front matter lacks {key!r}" for key in REQUIRED_DATASET_KEYS if not data.get(key)]
    if data.get("license") and data["license"] != config.hub.license:
        problems.append(f"front matter license is {data['license']!r}, expected {config.hub.license!r}")
    names = [c.get("config_name") for c in data.get("configs") or []]
    expected = [*config.model_keys, SUMMARY_CONFIG]
    if data.get("configs") and names != expected:
        problems.append(f"front matter configs are {names}, expected {expected}")
    return problems


def _check_training_seeds(text: str, config: StudyConfig, art: StudyArtifacts, level: int) -> list[str]:
    """The level's spread across training seeds, recomputed from each seed's metrics.json, must be what
    summary.json holds and what the card states."""
    models = [model for model, _ in config.adapter_models(level)]
    missing = [model for model in models if model not in art.metrics]
    if missing:
        return [f"no metrics for {missing[0]}: rerun `cot-compress evaluate`"]
    accuracy = mean_sd([art.metrics[m]["accuracy"] for m in models])
    think = mean_sd([art.metrics[m]["think_tokens"]["mean"] for m in models])
    spread = seed_spread(art, level)
    problems = []
    if spread["models"] != models or spread["accuracy"] != accuracy or spread["think_tokens_mean"] != think:
        problems.append(
            f"summary.json's training-seed spread of level {level} disagrees with the seeds' metrics.json: "
            "rerun `cot-compress evaluate`"
        )
    if len(models) > 1:
        for what, value in (
            ("accuracy", fmt_mean_sd(accuracy, fmt_accuracy)),
            ("mean think tokens", fmt_mean_sd(think, fmt_tokens)),
        ):
            if value not in text:
                problems.append(f"the card does not state the {what} across training seeds, {value}")
    return problems


def _check_vs_prompt(text: str, metrics: dict) -> list[str]:
    """An adapter whose prompt-only baseline was evaluated must state its paired delta against it."""
    vs_prompt = metrics["vs_prompt"]
    if vs_prompt is None:
        return []
    stated = f"{fmt_delta(vs_prompt['delta'])} (95% CI {fmt_ci(vs_prompt['ci95'])}"
    if stated not in text:
        return [f"the card does not state its delta against its prompt-only baseline, {stated})"]
    return []


def _check_sft_vs_rl(text: str, config: StudyConfig, art: StudyArtifacts, level: int) -> list[str]:
    """Both cards of a level with an RL adapter must state SFT+RL's paired comparison with SFT (``vs_sft`` of
    ``rl_l<n>``: delta, its CI, the test and p, the discordant problems) and the change in think tokens."""
    if level not in config.rl.levels:
        return []
    sft, rl_model = art.metrics[LEVELS[level].key], art.metrics[LEVELS[level].rl_key]
    vs_sft = rl_model["vs_sft"]
    if vs_sft is None:
        return [f"metrics of {LEVELS[level].rl_key} have no comparison with {LEVELS[level].key}: rerun `cot-compress evaluate`"]
    stated = (
        f"differs from SFT's by {fmt_delta(vs_sft['delta'])} (95% CI {fmt_ci(vs_sft['ci95'])}, "
        f"{TEST_NAMES[vs_sft['test']]} p {fmt_p(vs_sft['p_value'])}; SFT alone better on {fmt_count(vs_sft['b'])} "
        f"problems, SFT+RL on {fmt_count(vs_sft['c'])}), with "
        f"{fmt_change(rl_model['think_tokens']['mean'], sft['think_tokens']['mean'])} mean think tokens"
    )
    # The card escapes markdown ('<' of a small p as an entity): compare on the text a reader sees.
    if stated not in html.unescape(re.sub(r"\\(.)", r"\1", text)):
        return [f"the card does not state SFT+RL against SFT as the metrics give it: {stated}"]
    return []


def validate_card(
    rendered: RenderedCard,
    *,
    config: StudyConfig,
    run_dir: RunDir,
    artifacts: StudyArtifacts | None = None,
) -> list[str]:
    """Every problem of one rendered card, checked against ``artifacts`` (read from ``run_dir`` if not given).

    Checks: front matter parses with the required keys and values; no placeholder text, raw HTML or
    empty cells; every results/comparison/training-seeds/training table cell and model-index value equals the
    artifact value through the shared formatting; an adapter card states its delta against its prompt-only
    baseline and its spread across training seeds as recomputed from each seed's metrics; decimals and
    counts in prose are artifact values; metrics.json
    agrees with samples.jsonl; every link and repo id is inside the study; the usage snippet parses.
    """
    problems: list[str] = []
    card_class = ModelCard if rendered.repo_type == "model" else DatasetCard
    try:
        card = card_class(rendered.text)
    except Exception as error:  # noqa: BLE001 - any parse failure of the front matter is a card problem
        return [f"front matter does not parse: {' '.join(str(error).split())[:120]}"]
    try:
        art = artifacts if artifacts is not None else load_artifacts(config, run_dir)
    except ArtifactError as error:
        return [str(error)]
    parsed = _parse_body(card.text)
    problems += _check_text(card.text, parsed)
    problems += _check_links(parsed, config, art)
    problems += _check_snippets(parsed, config, art, rendered.repo_id)
    if config.tiny_base and rendered.repo_id == config.base_repo_id:
        data = card.data.to_dict()
        problems += [f"front matter lacks {key!r}" for key in ("license", "library_name") if not data.get(key)]
        return problems + _check_numbers(parsed, base_context(config, art), set())
    columns = results_columns(art)
    checked: set[int] = set()
    found_results = False
    if rendered.repo_type == "model":
        found = [(n, rl) for n, rl in adapter_cards(config) if card_repo_id(config, n, rl) == rendered.repo_id]
        if not found:
            return problems + [f"{rendered.repo_id} is not an adapter repo of this study"]
        [(level, rl)] = found
        model = card_model(level, rl)
        problems += _check_model_metadata(card, config, model, art)
        problems += [] if rl else _check_training_seeds(card.text, config, art, level)
        problems += _check_vs_prompt(card.text, art.metrics[model])
        problems += _check_sft_vs_rl(card.text, config, art, level)
        context = adapter_context(config, art, level, rl=rl)
        training = dict(rl_training_rows(config, art, level) if rl else training_rows(config, art, level))
        shown = table_models(config)
        seed_models = [model for model, _ in config.adapter_models(level)]
        rl_pair = [LEVELS[level].key, LEVELS[level].rl_key] if level in config.rl.levels else []
    else:
        problems += _check_dataset_metadata(card, config)
        context = dataset_context(config, art)
        training = {}
        shown = config.model_keys
        seed_models = []
        rl_pair = []
    expected_results = _expected(art.metrics, columns, shown)
    for index, (header, rows) in enumerate(parsed.tables):
        names = [_cell(h) for h in header]
        if names[1:] == list(SFT_VS_RL_COLUMNS) and rl_pair:
            missing = [model_label(m) for m in rl_pair if m not in {label_model(_cell(r[0])) for r in rows}]
            problems += [f"SFT-against-SFT+RL table lacks the row of {label}" for label in missing]
            problems += _check_table(
                names, rows, _expected(art.metrics, SFT_VS_RL_COLUMNS, rl_pair), "SFT-against-SFT+RL table"
            )
        elif names[:1] == [MODEL_COLUMN] and "Training seed" in names:
            problems += _check_table(
                names, rows, _expected(art.metrics, TRAINING_SEED_COLUMNS, seed_models), "training-seeds table"
            )
        elif names[:1] == [MODEL_COLUMN] and "Accuracy" in names:
            found_results = True
            missing = [model_label(m) for m in shown if m not in {label_model(_cell(r[0])) for r in rows}]
            problems += [f"results table lacks the row of {label}" for label in missing]
            problems += _check_table(names, rows, expected_results, "results table")
        elif names[:1] == [MODEL_COLUMN] and any(n in VS_BASE_COLUMNS for n in names):
            problems += _check_table(
                names,
                rows,
                _expected(art.metrics, VS_BASE_COLUMNS, compared_models(config)),
                "comparison table",
            )
        elif names == ["Setting", "Value"] and training:
            for row in rows:
                setting, value = _cell(row[0]), _cell(row[1]) if len(row) > 1 else ""
                want = " ".join(training[setting].split()) if setting in training else None
                if want is None:
                    problems.append(f"training table setting {setting!r} is not one render-cards can check")
                elif value != want:
                    problems.append(f"training table {setting!r} shows {value}, training.json gives {want}")
        else:
            continue
        checked.add(index)
    if not found_results:
        problems.append("the card has no results table (a table with columns 'Model' and 'Accuracy')")
    problems += _check_numbers(parsed, context, checked)
    # Last, so that a card/metrics mismatch (which names the number) is reported first.
    return problems + list(art.sample_mismatches)


def validate_note(
    repo_id: str,
    text: str,
    *,
    config: StudyConfig,
    run_dir: RunDir,
    artifacts: StudyArtifacts | None = None,
) -> list[str]:
    """Problems of one collection note: length, placeholders, its level, and its numbers.

    Raises:
        ArtifactError: ``artifacts`` not given and ``run_dir``'s do not load.
    """
    problems = []
    if not text.strip():
        return ["the note is empty"]
    if len(text) > NOTE_MAX_CHARS:
        problems.append(f"the note has {len(text)} characters, the Hub allows {NOTE_MAX_CHARS}")
    if (found := _PLACEHOLDERS.search(text)) is not None:
        problems.append(f"placeholder text {found.group()!r} in the note")
    art = artifacts if artifacts is not None else load_artifacts(config, run_dir)
    found = [(n, rl) for n, rl in adapter_cards(config) if card_repo_id(config, n, rl) == repo_id]
    if found:
        [(level, rl)] = found
        context = adapter_context(config, art, level, rl=rl)
        m = art.metrics[card_model(level, rl)]
        if f"L{level}" not in text and f"Level {level}" not in text:
            problems.append(f"the note does not state its level (L{level})")
        for shown, want in (
            (fmt_accuracy(m["accuracy"]), "accuracy"),
            (fmt_tokens(m["think_tokens"]["mean"]), "mean think tokens"),
        ):
            if shown not in text:
                problems.append(f"the note does not state its {want} {shown}")
    elif repo_id == config.eval_repo_id:
        context = dataset_context(config, art)
    elif config.tiny_base and repo_id == config.base_repo_id:
        context = base_context(config, art)
    else:
        return [f"{repo_id} is not a repo of this study"]
    parsed = _Parsed([], [text], [], [], [], [])
    return problems + _check_numbers(parsed, context, set())


def _problems(cards, *, config, run_dir, notes, artifacts) -> list[tuple[str, str]]:
    if artifacts is None:
        # A run dir that does not load stays each card's problem to report (and each note's to raise),
        # exactly as when they are validated one by one.
        with contextlib.suppress(ArtifactError):
            artifacts = load_artifacts(config, run_dir)
    found = [
        (name, p)
        for name, card in cards.items()
        for p in validate_card(card, config=config, run_dir=run_dir, artifacts=artifacts)
    ]
    for repo_id, text in (notes or {}).items():
        found += [
            (f"note {repo_id}", p)
            for p in validate_note(repo_id, text, config=config, run_dir=run_dir, artifacts=artifacts)
        ]
    return found


def all_problems(
    cards: dict[str, RenderedCard],
    *,
    config: StudyConfig,
    run_dir: RunDir,
    notes: dict[str, str] | None = None,
    artifacts: StudyArtifacts | None = None,
) -> list[str]:
    """Every problem of every card and note, each prefixed with the card's repo name (for listing)."""
    return [
        f"{where}: {problem}"
        for where, problem in _problems(
            cards, config=config, run_dir=run_dir, notes=notes, artifacts=artifacts
        )
    ]


def validate_all(
    cards: dict[str, RenderedCard],
    *,
    config: StudyConfig,
    run_dir: RunDir,
    notes: dict[str, str] | None = None,
    artifacts: StudyArtifacts | None = None,
) -> None:
    """Validate every card (and note); any problem stops publishing.

    Raises:
        CardValidationError: one line naming the card and its first problem, with the total count.
    """
    found = _problems(cards, config=config, run_dir=run_dir, notes=notes, artifacts=artifacts)
    if found:
        where, first = found[0]
        raise CardValidationError(
            f"card {where}: {first} ({len(found)} problem(s) in all; `cot-compress render-cards` lists them: "
            "fix the template or the artifacts, then render again)"
        )
