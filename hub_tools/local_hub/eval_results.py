"""The Hub's eval-results files: ``.eval_results/*.yaml`` in a model repo, read as the Hub reads them.

Each file is a YAML list of entries (the format of hub-docs' ``eval_results.yaml``, written by huggingface_hub's
``eval_result_entries_to_yaml``)::

    - dataset: {id: openai/gsm8k, task_id: main, revision: <sha>}   # id and task_id required
      value: 58.0                                                   # required, a number
      date: "2026-11-26"                                            # optional, ISO-8601 date or datetime
      source: {url: https://..., name: Eval details}                # optional; url required if given
      notes: "Level 4, strict grading"                              # optional

``model_info(..., expand=["evalResults"])`` answers one item per entry of a valid file,
``{filename, verified, data, pullRequest}``, and one ``{filename, error}`` per invalid file, which the client
skips with a warning (huggingface_hub ``parse_eval_result_entries``). Keys the format does not define are left
out of ``data``.
"""

from __future__ import annotations

import datetime as dt

import yaml

FOLDER = ".eval_results/"
SUFFIXES = (".yaml", ".yml")
OPTIONAL_TEXT = ("verifyToken", "notes")
SOURCE_KEYS = ("url", "name", "user", "org")


def is_eval_results_file(path: str) -> bool:
    """A file directly inside ``.eval_results/`` with a YAML suffix."""
    return path.startswith(FOLDER) and "/" not in path[len(FOLDER) :] and path.endswith(SUFFIXES)


def parse_file(text: str) -> list[dict]:
    """The entries of one file, normalised; raises ValueError naming the first problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"invalid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, list) or not data:
        raise ValueError("the file must be a non-empty YAML list of results")
    return [parse_entry(entry, index) for index, entry in enumerate(data)]


def parse_entry(entry: object, index: int) -> dict:
    where = f"result {index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping")
    dataset = entry.get("dataset")
    if not isinstance(dataset, dict):
        raise ValueError(f"{where}: 'dataset' is required and must be a mapping with 'id' and 'task_id'")
    out_dataset = {}
    for key in ("id", "task_id"):
        if not isinstance(dataset.get(key), str) or not dataset[key].strip():
            raise ValueError(f"{where}: 'dataset.{key}' is required and must be a string")
        out_dataset[key] = dataset[key]
    if "revision" in dataset:
        out_dataset["revision"] = text_field(dataset["revision"], f"{where}: 'dataset.revision'")
    value = entry.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: 'value' is required and must be a number")
    out = {"dataset": out_dataset, "value": value}
    for key in OPTIONAL_TEXT:
        if key in entry:
            out[key] = text_field(entry[key], f"{where}: '{key}'")
    if "date" in entry:
        out["date"] = iso_date(entry["date"], f"{where}: 'date'")
    if "source" in entry:
        source = entry["source"]
        if not isinstance(source, dict) or not isinstance(source.get("url"), str):
            raise ValueError(f"{where}: 'source' must be a mapping with a 'url'")
        out["source"] = {
            key: text_field(source[key], f"{where}: 'source.{key}'") for key in SOURCE_KEYS if key in source
        }
    return out


def text_field(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    return value


def iso_date(value: object, what: str) -> str:
    """An ISO-8601 date or datetime, as text (an unquoted YAML date is read as one too)."""
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str):
        try:
            dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return value
        except ValueError:
            pass
    raise ValueError(f'{what} must be an ISO-8601 date or datetime, like "2026-11-26"')


def eval_result_items(files: dict[str, str]) -> list[dict]:
    """The ``evalResults`` of repo info from ``{path: text}`` of the repo's eval-results files."""
    items = []
    for path, text in sorted(files.items()):
        try:
            entries = parse_file(text)
        except ValueError as error:
            items.append({"filename": path, "error": str(error)})
            continue
        items += [{"filename": path, "verified": False, "data": e, "pullRequest": None} for e in entries]
    return items
