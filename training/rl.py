"""Stage 2b, rl (optional): each chosen level's SFT adapter continued with TRL's GRPO and a length-aware reward.

Per level in ``rl.levels``, top to bottom: the level's SFT rows (``data/level_<n>/train.jsonl``, the training
split only) → GRPO prompts with their gold answers → the base model with the level's SFT adapter loaded
trainable (the same LoRA weights keep training; TRL keeps a frozen copy as the KL reference) →
``GRPOTrainer`` with three reward terms (the policy's SDPA opens left-padding query rows to every key:
``SDPA_LEFT_PADDING``) → ``adapters/rl_l<n>/`` (adapter_config.json,
adapter_model.safetensors, training.json).

The reward of one completion is ``w_correct·correct + w_format·format − w_length·length``:
    correct: 1 when the evaluation's own strict grader (``gsm8k.grade``, the level format) accepts the answer;
    format:  1 when the completion is a closed think block followed by a ``#### N`` final-answer line;
    length:  think tokens past the level's target, as a fraction of the target, capped at 1. The target is the
             upper end of the level's typical length (``Level.max_chars``) in the base tokenizer's tokens, at
             the tokens-per-character rate of the level's own SFT reasoning, but never above that reasoning's
             mean think tokens (rounded up): RL buys accuracy at the length SFT taught, not by writing longer
             than the level's own data, even where that data is shorter than the spec (the tiny study's).
Each term is logged at every step (``rewards/<term>/mean``) and copied into training.json's ``log``.

A level whose RL adapter was trained from the same inputs (the hash of the RL settings, the base model, the SFT
adapter's weights and the level's data) is skipped. Checkpoints go to ``adapters/rl_l<n>/checkpoints/``;
``resume=True`` continues a killed run from its last one.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from eval_artifacts.rundir import ADAPTER_FILES, SCHEMA_VERSION, RunDir, file_sha256, read_json
from eval_artifacts.study.config import RewardWeightsConfig, StudyConfig
from eval_artifacts.study.errors import ArtifactError, DataError
from eval_artifacts.study.levels import ANSWER_MARKER, get_level, parse_response
from training import rollouts, sft
from training.gsm8k import grade
from training.models import recorded_base_id
from training.tokens import count_tokens, think_tokens

TRAIN_ID_PREFIX = "train-"
"""Problem ids of the training split (``training.gsm8k.problems_from_rows``); RL reads no other."""
TERMS = ("correct", "format", "length")
_ANSWER_LINE_RE = re.compile(rf"^\s*{re.escape(ANSWER_MARKER)}\s*\S", re.MULTILINE)


def run(
    config: StudyConfig,
    run_dir: RunDir | str | Path,
    *,
    levels: list[int] | None = None,
    resume: bool = False,
    force: bool = False,
) -> dict[int, dict]:
    """Continue the SFT adapters of ``levels`` (default: ``rl.levels``) with GRPO; return their training.json.

    Args:
        resume: continue each level from its last checkpoint; levels without one start from the beginning.
        force: retrain levels whose RL adapter is already up to date.

    Raises:
        ArtifactError: a level has no SFT adapter or SFT data (run ``cot-compress train`` first).
        DataError: a row of the SFT data is not a training-split problem.
    """
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    levels = levels or config.rl.levels
    for level in levels:
        get_level(level)
    sft.check_quantization(config.base_model.quantization)
    rollouts.check_engine(config.rl.rollout_engine)
    model_path: str | None = None
    revision = config.base_model.revision
    results: dict[int, dict] = {}
    for level in levels:
        rows = training_rows(run_dir, level)
        inputs = stage_inputs(config, run_dir, level)
        out_dir, checkpoints = run_dir.rl_adapter_dir(level), run_dir.rl_adapter_dir(level) / "checkpoints"
        done = up_to_date(run_dir, level, inputs)
        if done is not None and not force:
            sft._say(f"rl level {level}: adapter up to date in {out_dir}, skipped")
            shutil.rmtree(checkpoints, ignore_errors=True)
            results[level] = done
            continue
        resume_from = sft.resume_point(
            checkpoints, config.rl.max_steps, resume=resume, name=f"rl level {level}"
        )
        if model_path is None:
            model_path, _, revision = sft.base_to_load(config)  # the commit SFT trained on
        precision = sft.choose_precision()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        base, tokenizer = sft.load_base(
            model_path=model_path,
            revision=revision,
            quantization=config.base_model.quantization,
            precision=precision,
            gradient_checkpointing=config.training.gradient_checkpointing,
        )
        policy = continued_adapter(base, run_dir.adapter_dir(level))
        design = RewardDesign.for_level(level, tokenizer, rows, weights=config.rl.reward_weights)
        trainer = build_trainer(
            policy=policy,
            tokenizer=tokenizer,
            dataset=prompt_dataset(rows),
            config=config,
            design=design,
            precision=precision,
            output_dir=checkpoints,
        )
        results[level] = sft.train_and_record(
            trainer,
            resume=resume_from,
            adapter_dir=out_dir,
            record_path=run_dir.rl_training_json(level),
            checkpoints=checkpoints,
            keep_checkpoints=False,
            record=partial(
                training_record,
                config=config,
                level=level,
                trainer=trainer,
                design=design,
                inputs=inputs,
                precision=precision,
                train_rows=len(rows),
            ),
            summary=summary_line,
        )
        trainer.accelerator.free_memory()
        del trainer, policy, base
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


# ---- data: the training split only ----
def training_rows(run_dir: RunDir, level: int) -> list[dict]:
    """The level's SFT rows (problems of the training split, with their gold answers).

    Raises:
        ArtifactError: no SFT data for the level.
        DataError: a row is not a training-split problem; RL must never see a test problem.
    """
    path = run_dir.train_file(level)
    if not path.is_file():
        raise ArtifactError(
            f"no SFT data for level {level} at {path}: run `cot-compress prepare-data --config C` first"
        )
    rows = sft.load_rows(path)
    for number, row in enumerate(rows, start=1):
        if not str(row.get("id", "")).startswith(TRAIN_ID_PREFIX) or not isinstance(row.get("answer"), str):
            raise DataError(
                f"{path} row {number} (id {row.get('id')!r}) is not a training-split problem with an answer: "
                "RL trains on the training split only; rerun `cot-compress prepare-data --config C`"
            )
    return rows


def prompt_dataset(rows: list[dict]) -> Dataset:
    """GRPO's prompts in chat form, each with its problem id and gold answer (passed to the reward)."""
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": row["prompt"]}], "id": row["id"], "gold": row["answer"]}
            for row in rows
        ]
    )


