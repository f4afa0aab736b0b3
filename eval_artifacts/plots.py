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


# Where a point's label may go, in points from the point, tried in this order until it overlaps no other label
# and no marker: right-above, right-below, left-above, left-below, then further out.
_LABEL_OFFSETS = [(6, 6), (6, -14), (-6, 6), (-6, -14), (10, 16), (10, -24), (-10, 16), (-10, -24)]


def pareto_figure(summary: dict) -> Figure:
    """The Pareto plot of a summary as a figure: points with CI bars, the frontier, labels that do not collide,
    and the legend below the axes, where it hides no point."""
    rows = [row for row in summary["models"] if on_the_plot(row["model"])]
    frontier = summary["frontier"]
    by_model = {row["model"]: row for row in rows}
    # A bare Figure with its own Agg canvas: no pyplot global state, no GUI backend.
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xs = [by_model[m]["think_tokens"]["mean"] for m in frontier]
    ys = [by_model[m]["accuracy"] for m in frontier]
    # Staircase: with a budget of x think tokens the best reachable accuracy is the last step left of x.
    axes.step(xs, ys, where="post", color="tab:green", linestyle="--", linewidth=1.5, zorder=1, label="Pareto frontier")
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
    axes.margins(x=0.1, y=0.1)  # room for the labels beside the outermost points
    axes.set_xlabel("mean think tokens per problem")
    axes.set_ylabel("accuracy (95% CI)")
    axes.set_title(f"{summary['study']}: accuracy vs reasoning length")
    axes.grid(True, alpha=0.3)
    figure.legend(loc="outside lower center", ncols=2, fontsize=8)
    place_labels(figure, axes, [(point_label(r["model"]), r["think_tokens"]["mean"], r["accuracy"]) for r in rows])
    return figure


def place_labels(figure: Figure, axes, points: list[tuple[str, float, float]]) -> None:
    """Annotate each point with the first offset whose text box overlaps no label already placed and no
    marker (measured with the renderer after the final layout, so what is checked is what is drawn)."""
    figure.draw_without_rendering()  # fixes the layout, hence where every point lands on the canvas
    renderer = figure.canvas.get_renderer()
    to_canvas = axes.transData.transform
    markers = [_box_around(*to_canvas((x, y)), half=5 * figure.dpi / 72) for _, x, y in points]
    placed: list = []
    # Top to bottom, left to right: a fixed order, so the same summary gives the same picture.
    for index in sorted(range(len(points)), key=lambda i: (-points[i][2], points[i][1], points[i][0])):
        text, x, y = points[index]
        others = [box for i, box in enumerate(markers) if i != index]  # a label sits beside its own marker
        for dx, dy in _LABEL_OFFSETS:
            annotation = axes.annotate(
                text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=9,
                ha="left" if dx > 0 else "right",
            )
            annotation.set_in_layout(False)  # labels never move the axes the placement was measured on
            box = annotation.get_window_extent(renderer)
            blocked = [*placed, *others]
            if not any(_overlap(box, other) for other in blocked):
                break
            if (dx, dy) != _LABEL_OFFSETS[-1]:
                annotation.remove()
            else:  # nowhere free: the first place, as before
                annotation.remove()
                annotation = axes.annotate(text, (x, y), textcoords="offset points", xytext=_LABEL_OFFSETS[0], fontsize=9)
                annotation.set_in_layout(False)
                box = annotation.get_window_extent(renderer)
        placed.append(box)


def _box_around(x: float, y: float, *, half: float):
    from matplotlib.transforms import Bbox

    return Bbox.from_extents(x - half, y - half, x + half, y + half)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def render_pareto(summary: dict, *, fmt: str = "png") -> bytes:
    """Draw the Pareto plot of a summary and return the encoded image."""
    with matplotlib.rc_context(_RC):
        figure = pareto_figure(summary)
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
