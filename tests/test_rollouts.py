"""GRPO rollouts on the fast engine (``rl.rollout_engine: fast``), on the CPU with the training tests' tiny Qwen3.

The trainer is built by ``rl.build_trainer`` from a random non-zero LoRA adapter (``helpers.make_adapter``) and
level-5 prompts of synthetic training problems, and trained for two steps. ``rl.run`` itself refuses the fast
engine without CUDA (as ``evaluate`` refuses ``eval.backend: fast``), so these tests build the trainer the way
``rl.run`` does. Torch runs single-threaded so that two runs reduce floats in the same order.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_adapter, sft_study

from eval_artifacts.rundir import RunDir, write_jsonl
from eval_artifacts.study.config import load_config
from eval_artifacts.study.errors import ConfigError
from eval_artifacts.study.levels import build_prompt, build_response
from training import rl, rollouts, sft
from training.synthetic import generate_problems

LEVEL = 5
SETTINGS = {
    "rl.levels": [LEVEL],
    "rl.max_steps": 2,
    "rl.prompts_per_step": 2,
    "rl.num_generations": 3,
    "rl.max_new_tokens": 16,
    "rl.learning_rate": 0.01,
    "rl.temperature": 1.3,
    "rl.save_steps": 100,
}

# Longer than the level's 20-character spec, so the reward's length target is the spec's (20 tokens here), and
# the random policy's outputs (about 25 think tokens) fall between it and twice it: their length terms differ,
# so GRPO has advantages to learn from (with "1+2=3" the target was 5 tokens, every output's term was capped at
# 1, every reward equal, and nothing trained).
REASONING = "12+7=19; 19-5=14; 14*2=28"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def continued(training_base, tmp_path_factory) -> Path:
    """A level adapter with random non-zero weights, as the RL stage finds an SFT adapter."""
    return make_adapter(training_base, tmp_path_factory.mktemp("adapter") / "level_5", seed=3)


def rows() -> list[dict]:
    return [
        {
            "id": f"train-{index:05d}",
            "prompt": build_prompt(LEVEL, problem.question),
            "completion": build_response(REASONING, problem.gold),
            "reasoning": REASONING,
            "answer": problem.gold,
        }
        for index, problem in enumerate(generate_problems(8, seed=4, split="train"))
    ]


class Recorder:
    """Wraps the trainer's first reward function and its rollout function: what each saw and returned."""

    def __init__(self, trainer) -> None:
        self.rewarded: list[dict] = []
        self.rolled: list[dict] = []
        reward, rollout = trainer.reward_funcs[0], trainer.rollout_func
        self.fast = rollout

        def recorded_reward(completions, completion_ids, **kwargs):
            self.rewarded.append({"completions": completions, "completion_ids": completion_ids})
            return reward(completions, completion_ids, **kwargs)

        trainer.reward_funcs[0] = recorded_reward
        if rollout is not None:

            def recorded_rollout(prompts, trainer):
                output = rollout(prompts, trainer)
                self.rolled.append({"prompts": prompts, **output})
                return output

            trainer.rollout_func = recorded_rollout


def grpo(training_base, continued, tmp_path, **changes):
    """Two GRPO steps through ``rl.build_trainer``: (trainer, policy, recorder)."""
    config = sft_study(training_base, tmp_path / "run").with_overrides(**{**SETTINGS, **changes})
    torch.manual_seed(0)
    base, tokenizer = sft.load_base(
        model_path=str(training_base), revision="main", quantization=config.base_model.quantization,
        precision=sft.choose_precision(), gradient_checkpointing=config.training.gradient_checkpointing,
    )  # fmt: skip
    policy = rl.continued_adapter(base, continued)
    design = rl.RewardDesign.for_level(LEVEL, tokenizer, rows(), weights=config.rl.reward_weights)
    trainer = rl.build_trainer(
        policy=policy, tokenizer=tokenizer, dataset=rl.prompt_dataset(rows()), config=config, design=design,
        precision=sft.choose_precision(), output_dir=tmp_path / "checkpoints",
    )  # fmt: skip
    recorder = Recorder(trainer)
    return trainer, policy, recorder


def base_weights(policy) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in policy.get_base_model().state_dict().items() if "lora_" not in k}


def lora_weights(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.named_parameters() if "lora_" in k and ".default." in k}


