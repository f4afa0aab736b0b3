"""The study config: every shipped file loads, and bad configs fail with one line naming the problem."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from eval_artifacts.metrics import sort_models
from eval_artifacts.records import is_rl, model_kind, model_level
from eval_artifacts.study.config import StudyConfig, default_config_path, load_config
from eval_artifacts.study.errors import ConfigError
from eval_artifacts.study.levels import LEVELS
from hub_tools.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, StudyConfig)
    assert config.levels == sorted(config.levels)
    assert config.model_keys[0] == "base"


def test_both_studies_are_shipped():
    names = {path.name for path in CONFIGS}
    assert {"tiny.yaml", "qwen3-4b-gsm8k.yaml"} <= names


def test_default_is_the_embedded_tiny_study():
    assert load_config(None) == load_config(default_config_path())
    assert load_config(None).base_model.id == "tiny"


def test_real_study_settings():
    config = load_config(Path(__file__).parents[1] / "configs" / "qwen3-4b-gsm8k.yaml")
    # Greedy: one evaluation seed; variance measured across training seeds; prompt-only baselines on.
    assert (config.training.seeds, config.eval.seeds, config.eval.sampling) == ([42, 43, 44], [0], None)
    assert config.eval.prompt_baselines and load_config(None).eval.prompt_baselines
    assert config.base_model.id == "Qwen/Qwen3-4B-Instruct-2507"
    assert config.base_model.quantization == "nf4"
    assert (config.data.dataset_id, config.data.config_name) == ("openai/gsm8k", "main")
    assert config.adapter_repo_id(4).endswith("-l4")


def test_the_base_adapters_name_on_the_hub(tmp_path):
    """Published adapters name their base by Hub id: the study's own tiny base, a Hub id, or the Hub repo a local
    copy stands for; a local folder that names none has no Hub id (publish refuses it)."""
    tiny = load_config(None)
    assert tiny.base_hub_id == "cot-compress/tiny-cot-base" == tiny.base_repo_id
    qwen = load_config(Path(__file__).parents[1] / "configs" / "qwen3-4b-gsm8k.yaml")
    assert qwen.base_hub_id == "Qwen/Qwen3-4B-Instruct-2507"
    local = qwen.with_overrides(**{"base_model.id": str(tmp_path)})
    assert local.base_hub_id is None
    copy = local.with_overrides(**{"base_model.hub_id": "Qwen/Qwen3-4B-Instruct-2507"})
    assert copy.base_hub_id == "Qwen/Qwen3-4B-Instruct-2507"


def _tiny() -> dict:
    return yaml.safe_load(default_config_path().read_text())


def _set(data: dict, dotted: str, value):
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return data


_DELETE = object()

# (change to the tiny config, text the one-line error must contain)
BAD_CONFIGS = [
    ("colour", "blue", "unknown key 'colour'"),
    ("training.learnig_rate", 0.1, "unknown key 'training.learnig_rate'"),
    ("training.batch_size", "eight", "'training.batch_size'"),
    ("training.batch_size", 0, "'training.batch_size'"),
    ("levels", [1, 7], "unknown level(s) [7]"),
    ("levels", [], "'levels'"),
    ("levels", [2, 2], "repeat a level"),
    ("hub.repo_prefix", "bad prefix!", "'hub.repo_prefix'"),
    ("hub.repo_prefix", "a--b", "not a valid Hub name"),
    ("hub.namespace", "-ns", "'hub.namespace'"),
    ("hub.license", "license", "placeholder"),
    ("hub.endpoint", "ftp://example", "'hub.endpoint'"),
    ("hub.namespace", _DELETE, "missing key 'hub.namespace'"),
    ("eval.seeds", [], "'eval.seeds'"),
    ("eval.seeds", [0, 1], "greedy decoding repeat one identical run"),
    ("training.seeds", [42, 42], "repeat a seed"),
    ("training.seeds", [], "'training.seeds'"),
    ("training.seed", 42, "unknown key 'training.seed'"),
    ("eval.sampling", {"temperature": 0}, "'eval.sampling.temperature'"),
    ("eval.max_new_tokens", -1, "'eval.max_new_tokens'"),
    ("base_model.quantization", "int3", "'base_model.quantization'"),
    ("eval.backend", "vllm", "'eval.backend'"),
    ("data.source", "local", "needs local_dir"),
    ("teacher.kind", "model", "needs model_id"),
    ("training.lora.dropout", 1.5, "'training.lora.dropout'"),
    ("tiny_model", _DELETE, "needs a tiny_model section"),
]


@pytest.mark.parametrize(
    ("key", "value", "message"), BAD_CONFIGS, ids=[c[0] + "-" + str(i) for i, c in enumerate(BAD_CONFIGS)]
)
def test_bad_config_is_one_line_exit_2(tmp_path, key, value, message):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_set(_tiny(), key, value)))
    result = CliRunner().invoke(main, ["prepare-data", "--config", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert str(path) in lines[0]
    assert message in lines[0]


@pytest.mark.parametrize("command", [["prepare-data"], ["evaluate", "--seeds", "0,1"]])
def test_greedy_decoding_with_two_evaluation_seeds_stops_with_one_line(tmp_path, command):
    """Issue 16: greedy draws nothing, so eval seeds [0, 1] would only narrow the error bars falsely."""
    path = tmp_path / "study.yaml"
    data = _tiny() if command[0] == "evaluate" else _set(_tiny(), "eval.seeds", [0, 1])
    path.write_text(yaml.safe_dump(data))
    args = [*command, "--config", str(path), "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "eval.seeds [0, 1] with greedy decoding" in line
    assert "training.seeds" in line and "eval.sampling" in line
    assert not (tmp_path / "run").exists()


def test_sampling_allows_several_evaluation_seeds_and_names_the_models():
    config = load_config(None).with_overrides(
        **{"eval.seeds": [0, 1], "eval.sampling": {"temperature": 0.7, "samples_per_problem": 4}},
        **{"training.seeds": [42, 7], "levels": [2, 4]},
    )
    assert config.eval.samples_per_problem == 4 and config.first_training_seed == 42
    assert config.adapter_models(4) == [("level_4", 42), ("level_4_seed7", 7)]
    assert config.model_keys == [
        "base", "level_2", "level_4", "prompt_l2", "prompt_l4", "level_2_seed7", "level_4_seed7",
    ]  # fmt: skip
    assert load_config(None).eval.samples_per_problem == 1


def test_all_problems_reported_at_once(tmp_path):
    data = _set(_set(_tiny(), "colour", "blue"), "training.batch_size", "eight")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "2 problem(s)" in str(caught.value)
    assert "colour" in str(caught.value) and "training.batch_size" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("levels: [1\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("", "must be a mapping"),
    ],
)
def test_unreadable_config_files(tmp_path, content, message):
    path = tmp_path / "study.yaml"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(main, ["prepare-data", "--config", str(path)])
    assert result.exit_code == 2
    assert message in result.stderr and "\n" not in result.stderr.strip()


def test_overrides_are_validated_too():
    config = load_config(None)
    assert config.with_overrides(**{"hub.namespace": "someone"}).adapter_repo_id(1) == "someone/tiny-cot-l1"
    with pytest.raises(ConfigError, match="hub.namespace"):
        config.with_overrides(**{"hub.namespace": "bad name"})


def test_rl_models_are_named_after_every_other_model():
    config = load_config(None).with_overrides(
        **{"training.seeds": [42, 7], "levels": [2, 4], "rl.levels": [4]}
    )
    assert config.model_keys[-2:] == ["level_4_seed7", "rl_l4"]
    assert (model_kind("rl_l4"), model_level("rl_l4"), is_rl("rl_l4"), is_rl("level_4")) == (
        "adapter",
        4,
        True,
        False,
    )
    assert sort_models(["rl_l4", "level_4_seed7", "base", "prompt_l2", "level_2"]) == [
        "base", "level_2", "prompt_l2", "level_4_seed7", "rl_l4",
    ]  # fmt: skip
    assert LEVELS[4].rl_key == "rl_l4"
    assert not any(is_rl(model) for model in load_config(None).model_keys)  # rl is off in the tiny study


def test_rl_passes_must_divide_the_step():
    config = load_config().with_overrides(**{"rl.prompts_per_step": 8, "rl.prompts_per_pass": 2})
    assert config.rl.passes_per_step == 4 and load_config().rl.passes_per_step == 1
    with pytest.raises(ConfigError, match=r"rl.prompts_per_pass \(3\) must divide rl.prompts_per_step \(8\)") as error:
        load_config().with_overrides(**{"rl.prompts_per_step": 8, "rl.prompts_per_pass": 3})
    assert "\n" not in str(error.value)
