"""Stage 2, train: one LoRA adapter per (level, training seed) with TRL's SFTTrainer, resumable, with full
provenance.

Per adapter, top to bottom: read ``data/level_<n>/train.jsonl`` → a prompt/completion dataset in chat form →
the base model (4-bit NF4 on CUDA when the config asks) → ``SFTTrainer`` with a PEFT LoRA config, seeded with
the training seed → ``adapters/<model>/`` (adapter_config.json, adapter_model.safetensors, training.json),
where ``<model>`` is ``level_<n>`` for the first of ``training.seeds`` (the published adapter) and
``level_<n>_seed<s>`` for the others.

An adapter already there, trained on the same data with the same recipe and seed, is skipped, so rerunning
the pipeline is cheap. Checkpoints go to ``adapters/<model>/checkpoints/`` and are removed after a successful
finish unless ``training.keep_checkpoints`` is set.
"""

from __future__ import annotations

import gc
import importlib.util
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from eval_artifacts.rundir import (
    ADAPTER_FILES,
    SCHEMA_VERSION,
    RunDir,
    epochs_trained,
    file_sha256,
    iter_jsonl,
    library_versions,
    write_json,
)
from eval_artifacts.study.config import StudyConfig, TrainingConfig
from eval_artifacts.study.errors import ArtifactError, DataError, TrainingError
from eval_artifacts.study.levels import get_level
from training import distributed
from training.models import recorded_base_id

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Hyperparameters that depend on the machine rather than the recipe; a rerun elsewhere still matches.
_RUNTIME_HYPERPARAMETERS = ("effective_batch_size", "optimizer")


def run(
    config: StudyConfig,
    run_dir: RunDir | str | Path,
    *,
    levels: list[int] | None = None,
    resume: bool = False,
    force: bool = False,
) -> dict[str, dict]:
    """Train the adapters of ``levels`` (default: the config's), one per training seed, and return their
    training.json payloads by model name (``level_<n>``, ``level_<n>_seed<s>``).

    Args:
        resume: continue each level from its last checkpoint; levels without one start from the beginning.
        force: retrain levels whose adapter is already up to date.

    Raises:
        ArtifactError: a level has no ``train.jsonl`` (run ``cot-compress prepare-data``).
        TrainingError: NF4 was asked for without a CUDA GPU, or bitsandbytes is missing.
    """
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    levels = levels or config.levels
    for level in levels:
        get_level(level)
    check_quantization(config.base_model.quantization)  # before any data is read or a base is built
    check_liger(config.training.liger_kernel)
    # Resolved on first need: an all-up-to-date rerun never builds the tiny base.
    model_path: str | None = None
    base_hub: dict[str, str | None] = {"id": None, "sha": None}
    revision = config.base_model.revision
    results: dict[str, dict] = {}
    adapters = [(level, model, seed) for level in levels for model, seed in config.adapter_models(level)]
    for level, model_name, seed in adapters:
        train_file = run_dir.train_file(level)
        if not train_file.is_file():
            raise ArtifactError(
                f"no SFT data for level {level} at {train_file}: run `cot-compress prepare-data --config C` first"
            )
        data_sha256 = file_sha256(train_file)
        adapter_dir = run_dir.adapter_dir(model_name)
        checkpoints = checkpoints_dir(run_dir, model_name)
        done = up_to_date(config, run_dir, model_name, seed, data_sha256)
        # An adapter killed mid-training has no training.json (removed when training starts), so it is never
        # "done": --resume reaches it, and skips the adapters that finished.
        if done is not None and not force:
            _say(f"{model_name}: adapter up to date in {adapter_dir}, skipped")
            if not config.training.keep_checkpoints:  # left by a run killed just after writing training.json
                shutil.rmtree(checkpoints, ignore_errors=True)
            results[model_name] = done
            continue
        resume_from = resume_point(checkpoints, config.training.max_steps, resume=resume, name=model_name)
        rows = load_rows(train_file)
        if model_path is None:
            model_path, base_hub, revision = base_to_load(config)  # resolved once, when the base is first read
        precision = choose_precision()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        model, tokenizer = load_base(
            model_path=model_path,
            revision=revision,
            quantization=config.base_model.quantization,
            precision=precision,
            gradient_checkpointing=config.training.gradient_checkpointing,
        )
        trainer = build_trainer(
            model=model,
            tokenizer=tokenizer,
            dataset=chat_dataset(rows),
            training=config.training,
            seed=seed,
            precision=precision,
            output_dir=checkpoints,
        )
        results[model_name] = train_and_record(
            trainer,
            resume=resume_from,
            adapter_dir=adapter_dir,
            record_path=run_dir.training_json(model_name),
            checkpoints=checkpoints,
            keep_checkpoints=config.training.keep_checkpoints,
            record=partial(
                training_record,
                config=config,
                level=level,
                model=model_name,
                seed=seed,
                trainer=trainer,
                precision=precision,
                train_rows=len(rows),
                data_file=train_file.relative_to(run_dir.root).as_posix(),
                data_sha256=data_sha256,
                base_hub=base_hub,
            ),
            summary=summary_line,
        )
        trainer.accelerator.free_memory()  # the accelerator holds the model and optimizer, too
        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next adapter loads its own copy of the base
    if config.tiny_base and distributed.current().is_main:
        from training.models import export_tiny_base

        export_tiny_base(config, run_dir)  # the adapters' base, published with them as {prefix}-base
    return results


