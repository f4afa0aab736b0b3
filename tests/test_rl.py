"""The RL stage: the reward's terms, the training split only, the training record, resume after a kill, skipping.

GRPO runs on the training tests' 2-layer Qwen3 (``training_base``) after a few SFT steps of level 5, whose target
length (its SFT reasoning's mean, under the spec's 20 characters) the random model's 24-token completions cross by
varying amounts: the length term differs within a group, so GRPO has advantages to follow and the weights move.
Torch runs single-threaded so that an interrupted and an uninterrupted run reduce floats in the same order.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_kill_hook, killed_at, prepared, sft_study
from safetensors.torch import load_file
from transformers import AutoTokenizer

from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import RewardWeightsConfig
from eval_artifacts.study.errors import ArtifactError, DataError
from eval_artifacts.study.levels import build_response
from hub_tools import pipeline
from training import data, rl, sft
from training.gsm8k import grade
from training.tokens import count_tokens

ROOT = Path(__file__).resolve().parents[1]
RL_SETTINGS = {
    "levels": [5],
    "rl.levels": [5],
    "rl.max_steps": 4,
    "rl.prompts_per_step": 2,
    "rl.num_generations": 4,
    "rl.max_new_tokens": 24,
    "rl.save_steps": 2,
    "rl.learning_rate": 0.01,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rl_study(base, run_dir, **changes):
    return sft_study(base, run_dir).with_overrides(**{**RL_SETTINGS, **changes})


@pytest.fixture(scope="module")
def after_sft(training_base, tmp_path_factory) -> RunDir:
    """A run dir with level 5's SFT data and adapter (8 steps); tests copy it."""
    config = rl_study(training_base, tmp_path_factory.mktemp("after_sft") / "run")
    run_dir = prepared(config, levels=(5,))
    sft.run(config, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def straight(training_base, after_sft, tmp_path_factory):
    """The uninterrupted RL run of level 5: its run dir and training.json."""
    root = tmp_path_factory.mktemp("straight") / "run"
    shutil.copytree(after_sft.root, root)
    config = rl_study(training_base, root)
    return {"config": config, "run": RunDir(root), "payload": rl.run(config, RunDir(root))[5]}


def copied(straight, after_sft, dest):
    shutil.copytree(after_sft.root, dest)
    return straight["config"].with_overrides(run_dir=str(dest)), RunDir(dest)


def rl_weights(run_dir: RunDir, level: int = 5) -> dict[str, torch.Tensor]:
    return load_file(run_dir.rl_adapter_dir(level) / "adapter_model.safetensors")


# ---------------------------------------------------------------- the reward

GOLD = "14"
# (completion, finish_reason, correct, format): the level format, and each way of missing it.
HAND_MADE = [
    (build_response("12+7-5", "14"), "stop", 1.0, 1.0),
    (build_response("12+7-5", "13"), "stop", 0.0, 1.0),  # well formed, wrong
    ("<think>\n12+7-5\n</think>\nThe answer is 14", "stop", 1.0, 0.0),  # graded like eval, no '####' line
    ("12+7-5\n#### 14", "stop", 0.0, 0.0),  # no think block: the strict grader reads nothing
    ("<think>\n12+7-5 = 14\n#### 14", "length", 0.0, 0.0),  # think block never closed, cut by the limit
    ("<think>\n12+7-5\n</think>\n", "length", 0.0, 0.0),  # cut after the block, before any answer
    ("<think>\n12+7=19; 19-5=14\n</think>\n#### 14", "stop", 1.0, 1.0),  # the answer after the block counts
    ("<think>\n14\n</think>\n#### 13", "stop", 0.0, 1.0),  # ... and only that one
]


@pytest.mark.parametrize(("completion", "finish", "correct", "well_formed"), HAND_MADE)
def test_correct_and_format_terms_on_hand_made_completions(completion, finish, correct, well_formed):
    terms = rl.reward_terms(completion, GOLD, finish_reason=finish, think=5, target=20)
    assert (terms.correct, terms.format, terms.length) == (correct, well_formed, 0.0)
    # The reward's correctness is the evaluation's strict grade of the same output.
    assert terms.correct == grade(completion, GOLD, finish_reason=finish, kind="adapter").correct


@pytest.mark.parametrize(
    ("think", "penalty"), [(0, 0.0), (20, 0.0), (21, 0.05), (30, 0.5), (40, 1.0), (400, 1.0)]
)
def test_length_term_grows_past_the_target_and_is_capped(think, penalty):
    terms = rl.reward_terms(build_response("1+1", "2"), "2", finish_reason="stop", think=think, target=20)
    assert terms.length == pytest.approx(penalty)


def test_reward_functions_weigh_terms_and_count_think_tokens_with_the_base_tokenizer(training_base):
    tokenizer = AutoTokenizer.from_pretrained(training_base)
    rows = [{"reasoning": "12+7=19; 19-5=14"}, {"reasoning": "3*4=12"}]
    design = rl.RewardDesign.for_level(4, tokenizer, rows, weights=RewardWeightsConfig())
    tokens = [count_tokens(tokenizer, r["reasoning"]) for r in rows]
    rate = sum(tokens) / sum(len(r["reasoning"]) for r in rows)
    assert design.target_chars == 45  # Level 4 "~45 chars"
    assert design.spec_think_tokens == math.ceil(45 * rate)
    # Reasoning shorter than the spec's (as the tiny data's is): the target is its own mean, not the spec's.
    assert design.sft_think_tokens == pytest.approx(sum(tokens) / 2, abs=0.01)
    assert design.target_think_tokens == math.ceil(sum(tokens) / 2) < design.spec_think_tokens
    assert design.reward_weights() == [1.0, 0.2, 0.5]
    record = design.record()
    assert (record["spec_think_tokens"], record["target_think_tokens"]) == (
        design.spec_think_tokens,
        design.target_think_tokens,
    )
    # Reasoning longer than the spec's: the spec's length is the target.
    long_rows = [{"reasoning": "12+7=19; 19-5=14; " * 6}] * 2
    long = rl.RewardDesign.for_level(4, tokenizer, long_rows, weights=RewardWeightsConfig())
    assert long.target_think_tokens == long.spec_think_tokens < long.sft_think_tokens

    long_reasoning = "+".join(["1"] * 60)  # far past the target
    completions = [
        [{"role": "assistant", "content": build_response("12+7-5", "14")}],
        [{"role": "assistant", "content": build_response(long_reasoning, "60")}],
        [{"role": "assistant", "content": "<think>\n12+7"}],
    ]
    eos = [tokenizer.eos_token_id]
    ids = [[5, 6, eos[0]], [5, 6, eos[0]], [5, 6, 7]]  # the last was cut by the token limit
    correct, well_formed, length = rl.reward_functions(design, tokenizer, eos)
    assert [f.__name__ for f in (correct, well_formed, length)] == ["correct", "format", "length"]
    logged = {}
    kwargs = {"completions": completions, "completion_ids": ids, "gold": ["14", "60", "19"]}
    assert correct(**kwargs) == [1.0, 1.0, 0.0]
    assert well_formed(**kwargs) == [1.0, 1.0, 0.0]
    assert length(**kwargs, log_metric=logged.__setitem__) == [0.0, -1.0, 0.0]
    think = [count_tokens(tokenizer, t) for t in ("12+7-5", long_reasoning, "12+7")]
    assert logged == {"think_tokens": pytest.approx(sum(think) / 3)}


# ---------------------------------------------------------------- the stage


def test_rl_continues_the_sft_adapter_and_records_every_term_per_step(straight, after_sft):
    run_dir, payload = straight["run"], straight["payload"]
    out = run_dir.rl_adapter_dir(5)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training.json",
    ]  # no checkpoints, no README.md, no copy of the KL reference adapter
    assert json.loads(run_dir.rl_training_json(5).read_text()) == payload

    # The same LoRA (same modules and shapes) continued, not a new adapter: every weight started at SFT's.
    sft_weights = load_file(after_sft.adapter_dir(5) / "adapter_model.safetensors")
    weights = rl_weights(run_dir)
    assert weights.keys() == sft_weights.keys()
    assert any(not torch.equal(weights[name], sft_weights[name]) for name in weights), "GRPO changed nothing"

    def adapter_config(directory: Path) -> dict:
        loaded = json.loads((directory / "adapter_config.json").read_text())
        # PEFT writes target_modules from a set: the order varies with the process's string hash seed.
        return loaded | {"target_modules": sorted(loaded["target_modules"])}

    assert adapter_config(out) == adapter_config(after_sft.adapter_dir(5))
    assert payload["continued_from"]["adapter"] == "adapters/level_5"

    assert (payload["model"], payload["method"], payload["steps"]) == ("rl_l5", "GRPO", 4)
    assert payload["hyperparameters"]["num_generations"] == 4
    reward = payload["reward"]
    assert reward["weights"] == {"correct": 1.0, "format": 0.2, "length": 0.5}
    assert reward["target_chars"] == 20
    assert (
        1
        <= reward["target_think_tokens"]
        == min(reward["spec_think_tokens"], math.ceil(reward["sft_think_tokens"]))
    )
    assert [row["step"] for row in payload["log"]] == [1, 2, 3, 4]
    for row in payload["log"]:
        assert {"reward", "correct", "format", "length", "think_tokens", "kl"} <= set(row)
        assert 0 <= row["length"] <= 1
        weighted = row["correct"] + 0.2 * row["format"] - 0.5 * row["length"]
        assert row["reward"] == pytest.approx(weighted, abs=1e-5)
    assert any(row["length"] > 0 for row in payload["log"])  # the setting the module docstring promises


