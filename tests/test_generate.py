"""The generation engine: batched greedy output equals one-at-a-time ``generate``, adapters switch per batch,
finish reasons and token counts are right.

The model is ``helpers.build_generation_base``'s (the ``generation_base`` fixture): a 2-layer, 64-dim Qwen3
with random weights and the tiny study's tokenizer. Its lm_head is untied and scaled so that greedy outputs
differ between prompts, and the ``<|im_end|>`` row is made a close rival of the token it emits most, so that
some completions stop early and others run to the limit.
"""

from __future__ import annotations

import ast
import collections
import inspect
from pathlib import Path

import pytest
import torch
from helpers import GENERATION_PROMPTS, make_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval_artifacts.study.errors import ArtifactError, ConfigError
from training import evaluate
from training.fast_generate import FastGenerationEngine
from training.generate import Engine, GenerationEngine, select_backend
from training.tiny import ENDOFTEXT, IM_END

PROMPTS = GENERATION_PROMPTS


@pytest.fixture(scope="module")
def adapters(generation_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen_adapters")
    return {
        name: make_adapter(generation_base, root / name, seed=seed)
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


def test_batched_output_equals_one_at_a_time_generate(generation_base):
    engine = GenerationEngine(generation_base)
    model = AutoModelForCausalLM.from_pretrained(generation_base).eval()
    tokenizer = AutoTokenizer.from_pretrained(generation_base)
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


def test_batches_are_sorted_by_length_and_cover_every_prompt(generation_base):
    engine = GenerationEngine(generation_base)
    plan = engine.plan(PROMPTS, batch_size=4)
    assert sorted(i for batch in plan for i in batch) == list(range(len(PROMPTS)))
    assert [len(batch) for batch in plan] == [4, 4, 3, 3]  # 14 prompts: as few batches as 4 allows, even
    lengths = [len(engine.tokenizer(engine.render(PROMPTS[i]))["input_ids"]) for batch in plan for i in batch]
    assert lengths == sorted(lengths, reverse=True)


def test_truncated_completion_reports_length(generation_base):
    engine = GenerationEngine(generation_base)
    generations = all_generations(engine, PROMPTS, adapter=None, max_new_tokens=2, batch_size=8)
    stopped = [g for g in generations if g.finish_reason == "stop"]
    truncated = [g for g in generations if g.finish_reason == "length"]
    assert truncated and all(g.completion_tokens == 2 for g in truncated)
    assert all(g.completion_tokens <= 2 for g in stopped)


def test_adapters_switch_per_batch_and_base_runs_with_adapters_disabled(generation_base, adapters):
    from peft import PeftModel

    prompts = PROMPTS[::2]
    tokenizer = AutoTokenizer.from_pretrained(generation_base)
    base_expected = one_at_a_time(
        AutoModelForCausalLM.from_pretrained(generation_base).eval(), tokenizer, prompts, 8
    )
    expected = {None: base_expected}
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(generation_base), path).eval()
        expected[name] = one_at_a_time(model, tokenizer, prompts, 8)
    assert expected["level_1"] != base_expected and expected["level_2"] != expected["level_1"]

    engine = GenerationEngine(generation_base)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    # Interleave so that a stale adapter state would show.
    for adapter in ("level_2", None, "level_1", "level_2", None):
        got = all_generations(engine, prompts, adapter=adapter, max_new_tokens=8, batch_size=4)
        assert [list(g.token_ids) for g in got] == expected[adapter], adapter


def test_unknown_or_missing_adapter_is_an_artifact_error(generation_base, tmp_path):
    engine = GenerationEngine(generation_base)
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
