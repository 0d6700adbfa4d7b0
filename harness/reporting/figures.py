"""What every report's figures share: one palette, matplotlib drawn straight to PNG data URIs (Agg, never
pyplot's global backend), one axes style and legend placement.
"""

from __future__ import annotations

import base64
import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PALETTE = ("#2f6fde", "#e07b28", "#2a9d5b", "#c23b3b", "#7b52c7", "#8c5a3c", "#d45aa8", "#1fa3b5")
BASE_GREYS = ("#8a8f98", "#b3b8c0", "#6b7079", "#cfd3d9")
REFERENCE_COLOR = "#222222"


def figure(height: float = 3.6, width: float = 10) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg: never touch pyplot's global backend
    return fig


def png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def placeholder(message: str) -> str:
    fig = figure(1.3)
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="#5b6472")
    return png(fig)


def mpl_text(text: str) -> str:
    """A run label as matplotlib text: `$` would start mathtext; long ids would swamp legends."""
    text = text if len(text) <= 40 else text[:39] + "…"
    return text.replace("$", r"\$")


def style_axes(ax) -> None:
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def legend_above(fig: Figure, ax) -> None:
    """Legend above the axes (never over the data), as many columns as long labels allow."""
    handles, labels = ax.get_legend_handles_labels()
    widest = max(len(label) for label in labels)
    ncols = max(1, min(len(labels), 4, int(10 / (0.075 * widest + 0.8))))
    fig.legend(handles, labels, loc="outside upper center", ncols=ncols, frameon=False, fontsize=9)