def test_rollout_engine_is_hf_by_default_and_fast_needs_cuda(tmp_path, monkeypatch):
    assert load_config().rl.rollout_engine == "hf"
    with pytest.raises(ConfigError, match="rl.rollout_engine") as error:
        load_config().with_overrides(**{"rl.rollout_engine": "vllm"})
    assert "\n" not in str(error.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rollouts.check_engine("hf")
    with pytest.raises(ConfigError, match="needs a CUDA GPU: set rl.rollout_engine to 'hf'"):
        rollouts.check_engine("fast")
    # The stage refuses before it reads anything, as evaluate refuses eval.backend 'fast'.
    fast = load_config().with_overrides(**{"rl.levels": [LEVEL], "rl.rollout_engine": "fast"})
    with pytest.raises(ConfigError, match="rl.rollout_engine 'fast' needs a CUDA GPU"):
        rl.run(fast, tmp_path / "no-run")


def test_fast_rollouts_train_two_steps_and_leave_the_base_weights_bit_identical(
    training_base, continued, tmp_path
):
    trainer, policy, recorder = grpo(training_base, continued, tmp_path, **{"rl.rollout_engine": "fast"})
    before_base, before_lora = base_weights(policy), lora_weights(policy)
    trainer.train()

    assert trainer.state.global_step == 2
    log = rl.step_log(trainer)
    assert [row["step"] for row in log] == [1, 2]
    assert all({"reward", *rl.TERMS, "think_tokens", "completion_tokens", "kl"} <= row.keys() for row in log)
    after_lora = lora_weights(policy)
    assert any(not torch.equal(before_lora[k], after_lora[k]) for k in before_lora)  # it trained
    after_base = base_weights(policy)
    assert all(torch.equal(before_base[k], after_base[k]) for k in before_base)  # merges undone bit for bit

    # One call per step, one completion per prompt entry (each prompt repeated num_generations times).
    tokenizer = trainer.processing_class
    assert len(recorder.rolled) == len(recorder.rewarded) == 2
    for rolled, rewarded in zip(recorder.rolled, recorder.rewarded, strict=True):
        assert len(rolled["prompts"]) == len(rolled["completion_ids"]) == 2 * 3
        assert rolled["prompts"][0] == rolled["prompts"][2] != rolled["prompts"][3]
        assert rewarded["completion_ids"] == rolled["completion_ids"]
        texts = [c[-1]["content"] for c in rewarded["completions"]]
        assert texts == tokenizer.batch_decode(rolled["completion_ids"], skip_special_tokens=True)
        assert [len(lp) for lp in rolled["logprobs"]] == [len(ids) for ids in rolled["completion_ids"]]
        assert all(lp <= 0 for row in rolled["logprobs"] for lp in row)
        prompt = tokenizer.apply_chat_template(rolled["prompts"][0], add_generation_prompt=True, tokenize=True)
        assert rolled["prompt_ids"][0] == list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)


def test_rollouts_draw_anew_per_call_and_again_the_same_after_a_restart(training_base, continued, tmp_path):
    """Seeds come from (rl.seed, optimizer step, call within the step, process), not from what ran before: a
    second call in one step draws anew, and a fresh engine at the same point (a resumed run) draws the same."""
    trainer, policy, recorder = grpo(training_base, continued, tmp_path, **{"rl.rollout_engine": "fast"})
    settings = recorder.fast.rl
    prompts = [row["prompt"] for row in rl.prompt_dataset(rows()[:2])] * 3
    first = trainer.rollout_func(prompts, trainer)
    second = trainer.rollout_func(prompts, trainer)
    assert second["completion_ids"] != first["completion_ids"]
    restarted = rollouts.FastRollouts(policy, settings)(prompts, trainer)
    assert restarted == first
    trainer.state.global_step += 1
    assert rollouts.FastRollouts(policy, settings)(prompts, trainer) != first


def test_with_top_k_1_fast_and_hf_rollouts_give_the_same_completions(training_base, continued, tmp_path):
    """HF's top-k 1 sampling is its argmax, and the engine's is too: same completions, step after step, and the
    same figures in the trainer's log."""
    runs = {}
    for engine in ("hf", "fast"):
        trainer, _, recorder = grpo(
            training_base, continued, tmp_path / engine, **{"rl.rollout_engine": engine, "rl.top_k": 1}
        )
        trainer.train()
        runs[engine] = [[c[-1]["content"] for c in r["completions"]] for r in recorder.rewarded]
        runs[engine + " ids"] = [r["completion_ids"] for r in recorder.rewarded]
        runs[engine + " log"] = set().union(*(entry.keys() for entry in trainer.state.log_history))
    assert runs["fast"] == runs["hf"] and len(runs["fast"]) == 2
    assert runs["fast ids"] == runs["hf ids"]
    assert runs["fast log"] == runs["hf log"]  # the same figures logged
    assert len({text for step in runs["fast"] for text in step}) > 1  # not one degenerate completion