# ---- the reward ----
@dataclass(frozen=True)
class RewardTerms:
    correct: float
    format: float
    length: float
    """The penalty's size in [0, 1]; the reward subtracts it."""
    think: int
    """The think tokens the penalty was measured on."""


def has_level_format(completion: str) -> bool:
    """A closed think block, then a ``#### N`` final-answer line."""
    parsed = parse_response(completion)
    return parsed.reasoning is not None and _ANSWER_LINE_RE.search(parsed.after_think) is not None


def length_penalty(think: int, target: int) -> float:
    """Think tokens past ``target`` as a fraction of it, capped at 1 (0 at or under the target)."""
    return min(1.0, max(0, think - target) / target)


def reward_terms(completion: str, gold: str, *, finish_reason: str, think: int, target: int) -> RewardTerms:
    return RewardTerms(
        correct=float(grade(completion, gold, finish_reason=finish_reason, kind="adapter").correct),
        format=float(has_level_format(completion)),
        length=length_penalty(think, target),
        think=think,
    )


@dataclass(frozen=True)
class RewardDesign:
    """What training.json records of the reward, and the weights GRPO sums the terms with."""

    level: int
    target_chars: int
    tokens_per_char: float
    spec_think_tokens: int
    """The level's ``target_chars`` in the base tokenizer's tokens, at the rate of its SFT reasoning."""
    sft_think_tokens: float
    """The mean think tokens of the level's SFT reasoning (its training rows)."""
    target_think_tokens: int
    """Where the length term starts: the spec's length, but never above the SFT reasoning's mean, rounded up."""
    weights: RewardWeightsConfig

    @classmethod
    def for_level(
        cls, level: int, tokenizer, rows: list[dict], *, weights: RewardWeightsConfig
    ) -> RewardDesign:
        """The level's target length in the base tokenizer's tokens, measured on its SFT reasoning."""
        tokens = [count_tokens(tokenizer, row.get("reasoning") or "") for row in rows]
        chars = sum(len(row.get("reasoning") or "") for row in rows)
        rate = sum(tokens) / chars if chars else 1.0
        target_chars = get_level(level).max_chars
        spec = max(1, math.ceil(target_chars * rate))
        sft_mean = sum(tokens) / len(tokens)
        return cls(
            level=level,
            target_chars=target_chars,
            tokens_per_char=round(rate, 4),
            spec_think_tokens=spec,
            sft_think_tokens=round(sft_mean, 2),
            # Rows without reasoning measure nothing: the spec alone sets the target then.
            target_think_tokens=min(spec, math.ceil(sft_mean)) if sft_mean > 0 else spec,
            weights=weights,
        )

    def reward_weights(self) -> list[float]:
        """GRPO's weights, in the order of ``reward_functions``; the length term's values are negative."""
        return [self.weights.correct, self.weights.format, self.weights.length]

    def record(self) -> dict:
        return {
            "formula": "w_correct*correct + w_format*format - w_length*length",
            "terms": {
                "correct": "1 if the evaluation's strict grader accepts the answer after a closed think block",
                "format": "1 if a closed think block is followed by a '#### N' final-answer line",
                "length": "min(1, max(0, think_tokens - target) / target); subtracted",
            },
            "target": "min(spec_think_tokens, ceil(sft_think_tokens)): the level's length, never above its "
            "SFT reasoning's mean (spec_think_tokens when the rows have no reasoning)",
            "weights": self.weights.model_dump(),
            "target_chars": self.target_chars,
            "tokens_per_char": self.tokens_per_char,
            "spec_think_tokens": self.spec_think_tokens,
            "sft_think_tokens": self.sft_think_tokens,
            "target_think_tokens": self.target_think_tokens,
        }