def test_rl_reads_the_training_split_only(training_base, after_sft, tmp_path, monkeypatch):
    config = rl_study(training_base, tmp_path / "run", **{"rl.max_steps": 1})
    shutil.copytree(after_sft.root, tmp_path / "run")
    run_dir = RunDir(tmp_path / "run")
    splits = []
    load_problems = data.load_problems
    monkeypatch.setattr(
        data, "load_problems", lambda c, split: splits.append(split) or load_problems(c, split)
    )
    seen = []
    make = rl.reward_functions

    def spying(design, tokenizer, eos):
        functions = make(design, tokenizer, eos)

        def correct(prompts, **kwargs):
            seen.extend(prompt[-1]["content"] for prompt in prompts)
            return functions[0](prompts=prompts, **kwargs)

        return [correct, *functions[1:]]

    monkeypatch.setattr(rl, "reward_functions", spying)
    rl.run(config, run_dir)

    train_prompts = {json.loads(line)["prompt"] for line in run_dir.train_file(5).read_text().splitlines()}
    test_questions = [p.question for p in load_problems(config, "test")]
    assert seen and set(seen) <= train_prompts
    assert not any(question in prompt for prompt in seen for question in test_questions)
    assert "test" not in splits

    # A row that is not a training-split problem stops the stage before any model is loaded.
    lines = run_dir.train_file(5).read_text().splitlines()
    planted = json.loads(lines[0]) | {"id": "test-00003"}
    run_dir.train_file(5).write_text("\n".join([*lines, json.dumps(planted)]) + "\n")
    with pytest.raises(DataError, match="training split"):
        rl.run(config, run_dir, force=True)


