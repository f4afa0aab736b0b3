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


def chromium_flags(tmp: Path) -> list[str]:
    return [
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


CHROMIUM_ENV = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def chromium(url: str, tmp: Path, *, screenshot: Path | None = None) -> str:
    """Open ``url`` in headless Chromium; return the DOM after scripts ran; optionally save a screenshot."""
    binary = shutil.which("chromium") or str(CHROMIUM)
    flags = chromium_flags(tmp)
    if screenshot is not None:
        subprocess.run(
            [binary, *flags, f"--screenshot={screenshot}", url],
            check=True,
            capture_output=True,
            timeout=90,
            env=CHROMIUM_ENV,
        )
    done = subprocess.run(
        [binary, *flags, "--dump-dom", url], check=True, capture_output=True, timeout=90, env=CHROMIUM_ENV
    )
    return done.stdout.decode()


# What a page shows once loaded: its HTTP status and each image with the width the browser decoded.
PAGE_REPORT = """JSON.stringify({
  status: performance.getEntriesByType("navigation")[0].responseStatus,
  images: [...document.images].map(i => ({src: i.currentSrc || i.src, naturalWidth: i.naturalWidth}))
})"""


# The navigation committed (about:blank is complete too) and the load event fired.
LOADED = "location.href !== 'about:blank' && document.readyState === 'complete'"


class DevTools:
    """Headless Chromium driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: the
    browser reads NUL-terminated JSON commands on fd 3 and answers on fd 4), so no driver package is needed."""

    def __init__(self, tmp: Path, timeout: float = 60.0):
        import fcntl

        self.timeout, self.next_id, self.buffer = timeout, 0, b""
        commands_r, self.commands = os.pipe()
        self.answers, answers_w = os.pipe()
        # Moved to fds >= 10 so that the shell's redirections onto 3 and 4 cannot clobber one with the other
        # (a shell, not preexec_fn, because the hub's server thread is running in this process).
        child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_r, answers_w))
        os.close(commands_r)
        os.close(answers_w)
        binary = shutil.which("chromium") or str(CHROMIUM)
        onto_3_and_4 = f'exec "$0" "$@" 3<&{child_r} 4>&{child_w} {child_r}<&- {child_w}>&-'
        browser = [binary, *chromium_flags(tmp), "--remote-debugging-pipe", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", onto_3_and_4, *browser],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(child_r, child_w),
            env=CHROMIUM_ENV,
        )
        os.close(child_r)
        os.close(child_w)

    def _receive(self) -> dict:
        import json
        import select

        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.answers], [], [], self.timeout)
            chunk = os.read(self.answers, 1 << 16) if ready else b""
            if not chunk:
                raise TimeoutError("Chromium did not answer over the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """One command; its result (events arriving meanwhile are skipped)."""
        import json

        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive()
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"DevTools {method}: {answer['error']}")
                return answer["result"]

    def page_report(self, url: str) -> dict:
        """Open ``url`` in a new tab, wait for its load event (images loaded or failed), and report it."""
        import json
        import time

        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.navigate", {"url": url}, session)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.evaluate(LOADED, session):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading within {self.timeout:.0f} s")
            time.sleep(0.05)
        report = json.loads(self.evaluate(PAGE_REPORT, session))
        self.send("Target.closeTarget", {"targetId": target})
        return report

    def evaluate(self, expression: str, session: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.answers)
