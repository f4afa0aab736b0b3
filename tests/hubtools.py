"""Helpers for tests that drive the real huggingface_hub / datasets clients against the local hub."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

CHROMIUM = Path("/usr/bin/chromium")
CARD_TITLE = "CoT compression, level 4 (Ultra-compact)"
ACCURACY = 0.7355


@contextmanager
def isolated_hf_caches(root: Path) -> Iterator[None]:
    """Keep the clients' caches under ``root`` for the block (both libraries read these at call time)."""
    from datasets import config
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
        patch.setattr(config, "HF_DATASETS_CACHE", root / "datasets")
        yield


@contextmanager
def clients_for(hub) -> Iterator[None]:
    """This process's huggingface_hub / datasets pointed at ``hub`` for the block, then put back."""
    from hub_tools.local_hub import configure_clients

    restore = configure_clients(hub.endpoint)
    try:
        yield
    finally:
        restore()


def publish_to(endpoint: str, config, run_dir, *, token: str | None, scope, echo=print, **options):
    """One publishing command on ``endpoint``, as the CLI runs it: the endpoint folded into the config, the Hub
    opened and the token checked, then ``publish`` with ``options`` (``PublishOptions``' fields)."""
    from hub_tools.publishing.commands import PublishOptions, open_target, publish

    config = config.with_overrides(**{"hub.endpoint": endpoint})
    with open_target(config, run_dir, token=token) as target:
        return publish(
            config, run_dir, target=target, scope=scope, options=PublishOptions(**options), echo=echo
        )


def card_text() -> str:
    """A README built with huggingface_hub's card data classes, holding a model-index accuracy."""
    from huggingface_hub import EvalResult, ModelCardData

    data = ModelCardData(
        base_model="Qwen/Qwen3-4B-Instruct-2507",
        base_model_relation="adapter",
        library_name="peft",
        license="apache-2.0",
        pipeline_tag="text-generation",
        datasets=["openai/gsm8k"],
        tags=["lora", "chain-of-thought"],
        model_name="cot-compress-l4",
        eval_results=[
            EvalResult(
                task_type="text-generation",
                task_name="Math reasoning",
                dataset_type="openai/gsm8k",
                dataset_name="GSM8K",
                dataset_split="test",
                metric_type="accuracy",
                metric_name="Accuracy",
                metric_value=ACCURACY,
            )
        ],
    )
    body = f"# {CARD_TITLE}\n\nA LoRA adapter. Raw HTML stays text: <script>alert(1)</script>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def front_matter(text: str) -> dict:
    """The YAML metadata of a README, parsed independently of the server."""
    _, yaml_text, _ = text.split("---\n", 2)
    return yaml.safe_load(yaml_text)


def make_folder(root: Path, *, big_bytes: int = 11 * 1024 * 1024, seed: int = 0) -> Path:
    """An adapter-like folder: README, a >10 MB binary (LFS), small JSON and a nested text file."""
    rng = __import__("random").Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(card_text())
    (root / "adapter_model.safetensors").write_bytes(rng.randbytes(big_bytes))
    (root / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}\n')
    (root / "logs").mkdir(exist_ok=True)
    (root / "logs" / "training.json").write_text('{"loss": [2.5, 1.25]}\n')
    return root


def folder_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def chromium(url: str, tmp: Path, *, screenshot: Path | None = None) -> str:
    """Open ``url`` in headless Chromium; return the DOM after scripts ran; optionally save a screenshot."""
    binary = shutil.which("chromium") or str(CHROMIUM)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--window-size=1200,1600",
    ]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    if screenshot is not None:
        subprocess.run(
            [binary, *flags, f"--screenshot={screenshot}", url],
            check=True,
            capture_output=True,
            timeout=90,
            env=env,
        )
    done = subprocess.run(
        [binary, *flags, "--dump-dom", url], check=True, capture_output=True, timeout=90, env=env
    )
    return done.stdout.decode()