def test_rl_without_an_sft_adapter_says_to_train_first(training_base, tmp_path):
    config = rl_study(training_base, tmp_path / "run")
    run_dir = prepared(config, levels=(5,))
    with pytest.raises(ArtifactError, match="cot-compress train"):
        rl.run(config, run_dir)


def test_rl_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(straight, after_sft, tmp_path):
    config, run_dir = copied(straight, after_sft, tmp_path / "run")

    def train():
        checkpoint_kill_hook()
        rl.run(config, run_dir)

    killed_at("train.checkpoint_saved#1", train)  # at step 2 of 4
    assert not run_dir.rl_training_json(5).exists()
    assert (run_dir.rl_adapter_dir(5) / "checkpoints" / "checkpoint-2").is_dir()
    rl.run(config, run_dir, resume=True)

    got, want = rl_weights(run_dir), rl_weights(straight["run"])
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    record = json.loads(run_dir.rl_training_json(5).read_text())
    expected = dict(straight["payload"])
    assert [row["step"] for row in record["log"]] == [1, 2, 3, 4]  # the checkpoint carried steps 1-2's log
    for row, want_row in zip(record.pop("log"), expected.pop("log"), strict=True):
        assert row == pytest.approx(want_row, rel=1e-4, abs=1e-6)
    record.pop("wall_time_s"), expected.pop("wall_time_s")
    assert record == expected
    assert not (run_dir.rl_adapter_dir(5) / "checkpoints").exists()


