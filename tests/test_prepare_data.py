"""Levels, the rule teacher and prepare-data, on synthetic problems and (opt-in) on the real GSM8K."""

import json
import os
import re
import statistics
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import load_config
from eval_artifacts.study.levels import LEVELS, build_prompt, build_response, parse_response
from hub_tools.cli import main
from training.gsm8k import problems_from_rows, safe_eval, solution_steps
from training.synthetic import generate_problems
from training.teachers import rule_teacher

GSM8K_DIR = os.environ.get("COT_GSM8K_DIR")  # tests marked realdata use it; conftest.py skips them without it


def test_prompt_and_response_round_trip():
    assert build_prompt(4, "  How many?  ") == "Solve this using Level 4 (Ultra-compact).\nProblem: How many?"
    response = build_response("m=48/2=24→t=48+24=72", "72")
    assert response == "<think>\nm=48/2=24→t=48+24=72\n</think>\n#### 72"
    parsed = parse_response(response)
    assert parsed.reasoning == "m=48/2=24→t=48+24=72"
    assert parsed.after_think.strip() == "#### 72"
    assert parse_response("#### 5").reasoning is None


def test_level_table_matches_design():
    assert [(n, level.name) for n, level in LEVELS.items()] == [
        (1, "Full"),
        (2, "Concise"),
        (3, "Equations"),
        (4, "Ultra-compact"),
        (5, "Minimal"),
    ]


def test_synthetic_problems_are_seeded_and_gsm8k_shaped():
    first, again = generate_problems(50, seed=3), generate_problems(50, seed=3)
    assert first == again
    assert first != generate_problems(50, seed=4)
    for problem in first:
        assert re.search(r"<<[^>]+=[^>]+>>", problem.answer)
        assert problem.answer.rstrip().endswith(f"#### {problem.gold}")
        steps = solution_steps(problem.answer)
        assert steps and all(step.arithmetic_ok for step in steps)
        assert steps[-1].value == problem.gold


def test_rule_teacher_on_a_known_problem():
    rows = [
        {
            "question": "Natalia sold clips to 48 friends in April, half as many in May. Total?",
            "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
        }
    ]
    (problem,) = problems_from_rows(rows, split="train", source="t")
    outputs = {level: rule_teacher(level, problem) for level in LEVELS}
    assert (
        outputs[1].reasoning
        == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether."
    )
    assert outputs[3].reasoning == "48 / 2 = 24; 48 + 24 = 72"
    assert outputs[4].reasoning == "c=48/2=24→a=48+24=72"
    assert outputs[5].reasoning == "48+24"
    assert all(out.answer == "72" for out in outputs.values())


def test_rule_teacher_drops_wrong_chains():
    rows = [
        {"question": "q", "answer": "He has 2+2 = <<2+2=5>>5 apples.\n#### 5"},
        {"question": "q", "answer": "He has 2+2 = <<2+2=4>>4 apples.\n#### 9"},
        {"question": "q", "answer": "He has some apples.\n#### 9"},
    ]
    problems = problems_from_rows(rows, split="train", source="t")
    assert [rule_teacher(3, p).dropped for p in problems] == [
        "arithmetic_error",
        "chain_result_not_gold",
        "no_arithmetic_steps",
    ]


def test_safe_eval_refuses_code():
    assert safe_eval("2*(3+4)") == 14
    assert safe_eval("__import__('os')") is None
    assert safe_eval("9**99999") is None


def test_prepare_data_cli_on_synthetic(tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["prepare-data", "--run-dir", str(run_dir), "--levels", "1,4"])
    assert result.exit_code == 0, result.output
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert set(stats["levels"]) == {"1", "4"}
    config = load_config(None)
    for level in (1, 4):
        rows = [json.loads(line) for line in RunDir(run_dir).train_file(level).read_text().splitlines()]
        entry = stats["levels"][str(level)]
        assert entry["total"] == config.data.synthetic.n_train
        assert entry["kept"] == len(rows) == entry["total"] - sum(entry["dropped"].values())
        lengths = [len(row["reasoning"]) for row in rows]
        assert entry["reasoning_chars"]["mean"] == round(statistics.fmean(lengths), 2)
        assert entry["reasoning_chars"]["median"] == statistics.median(lengths)
        assert set(rows[0]) == {"id", "prompt", "completion", "reasoning", "answer", "teacher"}
        assert rows[0]["prompt"].startswith(f"Solve this using Level {level} ")
        assert parse_response(rows[0]["completion"]).reasoning == rows[0]["reasoning"]


