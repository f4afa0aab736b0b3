"""The study config: one YAML file, one typed object. Every problem in a file is reported at once."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from eval_artifacts.study.errors import ConfigError
from eval_artifacts.study.levels import LEVELS

# Hub names: letters, digits, '-', '_', '.', no '--' or '..' (huggingface_hub's REPO_ID_REGEX rules).
_HUB_NAME_RE = re.compile(r"^(?!.*(--|\.\.))[\w\-.]{1,96}$")
_SPDX_PLACEHOLDERS = {"", "license", "licence", "unknown", "todo", "tbd", "other-license", "none"}


TINY_BASE = "tiny"
"""``base_model.id`` value that builds the tiny study model."""
LOCAL_ENDPOINT = "local"
"""``hub.endpoint`` value that starts the embedded Hub-compatible server instead of using a URL."""


def is_hub_id(value: str) -> bool:
    """``owner/name`` that is not an existing local path (a relative folder can look like a repo id)."""
    return bool(re.fullmatch(r"[\w][\w.-]*/[\w.-]*[\w]", value)) and not Path(value).exists()


def _known_levels(value: list[int]) -> list[int]:
    """The levels, sorted and without repeats; a level the study does not define is an error."""
    unknown = [n for n in value if n not in LEVELS]
    if unknown:
        raise ValueError(f"unknown level(s) {unknown}; levels are {sorted(LEVELS)}")
    return sorted(set(value))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class BaseModelConfig(_Strict):
    id: str = Field(
        description="Hub id of the base model, or a local path. 'tiny' builds the tiny study model."
    )
    revision: str = "main"
    """The revision of the Hub repo (``id``, or ``hub_id`` for a local base); resolved to a commit sha on first read."""
    hub_id: str | None = None
    """For a local base (``id`` a folder): the Hub repo it is a copy of, which published adapters name as their base."""
    quantization: Literal["nf4", "none"] = "none"
    """nf4 loads the base in 4-bit NF4 with double quant through bitsandbytes (CUDA only)."""


class TinyModelConfig(_Strict):
    """The tiny Qwen3-architecture base that the offline study builds and pre-trains itself."""

    vocab_size: int = 384
    """Target size of the byte-level BPE vocabulary (256 byte symbols + merges + special tokens)."""
    hidden_size: int = 96
    intermediate_size: int = 288
    num_layers: int = 4
    num_heads: int = 3
    num_kv_heads: int = 1
    pretrain_problems: int = 8000
    """Distinct synthetic problems in the pre-training pool (never a test question)."""
    pretrain_steps: int = 400
    pretrain_batch_size: int = 64
    pretrain_learning_rate: float = 3e-3
    seed: int = 0


class SyntheticDataConfig(_Strict):
    n_train: int = Field(2000, gt=0)
    n_test: int = Field(200, gt=0)
    max_number: int = Field(20, gt=1)
    seed: int = 0


class DataConfig(_Strict):
    source: Literal["hub", "local", "synthetic"] = "hub"
    dataset_id: str = "openai/gsm8k"
    config_name: str = "main"
    revision: str = "main"
    """Resolved to a commit sha on first read; for a local copy (``local_dir``), the revision it was taken from."""
    task_id: str = "main"
    """The benchmark task of ``dataset_id`` that the Hub's eval-results files name (its ``eval.yaml`` task id)."""
    local_dir: Path | None = None
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    max_train_rows: int | None = Field(None, gt=0)
    max_test_rows: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _local_needs_dir(self) -> DataConfig:
        if self.source == "local" and self.local_dir is None:
            raise ValueError("source 'local' needs local_dir (a folder with train.jsonl and test.jsonl)")
        return self


class TeacherConfig(_Strict):
    kind: Literal["rule", "model"] = "rule"
    model_id: str | None = None
    revision: str = "main"
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(512, gt=0)
    few_shot: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _model_needs_id(self) -> TeacherConfig:
        if self.kind == "model" and not self.model_id:
            raise ValueError("teacher kind 'model' needs model_id")
        return self


