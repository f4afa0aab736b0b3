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
