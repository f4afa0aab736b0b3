"""What several test modules build: sample rows, tiny models and adapters, small studies, hub snapshots.

Test modules import from here (and from fixtures_artifacts and hubtools), never from one another; the
fixtures built on these live in conftest.py. Heavy libraries (torch, transformers, huggingface_hub) are
imported inside the functions that need them, so that importing this module stays cheap.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from eval_artifacts.records import SampleRecord, model_kind, model_level, other_seed_of
from eval_artifacts.rundir import RunDir
from eval_artifacts.study.config import load_config
from eval_artifacts.study.levels import build_prompt
from training.synthetic import generate_problems


def sample_row(
    pid: str,
    correct: bool,
    think: int,
    completion: int,
    *,
    model: str = "level_2",
    seed: int = 0,
    sample: int = 0,
    finish: str = "stop",
    lenient: bool = False,
) -> dict:
    """One valid samples.jsonl row with these grading and token counts, its text consistent with them and
    graded by ``training.gsm8k.grade``.

    The gold answer is 14; a wrong answer that finished says 13, one cut by the token limit says nothing.
    With ``lenient``, a wrong output's reasoning ends in 14 with no final answer, so only the lenient rule
    credits it.
    """
    from training.gsm8k import grade

    level = model_level(model)
    question = f"Problem {pid}: Tom has 12 pens, gets 7, gives 5."
    predicted = "14" if correct else (None if finish == "length" or lenient else "13")
    reasoning = None if level is None else "x" * think
    body = "x" * think if level is None else f"<think>\n{reasoning}\n</think>"
    text = body if predicted is None else f"{body}\n#### {predicted}"
    if lenient:
        reasoning, text = None, ("" if level is None else "<think>\n") + "x" * think + " 14"
    graded = grade(text, "14", finish_reason=finish, kind="stock" if level is None else "adapter")
    if graded.correct != correct or graded.correct_lenient != (correct or lenient):
        raise ValueError(f"sample_row cannot make {pid} correct={correct} lenient={lenient} finish={finish}")
    return SampleRecord(
        id=pid,
        question=question,
        gold="14",
        prompt=question if level is None else build_prompt(level, question),
        completion=text,
        reasoning=reasoning,
        predicted=graded.predicted,
        extractor=graded.extractor,
        correct=graded.correct,
        correct_lenient=graded.correct_lenient,
        grade_reason=graded.reason,
        think_tokens=think,
        completion_tokens=completion,
        finish_reason=finish,
        model=model,
        level=level,
        training_seed=training_seed_of(model),
        seed=seed,
        sample=sample,
    ).to_row()


def training_seed_of(model: str, first: int = 42) -> int | None:
    """The training seed a sample row of ``model`` carries: ``first`` for a published adapter."""
    if model_kind(model) != "adapter":
        return None
    named = other_seed_of(model)
    return first if named is None else named


# ---------------------------------------------------------------- tiny models


def tiny_qwen3(
    vocab_size: int,
    *,
    seed: int = 0,
    tie: bool = True,
    init: float = 0.02,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    pad_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    max_positions: int = 32768,
    attn_implementation: str | None = None,
):
    """A randomly initialised Qwen3ForCausalLM in eval mode, weights drawn after ``torch.manual_seed(seed)``.

    ``init`` is the initializer range (the weights' standard deviation); ``tie`` ties lm_head to the
    embeddings. The same arguments give the same weights.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        initializer_range=init,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        **({"attn_implementation": attn_implementation} if attn_implementation else {}),
    )
    return Qwen3ForCausalLM(config).eval()


def study_tokenizer(problems: int, vocab_size: int, extra_texts: tuple[str, ...] = ()):
    """The tiny study's tokenizer and chat template, trained on ``problems`` synthetic training problems
    (questions and stock responses) and ``extra_texts``."""
    from training.tiny import stock_response, train_tokenizer

    drawn = generate_problems(problems, seed=0, split="train")
    texts = [p.question for p in drawn] + [stock_response(p) for p in drawn] + list(extra_texts)
    return train_tokenizer(texts, vocab_size=vocab_size)


GENERATION_PROMPTS = [p.question for p in generate_problems(12, seed=3, split="test")] + [
    "Hi",
    "Ann has 3 pens. " * 4,
]  # chat prompts of many lengths, what the generation tests decode


