"""The tiny study's base model: a seeded Qwen3-architecture model and tokenizer, built and pre-trained here.

The offline study cannot download a base model, so it makes one: a byte-level BPE tokenizer trained on the
synthetic corpus (digits split one per token, so arithmetic is learnable), Qwen's role tokens and chat
format, and a ~0.5M-parameter Qwen3 model pre-trained for a minute or two on the stock answer format
(the bare question in, the reference solution without calculator annotations out). That is enough for it
to solve a good share of the test problems before any adapter, so the adapters have something to compress.

The result is cached by a hash of everything that shapes it; a build goes to a temp dir that is renamed
into place, so a killed build never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from eval_artifacts.study.config import StudyConfig, TinyModelConfig
from eval_artifacts.study.errors import ConfigError
from eval_artifacts.study.levels import LEVELS, THINK_CLOSE, THINK_OPEN, build_prompt, build_response
from training.gsm8k import Problem, strip_annotations

# Bump when the build recipe changes, so stale caches are not reused.
CODE_VERSION = "tiny-1"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen's chat format. The assistant turn sits inside {% generation %} markers so that TRL's
# assistant_only_loss also works; prompt-completion training only needs the prompt rendered with
# add_generation_prompt to be a prefix of prompt + completion, which this template guarantees.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def cache_root() -> Path:
    """``$COT_COMPRESS_CACHE/tiny`` or ``~/.cache/cot-compress/tiny``."""
    base = os.environ.get("COT_COMPRESS_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "cot-compress") / "tiny"


def build_key(config: StudyConfig) -> str:
    """Hash of the tiny-model settings, the synthetic data settings and the recipe version."""
    payload = {
        "tiny_model": _tiny_settings(config).model_dump(mode="json"),
        "synthetic": config.data.synthetic.model_dump(mode="json"),
        "code_version": CODE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ensure_tiny_base(config: StudyConfig) -> Path:
    """The directory of the tiny base model (weights, tokenizer, chat template), built on first use."""
    target = cache_root() / build_key(config)
    if (target / "build.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_base(config, out_dir=work)
        try:
            os.rename(work, target)
        except OSError:
            # Another process finished the same build first; its result is identical.
            if not (target / "build.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def is_build_of(directory: Path, config: StudyConfig) -> bool:
    """Whether ``directory`` holds a complete tiny base built from ``config``'s settings."""
    try:
        build = json.loads((directory / "build.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return build.get("code_version") == CODE_VERSION and build.get("tiny_model") == _tiny_settings(
        config
    ).model_dump(mode="json") and build.get("synthetic") == config.data.synthetic.model_dump(mode="json")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the host's count: more threads than cores
    makes small-matrix training several times slower)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _tiny_settings(config: StudyConfig) -> TinyModelConfig:
    if config.tiny_model is None:
        raise ConfigError(
            "the config has no tiny_model section: add one, or set base_model.id to a Hub model"
        )
    return config.tiny_model


# ---------------------------------------------------------------- data


def stock_response(problem: Problem) -> str:
    """What the stock model answers: the reference solution without calculator annotations."""
    return strip_annotations(problem.answer).strip()


def _pretrain_problems(config: StudyConfig) -> list[Problem]:
    """The pre-training pool: synthetic problems drawn like the study's, minus every test question."""
    from training.data import synthetic_without_test

    return synthetic_without_test(config, _tiny_settings(config).pretrain_problems, split="pretrain")


def _tokenizer_corpus(problems: list[Problem]) -> list[str]:
    # The level prompts and styles are in the corpus too, so the adapters' prompts tokenize compactly.
    texts = [problem.question for problem in problems] + [stock_response(problem) for problem in problems]
    for level in LEVELS.values():
        texts += [build_prompt(level.number, problem.question) for problem in problems[:50]]
        texts.append(build_response(level.example, "72"))
    texts += ["user", "assistant", "system"]
    return texts


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], *, vocab_size: int):
    """A byte-level BPE tokenizer with single-digit tokens and Qwen's special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = [ENDOFTEXT, IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # As in Qwen: role tokens are special (dropped by skip_special_tokens), think tags are not (kept in text).
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.add_tokens(
        [AddedToken(token, special=False, normalized=False) for token in (THINK_OPEN, THINK_CLOSE)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def encode_example(tokenizer, question: str, response: str) -> tuple[list[int], int]:
    """Token ids of one chat exchange and the length of its prompt part (loss goes on the rest)."""
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids, "chat template must render the prompt as a prefix"
    # The trailing newline after <|im_end|> is format, not something the model must learn to emit.
    return full_ids[:-1] if full.endswith("\n") else full_ids, len(prompt_ids)


# ---------------------------------------------------------------- model


def make_model(settings: TinyModelConfig, tokenizer):
    """A freshly initialised, seeded Qwen3 model of the configured size."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(settings.seed)
    model_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        head_dim=settings.hidden_size // settings.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(model_config)
    stops = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    model.generation_config = GenerationConfig(
        eos_token_id=stops, pad_token_id=model_config.pad_token_id, do_sample=False
    )
    return model


def pretrain(
    model, tokenizer, problems: list[Problem], settings: TinyModelConfig, *, device: str = "cpu"
) -> list[dict]:
    """Next-token training on the stock answers, loss on the assistant turn only. Returns the loss curve."""
    import torch

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    examples = [encode_example(tokenizer, p.question, stock_response(p)) for p in problems]
    pad_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_learning_rate, weight_decay=0.0)
    warmup = max(1, settings.pretrain_steps // 20)

    def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.pretrain_steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    curve, order = [], []
    for step in range(settings.pretrain_steps):
        if len(order) < settings.pretrain_batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[order.pop()] for _ in range(settings.pretrain_batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        # Right padding under a causal mask never reaches real tokens, so no attention mask is needed.
        loss = model(input_ids=input_ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == settings.pretrain_steps - 1:
            curve.append({"step": step + 1, "loss": round(loss.item(), 4)})
    model.eval()
    return curve


def build_tiny_base(config: StudyConfig, *, out_dir: Path) -> Path:
    """Build, pre-train and save the tiny base into ``out_dir`` (uncached; ``ensure_tiny_base`` caches)."""
    import torch

    settings = _tiny_settings(config)
    torch.set_num_threads(usable_cores())
    started = time.perf_counter()
    problems = _pretrain_problems(config)
    tokenizer = train_tokenizer(_tokenizer_corpus(problems), vocab_size=settings.vocab_size)
    model = make_model(settings, tokenizer)
    curve = pretrain(model, tokenizer, problems, settings)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    build = {
        "code_version": CODE_VERSION,
        "tiny_model": settings.model_dump(mode="json"),
        "synthetic": config.data.synthetic.model_dump(mode="json"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "pretrain_rows": len(problems),
        "loss_curve": curve,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    # Written last: its presence marks a complete build.
    (out_dir / "build.json").write_text(json.dumps(build, indent=2) + "\n", encoding="utf-8")
    return out_dir
