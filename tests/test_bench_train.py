"""The training benchmark script runs end to end (CPU smoke mode) and reports each setup it compares."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDED = {
    "bench_eval.json",
    "bench_multigpu.json",
    "bench_multigpu_problem_sharding.json",
    "bench_train.json",
    "study_gpu.json",
    "train_qlora.json",
}


@pytest.mark.slow
def test_bench_train_smoke_compares_trl_defaults_with_the_study_recipe(tmp_path):
    out = tmp_path / "bench_train.json"
    subprocess.run(
        [sys.executable, "-m", "bench.bench_train", "--smoke", "--out", str(out)],
        check=True, cwd=ROOT, timeout=600, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    setups = {setup["setup"]: setup for setup in result["setups"]}
    assert set(setups) == {"trl_defaults_bf16", "ours_bf16"}
    assert setups["trl_defaults_bf16"]["gradient_checkpointing"] is True  # TRL's default
    assert setups["ours_bf16"]["gradient_checkpointing"] is False  # the study's recipe
    # Both setups train on the same rows, so they see the same real tokens.
    assert setups["trl_defaults_bf16"]["tokens_seen"] == setups["ours_bf16"]["tokens_seen"] > 0
    expected = round(
        setups["ours_bf16"]["steady_tokens_per_s"] / setups["trl_defaults_bf16"]["steady_tokens_per_s"], 2
    )
    assert result["speedup_ours_vs_trl_defaults"] == {"bf16": expected}


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
