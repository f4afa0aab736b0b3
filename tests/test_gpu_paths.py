"""The sequences that crashed the real study on a GPU (issue 15), repeated on a CUDA device.

1. ``evaluate``: the stock model, then an adapter whose longer level prompts need a bigger KV cache; the
   fast engine re-allocates and captures new CUDA graphs.
2. Train then evaluate in one process, as ``train-and-publish`` does.

Both run the fast engine with CUDA graphs on. The CPU test of the cause is
``test_fast_generate.py::test_captures_after_a_bigger_cache_start_a_fresh_graph_pool``.
"""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import build_generation_base, make_adapter

from eval_artifacts.records import read_samples
from eval_artifacts.rundir import RunDir, iter_jsonl
from eval_artifacts.study.config import load_config
from training import evaluate, prepare_data, sft
from training.fast_generate import FastGenerator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def small_study(base, run_dir, **overrides):
    return load_config().with_overrides(
        **{
            "base_model.id": str(base),
            "run_dir": str(run_dir),
            "levels": [1, 4],
            "data.synthetic.n_train": 64,
            "data.synthetic.n_test": 40,
            "eval.batch_size": 16,
            "eval.max_new_tokens": 24,
            "eval.backend": "fast",
            "eval.prompt_baselines": False,  # base and the adapters: the sequences these tests repeat
            **overrides,
        }
    )


def live(kind: type) -> list:
    """Objects of ``kind`` still reachable after a full collection (modules: those with CUDA weights)."""
    gc.collect()
    found = [thing for thing in gc.get_objects() if isinstance(thing, kind)]
    if kind is torch.nn.Module:
        found = [module for module in found if any(p.is_cuda for p in module.parameters(recurse=False))]
    return found


def allocated() -> int:
    """Bytes held by tensors, less the workspaces cuBLAS keeps per stream for the next matmul."""
    torch._C._cuda_clearCublasWorkspaces()
    return torch.cuda.memory_allocated()


def generation_log(run_dir: RunDir) -> list[dict]:
    return list(iter_jsonl(run_dir.generation_log, what="generation log"))


def test_base_then_adapters_through_evaluate(tmp_path):
    from training.fast_generate import FastGenerationEngine
    from training.generate import GenerationEngine

    base = build_generation_base(tmp_path / "base")
    run_dir = RunDir(tmp_path / "run")
    for level, seed in ((1, 1), (4, 4)):
        make_adapter(base, run_dir.adapter_dir(level), seed=seed)
    config = small_study(base, run_dir.root)

    # The crash needs the adapter's prompts to outgrow the cache the stock model's prompts allocated.
    engine = FastGenerationEngine(GenerationEngine(base))
    engine.load_adapter("level_1", run_dir.adapter_dir(1))
    problems = evaluate.load_problems(config, "test")
    engine.generate_batch(evaluate.model_prompts(problems, "base"), adapter=None, max_new_tokens=24)
    slots_for_base = engine._generator()._capacity[1]
    engine.generate_batch(evaluate.model_prompts(problems, "level_1"), adapter="level_1", max_new_tokens=24)
    assert engine._generator()._capacity[1] > slots_for_base
    engine.close()

    summary = evaluate.run(config, run_dir)

    assert [row["model"] for row in summary["models"]] == ["base", "level_1", "level_4"]
    log = generation_log(run_dir)
    assert [row["model"] for row in log] == ["base", "level_1", "level_4"]
    assert all(row["engine"] == "fast" and row["cuda_graphs"] and row["fused_projections"] for row in log)
    for model in ("base", "level_1", "level_4"):
        assert len(read_samples(run_dir.samples(model))) == 40


def test_train_then_evaluate_in_one_process(tmp_path):
    base = build_generation_base(tmp_path / "base")
    config = small_study(
        base,
        tmp_path / "run",
        **{"training.max_steps": 10, "training.batch_size": 8, "training.learning_rate": 0.05},
    )
    run_dir = RunDir(config.run_dir)
    prepare_data.run(config, run_dir)

    sft.run(config, run_dir)
    assert not live(torch.nn.Module)  # each level's model and trainer went before the next stage
    trained = allocated()
    summary = evaluate.run(config, run_dir)

    assert not live(torch.nn.Module) and not live(FastGenerator) and not live(torch.cuda.CUDAGraph)
    assert allocated() <= trained, (trained, allocated())  # evaluate's cache, graphs and model went too
    assert [row["model"] for row in summary["models"]] == ["base", "level_1", "level_4"]
    assert all(
        row["engine"] == "fast" and row["cuda_graphs"] and row["fused_projections"] for row in generation_log(run_dir)
    )