def test_rl_is_skipped_when_its_inputs_hash_matches(straight, after_sft, tmp_path, monkeypatch):
    config, run_dir = copied(straight, after_sft, tmp_path / "run")
    shutil.copytree(straight["run"].rl_adapter_dir(5), run_dir.rl_adapter_dir(5))
    built = []
    monkeypatch.setattr(
        rl, "build_trainer", lambda **kwargs: built.append(kwargs) or pytest.fail("retrained")
    )
    assert rl.run(config, run_dir) == {5: straight["payload"]}
    assert built == []

    # Any RL setting, a retrained SFT adapter or other data changes the hash: the level is stale.
    inputs = rl.stage_inputs(config, run_dir, 5)
    assert rl.up_to_date(run_dir, 5, inputs) == straight["payload"]
    for change in ({"rl.beta": 0.1}, {"rl.reward_weights.length": 1.0}, {"rl.max_new_tokens": 32}):
        changed = rl.stage_inputs(config.with_overrides(**change), run_dir, 5)
        assert rl.up_to_date(run_dir, 5, changed) is None, change
    weights = run_dir.adapter_dir(5) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert rl.up_to_date(run_dir, 5, rl.stage_inputs(config, run_dir, 5)) is None


def test_train_and_publish_has_an_rl_stage_only_when_on_and_hashes_its_settings(straight):
    config, run_dir = straight["config"], straight["run"]
    stages = {stage.name: stage for stage in pipeline.build_stages()}
    assert pipeline.STAGES.index("train") < pipeline.STAGES.index("rl") < pipeline.STAGES.index("evaluate")
    rl_stage, evaluate = stages["rl"], stages["evaluate"]
    assert rl_stage.applies(config) and not rl_stage.applies(config.with_overrides(**{"rl.levels": []}))

    recorded = {
        "inputs": pipeline._hash(rl_stage.inputs(config, run_dir)),
        "outputs": pipeline._hashes(rl_stage.outputs(config, run_dir), run_dir.root),
    }
    assert pipeline.stage_is_current(rl_stage, config, run_dir, recorded)
    for change in ({"rl.learning_rate": 0.02}, {"rl.num_generations": 2}, {"rl.loss_type": "grpo"}):
        assert not pipeline.stage_is_current(rl_stage, config.with_overrides(**change), run_dir, recorded)

    # The card stage's outputs include the RL adapter's card, so a deleted one is rendered again.
    rl_card = run_dir.card(config.rl_repo_id(5).split("/")[1])
    assert rl_card in stages["render-cards"].outputs(config, run_dir)
    assert rl_card not in stages["render-cards"].outputs(config.with_overrides(**{"rl.levels": []}), run_dir)

    # A new RL adapter makes the evaluation stale.
    before = pipeline._hash(evaluate.inputs(config, run_dir))
    weights = run_dir.rl_adapter_dir(5) / "adapter_model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original + b" ")
        assert pipeline._hash(evaluate.inputs(config, run_dir)) != before
        assert not pipeline.stage_is_current(rl_stage, config, run_dir, recorded)
    finally:
        weights.write_bytes(original)


# ---------------------------------------------------------------- the GPU benchmark's CPU smoke mode


