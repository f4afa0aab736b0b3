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
forward). An NF4 policy cannot be merged into, so its base is dequantized once, with bitsandbytes'
``dequantize_4bit``, into a bf16 copy that shares the embeddings, norms and head with the policy; only its
LoRA weights are refreshed from the policy before each call (``unquantized_copy``, ``sync_adapter``). That copy
exists on a CUDA GPU only (bitsandbytes' NF4). Differences from TRL's generate path: the engine's own sampler
and generator (seeded per step and process from ``rl.seed``, so a resumed run draws as an uninterrupted one),
and no LoRA dropout during rollouts (the merged weights have none; TRL's generate runs the policy in train mode).
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
    (its ``last_stats``) says where the last call's time went."""

    def __init__(self, policy, rl: RLConfig) -> None:
        self.policy = policy
        self.rl = rl
        self.adapter = policy.active_adapter
        quantized = getattr(policy.get_base_model(), "is_loaded_in_4bit", False)
        self.engine_model = unquantized_copy(policy, self.adapter) if quantized else policy
        self.engine = FastGenerator(self.engine_model, max_batch_size=rl.prompts_per_step * rl.num_generations)

    def __call__(self, prompts: list, trainer) -> dict:
        if self.engine_model is not self.policy:
            sync_adapter(self.policy, self.engine_model, self.adapter)
        # TRL's own templating (chat template, its kwargs, tools): the ids its generate path would get.
        prompt_ids = trainer._tokenize_prompts(prompts)[0]
        completions = self.engine.generate(
            prompt_ids,
            max_new_tokens=self.rl.max_new_tokens,
            stop_token_ids=trainer.eos_token_ids,
            pad_token_id=trainer.processing_class.pad_token_id,
            adapter=self.adapter,
            sampling=Sampling(
                temperature=self.rl.temperature,
                top_k=self.rl.top_k,
                seed=rollout_seed(self.rl.seed, trainer.state.global_step, trainer.accelerator.process_index),
            ),
        )
        return {
            "prompt_ids": [list(ids) for ids in prompt_ids],
            "completion_ids": [c.token_ids for c in completions],
            "logprobs": [c.logprobs for c in completions],
        }


def rollout_seed(seed: int, step: int, process: int) -> int:
    """The engine's seed for one step's rollouts on one process: independent streams per (seed, step, process)
    that do not depend on what ran before, so a run resumed from a checkpoint draws what it would have drawn."""
    return int(np.random.SeedSequence([seed, step, process]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---- the unquantized copy of an NF4 policy (CUDA only) ----
def base_weight(module: nn.Module) -> torch.Tensor:
    """A base linear's weight as a plain tensor: an NF4 weight dequantized by bitsandbytes, else itself."""
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach()
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight.data, quant_state).to(quant_state.dtype)


def unquantized_copy(policy, adapter: str):
    """The policy's model with every base linear as a plain ``nn.Linear`` over its dequantized weight (the
    dtype the NF4 layers compute in), other tensors shared with the policy, and the policy's LoRA layout with
    its current weights under ``adapter``. Built on the meta device, so nothing is allocated twice."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    lm = policy.get_base_model()
    config = copy.deepcopy(lm.config)
    config.__dict__.pop("quantization_config", None)  # the copy is a plain model
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=_compute_dtype(lm))
    for name, module in plain.named_modules():
        source = _unwrapped(lm.get_submodule(name)) if name else lm
        for key in chain(module._parameters, module._buffers):
            if module._parameters.get(key) is None and module._buffers.get(key) is None:
                continue
            linear_weight = key == "weight" and isinstance(module, nn.Linear)
            tensor = base_weight(source) if linear_weight else getattr(source, key)
            if key in module._parameters:
                module._parameters[key] = nn.Parameter(tensor.detach(), requires_grad=False)
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