def reward_functions(design: RewardDesign, tokenizer, eos_token_ids: list[int]) -> list:
    """One GRPO reward function per term, named after it (TRL logs ``rewards/<name>/mean`` per step)."""

    # TRL calls the three functions one after the other with the same completions list: its terms are
    # graded and counted once, for the last list seen (held, so its id cannot be reused meanwhile).
    seen_completions, seen_terms = None, []

    def terms_of(completions, completion_ids, gold) -> list[RewardTerms]:
        nonlocal seen_completions, seen_terms
        if seen_completions is not completions:
            seen_completions = completions
            seen_terms = [
                reward_terms(
                    text,
                    answer,
                    finish_reason=finish_reason,
                    think=think_tokens(tokenizer, text, finish_reason=finish_reason),
                    target=design.target_think_tokens,
                )
                for text, finish_reason, answer in zip(
                    map(_text, completions), finish_reasons(completion_ids), gold, strict=True
                )
            ]
        return seen_terms

    def finish_reasons(completion_ids) -> list[str]:
        return ["stop" if ids and ids[-1] in eos_token_ids else "length" for ids in completion_ids]

    def correct(completions, completion_ids, gold, **kwargs) -> list[float]:
        return [terms.correct for terms in terms_of(completions, completion_ids, gold)]

    def format(completions, completion_ids, gold, **kwargs) -> list[float]:  # noqa: A001 - TRL logs the name
        return [terms.format for terms in terms_of(completions, completion_ids, gold)]

    def length(completions, completion_ids, gold, **kwargs) -> list[float]:
        terms = terms_of(completions, completion_ids, gold)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:  # TRL versions without it still train; the log lacks think tokens then
            log_metric("think_tokens", sum(t.think for t in terms) / len(terms))
        return [-t.length for t in terms]

    return [correct, format, length]


def _text(completion) -> str:
    """A completion as text: conversational completions are a list holding the assistant's message."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


# ---- model and trainer ----
def continued_adapter(base, sft_adapter_dir: Path):
    """The base with the level's SFT LoRA loaded trainable: RL continues those weights, adds no new adapter."""
    from peft import PeftModel

    if not all((sft_adapter_dir / name).is_file() for name in ADAPTER_FILES):
        raise ArtifactError(
            f"no SFT adapter in {sft_adapter_dir}: run `cot-compress train --config C` before the RL stage"
        )
    return PeftModel.from_pretrained(base, sft_adapter_dir, is_trainable=True)


