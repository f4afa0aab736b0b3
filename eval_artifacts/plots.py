"""``eval/pareto.png``: accuracy against mean think tokens, CI bars, the frontier, base and the prompt-only
baselines marked apart from the adapters (other training seeds' adapters are not drawn: the cards give them).

Output is byte-for-byte deterministic for the same summary (no timestamp or software metadata, fixed
dpi, fixed SVG hash salt), because publishing uploads only files whose content changed.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from eval_artifacts.records import is_rl, model_kind, model_level
from eval_artifacts.study.errors import ArtifactError
from eval_artifacts.summary import on_the_plot

DPI = 150
_FORMATS = {".png": "png", ".svg": "svg"}
_RC = {"svg.hashsalt": "cot-compress", "svg.fonttype": "path", "path.simplify": True}


def point_label(model: str) -> str:
    """``base`` stays ``base``; ``level_3`` becomes ``L3``; ``prompt_l3`` becomes ``P3`` (prompt only);
    ``rl_l3`` becomes ``L3+RL``."""
    level = model_level(model)
    if level is None:
        return model
    if is_rl(model):
        return f"L{level}+RL"
    return f"P{level}" if model_kind(model) == "prompt" else f"L{level}"


# kind -> (marker, size, colour, face colour, legend label)
_STYLES = {
    "base": ("s", 8, "tab:red", "white", "base (stock model)"),
    "adapter": ("o", 6, "tab:blue", "tab:blue", "LoRA adapters"),
    "prompt": ("^", 6, "tab:orange", "white", "prompt only (base + level prompt, no adapter)"),
}


def render_pareto(summary: dict, *, fmt: str = "png") -> bytes:
    """Draw the Pareto plot of a summary and return the encoded image."""
    rows = [row for row in summary["models"] if on_the_plot(row["model"])]
    frontier = summary["frontier"]
    by_model = {row["model"]: row for row in rows}
    with matplotlib.rc_context(_RC):
        # A bare Figure with its own Agg canvas: no pyplot global state, no GUI backend.
        figure = Figure(figsize=(6.4, 4.4))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        xs = [by_model[m]["think_tokens"]["mean"] for m in frontier]
        ys = [by_model[m]["accuracy"] for m in frontier]
        # Staircase: with a budget of x think tokens the best reachable accuracy is the last step left of x.
        axes.step(
            xs,
            ys,
            where="post",
            color="tab:green",
            linestyle="--",
            linewidth=1.5,
            zorder=1,
            label="Pareto frontier",
        )
        labelled: set[str] = set()
        for row in rows:
            x, y = row["think_tokens"]["mean"], row["accuracy"]
            low, high = row["ci95"]
            marker, size, colour, face, label = _STYLES[row["kind"]]
            axes.errorbar(
                [x],
                [y],
                yerr=[[y - low], [high - y]],
                fmt=marker,
                markersize=size,
                color=colour,
                markerfacecolor=face,
                capsize=3,
                label=None if row["kind"] in labelled else label,
            )
            labelled.add(row["kind"])
            axes.annotate(
                point_label(row["model"]), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9
            )
        axes.margins(x=0.1, y=0.1)  # room for the labels right of the outermost points
        axes.set_xlabel("mean think tokens per problem")
        axes.set_ylabel("accuracy (95% CI)")
        axes.set_title(f"{summary['study']}: accuracy vs reasoning length")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right", fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        metadata = {"Software": None} if fmt == "png" else {"Creator": None, "Date": None}
        figure.savefig(buffer, format=fmt, dpi=DPI, metadata=metadata)
    return buffer.getvalue()


def plot_pareto(summary: dict, path: Path) -> None:
    """Write the Pareto plot of ``summary`` to ``path`` (``.png`` or ``.svg``), atomically."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ArtifactError(f"cannot draw the Pareto plot to {path}: use a .png or .svg path")
    data = render_pareto(summary, fmt=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(data)
    os.replace(handle.name, path)