def test_unquantized_copy_generates_as_the_policy_and_follows_its_lora_weights(training_base, continued):
    """The NF4 path's copy, built from a plain policy (bitsandbytes' dequantization is the GPU-only part)."""
    from training.fast_generate import FastGenerator

    base, tokenizer = sft.load_base(
        model_path=str(training_base), revision="main", quantization="none", precision="fp32",
        gradient_checkpointing=False,
    )  # fmt: skip
    policy = rl.continued_adapter(base, continued)
    engine_model = rollouts.unquantized_copy(policy, "default")
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows()[:3]]

    def greedy(model):
        return FastGenerator(model).generate(
            prompts, max_new_tokens=12, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=0, adapter="default"
        )

    assert greedy(engine_model) == greedy(policy)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.mul_(-3.0)
    moved = greedy(policy)
    assert greedy(engine_model) != moved
    rollouts.sync_adapter(policy, engine_model, "default")
    assert greedy(engine_model) == moved

    # An NF4 policy keeps its embeddings, norms and head in fp32 (PEFT's kbit preparation) and computes in
    # bf16: the copy is in one dtype, the rotary frequencies (a buffer) in fp32 as transformers keeps them.
    half = rollouts.unquantized_copy(policy, "default", dtype=torch.bfloat16)
    base_params = [p for n, p in half.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base_params} == {torch.bfloat16}
    assert {b.dtype for b in half.buffers()} == {torch.float32}
    assert all(len(c.token_ids) == 12 for c in FastGenerator(half).generate(
        prompts, max_new_tokens=12, stop_token_ids=[-1], pad_token_id=0, adapter="default"
    ))  # fmt: skip


# ---------------------------------------------------------------- GPU only: NF4 and CUDA graphs
NO_NF4 = not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.gpu
@pytest.mark.skipif(NO_NF4, reason="needs a CUDA GPU and bitsandbytes")
def test_fast_rollouts_on_the_gpu_restore_what_they_merge_into(training_base, continued, tmp_path, quantization):
    """Two steps with CUDA graphs: a plain base's weights, or the NF4 base's dequantized copy, come back bit
    for bit after every merge; the NF4 policy's own weights are never written."""
    from peft.utils.integrations import dequantize_module_weight

    trainer, policy, recorder = grpo(
        training_base, continued, tmp_path,
        **{"rl.rollout_engine": "fast", "base_model.quantization": quantization},
    )  # fmt: skip
    before = base_weights(policy)
    trainer.train()
    after = base_weights(policy)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [row["step"] for row in rl.step_log(trainer)] == [1, 2]
    assert all(len(r["completion_ids"]) == 6 for r in recorder.rolled)
    fast = recorder.fast
    assert fast.engine.use_graphs and fast.engine.device.type == "cuda"
    if quantization == "nf4":
        assert fast.engine_model is not policy
        copies = dict(fast.engine_model.get_base_model().named_modules())
        for name, module in policy.get_base_model().named_modules():
            if hasattr(module, "base_layer"):
                expected = dequantize_module_weight(module.base_layer).to(torch.bfloat16)
                assert torch.equal(copies[name].base_layer.weight, expected), name
    else:
        assert fast.engine_model is policy


@pytest.mark.gpu
@pytest.mark.skipif(NO_NF4, reason="needs a CUDA GPU and bitsandbytes")
def test_rl_stage_runs_on_fast_rollouts_with_an_nf4_base(training_base, continued, tmp_path):
    """``rl.run`` end to end on a GPU, NF4 base, ``rl.rollout_engine: fast``: recorded in training.json."""
    config = sft_study(training_base, tmp_path / "run").with_overrides(
        **{**SETTINGS, "levels": [LEVEL], "base_model.quantization": "nf4", "rl.rollout_engine": "fast"}
    )
    run_dir = RunDir(config.run_dir)
    write_jsonl(run_dir.train_file(LEVEL), rows())
    shutil.copytree(continued, run_dir.adapter_dir(LEVEL))
    payload = rl.run(config, run_dir)[LEVEL]
    assert payload["hyperparameters"]["rollout_engine"] == "fast"
    assert payload["steps"] == 2 and [row["step"] for row in payload["log"]] == [1, 2]
    assert (run_dir.rl_adapter_dir(LEVEL) / "adapter_model.safetensors").is_file()