def build_generation_base(path: Path) -> Path:
    """Save the generation tests' model and tokenizer to ``path``: a 2-layer, 64-dim Qwen3 with random weights
    and the tiny study's tokenizer.

    Its lm_head is untied and scaled so that greedy outputs differ between prompts (and a random adapter
    changes them), and the ``<|im_end|>`` row is made a close rival of the token it emits most on
    ``GENERATION_PROMPTS``, so that some completions stop early and others run to the limit.
    """
    import torch

    from training.tiny import ENDOFTEXT, IM_END

    tokenizer = study_tokenizer(200, 300)
    im_end, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    model = tiny_qwen3(len(tokenizer), tie=False, eos_token_id=im_end, pad_token_id=pad)
    weight = model.lm_head.weight
    with torch.no_grad():
        weight.mul_(20.0)
        chats = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in GENERATION_PROMPTS
        ]
        encoded = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **encoded, max_new_tokens=16, do_sample=False, eos_token_id=[], pad_token_id=pad
        )
        favourite = collections.Counter(
            output[:, encoded["input_ids"].shape[1] :].flatten().tolist()
        ).most_common(1)
        noise = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(1))
        weight[im_end] = weight[favourite[0][0]] + 0.1 * weight.std() * noise
    model.generation_config.eos_token_id = [im_end, pad]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_training_base(path: Path) -> Path:
    """Save the training tests' model to ``path``: a 2-layer, 64-dim Qwen3 with random weights and the tiny
    study's tokenizer and chat template, configured as ``training.tiny.make_model`` configures the tiny base.

    The (tied) embeddings are scaled up so that logits are not uniform: otherwise LoRA on the projections
    can hardly move the output distribution and the loss barely falls.
    """
    import torch
    from transformers import GenerationConfig

    from training.tiny import ENDOFTEXT, IM_END

    tokenizer = study_tokenizer(300, 320, ("Solve this using Level",))
    im_end, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    model = tiny_qwen3(len(tokenizer), max_positions=512, eos_token_id=im_end, pad_token_id=pad)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, pad], pad_token_id=pad, do_sample=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter(base: Path, path: Path, *, seed: int) -> Path:
    """A LoRA adapter with random, non-zero A and B, so that it changes the base's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    peft_model.save_pretrained(path)
    return path


def chat_token_lengths(base: Path, train_file: Path) -> list[int]:
    """Tokens of each SFT row rendered as one chat exchange by ``base``'s tokenizer, counted independently."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    return [
        len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for r in rows
    ]


# ---------------------------------------------------------------- small studies


def sft_study(base: Path, run_dir: Path, **training):
    """The tiny study on ``base``, with a few rows and steps; ``training`` overrides training.*."""
    settings = {
        "training.max_steps": 8,
        "training.batch_size": 8,
        "training.logging_steps": 2,
        "training.save_steps": 4,
        "training.learning_rate": 0.01,
        **{f"training.{key}": value for key, value in training.items()},
    }
    return load_config().with_overrides(
        **{
            "base_model.id": str(base),
            "run_dir": str(run_dir),
            "data.synthetic.n_train": 64,
            **settings,
        }
    )


def prepared(config, levels=(3,)) -> RunDir:
    """``config``'s run dir after prepare-data for ``levels``."""
    from training import prepare_data

    run_dir = RunDir(config.run_dir)
    prepare_data.run(config, run_dir, levels=list(levels))
    return run_dir


# ---------------------------------------------------------------- publishing: templates and hub snapshots


README = "README.md"
SLUG = re.compile(r"collections/[\w.-]+/[\w.-]+-[0-9a-f]{24}")
ENDPOINT = re.compile(r"http://127\.0\.0\.1:\d+")  # cards link the hub they are published to
COMMIT = re.compile(r"\b[0-9a-f]{40}\b")  # cards, eval results and shards name the commits of the publish


