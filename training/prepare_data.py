"""Stage 1, prepare-data: teacher-written SFT rows per level, kept only where the teacher's answer is gold.

Writes ``data/level_<n>/train.jsonl`` and ``data/stats.json`` (total, kept, dropped by reason, reasoning
length per level). The rule teacher's file is written whole and atomically; the model teacher appends rows
as they are generated, so a rerun resumes where a killed one stopped.
"""

from __future__ import annotations

from collections import Counter

from tqdm import tqdm

from eval_artifacts.faultpoints import maybe_crash
from eval_artifacts.rundir import SCHEMA_VERSION, RunDir, read_json, write_json, write_jsonl
from eval_artifacts.study.config import StudyConfig
from eval_artifacts.study.errors import ConfigError
from eval_artifacts.study.levels import get_level
from training.data import load_problems
from training.gsm8k import Problem
from training.teachers import reasoning_char_stats, rule_teacher, sft_row


def run(
    config: StudyConfig, run_dir: RunDir, *, levels: list[int] | None = None, teacher: str | None = None
) -> dict:
    """Write the SFT data for ``levels`` (default: the config's) and return the updated stats."""
    levels = levels or config.levels
    for level in levels:
        get_level(level)
    teacher = teacher or config.teacher.kind
    if teacher not in ("rule", "model"):
        raise ConfigError(f"teacher {teacher!r} does not exist: use 'rule' or 'model'")
    if teacher == "model" and not config.teacher.model_id:
        raise ConfigError("the model teacher needs teacher.model_id in the config (a causal LM id or path)")

    problems = load_problems(config, "train")
    stats = _existing_stats(run_dir) or {"schema_version": SCHEMA_VERSION, "levels": {}}
    stats["source"] = _source_description(config, len(problems))

    if teacher == "model":
        from training.teachers import ModelTeacher

        model_teacher = ModelTeacher(config)  # one model load for every level
    for level in levels:
        if teacher == "rule":
            rows, dropped = _rule_rows(level, problems)
            path = run_dir.train_file(level)
            write_jsonl(path, rows, crash_point="prepare_data.before_replace", crash_detail=path.parent.name)
        else:
            rows, dropped = model_teacher.write_level(level, problems, run_dir.train_file(level))
        maybe_crash("prepare_data.level_written", str(level))
        stats["levels"][str(level)] = {
            "teacher": teacher if teacher == "rule" else f"model:{config.teacher.model_id}",
            "total": len(problems),
            "kept": len(rows),
            "dropped": dict(sorted(dropped.items())),
            "reasoning_chars": reasoning_char_stats(rows),
        }
        kept = stats["levels"][str(level)]
        tqdm.write(
            f"level {level}: kept {kept['kept']}/{kept['total']}, "
            f"mean reasoning {kept['reasoning_chars']['mean']} chars"
        )
    stats["levels"] = dict(sorted(stats["levels"].items(), key=lambda item: int(item[0])))
    stats["teacher"] = teacher
    write_json(run_dir.data_stats, stats)
    return stats


def _rule_rows(level: int, problems: list[Problem]) -> tuple[list[dict], Counter]:
    rows, dropped = [], Counter()
    for problem in tqdm(problems, desc=f"level {level} (rule teacher)", unit="row", leave=False):
        result = rule_teacher(level, problem)
        if result.dropped:
            dropped[result.dropped] += 1
        else:
            rows.append(sft_row(level, problem, result.reasoning, result.answer, "rule"))
    return rows, dropped


def _existing_stats(run_dir: RunDir) -> dict | None:
    if not run_dir.data_stats.is_file():
        return None
    return read_json(run_dir.data_stats, what="data stats", hint="delete it and rerun prepare-data")


def _source_description(config: StudyConfig, n_rows: int) -> dict:
    """What the training data is, with the dataset's commit (``sha``) when there is one to pin."""
    from training.data import dataset_revision

    data = config.data
    if data.source == "synthetic":
        described = {"kind": "synthetic", **data.synthetic.model_dump()}
    elif data.source == "local":
        # The folder's name, not its path: the stats travel with every adapter to the Hub.
        described = {"kind": "local", "folder": data.local_dir.name, "dataset_id": data.dataset_id}
    else:
        described = {
            "kind": "hub",
            "dataset_id": data.dataset_id,
            "config": data.config_name,
            "revision": data.revision,
        }
    if data.source != "synthetic":
        described["sha"] = dataset_revision(config)
    return {**described, "train_rows": n_rows}
