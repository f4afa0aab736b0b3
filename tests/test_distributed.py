"""Several processes (torchrun, gloo on CPU): sharded evaluation merged into one samples.jsonl, its kill -9
resume across process counts, and DDP training writing one adapter.

The processes are real (``python -m torch.distributed.run --nproc_per_node 2``, the launcher under
``accelerate launch``) on the small random Qwen3s of the ``generation_base`` and ``training_base`` fixtures,
so every test is about the bookkeeping between ranks, not about accuracy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import chat_token_lengths, make_adapter, prepared, sft_study

from eval_artifacts.records import read_samples
from eval_artifacts.rundir import RunDir, read_json
from eval_artifacts.study.config import load_config
from training import evaluate

MODELS = ("base", "level_1", "prompt_l1")  # the tiny config evaluates prompt-only baselines too


def launch(command: list[str], *, processes: int = 2, env: dict | None = None, **popen) -> subprocess.Popen:
    """``cot-compress <command>`` under torchrun with ``processes`` CPU ranks, in its own process group."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--standalone",  # torchrun picks a free local port itself: no race for one picked here
            "-m",
            "hub_tools.cli",
            *command,
        ],  # fmt: skip
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        start_new_session=True,
        **popen,
    )


def kill_all(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a lost node or an OOM-killed job would end.

    torchrun starts each rank in a session of its own, so the launcher's process group does not reach them:
    the whole process tree is collected first, then killed.
    """
    tree, parents = {process.pid}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue
        parents[int(pid)] = int(rest.rsplit(") ", 1)[1].split()[1])
    while grown := {pid for pid, parent in parents.items() if parent in tree} - tree:
        tree |= grown
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in tree - {process.pid}):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def study(generation_base, tmp_path_factory):
    """One level, 30 test problems, batches of 2, and a single-process reference run."""
    root = tmp_path_factory.mktemp("dist_study")
    adapter = make_adapter(generation_base, root / "adapter", seed=5)
    config = load_config().with_overrides(
        **{
            "base_model.id": str(generation_base),
            "levels": [1],
            "data.synthetic.n_test": 30,
            "eval.batch_size": 2,
            "eval.max_new_tokens": 8,
        }
    )
    study = SimpleNamespace(config=config, adapter=adapter, root=root)
    study.reference = new_run_dir(study, "reference")
    evaluate.run(config.with_overrides(run_dir=str(study.reference.root)), study.reference)
    return study


def new_run_dir(study, name: str) -> RunDir:
    run_dir = RunDir(study.root / name)
    target = run_dir.adapter_dir(1)
    target.mkdir(parents=True)
    for file in study.adapter.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    (run_dir.root / "study.yaml").write_text(
        yaml.safe_dump(study.config.with_overrides(run_dir=str(run_dir.root)).model_dump(mode="json"))
    )
    return run_dir


def eval_command(run_dir: RunDir) -> list[str]:
    return ["evaluate", "--config", str(run_dir.root / "study.yaml")]


def assert_same_as_reference(study, run_dir: RunDir, *, in_order: bool = True) -> None:
    """The same records as the single-process run (in its order, unless a resumed run appended some later)."""
    for model in MODELS:
        got = read_samples(run_dir.samples(model), model=model)  # raises on a duplicate (id, seed)
        want = read_samples(study.reference.samples(model), model=model)
        if not in_order:
            got, want = (sorted(rows, key=lambda r: (r["id"], r["seed"])) for rows in (got, want))
        assert got == want
        assert read_json(run_dir.metrics(model), what="m", hint="") == read_json(
            study.reference.metrics(model), what="m", hint=""
        )
    assert not list(run_dir.eval_dir.glob("*/samples.rank*")), "shard files left behind"
    assert run_dir.summary.is_file() and run_dir.pareto_png.stat().st_size > 0


def test_two_processes_write_the_samples_of_one(study):
    run_dir = new_run_dir(study, "two")

    out = finish(launch(eval_command(run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    assert_same_as_reference(study, run_dir)
    lines = [line for line in out.splitlines() if "accuracy" in line]
    assert [line.split()[0] for line in lines] == list(MODELS)  # printed once, by rank 0


def test_every_gpu_count_decodes_the_same_batches(study, monkeypatch):
    """bf16 kernels round differently with a batch's size and neighbours, so greedy samples stay the same on
    N GPUs only if N changes which process decodes a batch and never what the batch holds."""
    from training.data import load_problems
    from training.distributed import Process
    from training.generate import GenerationEngine

    engine = GenerationEngine(study.config.base_model.id)
    problems = load_problems(study.config, "test")
    decoded: list[tuple[str, ...]] = []
    generate_batch = GenerationEngine.generate_batch

    def recording(self, prompts, **kwargs):
        decoded.append(tuple(prompts))
        return generate_batch(self, prompts, **kwargs)

    monkeypatch.setattr(GenerationEngine, "generate_batch", recording)

    def batches_of(rank: int, world: int) -> list[tuple[str, ...]]:
        decoded.clear()
        run_dir = RunDir(study.root / f"batches-{rank}-of-{world}")
        process = Process(rank=rank, world_size=world, local_rank=rank)
        evaluate.evaluate_model(
            engine, run_dir, problems, model="base", seed=0, config=study.config, process=process
        )
        return list(decoded)

    one = batches_of(0, 1)
    assert len(one) == 15 and {len(batch) for batch in one} == {2}  # 30 problems, eval.batch_size 2
    for world in (2, 3, 4):
        assert [batches_of(rank, world) for rank in range(world)] == [
            one[rank::world] for rank in range(world)
        ]


@pytest.mark.slow
def test_killed_two_process_run_resumes_with_one_process_and_with_two(study):
    for name, rerun_processes in (("killed_then_one", 1), ("killed_then_two", 2)):
        run_dir = new_run_dir(study, name)
        process = launch(eval_command(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        written, deadline = 0, time.monotonic() + 300
        while written < 8 and process.poll() is None and time.monotonic() < deadline:
            written = sum(len(p.read_bytes().splitlines()) for p in run_dir.eval_dir.glob("*/samples.rank*"))
            time.sleep(0.01)
        kill_all(process)
        shards = list(run_dir.eval_dir.glob("*/samples.rank*-of-2.jsonl"))
        assert shards and not list(run_dir.eval_dir.glob("*/samples.jsonl")), "killed after the merge"
        # A kill in the middle of a write leaves a torn last line; the rerun must drop it.
        with shards[0].open("a") as handle:
            handle.write('{"id": "test-000')

        if rerun_processes == 1:
            evaluate.run(study.config.with_overrides(run_dir=str(run_dir.root)), run_dir)
        else:
            finish(launch(eval_command(run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

        # The killed run's records come first, then the rerun's: the same set, none twice.
        assert_same_as_reference(study, run_dir, in_order=False)


@pytest.mark.slow
def test_kill_during_the_merge_then_rerun_generates_nothing_and_converges(study):
    run_dir = new_run_dir(study, "killed_in_merge")
    # Rank 0 dies right after replacing level_1's samples.jsonl, before removing its shards.
    killed = launch(
        eval_command(run_dir),
        env={"COT_COMPRESS_KILL_AT": "evaluate.shards_merged:level_1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed.wait(timeout=300)
    assert killed.returncode != 0
    assert list(run_dir.eval_dir.glob("level_1/samples.rank*"))  # merged, shards not yet removed
    merged = ("base", "level_1")  # the prompt-only baseline, merged after level_1, still has only its shards
    before = {model: len(run_dir.samples(model).read_bytes().splitlines()) for model in merged}
    assert before == {"base": 30, "level_1": 30}
    assert list(run_dir.eval_dir.glob("prompt_l1/samples.rank*")) and not run_dir.samples("prompt_l1").exists()

    finish(launch(eval_command(run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    assert_same_as_reference(study, run_dir)


def test_merge_is_idempotent_and_keeps_existing_records_first(study, tmp_path):
    run_dir = RunDir(tmp_path)
    path = run_dir.samples("base")
    path.parent.mkdir(parents=True)
    row = {"id": "a", "seed": 0, "sample": 0, "x": 1}
    path.write_text(json.dumps(row) + "\n")
    shard = path.with_name("samples.rank1-of-2.jsonl")
    shard.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in ({"id": "c", "seed": 0, "sample": 0}, {"id": "a", "seed": 0, "sample": 0, "x": 2})
        )
        + '{"id": "d", "se'  # torn tail
    )
    path.with_name("samples.rank0-of-2.jsonl").write_text(json.dumps({"id": "b", "seed": 0, "sample": 0}) + "\n")
    order = {"b": 0, "c": 1}

    added = evaluate.merge_shards(run_dir, "base", order=lambda r: order[r["id"]])

    assert added == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        row, {"id": "b", "seed": 0, "sample": 0}, {"id": "c", "seed": 0, "sample": 0},
    ]  # fmt: skip
    assert sorted(p.name for p in path.parent.iterdir()) == ["samples.jsonl"]
    merged = path.read_bytes()
    assert evaluate.merge_shards(run_dir, "base", order=lambda r: 0) == 0
    assert path.read_bytes() == merged


# ---------------------------------------------------------------- training under DDP


@pytest.mark.slow
def test_train_with_two_processes_writes_one_adapter_and_counts_every_rank(training_base, tmp_path):
    base = training_base
    config = sft_study(base, tmp_path / "run", max_steps=-1, epochs=1, batch_size=4)
    config = config.with_overrides(**{"data.max_train_rows": 24})
    run_dir = prepared(config)
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    out = finish(
        launch(
            ["train", "--config", str(config_path), "--levels", "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )

    adapter_dir = run_dir.adapter_dir(3)
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training.json",
    ]
    assert out.count("level_3 (seed 42): ") == 1  # one summary line, from rank 0
    payload = json.loads(run_dir.training_json(3).read_text())
    assert payload["hardware"] == {"device": "cpu", "gpu_name": None, "gpu_count": 0, "world_size": 2, "peak_gpu_memory_gib": None}
    assert payload["hyperparameters"]["effective_batch_size"] == 8  # 4 per rank × 2 ranks
    assert payload["steps"] == 3  # 24 rows / 8 per step
    # One epoch: each rank saw half the rows; the total is every token of every row once.
    assert payload["tokens_seen"] == sum(chat_token_lengths(base, run_dir.train_file(3)))


# ---------------------------------------------------------------- the multi-GPU benchmark's CPU mode


@pytest.mark.slow
def test_multigpu_benchmark_smoke_mode_writes_its_json(tmp_path):
    out = tmp_path / "bench_multigpu.json"
    subprocess.run(
        [sys.executable, "-m", "bench.bench_multigpu", "--smoke", "--out", str(out)],
        check=True, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())

    assert list(result["train"]) == ["none"]  # smoke: bf16/fp32 LoRA only, no bitsandbytes on the CPU
    train = result["train"]["none"]["runs"]
    assert {key: run["world_size"] for key, run in train.items()} == {"1": 1, "2": 2}
    for run in train.values():  # 2 steps of 2 rows per rank: every row of the run's data seen once
        assert (run["steps"], run["rows_per_step"]) == (2, 2 * run["world_size"])
        assert run["tokens_seen"] == run["dataset_tokens"]
        assert (run["quantization"], run["precision"], run["base_loaded_in_4bit"]) == ("none", "fp32", False)
    assert result["train"]["none"]["speedup"] == pytest.approx(
        train["2"]["tokens_per_s"] / train["1"]["tokens_per_s"], abs=1e-3
    )
    evaluation = result["eval"]
    # 12 problems in 4 batches of 3; each rank of 2 takes every other batch, one process takes all four.
    assert evaluation["runs"]["2"]["rank_problems"] == [6, 6]
    assert evaluation["runs"]["2"]["rank_batch_rows"] == [{"base": [3, 3], "level_1": [3, 3]}] * 2
    assert evaluation["runs"]["1"]["rank_batch_rows"] == [{"base": [3] * 4, "level_1": [3] * 4}]
    assert evaluation["samples"] == 24  # 12 problems × (base, level_1)
    # fp32 on the CPU: the sharded run reproduces the single-process samples exactly.
    assert evaluation["identical_samples"] == 24 and evaluation["same_weights_on_1_and_n"]
    assert evaluation["speedup"] == pytest.approx(
        evaluation["runs"]["1"]["wall_s"] / evaluation["runs"]["2"]["wall_s"], abs=1e-3
    )
    assert result["goals_met"]["eval_identical"] is True
    assert set(result["goals_met"]) == {"train_speedup_none", "eval_speedup", "eval_identical"}
    assert {"torch", "transformers"} <= set(result["library_versions"])
