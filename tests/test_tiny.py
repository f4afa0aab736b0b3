"""The tiny study's base: tokenizer and chat format, the build cache, and (slow) its accuracy before adapters."""

from __future__ import annotations

import json
import time

import pytest

from eval_artifacts.study.config import load_config
from eval_artifacts.study.errors import ConfigError
from training import tiny
from training.data import load_problems
from training.synthetic import generate_problems

QWEN_EXCHANGE = (
    "<|im_start|>user\nTom has 12 pens, gets 7. How many pens now?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n12+7=19\n</think>\n#### 19<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    problems = generate_problems(300, seed=0, split="train")
    return tiny.train_tokenizer(tiny._tokenizer_corpus(problems), vocab_size=384)


def small_config(tmp_path, **tiny_model):
    """The tiny study with a model and pre-training small enough to build in seconds."""
    settings = {
        "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
        "pretrain_problems": 300, "pretrain_steps": 3, "pretrain_batch_size": 8, **tiny_model,
    }  # fmt: skip
    return load_config().with_overrides(
        run_dir=str(tmp_path / "run"), **{f"tiny_model.{key}": value for key, value in settings.items()}
    )


def train_and_publish_small(tmp_path, monkeypatch, **overrides):
    """``train-and-publish`` through the CLI on a small tiny study (a base built in seconds, 6 SFT steps, 30 test
    problems) with caches of its own: what is under test is the plumbing, not accuracy. Returns the config, the
    command's result and the config file."""
    import yaml
    from click.testing import CliRunner

    from hub_tools.cli import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("COT_COMPRESS_CACHE", str(tmp_path / "cache"))
    config = small_config(tmp_path).with_overrides(
        **{
            "training.max_steps": 6,
            "data.synthetic.n_train": 200,
            "data.synthetic.n_test": 30,
            "eval.max_new_tokens": 24,
            **overrides,
        },
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return config, CliRunner().invoke(main, ["train-and-publish", "--config", str(path)]), path


def test_chat_template_is_qwens_format(tokenizer):
    user = {"role": "user", "content": "Tom has 12 pens, gets 7. How many pens now?"}
    assistant = {"role": "assistant", "content": "<think>\n12+7=19\n</think>\n#### 19"}

    assert tokenizer.apply_chat_template([user, assistant], tokenize=False) == QWEN_EXCHANGE
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert prompt == QWEN_EXCHANGE[: QWEN_EXCHANGE.index("<think>")]


def test_prompt_tokens_are_a_prefix_of_the_exchange_and_the_assistant_mask_ends_with_im_end(tokenizer):
    """What TRL's SFTTrainer needs for prompt-completion (prefix) and assistant_only_loss (generation marks)."""
    user = [{"role": "user", "content": "Ann has 3 cards, gives 2. How many cards now?"}]
    assistant = [{"role": "assistant", "content": "Ann has 3-2 = 1 cards left.\n#### 1"}]
    prompt_ids = tokenizer.apply_chat_template(
        user, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    full = tokenizer.apply_chat_template(
        user + assistant, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )

    assert full["input_ids"][: len(prompt_ids["input_ids"])] == prompt_ids["input_ids"]
    masked = [t for t, m in zip(full["input_ids"], full["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "Ann has 3-2 = 1 cards left.\n#### 1<|im_end|>"


def test_tokenizer_special_tokens_digits_and_size(tokenizer):
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]
    assert tokenizer.tokenize("<think>") == ["<think>"] and tokenizer.tokenize("</think>") == ["</think>"]
    ids = tokenizer(
        "<|im_start|>assistant\n<think>\nx → y\n</think>\n#### 5<|im_end|>", add_special_tokens=False
    )["input_ids"]
    # Role tokens are special (stripped); think tags are text; any character round-trips (byte level).
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nx → y\n</think>\n#### 5"
    assert len(tokenizer) <= 384 + 2


def test_pretraining_pool_never_holds_a_test_question(tmp_path):
    config = small_config(tmp_path, pretrain_problems=3000)
    pool = tiny._pretrain_problems(config)
    assert len(pool) == 3000
    assert not {p.question for p in pool} & {p.question for p in load_problems(config, "test")}


def test_ensure_builds_once_then_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COT_COMPRESS_CACHE", str(tmp_path / "cache"))
    config = small_config(tmp_path)

    path = tiny.ensure_tiny_base(config)

    assert path.parent == tmp_path / "cache" / "tiny" and path.name == tiny.build_key(config)
    build = json.loads((path / "build.json").read_text())
    assert build["loss_curve"][-1]["step"] == 3 and build["pretrain_rows"] == 300
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached build was rebuilt")

    monkeypatch.setattr(tiny, "build_tiny_base", no_rebuild)
    assert tiny.ensure_tiny_base(config) == path
    other = small_config(tmp_path, seed=1)
    assert tiny.build_key(other) != tiny.build_key(config)
    with pytest.raises(AssertionError, match="rebuilt"):
        tiny.ensure_tiny_base(other)


def test_a_killed_build_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("COT_COMPRESS_CACHE", str(tmp_path / "cache"))
    config = small_config(tmp_path)
    real_pretrain = tiny.pretrain

    def die_after_pretraining(*args, **kwargs):
        real_pretrain(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "pretrain", die_after_pretraining)
    with pytest.raises(KeyboardInterrupt):
        tiny.ensure_tiny_base(config)
    assert list((tmp_path / "cache" / "tiny").iterdir()) == []

    monkeypatch.setattr(tiny, "pretrain", real_pretrain)
    assert (tiny.ensure_tiny_base(config) / "build.json").is_file()


def test_a_config_without_tiny_model_settings_is_a_config_error(tmp_path):
    config = load_config().with_overrides(**{"base_model.id": "Qwen/Qwen3-4B-Instruct-2507"})
    config = config.model_copy(update={"tiny_model": None})
    with pytest.raises(ConfigError, match="tiny_model"):
        tiny.ensure_tiny_base(config)


@pytest.mark.slow
def test_tiny_base_solves_at_least_40_percent_of_the_test_set():
    """Issue 8: the pre-trained tiny base, before any adapter, greedy on the 200 test problems."""
    from training.generate import GenerationEngine

    config = load_config()
    started = time.perf_counter()
    path = tiny.ensure_tiny_base(config)
    build_s = time.perf_counter() - started
    problems = load_problems(config, "test")
    engine = GenerationEngine(path)
    correct = lenient = 0
    from training.gsm8k import grade

    for batch in engine.generate(
        [p.question for p in problems], adapter=None, max_new_tokens=96, batch_size=100
    ):
        for generation in batch:
            gold = problems[generation.index].gold
            graded = grade(generation.text, gold, finish_reason=generation.finish_reason, kind="stock")
            correct += graded.correct
            lenient += graded.correct_lenient
    accuracy = correct / len(problems)
    print(
        f"tiny base: accuracy {accuracy:.1%} (lenient {lenient / len(problems):.1%}) on {len(problems)} "
        f"problems; build {build_s:.0f} s"
    )
    assert len(problems) == 200 and accuracy >= 0.40


@pytest.mark.slow  # ~1-2 min on 2 cores: 4 adapters, 7 models evaluated, published to the embedded hub
def test_tiny_study_with_two_training_seeds_publishes_a_branch_per_extra_seed(tmp_path, monkeypatch):
    """Issue 16: ``training.seeds: [42, 43]`` gives 2 adapters per level, branches ``seed-43`` on the local hub,
    and cards with the mean ± sd across seeds and each seed's CI."""
    from huggingface_hub import HfApi

    from eval_artifacts.metrics import read_metrics
    from eval_artifacts.rundir import RunDir
    from hub_tools.local_hub import configure_clients, running_hub

    config, result, _ = train_and_publish_small(tmp_path, monkeypatch, levels=[1, 4], **{"training.seeds": [42, 43]})

    assert result.exit_code == 0, result.output
    run_dir = RunDir(config.run_dir)
    for level in config.levels:
        models = [model for model, _ in config.adapter_models(level)]
        assert models == [f"level_{level}", f"level_{level}_seed43"]
        assert all((run_dir.adapter_dir(m) / "adapter_model.safetensors").is_file() for m in models)
        assert [read_metrics(run_dir, m)["training_seed"] for m in models] == [42, 43]
    assert "level_4_seed43" in result.output and "prompt_l4" in result.output

    with running_hub(run_dir.hub_data_dir) as hub:
        undo = configure_clients(hub.endpoint)
        try:
            api = HfApi(endpoint=hub.endpoint)
            for level in config.levels:
                repo_id = config.adapter_repo_id(level)
                assert sorted(b.name for b in api.list_repo_refs(repo_id).branches) == ["main", "seed-43"]
                assert hub.commit_count("model", repo_id, "seed-43") == 3  # initial, main's, the branch's
        finally:
            undo()
    for level in config.levels:
        card = run_dir.card(config.adapter_repo_id(level).split("/")[1]).read_text().replace("**", "")
        accuracies = [read_metrics(run_dir, m)["accuracy"] for m, _ in config.adapter_models(level)]
        mean, sd = sum(accuracies) / 2, abs(accuracies[0] - accuracies[1]) / 2**0.5
        assert f"accuracy is {mean:.3f} ± {sd:.3f}" in card
        for model, seed in config.adapter_models(level):
            low, high = read_metrics(run_dir, model)["ci95"]
            branch = "main" if seed == 42 else f"seed-{seed}"
            assert f"| {seed} | {branch} | {read_metrics(run_dir, model)['accuracy']:.3f} | [{low:.3f}, {high:.3f}] |" in card
        assert "- `seed-43`: training seed 43, accuracy" in card


@pytest.mark.slow
def test_published_tiny_study_loads_from_the_hub_and_reproduces_its_cards(tmp_path, local_hub):
    """Issue 17: a small tiny study, trained, evaluated and published to the local hub; with an empty cache, every
    adapter loads with AutoPeftModelForCausalLM from its repo alone (the base comes from ``{prefix}-base`` at
    the pinned commit) and reproduces its card's example completion in the card's dtype."""
    import re

    import torch
    from hubtools import isolated_hf_caches, publish_to
    from huggingface_hub import HfApi, ModelCard
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval_artifacts.rundir import RunDir
    from eval_artifacts.study.levels import build_prompt
    from hub_tools.publishing.commands import Scope
    from training import evaluate, prepare_data, sft

    config = small_config(tmp_path, pretrain_steps=60).with_overrides(
        levels=[1, 4],
        **{"training.max_steps": 20, "training.batch_size": 8, "eval.max_problems": 12, "eval.max_new_tokens": 48},
    )
    run_dir = RunDir(config.run_dir)
    prepare_data.run(config, run_dir)
    sft.run(config, run_dir)
    evaluate.run(config, run_dir)
    publish_to(local_hub.endpoint, config, run_dir, token=local_hub.default_token, scope=Scope.ALL)

    api = HfApi(endpoint=local_hub.endpoint)
    base_commit = api.repo_info(config.base_repo_id).sha
    with isolated_hf_caches(tmp_path / "empty-cache"):
        base = AutoModelForCausalLM.from_pretrained(config.base_repo_id, revision=base_commit)
        assert base.config.model_type == "qwen3"
        for level in config.levels:
            repo_id = config.adapter_repo_id(level)
            card = ModelCard.load(repo_id)
            assert card.data.base_model == config.base_repo_id and "gsm8k" not in str(card.data.to_dict()).lower()
            assert f"at revision `{base_commit}`" in card.text
            dtype = re.search(r"dtype=torch\.(\w+)", card.text).group(1)
            model = AutoPeftModelForCausalLM.from_pretrained(repo_id, dtype=getattr(torch, dtype))
            shown = re.findall(r"```text\n(.*?)\n```", card.text, flags=re.S)
            if not shown:  # the card shows no example when no correct answer's arithmetic checks out
                assert "No example output is shown" in card.text
                continue
            question, completion = shown[:2]
            tokenizer = AutoTokenizer.from_pretrained(config.base_repo_id, revision=base_commit)
            messages = [{"role": "user", "content": build_prompt(level, question)}]
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            output = model.generate(**inputs, max_new_tokens=config.eval.max_new_tokens, do_sample=False)
            text = tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            assert text.strip() == completion.strip(), (level, text, completion)


@pytest.mark.slow  # ~10 s on 2 cores: 1 SFT and 1 RL adapter, 3 models evaluated, published to the embedded hub
def test_tiny_study_with_rl_publishes_the_rl_adapter_after_its_sft_sibling(tmp_path, monkeypatch):
    """Issue 20: ``train-and-publish`` with ``rl:`` on runs the RL stage, evaluates ``rl_l4`` against its SFT
    adapter, publishes ``{prefix}-l4-rl`` after ``{prefix}-l4``, both cards showing SFT against SFT+RL; a rerun
    skips every stage, the RL stage by its hash."""
    from click.testing import CliRunner
    from huggingface_hub import HfApi

    from eval_artifacts.metrics import read_metrics
    from eval_artifacts.rundir import RunDir
    from hub_tools.cli import main
    from hub_tools.local_hub import configure_clients, running_hub

    config, result, path = train_and_publish_small(
        tmp_path,
        monkeypatch,
        name="tiny-rl-small",
        levels=[4],
        **{
            "eval.prompt_baselines": False,
            "rl.levels": [4],
            "rl.max_steps": 2,
            "rl.prompts_per_step": 2,
            "rl.num_generations": 4,
            "rl.max_new_tokens": 24,
            "rl.save_steps": 1,
        },
    )

    assert result.exit_code == 0, result.output
    assert "[rl] running" in result.output and "rl_l4" in result.output
    run_dir = RunDir(config.run_dir)
    record = json.loads(run_dir.rl_training_json(4).read_text())
    assert record["steps"] == 2 and record["reward"]["target_think_tokens"] >= 1
    metrics = read_metrics(run_dir, "rl_l4")
    sft_metrics = read_metrics(run_dir, "level_4")
    b, c = metrics["vs_sft"]["b"], metrics["vs_sft"]["c"]
    assert metrics["n_correct"] - sft_metrics["n_correct"] == c - b  # paired on the same 30 problems
    for name in ("tiny-cot-l4", "tiny-cot-l4-rl"):
        assert "## SFT against SFT+RL" in run_dir.card(name).read_text(), name

    with running_hub(run_dir.hub_data_dir) as hub:
        undo = configure_clients(hub.endpoint)
        try:
            api = HfApi(endpoint=hub.endpoint)
            rl_repo = config.rl_repo_id(4)
            assert {"adapter_model.safetensors", "training.json", "README.md"} <= set(api.list_repo_files(rl_repo))
            slug = json.loads(run_dir.publish_state.read_text())["collection_slug"]
            items = [item.item_id for item in api.get_collection(slug).items]
            assert items.index(rl_repo) == items.index(config.adapter_repo_id(4)) + 1
        finally:
            undo()

    again = CliRunner().invoke(main, ["train-and-publish", "--config", str(path)])
    assert again.exit_code == 0, again.output
    assert "[rl] current, skipped" in again.output and "[rl] running" not in again.output