class LoraConfig(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainingConfig(_Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_seq_length: int = Field(512, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: str = "cosine"
    completion_only_loss: bool = True
    """False reproduces the original study: loss over the full sequence."""
    gradient_checkpointing: bool = False
    packing: bool = False
    liger_kernel: bool = False
    """Train with Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) through TRL; needs a CUDA GPU and liger-kernel.
    Same results within bf16 rounding (bench/README.md: the loss curves of both, one seed)."""
    compile_layers: bool = False
    """SFT only: compile each decoder layer with ``torch.compile`` (regional compilation: one compiled graph serves
    every layer) for a training step otherwise bound by kernel launches on the host. Compiling takes about a
    minute in the first steps; batches are padded to multiples of 8. Dropout draws eager's random numbers.
    The fused kernels round to bf16 where eager ops round. On an H200 (bench/README.md, "Compiled decoder
    layers"), after its one compile, NF4 ran 1.5-1.6x the eager recipe and bf16 1.7-1.8x, each within 0.1% of
    the eager loss at every step, in less memory. Liger's kernels inside compiled layers gain little. Not yet
    run end to end through the CLI on a GPU, hence off in the study's config."""
    lora: LoraConfig = LoraConfig()
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    """Training seeds: one adapter per (level, seed). The first seed's adapter is the published one (``main``);
    the others measure training-seed variance and go to branches ``seed-<s>`` of the level's repo."""
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(200, gt=0)
    save_total_limit: int = Field(2, gt=0)
    keep_checkpoints: bool = False
    """Keep ``adapters/level_<n>/checkpoints/`` after a successful finish (they can be large)."""

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"training seeds {value} repeat a seed")
        return value


class SamplingConfig(_Strict):
    """Sampled decoding: ``samples_per_problem`` draws per problem and evaluation seed."""

    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    """0 keeps every token (no top-k cut)."""
    samples_per_problem: int = Field(1, gt=0)


class EvalConfig(_Strict):
    max_new_tokens: int = Field(512, gt=0)
    batch_size: int = Field(64, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    max_problems: int | None = Field(None, gt=0)
    backend: Literal["auto", "hf", "fast"] = "auto"
    sweet_spot_margin: float = Field(0.0, ge=0, le=1)
    """A level is accuracy-preserving when it is not significantly below base, or within this margin of it."""
    sampling: SamplingConfig | None = None
    """None (the default) decodes greedily: one output per problem, nothing drawn."""
    prompt_baselines: bool = False
    """Also evaluate the base model given each level's prompt, no adapter (models ``prompt_l<n>``)."""

    @model_validator(mode="after")
    def _greedy_draws_once(self) -> EvalConfig:
        if self.sampling is None and len(self.seeds) > 1:
            raise ValueError(
                f"eval.seeds {self.seeds} with greedy decoding repeat one identical run: greedy draws nothing, "
                "so extra evaluation seeds only narrow the error bars falsely. Measure seed variance with "
                "training.seeds (one adapter per seed), or set eval.sampling to draw samples; "
                "else keep one evaluation seed (eval.seeds: [0])"
            )
        return self

    @property
    def samples_per_problem(self) -> int:
        """Draws per problem and evaluation seed: 1 when greedy."""
        return 1 if self.sampling is None else self.sampling.samples_per_problem


class RewardWeightsConfig(_Strict):
    """The weights of the RL reward's three terms (each term is logged per step before weighting)."""

    correct: float = Field(1.0, ge=0)
    """Strict correctness from the evaluation's own grader: 1 or 0."""
    format: float = Field(0.2, ge=0)
    """A closed think block followed by a final-answer line: 1 or 0."""
    length: float = Field(0.5, ge=0)
    """Subtracted: think tokens past the level's target, as a fraction of the target (capped at 1)."""


class RLConfig(_Strict):
    """The optional length-aware RL stage (TRL GRPO) that continues the SFT adapters of ``levels``."""

    levels: list[int] = Field(default_factory=list)
    """The levels whose SFT adapter is continued with GRPO; empty (the default) turns the stage off."""
    max_steps: int = Field(100, gt=0)
    prompts_per_step: int = Field(8, gt=0)
    """Training problems per optimizer step; each gets ``num_generations`` completions."""
    num_generations: int = Field(8, ge=2)
    """Completions per prompt: GRPO's group, whose mean reward is each completion's baseline."""
    prompts_per_pass: int | None = Field(None, gt=0)
    """Prompts whose completions go through one forward and backward pass; a step accumulates gradients over
    ``prompts_per_step / prompts_per_pass`` passes, which lowers peak memory (the step's update stays the same
    up to rounding). None: the whole step in one pass."""
    learning_rate: float = Field(1e-5, gt=0)
    beta: float = Field(0.04, ge=0)
    """KL penalty towards the SFT adapter (0 turns it off)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    """Rollouts sample from the ``top_k`` likeliest tokens only; 0 keeps every token."""
    max_new_tokens: int = Field(256, gt=0)
    rollout_engine: Literal["hf", "fast"] = "hf"
    """Who samples the rollouts: TRL's generate on the policy (hf), or the fast engine with the policy's LoRA
    merged (fast; CUDA only, as eval.backend 'fast'; an NF4 base gets one dequantized bf16 copy)."""
    reward_weights: RewardWeightsConfig = RewardWeightsConfig()
    seed: int = 42
    save_steps: int = Field(50, gt=0)

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, value: list[int]) -> list[int]:
        return _known_levels(value)

    @model_validator(mode="after")
    def _passes_divide_the_step(self) -> RLConfig:
        if self.prompts_per_pass is not None and self.prompts_per_step % self.prompts_per_pass:
            raise ValueError(
                f"rl.prompts_per_pass ({self.prompts_per_pass}) must divide rl.prompts_per_step ({self.prompts_per_step})"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.levels)

    @property
    def passes_per_step(self) -> int:
        return self.prompts_per_step // (self.prompts_per_pass or self.prompts_per_step)


class HubConfig(_Strict):
    endpoint: str = LOCAL_ENDPOINT
    """'local' starts the embedded Hub-compatible server for the run; any URL is used as is."""
    namespace: str
    repo_prefix: str
    private: bool = True
    license: str
    collection_title: str
    citation: str = ""

    @field_validator("namespace", "repo_prefix")
    @classmethod
    def _hub_name(cls, value: str) -> str:
        if not _HUB_NAME_RE.match(value) or value.startswith(("-", ".")) or value.endswith(("-", ".")):
            raise ValueError(
                f"{value!r} is not a valid Hub name: use letters, digits, '-', '_', '.', no '--' or '..', "
                "not starting or ending with '-' or '.'"
            )
        return value

    @field_validator("license")
    @classmethod
    def _real_license(cls, value: str) -> str:
        if value.strip().lower() in _SPDX_PLACEHOLDERS:
            raise ValueError(
                f"{value!r} is a placeholder, not a license: give an identifier such as 'apache-2.0'"
            )
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value != LOCAL_ENDPOINT and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"{value!r} is neither 'local' nor an http(s) URL")
        return value.rstrip("/")


class StudyConfig(_Strict):
    name: str
    title: str
    base_model: BaseModelConfig
    tiny_model: TinyModelConfig | None = None
    levels: list[int] = Field(min_length=1)
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    rl: RLConfig = RLConfig()
    hub: HubConfig
    run_dir: Path

    @field_validator("name")
    @classmethod
    def _study_name(cls, value: str) -> str:
        if not _HUB_NAME_RE.match(value):
            raise ValueError(f"{value!r} must be a plain name (letters, digits, '-', '_', '.')")
        return value

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, value: list[int]) -> list[int]:
        _known_levels(value)
        if len(set(value)) != len(value):
            raise ValueError(f"levels {value} repeat a level")
        return sorted(value)

    @model_validator(mode="after")
    def _tiny_needs_settings(self) -> StudyConfig:
        if self.base_model.id == "tiny" and self.tiny_model is None:
            raise ValueError("base_model.id 'tiny' needs a tiny_model section")
        if self.base_model.hub_id is not None and not is_hub_id(self.base_model.hub_id):
            raise ValueError(f"base_model.hub_id {self.base_model.hub_id!r} is not a Hub repo id ('owner/name')")
        return self

    @model_validator(mode="after")
    def _rl_continues_trained_levels(self) -> StudyConfig:
        missing = [n for n in self.rl.levels if n not in self.levels]
        if missing:
            raise ValueError(
                f"rl.levels {missing} are not in levels {self.levels}: RL continues a level's SFT adapter"
            )
        return self

    # ---- derived names, used by every stage so that they cannot disagree ----
    def adapter_repo_id(self, level: int) -> str:
        return f"{self.hub.namespace}/{self.hub.repo_prefix}-l{level}"

    def rl_repo_id(self, level: int) -> str:
        """The repo of the level's SFT adapter continued with GRPO (model ``rl_l<n>``)."""
        return f"{self.adapter_repo_id(level)}-rl"

    @property
    def eval_repo_id(self) -> str:
        return f"{self.hub.namespace}/{self.hub.repo_prefix}-eval"

    @property
    def first_training_seed(self) -> int:
        """The seed of the published adapters (``level_<n>``, the repos' ``main``)."""
        return self.training.seeds[0]

    def adapter_models(self, level: int) -> list[tuple[str, int]]:
        """(model name, training seed) of every adapter of ``level``: the published one first."""
        spec = LEVELS[level]
        first, *others = self.training.seeds
        return [(spec.key, first)] + [(spec.seed_key(seed), seed) for seed in others]

    @property
    def tiny_base(self) -> bool:
        """The base is the tiny study model, built here and published with the study."""
        return self.base_model.id == TINY_BASE

    @property
    def base_repo_id(self) -> str:
        """Where the study publishes its own base model (the tiny study only)."""
        return f"{self.hub.namespace}/{self.hub.repo_prefix}-base"

    @property
    def base_hub_id(self) -> str | None:
        """The Hub repo that published adapters name as their base: the published tiny base, ``hub_id`` for a
        local copy, the ``id`` itself when it is a Hub id; None for a local base that names no Hub repo."""
        if self.tiny_base:
            return self.base_repo_id
        if self.base_model.hub_id:
            return self.base_model.hub_id
        return self.base_model.id if is_hub_id(self.base_model.id) else None

    @property
    def synthetic_data(self) -> bool:
        return self.data.source == "synthetic"

    @property
    def model_keys(self) -> list[str]:
        """Every evaluated model: base, the published adapters, the prompt-only baselines (when on), the
        adapters of the other training seeds, then the RL adapters (when on), each group in level order."""
        keys = ["base"] + [LEVELS[n].key for n in self.levels]
        if self.eval.prompt_baselines:
            keys += [LEVELS[n].prompt_key for n in self.levels]
        keys += [name for n in self.levels for name, _ in self.adapter_models(n)[1:]]
        return keys + [LEVELS[n].rl_key for n in self.rl.levels]

    def with_overrides(self, **changes: object) -> StudyConfig:
        """A copy with top-level or dotted (``hub.namespace``) fields replaced, validated again."""
        data = self.model_dump(mode="python")
        for dotted, value in changes.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        return _validate(data, source="overrides")

    def fingerprint(self) -> str:
        """A stable hash of the resolved config, recorded in study.lock.json."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


TINY_CONFIG_NAME = "tiny.yaml"


def default_config_path() -> Path:
    """The embedded tiny study, used when no --config is given."""
    return Path(str(resources.files("eval_artifacts.study.configs") / TINY_CONFIG_NAME))


def load_config(path: str | Path | None = None) -> StudyConfig:
    """Read and validate a study config.

    A relative ``run_dir`` or ``data.local_dir`` stays relative to the current directory, as users expect
    from a command-line tool; the embedded default is the one exception: its run dir is ``runs/tiny``.

    Raises:
        ConfigError: the file is missing, is not YAML, or holds unknown keys or wrong values. The message
            names the file and every bad key.
    """
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass --config with the path of a study YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return _validate(data, source=str(path))


def _validate(data: dict, *, source: str) -> StudyConfig:
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = ".".join(str(part) for part in item["loc"]) or "(top level)"
            if item["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            elif item["type"] == "missing":
                problems.append(f"missing key '{key}'")
            else:
                message = item["msg"].removeprefix("Value error, ")
                got = item.get("input")
                # A section's own check names its keys itself; echoing the whole section would bury it.
                problems.append(f"'{key}': {message}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
        raise ConfigError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems)) from None