def edited_templates(folder: Path) -> Path:
    """A copy of the shipped card templates in ``folder``, each card and the note with a sentence added."""
    shutil.copytree(Path(str(resources.files("cards_templates"))), folder)
    for name in ("adapter_card.md.j2", "eval_dataset_card.md.j2", "base_card.md.j2", "collection_note.txt.j2"):
        text = (folder / name).read_text(encoding="utf-8")
        (folder / name).write_text(text.rstrip("\n") + " Reviewed.\n", encoding="utf-8")
    return folder


def repos(config) -> list[tuple[str, str]]:
    """(repo type, repo id) of every repo the study publishes: the tiny base, one per level, the eval dataset."""
    base = [("model", config.base_repo_id)] if config.tiny_base else []
    return base + [("model", config.adapter_repo_id(n)) for n in config.levels] + [("dataset", config.eval_repo_id)]


def head_files(hub, repo_type: str, repo_id: str) -> dict[str, str] | None:
    """path -> sha256 at main (the files that name the hub or commits as text, masked); None: no repo.

    Every blob the head names must be stored with the sha256 the tree claims, or the head is broken.
    """
    storage = hub.storage
    sha, _ = storage.resolve(repo_type, repo_id, "main")
    if sha is None:
        return None
    files = {}
    for path, entry in storage.get_commit(repo_type, repo_id, sha)["tree"].items():
        data = storage.read_blob(entry["sha256"])
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"], path
        files[path] = comparable(path, data) or entry["sha256"]
    return files


def comparable(path: str, data: bytes) -> str | None:
    """A file that names commits (cards, eval results, configs, the eval dataset's shards) as text with the
    parts that differ between two publishes of one study (port, collection id, commit ids) masked; None for
    any other file, which compares by its bytes."""
    if path.endswith((".md", ".yaml", ".json")):
        return mask(data.decode())
    if path.endswith(".parquet"):
        import io

        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(data)).to_pylist()
        return mask(json.dumps(rows, sort_keys=True, default=str))
    return None


def mask(text: str) -> str:
    """Text with the parts that differ between two publishes of one study (port, collection id, commit ids)
    masked."""
    return COMMIT.sub("COMMIT", ENDPOINT.sub("HUB", SLUG.sub("collections/SLUG", text)))


def hub_state(hub, config) -> dict:
    """Every repo's head files and the study's collection (title, items in order, notes)."""
    from huggingface_hub import HfApi

    collections = [c for c in hub.storage.list_collections() if c["title"] == config.hub.collection_title]
    api = HfApi(endpoint=hub.endpoint, token=hub.default_token)
    items = []
    for found in collections:
        slug = next(
            c.slug for c in api.list_collections(owner=config.hub.namespace) if c.title == found["title"]
        )
        items.append([(i.item_type, i.item_id, i.note) for i in api.get_collection(slug).items])
    return {
        "repos": {repo_id: head_files(hub, repo_type, repo_id) for repo_type, repo_id in repos(config)},
        "collections": items,
    }


def imported_names(path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports too), and each ``module.name``
    a ``from module import name`` takes."""
    import ast
    from pathlib import Path

    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


# ---------------------------------------------------------------- kills


def killed_at(point: str, work: Callable[[], object]) -> None:
    """Run ``work`` in a forked child with the kill point armed; it must die of SIGKILL there."""
    import os
    import signal
    import traceback

    from eval_artifacts import faultpoints

    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.environ[faultpoints.ENV] = point
            faultpoints._reached.clear()
            signal.alarm(300)  # a child stuck on a lock forked mid-use dies of SIGALRM: a failure, not a hang
            work()
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"{point} was never reached (exit status {status})"
    )


def checkpoint_kill_hook() -> None:
    """In the child: the kill point right after the Trainer wrote a checkpoint (sft.py has no hook of its own)."""
    from transformers import Trainer

    from eval_artifacts import faultpoints

    save = Trainer._save_checkpoint

    def save_then_maybe_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        faultpoints.maybe_crash("train.checkpoint_saved")

    Trainer._save_checkpoint = save_then_maybe_die


def bench_smoke(module: str, out: Path, *args: str) -> dict:
    """``python -m <module> --smoke --out <out> <args>`` from the repository root (a benchmark's CPU smoke
    mode); its JSON result."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", module, "--smoke", "--out", str(out), *args]
    subprocess.run(command, check=True, cwd=root, timeout=600, capture_output=True)
    return json.loads(out.read_text())