@pytest.mark.slow
def test_bench_grpo_smoke_times_generation_inside_each_step_for_both_rollout_engines(tmp_path):
    out = tmp_path / "grpo.json"
    subprocess.run(
        [sys.executable, "-m", "bench.bench_grpo", "--smoke", "--out", str(out)],
        check=True, cwd=ROOT, timeout=600, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke" and list(result["rollouts"]) == ["hf", "fast"]
    settings = result["rl"]
    assert settings["completions_per_step"] == settings["prompts_per_step"] * settings["num_generations"] == 4
    for engine, figures in result["rollouts"].items():
        assert (figures["steps"], figures["steps_timed"]) == (3, 2), engine  # warm-up step left out
        # Random weights never stop early: each step generates every completion to the token limit.
        assert figures["generated_tokens_per_step"] == 4 * settings["max_new_tokens"], engine
        per_step = figures["step_time_s"]["per_step"]
        assert figures["step_time_s"]["mean"] == pytest.approx(sum(per_step) / 2, abs=1e-3)
        assert 0 < figures["generation_share_of_step"] < 1
        generation_s = figures["generation_share_of_step"] * sum(per_step)
        assert figures["generation_tokens_per_s"] == pytest.approx(
            2 * 4 * settings["max_new_tokens"] / generation_s, rel=0.02
        )
    # The fast engine's rollout time, split: its parts fit inside the whole call.
    parts = result["rollouts"]["fast"]["rollout_parts_s_per_step"]
    assert set(parts) == {"merge", "capture", "prefill", "decode"}
    assert 0 < sum(parts.values()) <= result["rollouts"]["fast"]["generation_time_s_per_step"]
    assert {"trl", "transformers", "peft"} <= set(result["library_versions"])


def _masks_seen_by_sdpa(monkeypatch) -> list[torch.Tensor]:
    """Every attention mask handed to SDPA while gradients are on (GRPO's training forwards)."""
    masks: list[torch.Tensor] = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        if torch.is_grad_enabled() and attn_mask is not None:
            masks.append(attn_mask.detach().clone())
        return real_sdpa(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return masks


def test_left_padding_rows_attend_to_every_key_and_real_tokens_are_unchanged(monkeypatch):
    """A left-padding query row with no key to attend to gave NaN gradients on an H200 (bench_grpo): such rows
    now attend to every key, and neither the real tokens' logits nor the LoRA gradients change."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    policy = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.1)
    ids = torch.randint(0, 128, (3, 12))
    attention = torch.ones_like(ids)
    attention[0, :5] = 0
    attention[1, :2] = 0
    real = attention.bool()

    def logits_and_grads():
        policy.zero_grad()
        logits = policy(input_ids=ids, attention_mask=attention).logits
        logits[real].log_softmax(-1)[:, 7].sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return logits.detach()[real], grads

    plain_logits, plain_grads = logits_and_grads()
    masks = _masks_seen_by_sdpa(monkeypatch)
    rl.use_sdpa_for_left_padding(policy)
    assert policy.config._attn_implementation == rl.SDPA_LEFT_PADDING
    logits, grads = logits_and_grads()

    assert len(masks) == 2
    for mask in masks:
        assert mask.dtype == torch.bool and mask.any(dim=-1).all(), "a query row attends to no key"
        assert not mask[0, 0, 7, :5].any(), "a real token attends to padding"
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=0)
    assert rl.attend_from_padding(None) is None
    for fill in (torch.finfo(torch.float32).min, -torch.inf):
        additive = torch.zeros(1, 1, 2, 2).masked_fill(torch.tensor([[True, True], [False, True]]), fill)
        assert torch.equal(rl.attend_from_padding(additive), torch.tensor([[[[0.0, 0.0], [0.0, fill]]]]))


def test_grpo_training_forwards_give_sdpa_no_query_row_without_keys(
    straight, after_sft, tmp_path, monkeypatch
):
    """The RL stage itself (TRL's left-padded prompts of different lengths): no training forward hands SDPA a
    mask with a fully masked row, and some did have left padding to open."""
    config, run_dir = copied(straight, after_sft, tmp_path / "run")
    masks = _masks_seen_by_sdpa(monkeypatch)
    rl.run(config.with_overrides(**{"rl.max_steps": 1}), run_dir)
    assert masks, "no training forward went through SDPA with a mask"
    assert all(mask.any(dim=-1).all() for mask in masks)
    # A query row before the last position that sees every key: only an opened left-padding row does (a
    # causal row sees no later key).
    opened = sum(int(mask[:, 0, :-1, :].all(dim=-1).sum()) for mask in masks)
    assert opened > 0, (
        "no left-padding row was opened: the batches had no left padding, the test proves nothing"
    )
