"""The evaluate stage: think-token counting, sample records, kill -9 resume, errors and the CLI.

Models are the small random Qwen3 of test_generate.py (the ``generation_base`` fixture) and random LoRA
adapters, so every test is about the stage's bookkeeping, not about accuracy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner
from helpers import make_adapter
from scipy.stats import binomtest

from eval_artifacts.records import read_samples
from eval_artifacts.rundir import RunDir, iter_jsonl, read_json
from eval_artifacts.study.config import load_config
from eval_artifacts.study.errors import ArtifactError, ConfigError
from eval_artifacts.study.levels import build_baseline_prompt
from hub_tools.cli import main
from training import evaluate
from training.generate import Generation
from training.gsm8k import Problem, grade
from training.tiny import train_tokenizer
from training.tokens import reasoning_text, think_tokens


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE with no merges: every ASCII character is one token, so counts are string lengths."""
    return train_tokenizer(["x"], vocab_size=300)


@pytest.mark.parametrize(
    ("completion", "finish_reason", "reasoning"),
    [
        ("<think>\n12+7=19; 19-5=14\n</think>\n#### 14", "stop", "12+7=19; 19-5=14"),
        ("<think>\n\n</think>\n#### 14", "stop", ""),
        ("Tom has 12+7 = 19 pens.\nThen 19-5 = 14.\n#### 14", "stop", "Tom has 12+7 = 19 pens.\nThen 19-5 = 14."),
        ("x = 3 + 4\nThe answer is 7.", "stop", "x = 3 + 4"),
        ("So #### 5 first\nthen #### 7", "stop", "So #### 5 first"),
        ("no answer line at all", "stop", "no answer line at all"),
        ("<think>\ntruncated reasoning wit", "length", "truncated reasoning wit"),
        # The stock model's own endings: the count stops at the line the grading rule reads the answer from.
        ("So 5 + 3 = 8.\nThe final answer is $\\boxed{8}$.", "stop", "So 5 + 3 = 8."),
        ("She has 3 + 4 = 7.\n**Final Answer:**\n**7**", "stop", "She has 3 + 4 = 7."),
        ("Natalia sold 72.\n\n**Final Answer**\n\\[\n\\boxed{72}\n\\]", "stop", "Natalia sold 72.\n\n**Final Answer**\n\\["),
        # The answer line is where the grader read it, not a later line that repeats its text.
        ("Step 1\n**Final Answer:**\n**72**\n\n**Final Answer:** see above", "stop", "Step 1"),
        ("a\r\nb = 3\r\n#### 3", "stop", "a\r\nb = 3"),
        # An announcement the grading rule does not read (above the last 5 lines) ends no reasoning.
        ("The answer is 7.\na\nb\nc\nd\ne", "stop", "The answer is 7.\na\nb\nc\nd\ne"),
        # Cut by the token limit: the unfinished last line is no answer; a finished one before it is.
        ("x = 3 + 4\n#### 7\nand then", "length", "x = 3 + 4"),
        ("x = 3 + 4\n#### 7", "length", "x = 3 + 4\n#### 7"),
    ],
)
def test_think_tokens_count_only_the_reasoning(byte_tokenizer, completion, finish_reason, reasoning):
    assert reasoning_text(completion, finish_reason=finish_reason) == reasoning
    assert think_tokens(byte_tokenizer, completion, finish_reason=finish_reason) == len(reasoning)
    graded = grade(completion, "7", finish_reason=finish_reason, kind="stock")
    if "<think>" not in completion and graded.predicted is None:
        assert reasoning == completion.strip()  # no answer for the grader: all of it is reasoning