# ---- data ----
def load_rows(path: Path) -> list[dict]:
    """The SFT rows of one level; each needs a ``prompt`` and a ``completion``."""
    rows = list(iter_jsonl(path, what="SFT data"))
    if not rows:
        raise DataError(f"{path} holds no rows: rerun `cot-compress prepare-data --config C`")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise DataError(
                f"{path} row {number} lacks a string 'prompt' or 'completion': rerun `cot-compress prepare-data`"
            )
    return rows


def chat_dataset(rows: list[dict]) -> Dataset:
    """Prompt/completion pairs in chat form: TRL renders them with the base model's chat template."""
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "completion": [{"role": "assistant", "content": row["completion"]}],
            }
            for row in rows
        ]
    )


# ---- model ----
def choose_precision() -> str:
    """bf16 where the GPU supports it, else fp16; fp32 on the CPU."""
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_quantization(quantization: str) -> None:
    """NF4 needs a CUDA GPU and bitsandbytes; say so before anything is loaded."""
    if quantization != "nf4":
        return
    if not torch.cuda.is_available():
        raise TrainingError(
            "base_model.quantization is 'nf4' but no CUDA GPU is visible: train on a GPU machine, "
            "or set base_model.quantization: none in the config"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError("NF4 quantization needs bitsandbytes: pip install 'cot-compress[gpu]'")


def check_liger(liger_kernel: bool) -> None:
    """Liger's kernels are Triton kernels: they need a CUDA GPU and liger-kernel."""
    if not liger_kernel:
        return
    if not torch.cuda.is_available():
        raise TrainingError(
            "training.liger_kernel is true but no CUDA GPU is visible: set training.liger_kernel: false"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise TrainingError("training.liger_kernel needs liger-kernel: pip install 'cot-compress[gpu]'")


def load_base(
    *,
    model_path: str,
    revision: str,
    quantization: str,
    precision: str,
    gradient_checkpointing: bool,
    attn_implementation: str | None = None,
):
    """The base model (NF4 with double quant when asked) and its tokenizer, ready for LoRA.

    ``attn_implementation``: transformers' attention backend (default: the model's, SDPA for Qwen3); the
    training benchmark tries ``flex_attention`` for padding-free batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_quantization(quantization)
    kwargs: dict = {"revision": revision, "dtype": _DTYPES[precision]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization == "nf4":
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_DTYPES[precision],
        )
        # 4-bit weights cannot be moved after loading: each DDP rank loads straight onto its own GPU.
        kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
    if tokenizer.chat_template is None:
        raise TrainingError(
            f"the tokenizer of {model_path} has no chat template: use an instruct/chat base model"
        )
    return model, tokenizer


class WithoutSideEffects:
    """Mixed into a TRL trainer: the project owns README.md, and nothing phones home."""

    def create_model_card(self, *args, **kwargs) -> None:
        return None

    def _send_telemetry(self) -> None:
        return None


class _StudySFTTrainer(WithoutSideEffects, SFTTrainer):
    pass


def build_trainer(
    *,
    model,
    tokenizer,
    dataset: Dataset,
    training: TrainingConfig,
    seed: int,
    precision: str,
    output_dir: Path,
    sft_overrides: dict | None = None,
) -> SFTTrainer:
    """The SFTTrainer of one adapter: LoRA from the config, loss on the completion or the whole sequence,
    ``seed`` for the LoRA initialisation, the data order and dropout.

    ``sft_overrides``: SFTConfig fields the training benchmark varies beyond the study config (padding-free
    batches); the study itself never passes any."""
    from peft import LoraConfig

    check_liger(training.liger_kernel)
    settings = dict(
        output_dir=str(output_dir),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_length=training.max_seq_length,
        **_warmup_and_checkpointing(training),
        lr_scheduler_type=training.lr_scheduler,
        completion_only_loss=training.completion_only_loss,
        packing=training.packing,
        # Liger's RMSNorm, SwiGLU and RoPE kernels; TRL keeps its own chunked LM head and loss.
        use_liger_kernel=training.liger_kernel,
        seed=seed,
        data_seed=seed,
        logging_steps=training.logging_steps,
        logging_first_step=True,  # the loss curve starts at the untrained loss
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        include_num_input_tokens_seen="non_padding",  # real tokens, summed over DDP ranks
        # Every LoRA weight sits on a linear layer of every forward pass, so DDP need not search the graph for
        # unused parameters each step (transformers' default without gradient checkpointing).
        ddp_find_unused_parameters=False,
        **runtime_arguments(precision),
    )
    packed = training.packing or (sft_overrides or {}).get("padding_free")
    if training.compile_layers and not packed:
        # Padded lengths that are multiples of 8: inductor's GPU kernels specialise on that alignment, and the
        # first unaligned batch cost a recompile of ~35 s on an H200 (bench/README.md, "Compiled decoder
        # layers"). Packed rows are left as they were measured there (one recompile, in step 2).
        settings["pad_to_multiple_of"] = 8
    args = SFTConfig(**(settings | (sft_overrides or {})))
    lora = LoraConfig(
        r=training.lora.r,
        lora_alpha=training.lora.alpha,
        lora_dropout=training.lora.dropout,
        target_modules=training.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    set_seed(seed)  # the LoRA weights are initialised inside the trainer's constructor
    trainer = _StudySFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[LogLastStep()],
    )
    if training.compile_layers:
        compile_decoder_layers(trainer.model)
    return trainer


class LogLastStep(TrainerCallback):
    """Logs the last optimizer step, so the loss curve ends where training did: the trainer logs only every
    ``logging_steps`` (and the first step), and a run whose last step is not a multiple of it would stop its
    curve short (a run shorter than ``logging_steps`` would have its first loss alone). Like every logged point,
    the last is the mean loss over the steps since the point before. When the last step is a multiple, the
    trainer logs that step once all the same: it never logs a step twice."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


def compile_decoder_layers(model) -> None:
    """``torch.compile`` each decoder layer in place, after PEFT has put LoRA into it.

    In place (``nn.Module.compile``), so parameter names, checkpoints and the saved adapter are unchanged.
    The layers share one code object, so dynamo compiles it once and every layer reuses it (PyTorch's regional
    compilation). The decoder layer is the class transformers keeps whole across devices (``_no_split_modules``).
    accelerate's ``compile_regions`` does the same by wrapping each layer in a new module, whose parameter names
    gain ``_orig_mod.``, which would change the adapter's keys and the checkpoints; hence in place."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in base.modules() if type(module).__name__ in kinds]
    if not layers:
        raise TrainingError(
            f"training.compile_layers found no decoder layers in {type(base).__name__}: set training.compile_layers: false"
        )
    for layer in layers:
        # dynamic: one graph for every batch's length (automatic dynamic shapes compile a static graph first,
        # then recompile as lengths change, ~25 s each for Qwen3-4B). fallback_random: dropout draws eager's
        # random numbers; emulate_precision_casts: fused kernels round to bf16 where eager ops do. So a seed
        # trains the same adapter compiled or not, up to the order of float sums.
        layer.compile(dynamic=True, options={"fallback_random": True, "emulate_precision_casts": True})


def runtime_arguments(precision: str) -> dict:
    """The trainer arguments every stage shares: precision, device, checkpoints by steps, no reporting."""
    return {
        "save_strategy": "steps",
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "dataloader_pin_memory": torch.cuda.is_available(),
        # Without it, accelerate ignores torchrun's ranks on a CPU-only machine: each rank trains alone.
        "use_cpu": not torch.cuda.is_available(),
        "report_to": [],
        "push_to_hub": False,
    }


def _warmup_and_checkpointing(training: TrainingConfig) -> dict:
    """The arguments whose names changed across transformers 5.x (GPU images lag behind PyPI)."""
    fields = SFTConfig.__dataclass_fields__
    # Newer versions take a warmup ratio as a float ``warmup_steps`` below 1 and dropped ``warmup_ratio``.
    warmup = "warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"
    return {**checkpointing_argument(SFTConfig, training.gradient_checkpointing), warmup: training.warmup_ratio}


def checkpointing_argument(config_class: type, enabled: bool) -> dict:
    """Gradient checkpointing under the name this transformers calls it (renamed ``activation_checkpointing``)."""
    fields = config_class.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled}


# ---- training ----
@dataclass(frozen=True)
class TrainOutcome:
    wall_time_s: float
    session_tokens: int
    """Real tokens processed by this call (a resumed run counts only what it trained itself)."""


class _TokensAtStart(TrainerCallback):
    """Remembers the token count restored from a checkpoint, so tokens/s covers this session only."""

    tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens = state.num_input_tokens_seen


def train(trainer: SFTTrainer, *, resume: bool | Path | None = None) -> TrainOutcome:
    """Run the trainer (from ``resume``, a checkpoint, or its last one when True) and time it."""
    start = _TokensAtStart()
    trainer.add_callback(start)
    began = time.perf_counter()
    with _modeling_module_restored(trainer):
        trainer.train(
            resume_from_checkpoint=str(resume) if isinstance(resume, Path) else (True if resume else None)
        )
    wall = time.perf_counter() - began
    trainer.remove_callback(start)
    return TrainOutcome(
        wall_time_s=wall, session_tokens=int(trainer.state.num_input_tokens_seen - start.tokens)
    )


def base_to_load(config: StudyConfig) -> tuple[str, dict[str, str | None], str]:
    """The base to load (a path or Hub id), the Hub repo and commit it stands for, and the revision to load:
    the resolved commit when loading from the Hub, so the commit training.json records is the one loaded
    even if the branch moves meanwhile."""
    from training.models import base_model_hub, resolve_base_model

    model_path = resolve_base_model(config)
    base_hub = base_model_hub(config)
    pinned = base_hub["sha"] if base_hub["sha"] and model_path == base_hub["id"] else None
    return model_path, base_hub, pinned or config.base_model.revision


def resume_point(checkpoints: Path, max_steps: int, *, resume: bool, name: str) -> Path | None:
    """The checkpoint ``--resume`` continues from (None: from the start, said when one was asked for)."""
    resume_from = last_checkpoint(checkpoints, before_step=max_steps) if resume else None
    if resume and resume_from is None:
        _say(f"{name}: no checkpoint under {checkpoints}, training from the start")
    return resume_from


def train_and_record(
    trainer: SFTTrainer,
    *,
    resume: Path | None,
    adapter_dir: Path,
    record_path: Path,
    checkpoints: Path,
    keep_checkpoints: bool,
    record: Callable[..., dict],
    summary: Callable[[dict, Path], str],
) -> dict:
    """Train (from ``resume``, or from the start), then save the adapter and its record; return the record.

    The stage's training sequence for the SFT and the RL adapters alike: ``record(outcome=...)`` builds the
    training.json payload from the outcome, ``summary`` the line printed for it.
    """
    if trainer.is_world_process_zero():
        # An adapter without its training.json is never "up to date", so a run killed while retraining
        # cannot leave new weights beside an old record.
        record_path.unlink(missing_ok=True)
        if resume is None:  # stale checkpoints of an older run must not become "last"
            shutil.rmtree(checkpoints, ignore_errors=True)
    outcome = train(trainer, resume=resume)
    payload = record(outcome=outcome)
    save_adapter(trainer, adapter_dir)
    if trainer.is_world_process_zero():  # under DDP every rank trains; one writes
        write_json(record_path, payload)
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
        _say(summary(payload, adapter_dir))
    trainer.accelerator.wait_for_everyone()
    return payload


@contextmanager
def _modeling_module_restored(trainer: SFTTrainer) -> Iterator[None]:
    """Liger patches the model's transformers module for the whole process (norm and MLP classes, the
    rotary function), and its MLP has no ``act_fn``, which the fast engine reads. Models built after
    training (evaluation, in the same process) must be transformers' own, so the module comes back."""
    if not trainer.args.use_liger_kernel:
        yield
        return
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    module = sys.modules[type(model).__module__]
    saved = dict(vars(module))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def save_adapter(trainer: SFTTrainer, adapter_dir: Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors, and nothing else, into ``adapter_dir``.

    PEFT's ``save_pretrained`` always writes a README.md model card; it is written to a scratch dir and
    dropped, because the project renders the card from the eval artifacts.
    """
    adapter_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=adapter_dir, prefix=".save-") as scratch:
        trainer.save_model(scratch)  # every rank must call it (DDP/FSDP gather); only rank 0 writes
        if trainer.is_world_process_zero():
            for name in ADAPTER_FILES:
                shutil.move(str(Path(scratch) / name), adapter_dir / name)
        trainer.accelerator.wait_for_everyone()


# ---- provenance ----
def checkpoints_dir(run_dir: RunDir, adapter: int | str) -> Path:
    return run_dir.adapter_dir(adapter) / "checkpoints"


def last_checkpoint(directory: Path, *, before_step: int = -1) -> Path | None:
    """The newest ``checkpoint-N`` (with ``before_step`` > 0: the newest with N below it).

    Resumed from a checkpoint at ``max_steps``, transformers trains one step too many (it checks the limit
    only after a step), so ``--resume`` after a kill between the last checkpoint and training.json resumes from
    the checkpoint before it, or starts over: either way it ends with the uninterrupted run's weights.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = sorted(
        int(path.name.rsplit("-", 1)[1])
        for path in (directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if directory.is_dir() else [])
        if path.name.rsplit("-", 1)[1].isdigit() and (path / "trainer_state.json").is_file()
    )
    usable = [step for step in steps if before_step <= 0 or step < before_step]
    return directory / f"{PREFIX_CHECKPOINT_DIR}-{usable[-1]}" if usable else None


def recipe(config: StudyConfig, seed: int) -> dict:
    """Everything in training.json that the config and the training seed decide; a matching adapter need not
    be retrained."""
    training = config.training
    lora = training.lora
    return {
        "base_model": {"id": recorded_base_id(config), "revision": config.base_model.revision},
        "adapter": {
            "method": "LoRA",
            "r": lora.r,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": lora.target_modules,
        },
        "hyperparameters": {
            "epochs": training.epochs,
            "max_steps": training.max_steps,
            "learning_rate": training.learning_rate,
            "batch_size": training.batch_size,
            "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "max_seq_length": training.max_seq_length,
            "warmup_ratio": training.warmup_ratio,
            "lr_scheduler": training.lr_scheduler,
        },
        "quantization": config.base_model.quantization,
        "loss": "completion_only" if training.completion_only_loss else "full_sequence",
        "seed": seed,
    }


def up_to_date(
    config: StudyConfig, run_dir: RunDir, adapter: int | str, seed: int, data_sha256: str
) -> dict | None:
    """The existing training.json when the adapter was trained on this data with this recipe and seed, else
    None."""
    import json

    path = run_dir.training_json(adapter)
    if not path.is_file() or not all((run_dir.adapter_dir(adapter) / name).is_file() for name in ADAPTER_FILES):
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if payload.get("data_sha256") != data_sha256:
        return None
    recorded = dict(payload)
    recorded["hyperparameters"] = {
        key: value
        for key, value in payload.get("hyperparameters", {}).items()
        if key not in _RUNTIME_HYPERPARAMETERS
    }
    expected = recipe(config, seed)
    return payload if all(recorded.get(key) == value for key, value in expected.items()) else None


def trained_with() -> dict[str, str]:
    """The training libraries' versions for training.json (bitsandbytes when NF4 loaded it, liger-kernel when
    its kernels were used)."""
    names = ["torch", "transformers", "peft", "trl", "accelerate", "datasets"]
    if "bitsandbytes" in sys.modules:
        names.append("bitsandbytes")
    if "liger_kernel" in sys.modules:
        names.append("liger-kernel")
    return {name: version for name, version in library_versions(names).items() if version is not None}


def hardware(trainer: SFTTrainer) -> dict:
    """Device, GPU name and count, and ``world_size``: the training processes (DDP ranks, 1 without a launcher)."""
    world_size = trainer.accelerator.num_processes
    if not torch.cuda.is_available():
        return {
            "device": "cpu",
            "gpu_name": None,
            "gpu_count": 0,
            "world_size": world_size,
            "peak_gpu_memory_gib": None,
        }
    # DDP runs one process per GPU; a single process may still drive several through DataParallel.
    count = world_size * max(1, trainer.args.n_gpu)
    return {
        "device": "cuda",
        "gpu_name": torch.cuda.get_device_name(0),
        "gpu_count": count,
        "world_size": world_size,
        # This process's GPU, since the level's base was loaded: the weights, optimizer and activations.
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
    }


def loss_curve(trainer: SFTTrainer) -> list[dict]:
    return [
        {"step": entry["step"], "loss": round(float(entry["loss"]), 6)}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]


def training_record(
    *,
    config: StudyConfig,
    level: int,
    model: str,
    seed: int,
    trainer: SFTTrainer,
    outcome: TrainOutcome,
    precision: str,
    train_rows: int,
    data_file: str,
    data_sha256: str,
    base_hub: dict[str, str | None],
) -> dict:
    """The training.json payload of one adapter (fields fixed by the run-dir contract).

    ``base_hub`` is the Hub repo and commit the base stands for (``training.models.base_model_hub``).
    """
    base = recipe(config, seed)
    args = trainer.args
    hyperparameters = {
        **base["hyperparameters"],
        "effective_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
    }
    steps = trainer.state.global_step
    return {
        "schema_version": SCHEMA_VERSION,
        "level": level,
        "model": model,
        "base_model": base["base_model"],
        "base_model_hub": base_hub,
        "adapter": base["adapter"],
        "hyperparameters": hyperparameters,
        "precision": precision,
        "quantization": base["quantization"],
        "loss": base["loss"],
        "hardware": hardware(trainer),
        "seed": base["seed"],
        "train_rows": train_rows,
        "data_file": data_file,
        "data_sha256": data_sha256,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "steps": steps,
        "epochs_trained": epochs_trained(steps, hyperparameters["effective_batch_size"], train_rows),
        "loss_curve": loss_curve(trainer),
        "wall_time_s": round(outcome.wall_time_s, 3),
        "tokens_per_s": round(outcome.session_tokens / outcome.wall_time_s, 1)
        if outcome.wall_time_s
        else 0.0,
        "library_versions": trained_with(),
    }


def _say(line: str) -> None:
    """Print once, not once per DDP rank."""
    if distributed.current().is_main:
        print(line, flush=True)


def summary_line(payload: dict, adapter_dir: Path) -> str:
    curve = payload["loss_curve"]
    ends = curve[:1] + curve[1:][-1:]  # a one-point curve shows its point once, not as "x → x"
    points = " → ".join(f"{point['loss']:.3f} (step {point['step']})" for point in ends)
    losses = f"loss {points}" if curve else "no loss logged"
    return (
        f"{payload['model']} (seed {payload['seed']}): {payload['steps']} steps, {losses}, {payload['tokens_per_s']:,.0f} tokens/s, "
        f"{payload['wall_time_s']:.1f} s → {adapter_dir}"
    )
