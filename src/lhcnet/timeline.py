"""``<video>_timeline.png``: each tracked face's emotion probabilities over the video's time."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_write

__all__ = ["MAX_TRACKS", "plot_timeline"]

MAX_TRACKS = 6  # panels; the faces seen in the most frames are drawn


def plot_timeline(records: Sequence[dict[str, Any]], classes: Sequence[str], out_png: str | Path,
                  fps: float = 0.0, title: str = "") -> Path:
    """One panel per face track (``FaceTracker``), one line per emotion, x = seconds (frames if
    ``fps`` is unknown). ``records``: one video's frame records, in frame order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[int, list[tuple[float, dict[str, float]]]] = {}
    times = [record["frame"] / fps if fps > 0 else record["frame"] for record in records]
    for time, record in zip(times, records):
        for face in record["faces"]:
            series.setdefault(face.get("track", 1), []).append((time, face["scores"]))
    times = sorted(set(times))
    step = min(np.diff(times), default=1.0)  # between two frames read
    shown = sorted(sorted(series, key=lambda t: -len(series[t]))[:MAX_TRACKS])
    fig, axes = plt.subplots(max(1, len(shown)), 1, figsize=(10, 1.2 + 2.2 * max(1, len(shown))),
                             sharex=True, squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, track in zip(axes[:, 0], shown):
        points = series[track]
        for k, name in enumerate(classes):
            xs, ys = [], []
            for i, (time, scores) in enumerate(points):
                if i and time - points[i - 1][0] > 1.5 * step:  # frames without the face: a gap
                    xs.append(np.nan)
                    ys.append(np.nan)
                xs.append(time)
                ys.append(scores[name])
            ax.plot(xs, ys, label=name, color=colours(k), marker="." if len(points) < 30 else None,
                    linewidth=1.2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(f"face #{track}\nprobability")
        ax.grid(alpha=0.3)
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no face found", ha="center", va="center", transform=axes[0, 0].transAxes)
    hidden = len(series) - len(shown)
    axes[0, 0].set_title(title + (f" ({hidden} more faces not drawn)" if hidden else ""), fontsize=10)
    if shown:
        axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[-1, 0].set_xlabel("time (s)" if fps > 0 else "frame")
    fig.tight_layout()
    try:
        return atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