def test_record_grades_and_counts_one_completion(byte_tokenizer):
    problem = Problem(
        id="test-00001", question="Tom has 12 pens, gets 7. How many pens now?", answer="", gold="19"
    )
    text = "<think>\n12+7=19\n</think>\n#### 19"
    generation = Generation(index=0, text=text, token_ids=tuple(range(11)), finish_reason="stop")
    engine = SimpleNamespace(tokenizer=byte_tokenizer)

    record = evaluate.make_record(
        engine, problem, "P", generation, model="level_3", level=3, training_seed=42, seed=1, sample=2
    )

    assert record == {
        "id": "test-00001", "question": problem.question, "gold": "19", "prompt": "P", "completion": text,
        "reasoning": "12+7=19", "predicted": "19", "extractor": "hash", "correct": True,
        "correct_lenient": True, "grade_reason": "correct", "think_tokens": 7, "completion_tokens": 11,
        "finish_reason": "stop", "model": "level_3", "level": 3, "training_seed": 42, "seed": 1, "sample": 2,
        "schema_version": 2,
    }  # fmt: skip
    wrong = evaluate.make_record(
        engine,
        problem,
        "P",
        Generation(0, "Tom has 20.\n#### 20", (1, 2), "stop"),
        model="base",
        level=None,
        training_seed=None,
        seed=0,
    )
    assert (wrong["correct"], wrong["predicted"], wrong["reasoning"], wrong["think_tokens"]) == (
        False, "20", None, len("Tom has 20."),
    )  # fmt: skip
    assert (wrong["grade_reason"], wrong["correct_lenient"]) == ("wrong", False)


@pytest.mark.parametrize(
    ("text", "finish", "model", "graded"),
    [
        # Base is graded by the stock model's rule, a level by the level format's.
        ("Tom has 12+7 = 19 pens.\n#### 19", "stop", "base", ("19", True, True, "correct")),
        ("Tom has 12+7 = 19 pens.\n#### 19", "stop", "level_3", (None, False, True, "no_answer")),
        ("Tom has 12+7 = 19 pens.", "stop", "base", (None, False, True, "no_answer")),
        ("<think>\n12+7=19", "length", "level_3", (None, False, True, "truncated")),
        ("Tom has 12+7 = 19", "length", "base", (None, False, True, "truncated")),
    ],
)
def test_record_grades_strictly_and_leniently(byte_tokenizer, text, finish, model, graded):
    problem = Problem(id="test-00001", question="Tom has 12 pens, gets 7. How many?", answer="", gold="19")
    generation = Generation(index=0, text=text, token_ids=(1, 2, 3), finish_reason=finish)
    level = None if model == "base" else 3
    record = evaluate.make_record(
        SimpleNamespace(tokenizer=byte_tokenizer),
        problem,
        "P",
        generation,
        model=model,
        level=level,
        training_seed=None if level is None else 42,
        seed=0,
    )
    assert (
        record["predicted"],
        record["correct"],
        record["correct_lenient"],
        record["grade_reason"],
    ) == graded


# ---------------------------------------------------------------- whole-stage tests


@pytest.fixture(scope="module")
def study(generation_base, tmp_path_factory):
    """A config for the small base with one level, 30 test problems, and a trained-looking adapter dir."""
    root = tmp_path_factory.mktemp("eval_study")
    adapter = make_adapter(generation_base, root / "adapter", seed=5)
    config = load_config().with_overrides(
        **{
            "base_model.id": str(generation_base),
            "levels": [1],
            "data.synthetic.n_test": 30,
            "eval.batch_size": 2,
            "eval.max_new_tokens": 8,
            "eval.prompt_baselines": False,  # on in one test below, which evaluates it
        }
    )
    return SimpleNamespace(config=config, adapter=adapter, root=root)


def new_run_dir(study, name: str, adapters: tuple[str, ...] = ("level_1",)) -> RunDir:
    run_dir = RunDir(study.root / name)
    for model in adapters:
        target = run_dir.adapter_dir(model)
        target.mkdir(parents=True)
        for file in study.adapter.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
    return run_dir


