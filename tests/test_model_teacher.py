"""The model teacher: keeps only rows whose answer is gold, records why others were dropped, resumes."""

import json
from collections import Counter
from dataclasses import dataclass

import yaml
from click.testing import CliRunner

from eval_artifacts.study.config import default_config_path, load_config
from hub_tools.cli import main
from training.synthetic import generate_problems
from training.teachers import ModelTeacher, teacher_instruction


@dataclass(frozen=True)
class _Out:
    index: int
    text: str


class ScriptedEngine:
    """Answers from a table keyed by problem text; counts the prompts it was asked."""

    def __init__(self, answers: dict[str, str]):
        self.answers, self.asked = answers, []

    def generate(self, prompts, *, adapter, max_new_tokens, batch_size):
        self.asked += prompts
        for start in range(0, len(prompts), batch_size):
            batch = range(start, min(start + batch_size, len(prompts)))
            yield [_Out(i, self.answers[prompts[i].rsplit("Problem: ", 1)[1]]) for i in batch]


def test_keeps_gold_rows_drops_the_rest_and_resumes(tmp_path):
    config = load_config(None)
    problems = generate_problems(8, seed=5)
    answers = {}
    for n, p in enumerate(problems):
        answers[p.question] = (
            f"<think>\nsum {p.gold}\n</think>\n#### {p.gold}"
            if n % 3 == 0
            else f"<think>\nguess\n</think>\n#### {int(p.gold) + 1}"
            if n % 3 == 1
            else f"The answer is {p.gold}"
        )
    engine = ScriptedEngine(answers)
    path = tmp_path / "level_4" / "train.jsonl"
    rows, dropped = ModelTeacher(config, engine=engine).write_level(4, problems, path)
    shots = config.teacher.few_shot
    assert dropped["used_as_example"] == shots
    expected_kept = [p for n, p in enumerate(problems[shots:], start=shots) if n % 3 == 0]
    assert [row["id"] for row in rows] == [p.id for p in expected_kept]
    assert all(
        row["answer"] == p.gold and row["teacher"].startswith("model:")
        for row, p in zip(rows, expected_kept, strict=True)
    )
    assert len(rows) + sum(dropped.values()) == len(problems)
    assert set(dropped) == {"used_as_example", "answer_not_gold", "no_think_block"}
    # Every prompt carries the level's spec and the worked examples in the target format.
    assert engine.asked[0].startswith(
        teacher_instruction(4, ModelTeacher(config, engine=engine).examples(4, problems))
    )

    again = ScriptedEngine(answers)
    rows2, dropped2 = ModelTeacher(config, engine=again).write_level(4, problems, path)
    assert again.asked == [] and rows2 == rows and dropped2 == dropped
    assert len(path.read_text().splitlines()) == len(rows)


def test_prepare_data_with_a_real_model_teacher(tmp_path, monkeypatch):
    """The tiny base as teacher through the CLI: stats add up, and a rerun generates nothing new."""
    from training.tiny import ensure_tiny_base

    data = yaml.safe_load(default_config_path().read_text())
    data["teacher"] = {
        "kind": "model",
        "model_id": str(ensure_tiny_base(load_config(None))),
        "max_new_tokens": 24,
        "batch_size": 8,
        "few_shot": 1,
    }
    data["data"]["max_train_rows"] = 12
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(data))
    args = ["prepare-data", "--config", str(config_path), "--run-dir", str(tmp_path / "run"), "--levels", "3"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())["levels"]["3"]
    assert stats["total"] == 12 and stats["kept"] + sum(stats["dropped"].values()) == 12
    assert stats["teacher"].startswith("model:")
    dropped_file = tmp_path / "run" / "data" / "level_3" / "dropped.jsonl"
    train_file = dropped_file.with_name("train.jsonl")
    before = (Counter(json.loads(line)["reason"] for line in dropped_file.read_text().splitlines()),
              train_file.read_bytes(), dropped_file.read_bytes())  # fmt: skip

    def nothing_to_generate(self, prompts, **kwargs):
        assert not prompts, f"a rerun over finished rows asked the teacher again for {len(prompts)}"
        return iter(())

    monkeypatch.setattr("training.generate.GenerationEngine.generate", nothing_to_generate)
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    after = (Counter(json.loads(line)["reason"] for line in dropped_file.read_text().splitlines()),
             train_file.read_bytes(), dropped_file.read_bytes())  # fmt: skip
    assert after == before
