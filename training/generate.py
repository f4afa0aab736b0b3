"""Batched generation, greedy or sampled: one loaded base serves the stock model and every LoRA adapter.

Prompts are user messages rendered with the tokenizer's chat template, sorted by length and cut into
left-padded batches (so little compute goes to padding), and decoded greedily (or sampled, with
``eval.sampling``) until ``<|im_end|>`` / EOS or ``max_new_tokens``. Adapters are loaded once into a ``PeftModel`` and switched per batch; the stock
model runs with adapters disabled, so no second copy of the base is held.

``GenerationEngine`` is the plain-transformers backend; ``training.fast_generate.FastGenerationEngine``
(merged LoRA, static KV cache, CUDA graphs) wraps it. Both are an ``Engine``, the interface the evaluate
stage decodes through; ``select_backend`` picks one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from eval_artifacts.study.errors import ArtifactError, ConfigError

if TYPE_CHECKING:  # the config (pydantic) stays out of the GPU benchmarks' imports
    from transformers import PreTrainedTokenizerBase

    from eval_artifacts.study.config import SamplingConfig

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length: longest first (ties by index), as few batches as
    ``batch_size`` allows, their sizes differing by at most one (larger first).

    The plan depends only on the lengths and ``batch_size``: a resumed run batches exactly as an
    uninterrupted one, and several GPUs share out these same batches rather than batching their own
    problems, so greedy outputs do not depend on the number of GPUs (bf16 kernels round differently with
    a batch's size and neighbours).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    count = math.ceil(len(order) / batch_size)
    if not count:
        return []
    size, larger = divmod(len(order), count)
    batches, start = [], 0
    for k in range(count):
        end = start + size + (k < larger)
        batches.append(order[start:end])
        start = end
    return batches


@dataclass(frozen=True)
class Generation:
    """One completion."""

    index: int
    """Position of its prompt in the list given to ``generate`` / ``generate_batch``."""
    text: str
    """The completion, special tokens stripped (``<think>`` tags are not special and stay)."""
    token_ids: tuple[int, ...]
    """Generated tokens up to and including the stop token; padding excluded."""
    finish_reason: str
    """``stop`` when a stop token was generated, ``length`` when ``max_new_tokens`` ran out first."""

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Engine(Protocol):
    """What the evaluate stage needs of a generation backend; ``GenerationEngine`` and
    ``training.fast_generate.FastGenerationEngine`` both provide it."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer, which counts a completion's think tokens."""

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter under ``name``."""

    def plan(self, prompts: list[str], *, batch_size: int) -> list[list[int]]:
        """``plan_batches`` over the prompts' token counts."""

    def generate_batch(
        self,
        prompts: list[str],
        *,
        adapter: str | None,
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
    ) -> list[Generation]:
        """Completions of ``prompts`` in order, with ``adapter`` active (``None``: the stock model): greedy, or
        one draw each with ``sampling`` (from torch's global generator, which the caller seeds)."""

    def describe(self) -> dict:
        """What decodes, for the generation log: engine, device, dtype, CUDA graphs, fused kernels and
        projections."""

    def close(self) -> None:
        """Free the model and any caches, so the next stage finds the GPU empty."""


SAMPLING_FALLBACK = (
    "eval.sampling is on and the fast engine decodes greedily only: sampling with the hf engine "
    "(slower on a GPU; set eval.backend: hf to silence this)"
)


def select_backend(requested: Literal["auto", "hf", "fast"], *, sampling: bool = False) -> str:
    """The backend for ``eval.backend``: ``fast`` (static KV cache + CUDA graphs, ``training.fast_generate``)
    on a CUDA GPU when asked for or when ``auto``; ``hf`` otherwise. The fast engine decodes greedily only,
    so with ``sampling`` ``auto`` falls back to ``hf`` and says so on stderr.

    Raises:
        ConfigError: ``fast`` was asked for without a CUDA GPU, or with sampling.
    """
    import sys

    import torch

    if requested == "fast" and sampling:
        raise ConfigError(
            "eval.backend 'fast' decodes greedily only and eval.sampling is on: set eval.backend to 'auto' or "
            "'hf' to sample with the hf engine, or remove eval.sampling"
        )
    if requested == "fast" and not torch.cuda.is_available():
        raise ConfigError("eval.backend 'fast' needs a CUDA GPU: set eval.backend to 'auto' or 'hf'")
    if requested == "auto" and torch.cuda.is_available():
        if not sampling:
            return "fast"
        print(SAMPLING_FALLBACK, file=sys.stderr)
    return "fast" if requested == "fast" else "hf"