def test_kill_9_then_rerun_equals_an_uninterrupted_run(study):
    reference = new_run_dir(study, "uninterrupted")
    evaluate.run(study.config.with_overrides(run_dir=str(reference.root)), reference)

    resumed = new_run_dir(study, "killed")
    config = study.config.with_overrides(run_dir=str(resumed.root))
    config_path = study.root / "killed.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    # SIGKILL right after the third batch of base is on disk, wherever the scheduler puts this process.
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            "from hub_tools.cli import main; main()",
            "evaluate",
            "--config",
            str(config_path),
        ],
        env={**os.environ, "COT_COMPRESS_KILL_AT": "evaluate.batch_appended:base#3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
    )
    assert process.returncode == -signal.SIGKILL, "evaluate was not killed at its third batch"
    interrupted = {
        m: len(resumed.samples(m).read_bytes().splitlines())
        for m in ("base", "level_1")
        if resumed.samples(m).is_file()
    }
    assert 0 < sum(interrupted.values()) < 60
    # A kill in the middle of a write leaves a torn last line; the rerun must drop it.
    in_flight = resumed.samples("level_1" if "level_1" in interrupted else "base")
    with in_flight.open("a") as handle:
        handle.write('{"id": "test-000')

    evaluate.run(config, resumed)

    for model in ("base", "level_1"):
        got = read_samples(resumed.samples(model), model=model)  # raises on a duplicate (id, seed)
        want = read_samples(reference.samples(model), model=model)
        assert len(got) == 30
        assert sorted(got, key=lambda r: r["id"]) == sorted(want, key=lambda r: r["id"])
        assert read_json(resumed.metrics(model), what="m", hint="") == read_json(
            reference.metrics(model), what="m", hint=""
        )
    assert resumed.summary.is_file() and resumed.pareto_png.stat().st_size > 0


SAMPLED = {"eval.seeds": [0, 1], "eval.sampling": {"temperature": 1.5, "samples_per_problem": 2}}


def test_sampled_draws_are_reproducible_and_a_complete_rerun_generates_nothing(study, monkeypatch):
    run_dir = new_run_dir(study, "complete")
    config = study.config.with_overrides(run_dir=str(run_dir.root), **SAMPLED)
    evaluate.run(config, run_dir, models=["base"])
    before = run_dir.samples("base").read_bytes()
    rows = read_samples(run_dir.samples("base"))
    assert {(r["seed"], r["sample"]) for r in rows} == {(0, 0), (0, 1), (1, 0), (1, 1)} and len(rows) == 120
    by_draw = {(r["id"], r["seed"], r["sample"]): r["completion"] for r in rows}
    assert any(by_draw[(i, 0, 0)] != by_draw[(i, 0, 1)] for i, _, _ in by_draw)  # draws, not copies
    metrics = read_json(run_dir.metrics("base"), what="m", hint="")
    assert (metrics["n_problems"], metrics["samples_per_problem"], metrics["ci_method"]) == (
        30,
        4,
        "wilson_clustered",
    )

    def fail(*args, **kwargs):
        raise AssertionError("nothing should be generated")

    monkeypatch.setattr("training.generate.GenerationEngine.generate_batch", fail)
    evaluate.run(config, run_dir, models=["base"])
    assert run_dir.samples("base").read_bytes() == before
    monkeypatch.undo()

    # A run that lost its last draw's rows draws them again exactly: each batch is seeded on its own.
    kept = [line for line in before.decode().splitlines() if '"seed": 1, "sample": 1' not in line]
    run_dir.samples("base").write_text("\n".join(kept) + "\n")
    evaluate.run(config, run_dir, models=["base"])
    assert sorted(run_dir.samples("base").read_bytes().splitlines()) == sorted(before.splitlines())


def test_training_seeds_and_the_prompt_only_baseline_are_evaluated_like_the_others(study):
    config = study.config.with_overrides(**{"training.seeds": [42, 43], "eval.prompt_baselines": True})
    run_dir = new_run_dir(study, "seeds", adapters=("level_1", "level_1_seed43"))
    summary = evaluate.run(config.with_overrides(run_dir=str(run_dir.root)), run_dir)

    assert [row["model"] for row in summary["models"]] == ["base", "level_1", "prompt_l1", "level_1_seed43"]
    assert [row["kind"] for row in summary["models"]] == ["base", "adapter", "prompt", "adapter"]
    prompt = read_samples(run_dir.samples("prompt_l1"))
    adapter = read_samples(run_dir.samples("level_1"))
    # The level's prompt with its style and answer format spelled out, for a model that never saw "Level 1".
    assert [r["prompt"] for r in prompt] == [build_baseline_prompt(1, r["question"]) for r in adapter]
    assert all(
        r["prompt"].startswith(a["prompt"].split("\n")[0]) for r, a in zip(prompt, adapter, strict=True)
    )
    assert "<think>" in prompt[0]["prompt"] and "####" in prompt[0]["prompt"]
    assert {r["training_seed"] for r in prompt} == {None} and {r["training_seed"] for r in adapter} == {42}
    assert {r["training_seed"] for r in read_samples(run_dir.samples("level_1_seed43"))} == {43}
    assert [r["completion"] for r in prompt] != [r["completion"] for r in adapter]
    level_1 = read_json(run_dir.metrics("level_1"), what="m", hint="")
    assert level_1["vs_prompt"]["n_paired"] == 30 and level_1["training_seed"] == 42
    [spread] = summary["training_seeds"]
    assert spread["models"] == ["level_1", "level_1_seed43"] and spread["training_seeds"] == [42, 43]