class _StudyGRPOTrainer(sft.WithoutSideEffects, GRPOTrainer):
    pass


# ---- left padding under SDPA ----
SDPA_LEFT_PADDING = "sdpa_left_padding"
"""SDPA for GRPO's left-padded batches. TRL left-pads the prompts, so each padding position is a query that
may attend to no key (causal mask, padding keys masked). PyTorch's forward returns zeros for such a row, but on
an H200 (torch 2.11, bf16) its backward gives NaN in the row's query gradient; multiplied by the zero gradient of
the output it does not affect, it still turns every LoRA gradient into NaN (bench_grpo, 256-token rollouts).
Such rows attend to every key instead, as transformers' ``_unmask_unattended`` once arranged: no real
position reads a padding position's output, so the loss and the logits of real tokens are unchanged."""


def attend_from_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The 4-D SDPA mask with each fully masked query row opened to every key (bool or additive masks)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask | ~attention_mask.any(dim=-1, keepdim=True)
    masked = attention_mask <= torch.finfo(attention_mask.dtype).min  # finfo.min or -inf
    return attention_mask.masked_fill(masked.all(dim=-1, keepdim=True), 0.0)


def _sdpa_mask_from_padding(*args, **kwargs) -> torch.Tensor | None:
    """transformers' SDPA mask, opened where a query has no key; built once per forward, for every layer."""
    from transformers.masking_utils import sdpa_mask

    return attend_from_padding(sdpa_mask(*args, **kwargs))


def use_sdpa_for_left_padding(policy) -> None:
    """Switch an SDPA policy to ``SDPA_LEFT_PADDING``: transformers' own SDPA attention, with its mask builder
    wrapped by ``attend_from_padding`` (registered with transformers under that name)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if policy.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(SDPA_LEFT_PADDING, sdpa_attention_forward)
    AttentionMaskInterface.register(SDPA_LEFT_PADDING, _sdpa_mask_from_padding)
    policy.set_attn_implementation(SDPA_LEFT_PADDING)


def build_trainer(
    *,
    policy,
    tokenizer,
    dataset: Dataset,
    config: StudyConfig,
    design: RewardDesign,
    precision: str,
    output_dir: Path,
) -> GRPOTrainer:
    rl = config.rl
    args = GRPOConfig(
        output_dir=str(output_dir),
        max_steps=rl.max_steps,
        learning_rate=rl.learning_rate,
        lr_scheduler_type="constant",
        # One generation of prompts_per_step x num_generations completions per optimizer step, trained in
        # passes_per_step passes (TRL's steps_per_generation defaults to the accumulation steps).
        per_device_train_batch_size=rl.prompts_per_step // rl.passes_per_step * rl.num_generations,
        gradient_accumulation_steps=rl.passes_per_step,
        num_generations=rl.num_generations,
        max_completion_length=rl.max_new_tokens,
        temperature=rl.temperature,
        top_k=rl.top_k,
        beta=rl.beta,
        loss_type=rl.loss_type,
        reward_weights=design.reward_weights(),
        **sft.checkpointing_argument(GRPOConfig, config.training.gradient_checkpointing),
        seed=rl.seed,
        data_seed=rl.seed,
        logging_steps=1,  # every step's reward terms go into training.json
        save_steps=rl.save_steps,
        save_total_limit=2,
        **sft.runtime_arguments(precision),
    )
    use_sdpa_for_left_padding(policy)
    # The reward reads a completion's finish from its last id; which ids end one, the trainer decides.
    eos_token_ids: list[int] = []
    trainer = _StudyGRPOTrainer(
        model=policy,
        reward_funcs=reward_functions(design, tokenizer, eos_token_ids),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=rollouts.rollout_function(rl, policy),
    )
    eos_token_ids.extend(trainer.eos_token_ids)
    return trainer


# ---- provenance and skipping ----
REWARD_DESIGN_VERSION = 2
"""Bumped whenever the reward's definition changes, so RL adapters trained under an older one retrain:
2 = the length target capped at the SFT reasoning's mean, think tokens counted as the evaluation counts them
(an output cut by the token limit loses its unfinished last line)."""


def stage_inputs(config: StudyConfig, run_dir: RunDir, level: int) -> dict:
    """Everything the RL adapter of ``level`` depends on; its hash decides whether the level is retrained."""
    sft_weights = run_dir.adapter_dir(level) / "adapter_model.safetensors"
    if not sft_weights.is_file():
        raise ArtifactError(
            f"no SFT adapter for level {level} in {sft_weights.parent}: run `cot-compress train --config C` first"
        )
    return {
        "level": level,
        "base_model": {"id": recorded_base_id(config), "revision": config.base_model.revision},
        "tiny_model": config.tiny_model.model_dump() if config.tiny_model else None,
        "quantization": config.base_model.quantization,
        "rl": config.rl.model_dump(mode="json", exclude={"levels"}),
        "reward_design": REWARD_DESIGN_VERSION,
        "sft_adapter_sha256": file_sha256(sft_weights),
        "data_sha256": file_sha256(run_dir.train_file(level)),
    }


def inputs_sha256(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def up_to_date(run_dir: RunDir, level: int, inputs: dict) -> dict | None:
    """The existing training.json when the RL adapter was trained from exactly these inputs, else None."""
    path = run_dir.rl_training_json(level)
    if not path.is_file() or not all((run_dir.rl_adapter_dir(level) / n).is_file() for n in ADAPTER_FILES):
        return None
    try:
        payload = read_json(path, what="RL training record", hint="delete it to retrain")
    except ArtifactError:
        return None
    return payload if payload.get("inputs_sha256") == inputs_sha256(inputs) else None


def step_log(trainer: GRPOTrainer) -> list[dict]:
    """Per step: the weighted total reward, each term's mean, think tokens, completion length and KL."""
    names = {
        "reward": "reward",
        **{f"rewards/{term}/mean": term for term in TERMS},
        "think_tokens": "think_tokens",
        "completions/mean_length": "completion_tokens",
        "kl": "kl",
        "loss": "loss",
    }
    rows = []
    for entry in trainer.state.log_history:
        if "reward" not in entry:
            continue
        row = {"step": entry["step"]}
        for key, name in names.items():
            if key in entry:
                value = float(entry[key])
                # The length function returns the penalty negated; the log shows the penalty's size.
                row[name] = round(0.0 - value if name == "length" else value, 6)
        rows.append(row)
    return rows