class GenerationEngine:
    """Greedy batched generation with Hugging Face transformers (+ PEFT for adapters).

    Args:
        model_path: a local model dir or a Hub id (with ``revision``), tokenizer and chat template included.
        device: ``cuda`` when available, else ``cpu``.
        dtype: a torch dtype name; default bf16 on CUDA, fp32 on CPU.
    """

    tokenizer: PreTrainedTokenizerBase

    def __init__(
        self,
        model_path: str | Path,
        *,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 where the hardware has it; fp32 on CPU, where bf16 is slow and greedy decoding drifts.
        torch_dtype = (
            getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device == "cuda" else torch.float32)
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path), revision=revision)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path), revision=revision, dtype=torch_dtype
        ).to(self.device)
        self.model.eval()
        vocab = self.tokenizer.get_vocab()
        stops = {vocab[token] for token in STOP_TOKENS if token in vocab}
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        self.stop_ids = sorted(stops)
        self.adapters: dict[str, Path] = {}

    # ---- adapters ----
    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter under ``name``; the base weights are shared by all adapters."""
        from peft import PeftModel

        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise ArtifactError(f"no PEFT adapter at {path} (adapter_config.json missing): train it first")
        if self.adapters:
            self.model.load_adapter(str(path), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        self.model.eval()
        self.adapters[name] = path

    # ---- prompts and batches ----
    def render(self, prompt: str) -> str:
        """The chat-formatted text of one user message, ending where the assistant's answer begins."""
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def plan(self, prompts: list[str], *, batch_size: int) -> list[list[int]]:
        """``plan_batches`` over the prompts' token counts."""
        lengths = [
            len(self.tokenizer(self.render(p), add_special_tokens=False)["input_ids"]) for p in prompts
        ]
        return plan_batches(lengths, batch_size)

    # ---- generation ----
    def generate_batch(
        self,
        prompts: list[str],
        *,
        adapter: str | None,
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
    ) -> list[Generation]:
        """Completions of one batch, with ``adapter`` active (``None``: the stock model): greedy, or one draw
        each with ``sampling`` (from torch's global generator, which the caller seeds)."""
        import torch
        from transformers import GenerationConfig

        self.check_adapter(adapter)
        if adapter is None:
            context = self.model.disable_adapter() if self.adapters else nullcontext()
        else:
            self.model.set_adapter(adapter)
            context = nullcontext()
        encoded = self.tokenizer(
            [self.render(p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.device)
        drawn = (
            {"do_sample": False}
            if sampling is None
            else {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,  # 0: no top-k cut
            }
        )
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            **drawn,
        )
        with context, torch.inference_mode():
            output = self.model.generate(**encoded, generation_config=config)
        new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
        return [self.to_generation(index, row) for index, row in enumerate(new_tokens)]

    def generate(
        self, prompts: list[str], *, adapter: str | None, max_new_tokens: int, batch_size: int
    ) -> Iterator[list[Generation]]:
        """Yield the completions batch by batch (in plan order); each ``Generation.index`` points into ``prompts``."""
        for batch in self.plan(prompts, batch_size=batch_size):
            results = self.generate_batch(
                [prompts[i] for i in batch], adapter=adapter, max_new_tokens=max_new_tokens
            )
            yield [Generation(batch[r.index], r.text, r.token_ids, r.finish_reason) for r in results]

    def describe(self) -> dict:
        """What decodes: the engine, the device and dtype, and whether CUDA graphs and fused kernels run."""
        parameter = next(self.model.parameters())
        return {
            "engine": "hf",
            "device": _device_name(parameter.device),
            "dtype": str(parameter.dtype).removeprefix("torch."),
            "cuda_graphs": False,
            "fused_kernels": "off: the hf engine runs transformers' modules",
            "fused_projections": False,
        }

    def close(self) -> None:
        """Drop the model and return its GPU memory to the driver, so the next stage starts clean."""
        import gc

        import torch

        self.model = None
        self.adapters = {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def check_adapter(self, adapter: str | None) -> None:
        """Raise ``ArtifactError`` unless ``adapter`` is None (the stock model) or a loaded adapter."""
        if adapter is not None and adapter not in self.adapters:
            raise ArtifactError(
                f"adapter {adapter!r} is not loaded; loaded: {sorted(self.adapters) or 'none'}"
            )

    def to_generation(self, index: int, row: list[int]) -> Generation:
        """The ``Generation`` of one row of new token ids: cut after its first stop token, decoded."""
        stops = set(self.stop_ids)
        end = next((position for position, token in enumerate(row) if token in stops), None)
        # After its stop token a finished row holds only padding; an unfinished row is all real tokens.
        kept = row if end is None else row[: end + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(index, text, tuple(kept), "length" if end is None else "stop")


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
