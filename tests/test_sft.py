"""The train stage: adapters, training.json, skipping, resume, errors, and the GPU benchmark's CPU smoke mode.

Fast tests train a 2-layer, 64-dim Qwen3 (random weights, the tiny study's tokenizer: the ``training_base``
fixture) for a few steps; the slow test trains the real tiny study and evaluates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import chat_token_lengths, prepared, sft_study
from safetensors.torch import load_file

from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import load_config
from eval_artifacts.study.errors import ArtifactError, TrainingError
from hub_tools.cli import main
from training import prepare_data, sft

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = {
    "schema_version", "level", "model", "base_model", "adapter", "hyperparameters", "precision", "quantization", "loss",
    "hardware", "seed", "train_rows", "data_file", "data_sha256", "tokens_seen", "steps", "loss_curve",
    "wall_time_s", "tokens_per_s", "library_versions", "base_model_hub", "epochs_trained",
}  # fmt: skip
HYPERPARAMETER_KEYS = {
    "epochs", "max_steps", "learning_rate", "batch_size", "gradient_accumulation_steps", "effective_batch_size",
    "max_seq_length", "warmup_ratio", "lr_scheduler", "optimizer",
}  # fmt: skip


def adapter_weights(run_dir: RunDir, level: int | str) -> dict[str, torch.Tensor]:
    return load_file(run_dir.adapter_dir(level) / "adapter_model.safetensors")


def test_train_writes_adapter_and_a_complete_training_json(training_base, tmp_path):
    # Two full epochs over 24 rows: every token of every row is seen exactly twice.
    config = sft_study(training_base, tmp_path / "run", max_steps=-1, epochs=2, batch_size=8)
    config = config.with_overrides(**{"data.max_train_rows": 24})
    run_dir = prepared(config)

    payload = sft.run(config, run_dir.root, levels=[3])["level_3"]

    adapter_dir = run_dir.adapter_dir(3)
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training.json",
    ]  # no README.md from TRL or PEFT, and the checkpoints are gone
    assert json.loads(run_dir.training_json(3).read_text()) == payload
    assert set(payload) == CONTRACT_KEYS
    assert set(payload["hyperparameters"]) == HYPERPARAMETER_KEYS

    lengths = chat_token_lengths(training_base, run_dir.train_file(3))
    assert payload["tokens_seen"] == 2 * sum(lengths)
    assert payload["train_rows"] == 24
    assert payload["steps"] == 6  # 24 rows / 8 per step × 2 epochs
    assert payload["epochs_trained"] == 6 * 8 / 24
    assert payload["data_file"] == "data/level_3/train.jsonl"
    assert payload["data_sha256"] == hashlib.sha256(run_dir.train_file(3).read_bytes()).hexdigest()
    assert payload["loss_curve"][0]["step"] == 1 and [p["step"] for p in payload["loss_curve"]][1:] == [
        2,
        4,
        6,
    ]
    # Both are stored rounded (wall to 1 ms, tokens/s to 0.1): allow what that rounding alone can move.
    rounding = 5e-4 / payload["wall_time_s"] + 0.05 / payload["tokens_per_s"]
    assert payload["tokens_per_s"] == pytest.approx(
        payload["tokens_seen"] / payload["wall_time_s"], rel=1e-6 + rounding
    )
    assert payload["hardware"] == {"device": "cpu", "gpu_name": None, "gpu_count": 0, "world_size": 1, "peak_gpu_memory_gib": None}
    assert (payload["precision"], payload["quantization"], payload["loss"]) == (
        "fp32",
        "none",
        "completion_only",
    )
    assert payload["adapter"] == {
        "method": "LoRA",
        "r": 16,
        "alpha": 32,
        "dropout": 0.0,
        "target_modules": "all-linear",
    }
    assert payload["hyperparameters"]["effective_batch_size"] == 8
    assert payload["base_model"] == {"id": str(training_base), "revision": "main"}
    assert payload["base_model_hub"] == {"id": None, "sha": None}  # a local folder that names no Hub repo
    assert {"torch", "transformers", "peft", "trl", "accelerate"} <= set(payload["library_versions"])

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (16, 32)
    # all-linear: every attention and MLP projection of the 2 layers carries LoRA A and B.
    weights = adapter_weights(run_dir, 3)
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.split(".")[-3] for name in weights} == projections
    assert len(weights) == 2 * len(projections) * 2


def test_loss_falls_and_completion_only_masks_the_prompt(training_base, tmp_path):
    # The criterion: the loss falls by at least 30% from the first logged step to the last.
    config = sft_study(training_base, tmp_path / "run", max_steps=16, logging_steps=4, learning_rate=0.03)
    run_dir = prepared(config)
    payload = sft.run(config, run_dir, levels=[3])["level_3"]
    curve = payload["loss_curve"]
    assert [point["step"] for point in curve] == [1, 4, 8, 12, 16]
    assert curve[-1]["loss"] <= 0.7 * curve[0]["loss"]

    rows = sft.load_rows(run_dir.train_file(3))[:4]
    for completion_only in (True, False):
        training = config.training.model_copy(update={"completion_only_loss": completion_only})
        model, tokenizer = sft.load_base(
            model_path=str(training_base), revision="main", quantization="none", precision="fp32",
            gradient_checkpointing=False,
        )  # fmt: skip
        trainer = sft.build_trainer(
            model=model, tokenizer=tokenizer, dataset=sft.chat_dataset(rows), training=training,
            seed=training.seeds[0], precision="fp32", output_dir=tmp_path / "unused",
        )  # fmt: skip
        example = trainer.train_dataset[0]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": rows[0]["prompt"]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        masked = sum(label == -100 for label in example["labels"])
        assert masked == (len(prompt) if completion_only else 0)


def test_the_loss_curve_ends_at_the_last_step_when_it_is_not_a_multiple_of_logging_steps(training_base, tmp_path):
    # 6 steps logged every 4: the trainer alone would log steps 1 and 4 and miss the trained loss. The same
    # seed logged every step gives each step's own loss; a logged loss is the mean over the steps since the
    # previous log, so the curve is recomputed from it.
    config = sft_study(training_base, tmp_path / "run", max_steps=6, logging_steps=4)
    run_dir = prepared(config)
    payload = sft.run(config, run_dir, levels=[3])["level_3"]
    every_step = sft.run(config.with_overrides(**{"training.logging_steps": 1}), run_dir, levels=[3], force=True)
    step_loss = {point["step"]: point["loss"] for point in every_step["level_3"]["loss_curve"]}

    assert list(step_loss) == [1, 2, 3, 4, 5, 6]  # a last step that is a multiple is logged once
    curve = payload["loss_curve"]
    assert [point["step"] for point in curve] == [1, 4, 6] and curve[-1]["step"] == payload["steps"] == 6
    expected = [step_loss[1], (step_loss[2] + step_loss[3] + step_loss[4]) / 3, (step_loss[5] + step_loss[6]) / 2]
    assert [point["loss"] for point in curve] == pytest.approx(expected, rel=1e-5)


def test_summary_line_names_the_step_of_each_loss_it_shows(tmp_path):
    payload = {"model": "level_1", "seed": 42, "steps": 8, "tokens_per_s": 1234.5, "wall_time_s": 3.21}

    def line(curve):
        return sft.summary_line({**payload, "loss_curve": curve}, tmp_path)

    first, middle, last = {"step": 1, "loss": 12.4031}, {"step": 4, "loss": 11.0}, {"step": 8, "loss": 9.7799}
    assert line([first, middle, last]) == (
        f"level_1 (seed 42): 8 steps, loss 12.403 (step 1) → 9.780 (step 8), 1,234 tokens/s, 3.2 s → {tmp_path}"
    )
    assert "loss 12.403 (step 1), 1,234 tokens/s" in line([first])  # one point: no "12.403 → 12.403"
    assert "8 steps, no loss logged, " in line([])


def test_rerun_skips_an_up_to_date_adapter_and_retrains_on_change(training_base, tmp_path, capsys):
    config = sft_study(training_base, tmp_path / "run", max_steps=2)
    run_dir = prepared(config)
    first = sft.run(config, run_dir, levels=[3])["level_3"]
    stamp = (run_dir.adapter_dir(3) / "adapter_model.safetensors").stat().st_mtime_ns

    assert sft.run(config, run_dir, levels=[3])["level_3"] == first
    assert "level_3: adapter up to date" in capsys.readouterr().out
    assert (run_dir.adapter_dir(3) / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    changed = config.with_overrides(**{"training.learning_rate": 0.02})
    assert sft.run(changed, run_dir, levels=[3])["level_3"]["hyperparameters"]["learning_rate"] == 0.02
    assert sft.run(changed, run_dir, levels=[3], force=True)["level_3"]["wall_time_s"] > 0
    assert "skipped" not in capsys.readouterr().out

    with run_dir.train_file(3).open("a") as handle:
        handle.write(
            json.dumps({"id": "x", "prompt": "p", "completion": "<think>\n1\n</think>\n#### 1"}) + "\n"
        )
    assert sft.run(changed, run_dir, levels=[3])["level_3"]["train_rows"] == 65


class _Killed(Exception):
    pass


def test_resume_after_a_kill_ends_with_the_uninterrupted_weights(training_base, tmp_path, monkeypatch):
    config = sft_study(training_base, tmp_path / "straight", max_steps=8, save_steps=4)
    straight = prepared(config)
    expected = sft.run(config, straight, levels=[3])["level_3"]

    killed_config = config.with_overrides(run_dir=str(tmp_path / "killed"))
    killed = prepared(killed_config)
    build = sft.build_trainer

    def build_then_die_after_first_checkpoint(**kwargs):
        from transformers import TrainerCallback

        class DieAfterSave(TrainerCallback):
            def on_save(self, args, state, control, **_):
                raise _Killed(f"killed after checkpoint {state.global_step}")

        trainer = build(**kwargs)
        trainer.add_callback(DieAfterSave())
        return trainer

    monkeypatch.setattr(sft, "build_trainer", build_then_die_after_first_checkpoint)
    with pytest.raises(_Killed, match="checkpoint 4"):
        sft.run(killed_config, killed, levels=[3])
    checkpoints = sorted(p.name for p in (killed.adapter_dir(3) / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-4"]
    assert not run_dir_has_adapter(killed, 3)

    monkeypatch.setattr(sft, "build_trainer", build)
    resumed = sft.run(killed_config, killed, levels=[3], resume=True)["level_3"]

    got, want = adapter_weights(killed, 3), adapter_weights(straight, 3)
    assert got.keys() == want.keys()
    for name in want:  # stated tolerance: 1e-6 absolute on every LoRA weight
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    assert resumed["steps"] == 8 and resumed["tokens_seen"] == expected["tokens_seen"]
    assert [p["step"] for p in resumed["loss_curve"]] == [p["step"] for p in expected["loss_curve"]]
    assert [p["loss"] for p in resumed["loss_curve"]] == pytest.approx(
        [p["loss"] for p in expected["loss_curve"]]
    )
    assert not (killed.adapter_dir(3) / "checkpoints").exists()
    assert sft.run(killed_config, killed, levels=[3], resume=True)["level_3"] == resumed  # finished levels are skipped


def run_dir_has_adapter(run_dir: RunDir, level: int) -> bool:
    return (run_dir.adapter_dir(level) / "adapter_model.safetensors").exists()


def test_keep_checkpoints_keeps_the_last_ones(training_base, tmp_path):
    config = sft_study(
        training_base, tmp_path / "run", max_steps=6, save_steps=2, save_total_limit=2, keep_checkpoints=True
    )
    run_dir = prepared(config)
    sft.run(config, run_dir, levels=[3])
    kept = sorted(p.name for p in (run_dir.adapter_dir(3) / "checkpoints").iterdir())
    assert kept == ["checkpoint-4", "checkpoint-6"]


def test_one_adapter_per_training_seed_each_skipped_when_up_to_date(training_base, tmp_path, capsys):
    config = sft_study(training_base, tmp_path / "run", max_steps=2, seeds=[42, 43])
    run_dir = prepared(config)

    trained = sft.run(config, run_dir, levels=[3])

    assert list(trained) == ["level_3", "level_3_seed43"]
    assert [trained[m]["seed"] for m in trained] == [42, 43] and trained["level_3_seed43"]["model"] == "level_3_seed43"
    assert json.loads(run_dir.training_json("level_3_seed43").read_text()) == trained["level_3_seed43"]
    published, other = adapter_weights(run_dir, 3), adapter_weights(run_dir, "level_3_seed43")
    assert any(not torch.equal(published[name], other[name]) for name in published)  # another initialisation
    capsys.readouterr()
    assert sft.run(config, run_dir, levels=[3]) == trained
    assert capsys.readouterr().out.count("adapter up to date") == 2
    # Training the same recipe on another first seed does not reuse seed 42's adapter under level_3.
    swapped = config.with_overrides(**{"training.seeds": [43, 42]})
    assert sft.run(swapped, run_dir, levels=[3])["level_3"]["seed"] == 43


def test_missing_data_names_prepare_data(training_base, tmp_path):
    config = sft_study(training_base, tmp_path / "run")
    with pytest.raises(ArtifactError, match="cot-compress prepare-data"):
        sft.run(config, config.run_dir, levels=[2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_nf4_without_cuda_is_a_training_error(training_base, tmp_path):
    config = sft_study(training_base, tmp_path / "run").with_overrides(**{"base_model.quantization": "nf4"})
    run_dir = prepared(config)
    with pytest.raises(TrainingError, match="quantization: none"):
        sft.run(config, run_dir, levels=[3])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_liger_kernels_without_cuda_are_a_training_error_before_any_data_is_read(training_base, tmp_path):
    config = sft_study(training_base, tmp_path / "run").with_overrides(**{"training.liger_kernel": True})
    with pytest.raises(TrainingError, match="training.liger_kernel: false"):
        sft.run(config, config.run_dir, levels=[3])  # no prepared data: the kernel check comes first


def test_what_liger_patches_in_transformers_during_training_is_put_back():
    # Liger swaps the Qwen3 module's classes for the whole process; evaluation builds models after training.
    from types import SimpleNamespace

    from helpers import tiny_qwen3
    from transformers.models.qwen3 import modeling_qwen3

    original = modeling_qwen3.Qwen3MLP, modeling_qwen3.apply_rotary_pos_emb
    trainer = SimpleNamespace(args=SimpleNamespace(use_liger_kernel=True), model=tiny_qwen3(32))
    with sft._modeling_module_restored(trainer):
        modeling_qwen3.Qwen3MLP, modeling_qwen3.apply_rotary_pos_emb = object, len  # what Liger does
    assert (modeling_qwen3.Qwen3MLP, modeling_qwen3.apply_rotary_pos_emb) == original


def test_train_command_prints_one_summary_line_per_level(training_base, tmp_path):
    config = sft_study(training_base, tmp_path / "run", max_steps=2)
    prepared(config, levels=(4, 5))
    config_file = tmp_path / "study.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    result = CliRunner().invoke(main, ["train", "--config", str(config_file), "--levels", "4,5"])
    assert result.exit_code == 0, result.output
    summaries = [line for line in result.output.splitlines() if line.startswith("level_")]
    assert [line.split(":")[0] for line in summaries] == ["level_4 (seed 42)", "level_5 (seed 42)"]
    assert all("2 steps" in line and "tokens/s" in line for line in summaries)

    missing = CliRunner().invoke(main, ["train", "--config", str(config_file), "--levels", "1"])
    assert missing.exit_code == 2
    assert missing.output.strip().count("\n") == 0 and "prepare-data" in missing.output


@pytest.mark.slow  # ~10 s alone, over 30 s on a loaded 2-core machine
def test_qlora_benchmark_smoke_mode_writes_its_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    subprocess.run(
        [sys.executable, "-m", "bench.train_qlora", "--smoke"],
        check=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    result = json.loads((tmp_path / "train_qlora.json").read_text())
    assert result["mode"] == "smoke" and result["steps"] == 2
    # One epoch of exactly steps × rows_per_step rows: the trainer saw every real token once.
    assert result["tokens_seen"] == result["dataset_tokens"]
    assert 200 <= result["tokens_per_row"] <= 300
    assert result["tokens_per_s"] > 0 and result["quantization"] == "none"
    assert result["model"]["num_hidden_layers"] == 2 and result["model"]["hidden_size"] == 64


@pytest.mark.slow
def test_tiny_study_trains_every_level_and_think_tokens_fall_from_l1_to_l5(tmp_path):
    """The issue's done-when on the real tiny study: every level's loss falls ≥ 30%, and the adapters'
    mean think tokens on the test problems fall strictly from L1 to L5."""
    from training import evaluate

    config = load_config().with_overrides(run_dir=str(tmp_path / "tiny"))
    run_dir = RunDir(config.run_dir)
    prepare_data.run(config, run_dir)

    trained = sft.run(config, run_dir)

    assert sorted(trained) == [f"level_{n}" for n in range(1, 6)]
    for level, payload in trained.items():
        curve = payload["loss_curve"]
        assert curve[-1]["loss"] <= 0.7 * curve[0]["loss"], (level, curve[0], curve[-1])
    evaluate.run(config, run_dir, models=config.model_keys)  # the stock model too: the summary needs it
    means = []
    for level in config.levels:
        samples = [json.loads(line) for line in run_dir.samples(f"level_{level}").read_text().splitlines()]
        assert len(samples) == config.data.synthetic.n_test
        means.append(sum(sample["think_tokens"] for sample in samples) / len(samples))
    assert all(earlier > later for earlier, later in zip(means, means[1:], strict=False)), means

    # Issue 16: the default run evaluates the prompt-only baselines like the others; summary.json, the
    # results tables and every adapter card carry them, each card its paired delta against its own level's.
    from eval_artifacts.metrics import read_metrics
    from eval_artifacts.summary import read_summary
    from hub_tools import cards

    summary = read_summary(run_dir)
    prompt_rows = [row for row in summary["models"] if row["kind"] == "prompt"]
    assert [row["model"] for row in prompt_rows] == [f"prompt_l{n}" for n in range(1, 6)]
    rendered = cards.render_study_cards(config, run_dir)
    cards.validate_all(rendered, config=config, run_dir=run_dir)
    for level in config.levels:
        text = rendered[f"tiny-cot-l{level}"].text
        assert f"| P{level} " in text and ", prompt only |" in text
        vs_prompt = read_metrics(run_dir, f"level_{level}")["vs_prompt"]
        assert vs_prompt["n_paired"] == config.data.synthetic.n_test
        assert f"differs by {cards.fmt_delta(vs_prompt['delta'])} (95% CI {cards.fmt_ci(vs_prompt['ci95'])}" in text
    assert "| `prompt_l5` | P5 Minimal, prompt only |" in rendered["tiny-cot-eval"].text


def test_compiled_decoder_layers_train_to_the_eager_loss_and_save_the_same_adapter_keys(
    training_base, tmp_path
):
    # Regional compilation: every decoder layer compiled in place (one dynamic graph serves them all), so the
    # adapter's parameter names are the eager run's, and with the same padding (compiled layers pad to
    # multiples of 8) the loss curve is the eager one up to the order of float sums: dropout draws eager's
    # random numbers (fallback_random), so it is on here.
    import torch._dynamo

    config = sft_study(training_base, tmp_path / "run", max_steps=4, logging_steps=1)
    training = config.training.model_copy(update={"lora": config.training.lora.model_copy(update={"dropout": 0.1})})
    rows = sft.load_rows(prepared(config).train_file(3))
    curves, keys = {}, {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # Eager, then two compiled models in one process without a reset, as sft.run trains its levels.
    for run, compiled in (("eager", False), ("compiled", True), ("compiled again", True)):
        model, tokenizer = sft.load_base(
            model_path=str(training_base), revision="main", quantization="none", precision="fp32",
            gradient_checkpointing=False,
        )  # fmt: skip
        trainer = sft.build_trainer(
            model=model, tokenizer=tokenizer, dataset=sft.chat_dataset(rows),
            training=training.model_copy(update={"compile_layers": compiled}), seed=42, precision="fp32",
            output_dir=tmp_path / run, sft_overrides=None if compiled else {"pad_to_multiple_of": 8},
        )  # fmt: skip
        sft.train(trainer)
        curves[run] = [point["loss"] for point in sft.loss_curve(trainer)]
        sft.save_adapter(trainer, tmp_path / f"adapter-{run}")
        keys[run] = sorted(load_file(tmp_path / f"adapter-{run}" / "adapter_model.safetensors"))
    # One graph for layer 0 (its input needs no gradient) and one for the others, whatever the lengths, and the
    # second model's layers reuse them: no recompile (dynamo would fall back to eager after 8).
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert keys["compiled"] == keys["compiled again"] == keys["eager"] and len(keys["eager"]) == 2 * 7 * 2
    assert len(curves["compiled"]) == 4
    assert curves["compiled"] == pytest.approx(curves["eager"], rel=1e-4)
    assert curves["compiled again"] == curves["compiled"]


def test_compiled_layers_pad_batches_to_multiples_of_8(training_base, tmp_path):
    config = sft_study(training_base, tmp_path / "run", compile_layers=True)
    rows = sft.load_rows(prepared(config).train_file(3))
    model, tokenizer = sft.load_base(
        model_path=str(training_base), revision="main", quantization="none", precision="fp32",
        gradient_checkpointing=False,
    )  # fmt: skip
    trainer = sft.build_trainer(
        model=model, tokenizer=tokenizer, dataset=sft.chat_dataset(rows), training=config.training,
        seed=42, precision="fp32", output_dir=tmp_path / "unused",
    )  # fmt: skip
    lengths = {batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()}
    assert lengths and all(n % 8 == 0 for n in lengths)
    assert all(layer._compiled_call_impl is not None for layer in trainer.model.get_base_model().model.layers)


def test_compile_layers_without_decoder_layers_is_a_training_error():
    with pytest.raises(TrainingError, match="training.compile_layers: false"):
        sft.compile_decoder_layers(torch.nn.Linear(2, 2))
