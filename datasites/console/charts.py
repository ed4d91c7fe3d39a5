"""The console's budget charts: matplotlib, drawn on the server as SVG.

Each chart is a horizontal bar per researcher (or dataset): the epsilon already spent
(composed from the ledger's records by :func:`fedmtl.datasites.ledger.audit.audit`) against
the policy's budget. Labels are researcher emails and dataset names, which a researcher
may choose: they are drawn as SVG ``<text>`` that matplotlib escapes, with mathtext off
(``$...$`` in a name is text, not a formula to parse). The page embeds each SVG as a
``data:`` image, where nothing in it could run script whatever it held.
"""

from __future__ import annotations

import base64
import io
import threading
from typing import Mapping

import matplotlib
from matplotlib.figure import Figure

from fedmtl.datasites.ledger.audit import PALETTE

_RC = {"svg.fonttype": "none", "text.parse_math": False, "svg.hashsalt": "fedmtl-console"}
MAX_LABEL = 48
_LOCK = threading.Lock()  # rc_context is process-wide; the console serves from threads


def _label(name: str) -> str:
    return name if len(name) <= MAX_LABEL else name[: MAX_LABEL - 1] + "…"


def budget_svg(spent: Mapping[str, float], budget: float | None, *, title: str, what: str) -> str:
    """One bar chart as SVG text: ``spent`` per name, with the ``budget`` as a dashed line.

    Args:
        spent: composed epsilon spent so far, per researcher or per dataset.
        budget: the policy's epsilon budget for each (None: not shown).
        title: the chart's title.
        what: what a bar is ("researcher", "dataset"), for the empty chart's text.

    Returns:
        A standalone SVG document (UTF-8 text).
    """
    names = sorted(spent)
    with _LOCK, matplotlib.rc_context(_RC):
        fig = Figure(figsize=(6.4, 0.6 + 0.45 * max(2, len(names))), dpi=100)
        ax = fig.subplots()
        if not names:
            ax.text(0.5, 0.5, f"no {what} has spent any epsilon yet", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_yticks([])
        else:
            ys = list(range(len(names)))
            vals = [float(spent[n]) for n in names]
            colours = [PALETTE[1] if budget is not None and v > budget else PALETTE[0] for v in vals]
            ax.barh(ys, vals, color=colours, height=0.6)
            ax.set_yticks(ys, [_label(n) for n in names])
            ax.invert_yaxis()
            for y, v in zip(ys, vals):
                ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
        if budget is not None:
            ax.axvline(float(budget), color="#555555", linestyle="--", linewidth=1, label=f"budget {budget:g}")
            ax.legend(fontsize=8, loc="lower right")
            ax.set_xlim(0, max([float(budget), *(float(v) for v in spent.values())]) * 1.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epsilon spent (composed)")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def data_uri(svg: str) -> str:
    """``svg`` as a ``data:image/svg+xml`` URI for an ``<img src>`` (the CSP allows ``data:``
    images only)."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


__all__ = ["budget_svg", "data_uri"]
