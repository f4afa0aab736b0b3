"""The training benchmark script runs end to end (CPU smoke mode) and reports each setup it compares."""

import json
import sys
from pathlib import Path

import pytest
from helpers import bench_smoke

ROOT = Path(__file__).resolve().parents[1]
RECORDED = {
    "bench_eval.json",
    "bench_eval_batch.json",
    "bench_eval_batch_cudnn.json",
    "bench_eval_headnorm.json",
    "bench_eval_kvfuse.json",
    "bench_eval_repeat.json",
    "bench_eval_tuned.json",
    "bench_multigpu.json",
    "bench_multigpu_problem_sharding.json",
    "bench_train.json",
    "bench_train_b20.json",
    "bench_train_layers.json",
    "bench_train_layers_final.json",
    "bench_train_layers_first.json",
    "bench_train_layers_padded.json",
    "bench_train_setups.json",
    "grpo_gpu.json",
    "grpo_gpu_session7.json",
    "profile_decode_headnorm.json",
    "profile_train.json",
    "study_gpu.json",
    "study_gpu_final_session7.json",
    "study_gpu_fused_projections.json",
    "study_gpu_session5.json",
    "study_gpu_session7.json",
    "train_qlora.json",
    "tune_decode_attention.json",
    "tune_decode_attention_1319.json",
}


@pytest.mark.slow
def test_bench_train_smoke_compares_trl_defaults_with_the_study_recipe(tmp_path):
    result = bench_smoke("bench.bench_train", tmp_path / "bench_train.json")
    setups = {setup["setup"]: setup for setup in result["setups"]}
    assert set(setups) == {"trl_defaults_bf16", "ours_bf16", "ours_pf_bf16"}
    assert setups["trl_defaults_bf16"]["gradient_checkpointing"] is True  # TRL's default
    assert setups["ours_bf16"]["gradient_checkpointing"] is False  # the study's recipe
    # Both setups train on the same rows, so they see the same real tokens.
    assert setups["trl_defaults_bf16"]["tokens_seen"] == setups["ours_bf16"]["tokens_seen"] > 0
    expected = round(
        setups["ours_bf16"]["steady_tokens_per_s"] / setups["trl_defaults_bf16"]["steady_tokens_per_s"], 2
    )
    assert result["speedup_ours_vs_trl_defaults"] == {"bf16": expected}
    # Padding-free batches (one packed row, SDPA masked per row from the position ids) train the same rows
    # to the same loss, step by step, as the padded recipe.
    assert setups["ours_pf_bf16"]["padding_free"] and not setups["ours_bf16"]["padding_free"]
    assert setups["ours_pf_bf16"]["tokens_seen"] == setups["ours_bf16"]["tokens_seen"]
    check = result["loss_match_vs_unfused"]["ours_pf_bf16"]
    assert check["passed"] and check["steps"] == setups["ours_bf16"]["steps"] and check["max_relative_diff"] < 1e-3
    assert result["goals_issue_19"]["ours_pf_bf16"]["loss_curve"] is True


@pytest.mark.slow
def test_profile_train_smoke_splits_steps_by_kernel_class(tmp_path):
    result = bench_smoke("bench.profile_train", tmp_path / "profile_train.json")
    profiled = result["setups"]["ours_bf16"]
    assert profiled["profiled_steps"] == 1 and profiled["tokens_per_step"] > 0
    # On the CPU the classes hold CPU ops' self time: GEMMs are there, and the classes add up to the total.
    assert profiled["classes"]["gemm"]["ms"] > 0
    assert sum(c["ms"] for c in profiled["classes"].values()) == pytest.approx(profiled["kernel_ms_per_step"])


def test_recorded_gpu_results_name_their_device():
    paths = sorted((ROOT / "bench" / "results").glob("*.json"))
    # Every benchmark's committed result, so that an emptied folder fails instead of checking nothing.
    missing = RECORDED - {path.name for path in paths}
    assert not missing, f"missing from bench/results/: {sorted(missing)}"
    for path in paths:
        result = json.loads(path.read_text())
        text = json.dumps(result)
        assert "H100" in text or "H200" in text, f"{path.name} does not record the GPU it ran on"
        assert "transformers" in text, f"{path.name} does not record library versions"


def test_rates_from_a_log_start_after_the_compiles():
    # Two setups as bench_train logs them (the Trainer's per-step dict, progress bars repeating lines); the
    # second compiles in step 1: its rate over steps 3..4 leaves that out.
    sys.path.insert(0, str(ROOT))
    from bench.bench_train import rates_from_log

    def step(tokens, runtime):
        return f"{{'loss': '1', 'num_input_tokens_seen': {tokens}, 'train_runtime': '{runtime}'}}\n"

    log = "[bench_train] a_nf4 ...\n" + "".join(step(100 * i, 0.5 * i) for i in range(1, 5))
    log += "[bench_train] b_nf4 ...\n" + step(100, 30.0) + step(100, 30.0) + step(200, 30.2)
    log += step(300, 30.4) + step(400, 30.6)
    rates = rates_from_log(log, from_step=3, parameters=10**9, peak_flops=10**15)
    assert rates["a_nf4"] == {"steps": [3, 4], "s_per_step": 0.5, "tokens_per_s": 200.0, "mfu_4n": 0.0008}
    assert rates["b_nf4"]["tokens_per_s"] == 500.0 and rates["b_nf4"]["steps"] == [3, 4]


def test_step_clock_reads_speed_after_the_last_compile():
    sys.path.insert(0, str(ROOT))
    from bench.train_qlora import StepClock

    clock = StepClock()
    # Steps of 1 s and 100 tokens, but steps 1 and 3 compile (30 s and 20 s).
    clock.marks = [(0.0, 0), (30.0, 100), (31.0, 200), (51.0, 300), (52.0, 400), (53.0, 500), (54.0, 600)]
    assert clock.step_seconds() == [30.0, 1.0, 20.0, 1.0, 1.0, 1.0]
    assert clock.tokens_per_s_after_compiles() == 100.0
    assert clock.steady_tokens_per_s() == 20.8  # from the end of step 1: the second compile falls inside