def test_unknown_level_on_command_line_is_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["prepare-data", "--run-dir", str(tmp_path), "--levels", "6"])
    assert result.exit_code == 2 and "level 6 does not exist" in result.stderr


def test_malformed_gsm8k_row_is_one_line_error(tmp_path):
    data = tmp_path / "gsm"
    data.mkdir()
    (data / "train.jsonl").write_text('{"question": "q", "answer": "#### 3"}\n{"question": "q"}\n')
    result = CliRunner().invoke(
        main, ["prepare-data", "--run-dir", str(tmp_path / "r"), "--data-dir", str(data)]
    )
    assert result.exit_code == 2
    assert "row 2" in result.stderr and "'answer'" in result.stderr


@pytest.mark.realdata
def test_real_gsm8k_gold_answers_all_parse():
    for split, expected in (("train", 7473), ("test", 1319)):
        rows = [json.loads(line) for line in (Path(GSM8K_DIR) / f"{split}.jsonl").read_text().splitlines()]
        assert len(problems_from_rows(rows, split=split, source=split)) == expected


@pytest.mark.realdata
def test_real_gsm8k_prepare_data_all_levels(tmp_path):
    started = time.perf_counter()
    result = CliRunner().invoke(
        main,
        [
            "prepare-data",
            "--config",
            "configs/qwen3-4b-gsm8k.yaml",
            "--data-dir",
            GSM8K_DIR,
            "--run-dir",
            str(tmp_path),
        ],
    )
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert elapsed < 60
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    means = []
    for level in range(1, 6):
        entry = stats["levels"][str(level)]
        assert entry["total"] == 7473
        assert entry["kept"] / entry["total"] >= 0.95
        assert set(entry) >= {"total", "kept", "dropped", "reasoning_chars"}
        means.append(entry["reasoning_chars"]["mean"])
    assert 35 <= means[3] <= 55
    assert all(a > b for a, b in zip(means, means[1:], strict=False))


def test_published_records_name_local_copies_without_this_machines_paths(tmp_path):
    """data_stats.json and training.json go to the Hub with every adapter: a local GSM8K copy is named by its
    folder and Hub id, a local base by the Hub repo it stands for, never by a path on the machine that ran."""
    from training import rl, sft

    data = tmp_path / "private" / "gsm8k"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text(
        json.dumps({"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3 = <<2+3=5>>5\n#### 5"}) + "\n"
    )
    result = CliRunner().invoke(
        main, ["prepare-data", "--run-dir", str(tmp_path / "run"), "--data-dir", str(data), "--levels", "4"]
    )
    assert result.exit_code == 0, result.output
    stats_text = (tmp_path / "run" / "data" / "stats.json").read_text()
    assert json.loads(stats_text)["source"]["folder"] == "gsm8k" and str(tmp_path) not in stats_text

    base = tmp_path / "private" / "models" / "qwen3-4b"
    config = load_config().with_overrides(
        run_dir=str(tmp_path / "run"),
        **{"base_model.id": str(base), "base_model.hub_id": "Qwen/Qwen3-4B-Instruct-2507", "rl.levels": [4]},
    )
    run_dir = RunDir(config.run_dir)
    run_dir.adapter_dir(4).mkdir(parents=True)
    (run_dir.adapter_dir(4) / "adapter_model.safetensors").write_bytes(b"weights")
    recorded = {"id": "Qwen/Qwen3-4B-Instruct-2507", "revision": config.base_model.revision}
    assert sft.recipe(config, 42)["base_model"] == recorded
    assert rl.stage_inputs(config, run_dir, 4)["base_model"] == recorded
    assert str(tmp_path) not in json.dumps(sft.recipe(config, 42)) + json.dumps(rl.stage_inputs(config, run_dir, 4))