def test_an_rl_adapter_is_evaluated_and_paired_with_its_sft_sibling(study):
    config = study.config.with_overrides(**{"rl.levels": [1]})
    run_dir = new_run_dir(study, "rl")
    make_adapter(config.base_model.id, run_dir.adapter_dir("rl_l1"), seed=6)  # other weights than level_1's
    summary = evaluate.run(config.with_overrides(run_dir=str(run_dir.root)), run_dir)

    rows = {row["model"]: row for row in summary["models"]}
    assert list(rows) == ["base", "level_1", "rl_l1"]
    assert [(rows[m]["kind"], rows[m]["rl"]) for m in rows] == [
        ("base", False),
        ("adapter", False),
        ("adapter", True),
    ]
    rl_rows, sft_rows = read_samples(run_dir.samples("rl_l1")), read_samples(run_dir.samples("level_1"))
    assert {r["training_seed"] for r in rl_rows} == {42} and {r["level"] for r in rl_rows} == {1}
    assert [r["prompt"] for r in rl_rows] == [
        r["prompt"] for r in sft_rows
    ]  # the level's prompt, graded alike
    assert [r["completion"] for r in rl_rows] != [r["completion"] for r in sft_rows]
    # vs_sft recomputed here from the two files: greedy, one draw per problem, so exact McNemar.
    mine = {r["id"]: r["correct"] for r in rl_rows}
    theirs = {r["id"]: r["correct"] for r in sft_rows}
    b = sum(1 for pid in mine if theirs[pid] and not mine[pid])
    c = sum(1 for pid in mine if mine[pid] and not theirs[pid])
    vs_sft = read_json(run_dir.metrics("rl_l1"), what="m", hint="")["vs_sft"]
    assert (vs_sft["n_paired"], vs_sft["b"], vs_sft["c"], vs_sft["test"]) == (30, b, c, "mcnemar_exact")
    assert vs_sft["delta"] == pytest.approx((c - b) / 30)
    expected_p = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert vs_sft["p_value"] == pytest.approx(expected_p)
    assert (
        rows["rl_l1"]["vs_sft"] == vs_sft
        and rows["level_1"]["vs_sft"] is None
        and rows["base"]["vs_sft"] is None
    )
    # The seed spread is about SFT seeds: the RL adapter is another method, not another seed.
    [spread] = summary["training_seeds"]
    assert spread["models"] == ["level_1"]


def test_a_half_done_model_is_left_out_of_the_summary(study):
    run_dir = new_run_dir(study, "half_done")
    config = study.config.with_overrides(run_dir=str(run_dir.root))
    evaluate.run(config, run_dir, models=["base"])
    level_1 = run_dir.samples("level_1")
    level_1.parent.mkdir(parents=True)
    rows = run_dir.samples("base").read_text().splitlines()[:10]
    level_1.write_text(
        "".join(
            row.replace(
                '"model": "base", "level": null, "training_seed": null',
                '"model": "level_1", "level": 1, "training_seed": 42',
            )
            + "\n"
            for row in rows
        )
    )

    summary = evaluate.run(config, run_dir, models=["base"])

    assert [row["model"] for row in summary["models"]] == ["base"]
    assert not run_dir.metrics("level_1").exists()


def test_missing_adapter_names_the_train_command(study, tmp_path):
    config = study.config.with_overrides(run_dir=str(tmp_path))
    with pytest.raises(ArtifactError, match=r"cot-compress train --levels 1"):
        evaluate.run(config, RunDir(tmp_path), models=["level_1"])


