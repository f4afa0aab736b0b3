"""The Pareto frontier of accuracy against mean think tokens: the models nobody beats on both axes."""

from __future__ import annotations

import math


def dominates(p: tuple[float, float], q: tuple[float, float]) -> bool:
    """True when ``p`` = (tokens, accuracy) is at least as good as ``q`` on both axes and better on one."""
    return p[0] <= q[0] and p[1] >= q[1] and (p[0] < q[0] or p[1] > q[1])


def pareto_frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the non-dominated points, sorted by tokens (then by accuracy, then by name).

    Fewer tokens and higher accuracy are better. Identical points do not dominate each other, so both
    stay on the frontier; of two points with equal tokens only the more accurate one stays (and of two
    with equal accuracy only the cheaper one).

    Args:
        points: name -> (mean think tokens, accuracy).
    """
    for name, (tokens, accuracy) in points.items():
        if not (math.isfinite(tokens) and math.isfinite(accuracy)):
            raise ValueError(f"point {name!r} is not finite: ({tokens}, {accuracy})")
    frontier = [
        name
        for name, point in points.items()
        if not any(dominates(other, point) for other_name, other in points.items() if other_name != name)
    ]
    return sorted(frontier, key=lambda name: (points[name][0], -points[name][1], name))
