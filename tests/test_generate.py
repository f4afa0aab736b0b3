"""The generation engine: batched greedy output equals one-at-a-time ``generate``, adapters switch per batch,
finish reasons and token counts are right.

The model is a 2-layer, 64-dim Qwen3 with random weights and the tiny study's tokenizer. Its lm_head is
untied and scaled so that greedy outputs differ between prompts, and the ``<|im_end|>`` row is made a
close rival of the token it emits most, so that some completions stop early and others run to the limit.
"""

from __future__ import annotations

import ast
import collections
import inspect
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from eval_artifacts.study.errors import ArtifactError, ConfigError
from training import evaluate
from training.fast_generate import FastGenerationEngine
from training.generate import Engine, GenerationEngine, select_backend
from training.synthetic import generate_problems
from training.tiny import ENDOFTEXT, IM_END, stock_response, train_tokenizer

PROMPTS = [p.question for p in generate_problems(12, seed=3, split="test")] + ["Hi", "Ann has 3 pens. " * 4]


def build_small_base(path: Path) -> Path:
    """Save the test model and tokenizer described in the module docstring to ``path``."""
    problems = generate_problems(200, seed=0, split="train")
    tokenizer = train_tokenizer(
        [p.question for p in problems] + [stock_response(p) for p in problems], vocab_size=300
    )
    im_end, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        eos_token_id=im_end, pad_token_id=pad,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    weight = model.lm_head.weight
    with torch.no_grad():
        weight.mul_(20.0)
        encoded = tokenizer(
            [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS], return_tensors="pt", padding=True, add_special_tokens=False,
        )  # fmt: skip
        output = model.generate(
            **encoded, max_new_tokens=16, do_sample=False, eos_token_id=[], pad_token_id=pad
        )
        favourite = collections.Counter(
            output[:, encoded["input_ids"].shape[1] :].flatten().tolist()
        ).most_common(1)
        noise = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(1))
        weight[im_end] = weight[favourite[0][0]] + 0.1 * weight.std() * noise
    model.generation_config.eos_token_id = [im_end, pad]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter(base: Path, path: Path, *, seed: int) -> Path:
    """A LoRA adapter with random, non-zero A and B, so that it changes the base's output."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> Path:
    return build_small_base(tmp_path_factory.mktemp("gen_base"))


@pytest.fixture(scope="module")
def adapters(small_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen_adapters")
    return {
        name: make_adapter(small_base, root / name, seed=seed)
        for name, seed in (("level_1", 1), ("level_2", 2))
    }


def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Reference: unpadded single-prompt ``generate``, cut after the first stop token."""
    stops = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    results = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            output = model.generate(
                input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()  # fmt: skip
        end = next((i for i, token in enumerate(output) if token in stops), None)
        results.append(output if end is None else output[: end + 1])
    return results


def all_generations(engine, prompts, **kwargs):
    found = {g.index: g for batch in engine.generate(prompts, **kwargs) for g in batch}
    return [found[i] for i in range(len(prompts))]


def test_batched_output_equals_one_at_a_time_generate(small_base):
    engine = GenerationEngine(small_base)
    model = AutoModelForCausalLM.from_pretrained(small_base).eval()
    tokenizer = AutoTokenizer.from_pretrained(small_base)
    expected = one_at_a_time(model, tokenizer, PROMPTS, 16)

    generations = all_generations(engine, PROMPTS, adapter=None, max_new_tokens=16, batch_size=5)

    assert [list(g.token_ids) for g in generations] == expected
    lengths = {len(engine.tokenizer(engine.render(p))["input_ids"]) for p in PROMPTS}
    assert len(lengths) > 3, "the batch must mix prompt lengths (left padding)"
    reasons = collections.Counter(g.finish_reason for g in generations)
    assert reasons["stop"] >= 2 and reasons["length"] >= 2, reasons
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    for g, ids in zip(generations, expected, strict=True):
        assert g.completion_tokens == len(ids)
        assert g.text == tokenizer.decode(ids, skip_special_tokens=True)
        if g.finish_reason == "stop":
            assert ids[-1] == im_end and g.completion_tokens <= 16 and IM_END not in g.text
        else:
            assert im_end not in ids and g.completion_tokens == 16


def test_batches_are_sorted_by_length_and_cover_every_prompt(small_base):
    engine = GenerationEngine(small_base)
    plan = engine.plan(PROMPTS, batch_size=4)
    assert sorted(i for batch in plan for i in batch) == list(range(len(PROMPTS)))
    assert [len(batch) for batch in plan] == [4, 4, 3, 3]  # 14 prompts: as few batches as 4 allows, even
    lengths = [len(engine.tokenizer(engine.render(PROMPTS[i]))["input_ids"]) for batch in plan for i in batch]
    assert lengths == sorted(lengths, reverse=True)


def test_truncated_completion_reports_length(small_base):
    engine = GenerationEngine(small_base)
    generations = all_generations(engine, PROMPTS, adapter=None, max_new_tokens=2, batch_size=8)
    stopped = [g for g in generations if g.finish_reason == "stop"]
    truncated = [g for g in generations if g.finish_reason == "length"]
    assert truncated and all(g.completion_tokens == 2 for g in truncated)
    assert all(g.completion_tokens <= 2 for g in stopped)


def test_adapters_switch_per_batch_and_base_runs_with_adapters_disabled(small_base, adapters):
    from peft import PeftModel

    prompts = PROMPTS[::2]
    tokenizer = AutoTokenizer.from_pretrained(small_base)
    base_expected = one_at_a_time(
        AutoModelForCausalLM.from_pretrained(small_base).eval(), tokenizer, prompts, 8
    )
    expected = {None: base_expected}
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_base), path).eval()
        expected[name] = one_at_a_time(model, tokenizer, prompts, 8)
    assert expected["level_1"] != base_expected and expected["level_2"] != expected["level_1"]

    engine = GenerationEngine(small_base)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    # Interleave so that a stale adapter state would show.
    for adapter in ("level_2", None, "level_1", "level_2", None):
        got = all_generations(engine, prompts, adapter=adapter, max_new_tokens=8, batch_size=4)
        assert [list(g.token_ids) for g in got] == expected[adapter], adapter