def test_unknown_model_is_a_config_error(study, tmp_path):
    with pytest.raises(ConfigError, match="level_7"):
        evaluate.run(study.config, RunDir(tmp_path), models=["level_7"])


def test_levels_without_base_samples_say_to_evaluate_base(study):
    run_dir = new_run_dir(study, "no_base")
    with pytest.raises(ArtifactError, match="--models base"):
        evaluate.run(study.config.with_overrides(run_dir=str(run_dir.root)), run_dir, models=["level_1"])
    assert len(read_samples(run_dir.samples("level_1"))) == 30  # the samples are kept for the next run


def test_evaluate_command_prints_one_line_per_model(study):
    run_dir = new_run_dir(study, "cli")
    config_path = Path(run_dir.root) / "study.yaml"
    config_path.write_text(yaml.safe_dump(study.config.model_dump(mode="json")))

    result = CliRunner().invoke(
        main, ["evaluate", "--config", str(config_path), "--run-dir", str(run_dir.root)]
    )

    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "accuracy" in line]
    assert [line.split()[0] for line in lines] == ["base", "level_1"]
    assert len(read_samples(run_dir.samples("level_1"))) == 30


def test_a_zero_adapter_fails_on_its_first_batch(study, tmp_path):
    """An adapter that changes nothing (here: PEFT's zero init of B) is the stock model under its name."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run_dir = RunDir(tmp_path / "run")
    base = AutoModelForCausalLM.from_pretrained(study.config.base_model.id)
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(run_dir.adapter_dir(1))
    config = study.config.with_overrides(run_dir=str(run_dir.root))

    with pytest.raises(
        ArtifactError, match=r"level_1: the adapter changed none of the 2 completions"
    ) as error:
        evaluate.run(config, run_dir)

    assert "\n" not in str(error.value) and "cot-compress train --levels 1 --force" in str(error.value)
    assert not run_dir.samples("level_1").exists()  # nothing of it was recorded
    assert len(read_samples(run_dir.samples("base"))) == 30


def test_the_adapter_check_passes_a_real_adapter_and_logs_the_engine(study):
    run_dir = new_run_dir(study, "logged")
    evaluate.run(study.config.with_overrides(run_dir=str(run_dir.root)), run_dir)

    log = list(iter_jsonl(run_dir.generation_log, what="generation log"))
    assert [(row["model"], row["samples"], row["engine"]) for row in log] == [
        ("base", 30, "hf"),
        ("level_1", 30, "hf"),
    ]
    for row, model in zip(log, ("base", "level_1"), strict=True):
        samples = read_samples(run_dir.samples(model))
        assert row["generated_tokens"] == sum(sample["completion_tokens"] for sample in samples)
        assert row["tokens_per_s"] == pytest.approx(row["generated_tokens"] / row["wall_time_s"], rel=0.01)
        assert row["cuda_graphs"] is False and row["device"] == "cpu" and row["dtype"] == "float32"


def test_ids_past_the_tokenizer_decode_to_nothing_and_still_count(byte_tokenizer):
    """Qwen's embedding has more rows than its tokenizer has tokens; a model can generate those ids."""
    from training.generate import GenerationEngine

    text = "<think>\n3+4=7\n</think>\n#### 7\n"  # the answer line is complete before the token limit
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    beyond = [151_000, len(byte_tokenizer) + 7]
    row = ids[:3] + beyond + ids[3:] + [beyond[0]]
    engine = SimpleNamespace(
        tokenizer=byte_tokenizer, stop_ids=[byte_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    )

    generation = GenerationEngine.to_generation(engine, 0, row)
    problem = Problem(id="test-00002", question="3 and 4?", answer="", gold="7")
    record = evaluate.make_record(
        engine, problem, "P", generation, model="level_3", level=3, training_seed=42, seed=0
    )

    assert generation.text == text and generation.finish_reason == "length"
    assert record["completion_tokens"] == len(ids) + 3 and record["think_tokens"] == len("3+4=7")
    assert record["correct"] is True and record["predicted"] == "7"