def training_record(
    *,
    config: StudyConfig,
    level: int,
    trainer: GRPOTrainer,
    design: RewardDesign,
    inputs: dict,
    outcome: sft.TrainOutcome,
    precision: str,
    train_rows: int,
) -> dict:
    """The training.json of ``adapters/rl_l<n>/``."""
    rl = config.rl
    return {
        "schema_version": SCHEMA_VERSION,
        "model": f"rl_l{level}",
        "level": level,
        "method": "GRPO",
        "continued_from": {
            "adapter": f"adapters/level_{level}",
            "adapter_sha256": inputs["sft_adapter_sha256"],
        },
        "base_model": inputs["base_model"],
        "quantization": inputs["quantization"],
        "hyperparameters": {
            "max_steps": rl.max_steps,
            "prompts_per_step": rl.prompts_per_step,
            "num_generations": rl.num_generations,
            "learning_rate": rl.learning_rate,
            "beta": rl.beta,
            "loss_type": rl.loss_type,
            "temperature": rl.temperature,
            "top_k": rl.top_k,
            "max_new_tokens": rl.max_new_tokens,
            "rollout_engine": rl.rollout_engine,
        },
        "reward": design.record(),
        "precision": precision,
        "hardware": sft.hardware(trainer),
        "seed": rl.seed,
        "train_rows": train_rows,
        "data_file": f"data/level_{level}/train.jsonl",
        "data_sha256": inputs["data_sha256"],
        "inputs_sha256": inputs_sha256(inputs),
        "steps": trainer.state.global_step,
        "log": step_log(trainer),
        "wall_time_s": round(outcome.wall_time_s, 3),
        "library_versions": sft.trained_with(),
    }


def summary_line(payload: dict, adapter_dir: Path) -> str:
    log = payload["log"]
    rewards = f"reward {log[0]['reward']:.3f} → {log[-1]['reward']:.3f}" if log else "no reward logged"
    return f"rl level {payload['level']}: {payload['steps']} steps, {rewards}, {payload['wall_time_s']:.1f} s → {adapter_dir}"