def test_unknown_or_missing_adapter_is_an_artifact_error(small_base, tmp_path):
    engine = GenerationEngine(small_base)
    with pytest.raises(ArtifactError, match="adapter_config.json"):
        engine.load_adapter("level_1", tmp_path)
    with pytest.raises(ArtifactError, match="not loaded"):
        next(engine.generate(PROMPTS, adapter="level_3", max_new_tokens=4, batch_size=4))


def test_backend_selection(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_backend("hf") == "hf"
    assert select_backend("auto") == "hf"
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        select_backend("fast")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_backend("auto") == "fast"
    assert select_backend("fast") == "fast"
    assert select_backend("hf") == "hf"


ENGINE_MEMBERS = {name: member for name, member in vars(Engine).items() if not name.startswith("_")}


def test_the_engine_protocol_is_what_evaluate_uses():
    assert set(ENGINE_MEMBERS) == {"tokenizer", "load_adapter", "plan", "generate_batch", "describe", "close"}
    tree = ast.parse(Path(evaluate.__file__).read_text(encoding="utf-8"))
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine"
    }
    assert used == set(ENGINE_MEMBERS)


def _parameters(function) -> list[tuple]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("engine_class", [GenerationEngine, FastGenerationEngine], ids=lambda c: c.__name__)
def test_both_engines_provide_every_engine_member(engine_class):
    # From the classes, since building an engine needs a model: an attribute set in __init__ counts when
    # the class declares it.
    declared = {name for klass in engine_class.__mro__ for name in vars(klass).get("__annotations__", {})}
    for name, member in ENGINE_MEMBERS.items():
        if isinstance(member, property):
            assert hasattr(engine_class, name) or name in declared, name
        else:
            provided = getattr(engine_class, name, None)
            assert callable(provided), name
            assert _parameters(provided) == _parameters(member), name
