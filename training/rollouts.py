"""GRPO's rollouts on the fast engine (``rl.rollout_engine: fast``): a ``rollout_func`` for TRL's GRPOTrainer.

TRL 1.16 calls ``rollout_func(prompts, trainer)`` once per generation batch with this process's prompts as the
sampler gave them: each prompt already repeated ``num_generations`` times, consecutively (TRL's RepeatSampler),
so one completion per entry makes the groups. It expects ``prompt_ids``, ``completion_ids`` (cut after the
first stop token, as its own generate path cuts them) and ``logprobs``. Without vLLM, TRL reads those logprobs
only for its off-policy mask (``off_policy_mask_threshold``, off in the study); they are the sampled tokens'
log-probabilities under the (temperature, top-k) distribution they were drawn from, as vLLM's
``processed_logprobs`` that TRL asks vLLM for.

Per call, top to bottom: the policy's current LoRA weights → (NF4 only) copied into the engine's unquantized
copy → the prompts rendered by TRL's own chat templating (the same ids its generate path would see) → the
fast engine merges the adapter's delta into the unquantized base (``FastGenerator.merged``: PEFT's
``get_delta_weight``, original weights copied back bit for bit after), samples with the ``rl:`` temperature,
top-k and ``max_new_tokens`` → TRL's dict.

The unquantized base: a bf16/fp32 policy's own base weights (no copy; the merge is undone before TRL's next
forward). An NF4 policy cannot be merged into, so at the first call its base is dequantized, with bitsandbytes'
``dequantize_4bit`` (through PEFT's ``dequantize_module_weight``), into a bf16 copy (its fp32 embeddings, norms
and head cast to bf16); only the copy's LoRA weights are refreshed from the policy before each later call
(``unquantized_copy``, ``sync_adapter``). That copy exists on a CUDA GPU only (bitsandbytes' NF4).

Differences from TRL's generate path: the engine's own sampler and generator (seeded per step and process
from ``rl.seed``, so a resumed run draws as an uninterrupted one), bf16 matmuls over dequantized weights
instead of bitsandbytes' NF4 kernels (the same weights, other rounding), and no LoRA dropout during rollouts
(merged weights have none; TRL's generate runs the policy in train mode).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from itertools import chain

import numpy as np
import torch
from torch import nn

from eval_artifacts.study.config import RLConfig
from eval_artifacts.study.errors import ConfigError
from training.fast_generate import FastGenerator, Sampling


def check_engine(requested: str) -> None:
    """Refuse ``rl.rollout_engine: fast`` without a CUDA GPU, as ``eval.backend: fast`` is refused.

    Raises:
        ConfigError: ``fast`` was asked for on a machine without CUDA.
    """
    if requested == "fast" and not torch.cuda.is_available():
        raise ConfigError("rl.rollout_engine 'fast' needs a CUDA GPU: set rl.rollout_engine to 'hf'")


def rollout_function(rl: RLConfig, policy) -> Callable[[list, object], dict] | None:
    """TRL's ``rollout_func`` for ``rl.rollout_engine``: None (TRL's own generate) for ``hf``."""
    return FastRollouts(policy, rl) if rl.rollout_engine == "fast" else None


class FastRollouts:
    """The policy's GRPO completions from the fast engine, with its current LoRA weights merged; ``engine``
    (its ``last_stats``) says where the last call's time went.

    The engine (and an NF4 policy's copy) is made at the first call, not before: the trainer may still move
    the policy to its device after it is built, and the engine works on the device its weights are on.
    """

    def __init__(self, policy, rl: RLConfig) -> None:
        self.policy = policy
        self.rl = rl
        self.adapter = policy.active_adapter
        self.engine_model = None
        self.engine: FastGenerator | None = None
        self._last_call = (-1, 0)  # (optimizer step, calls made during it)

    def __call__(self, prompts: list, trainer) -> dict:
        if self.engine is None:
            quantized = getattr(self.policy.get_base_model(), "is_loaded_in_4bit", False)
            self.engine_model = unquantized_copy(self.policy, self.adapter) if quantized else self.policy
            self.engine = FastGenerator(
                self.engine_model,
                max_batch_size=self.rl.prompts_per_step * self.rl.num_generations,
                backend_key="rl.rollout_engine",
                max_new_tokens_key="rl.max_new_tokens",
            )
        elif self.engine_model is not self.policy:
            sync_adapter(self.policy, self.engine_model, self.adapter)
        # TRL's own templating (chat template, its kwargs, tools): the ids its generate path would get.
        prompt_ids = trainer._tokenize_prompts(prompts)[0]
        # With gradient accumulation TRL generates more than once per optimizer step: each call its own seed.
        step = trainer.state.global_step
        call = self._last_call[1] + 1 if self._last_call[0] == step else 0
        self._last_call = (step, call)
        completions = self.engine.generate(
            prompt_ids,
            max_new_tokens=self.rl.max_new_tokens,
            stop_token_ids=trainer.eos_token_ids,
            pad_token_id=trainer.processing_class.pad_token_id,
            adapter=self.adapter,
            sampling=Sampling(
                temperature=self.rl.temperature,
                top_k=self.rl.top_k,
                seed=rollout_seed(self.rl.seed, step, call, trainer.accelerator.process_index),
            ),
        )
        return {
            "prompt_ids": [list(ids) for ids in prompt_ids],
            "completion_ids": [c.token_ids for c in completions],
            "logprobs": [c.logprobs for c in completions],
        }


def rollout_seed(seed: int, step: int, call: int, process: int) -> int:
    """The engine's seed for a step's ``call``-th rollouts on one process: independent streams per (seed, step,
    call, process) that do not depend on what ran before, so a run resumed from a checkpoint (a step boundary)
    draws what it would have drawn."""
    return int(np.random.SeedSequence([seed, step, call, process]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---- the unquantized copy of an NF4 policy (CUDA only) ----
def unquantized_copy(policy, adapter: str, *, dtype: torch.dtype | None = None):
    """The policy's model with every base linear as a plain ``nn.Linear`` over its dequantized weight, and the
    policy's LoRA layout with its current weights under ``adapter``. Built on the meta device.

    Every parameter is in ``dtype`` (default: the dtype the NF4 layers compute in): PEFT's
    ``prepare_model_for_kbit_training`` left the policy's embeddings, norms and head in fp32, and the engine
    computes in one dtype. A tensor already in ``dtype`` is shared with the policy, not copied (all of them,
    for a plain policy: what lets the CPU tests build one). Buffers (the rotary frequencies) stay as they are.
    """
    from peft import get_peft_model
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM

    lm = policy.get_base_model()
    dtype = dtype or _compute_dtype(lm)
    config = copy.deepcopy(lm.config)
    config.__dict__.pop("quantization_config", None)  # the copy is a plain model
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, module in plain.named_modules():
        source = _unwrapped(lm.get_submodule(name)) if name else lm
        for key in chain(module._parameters, module._buffers):
            if module._parameters.get(key) is None and module._buffers.get(key) is None:
                continue
            if key == "weight" and isinstance(module, nn.Linear):
                # PEFT's own dequantization (bitsandbytes' dequantize_4bit for NF4): a plain weight as it is.
                tensor = dequantize_module_weight(source)
            else:
                tensor = getattr(source, key)
            if key in module._parameters:
                module._parameters[key] = nn.Parameter(tensor.detach().to(dtype), requires_grad=False)
            else:
                module._buffers[key] = tensor
    plain.eval()
    engine_model = get_peft_model(plain, policy.peft_config[adapter], adapter_name=adapter)
    engine_model.requires_grad_(False)
    sync_adapter(policy, engine_model, adapter)
    return engine_model


def sync_adapter(policy, engine_model, adapter: str) -> None:
    """Copy the policy's current LoRA weights of ``adapter`` into the engine's copy (same PEFT names)."""
    targets = dict(engine_model.named_parameters())
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_" in name and f".{adapter}." in name:
                targets[name].copy_(weight)


def _unwrapped(module: nn.Module) -> nn.Module:
    """The base layer under a PEFT LoRA wrapper, or the module itself."""
    return getattr(module, "base_layer", module)


def _compute_dtype(lm) -> torch.dtype:
    """The dtype the policy computes in: its NF4 layers' compute dtype, else its weights' dtype."""
    for module in lm.modules():
        if getattr(module, "compute_dtype", None) is not None:
            return module.compute_dtype
    return lm.get_input_embeddings().weight.dtype
