"""Pictures: faithfulness curves (matplotlib) and circuits (graphviz, optional)."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Sequence

import numpy as np

from .graph import Graph
from .io import atomic_write_text, atomic_write_with, write_figure


def plot_curves(curves: Sequence, path: str, title: str = "Faithfulness of top-n circuits") -> str:
    """Faithfulness against circuit size (log x axis), one line per :class:`Curve`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for c in curves:
        ax.plot(np.maximum(c.n_edges, 1), c.faithfulness, marker="o", ms=3, label=c.label or None)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("edges in circuit (after pruning)")
    ax.set_ylabel("normalised faithfulness")
    ax.set_title(title)
    if any(c.label for c in curves):
        ax.legend()
    fig.tight_layout()
    return write_figure(fig, path)  # atomic: a failed write leaves an old picture whole


def plot_pruning_history(history: dict, path: str, title: str = "Edge pruning") -> str:
    """Training of :func:`jaxinterp.edge_pruning.learn_circuit`: the faithfulness loss (in
    units of the empty circuit's) and the expected fraction of edges kept against its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    steps = np.arange(len(history["loss"]))
    ax1.plot(steps, history["faithfulness_loss"], lw=1)
    ax1.set_yscale("symlog", linthresh=1e-3)
    ax1.set_xlabel("step")
    ax1.set_ylabel("faithfulness loss / empty circuit's")
    ax2.plot(steps, history["density"], lw=1, label="expected")
    ax2.plot(steps, history["target"], lw=1, ls="--", label="target")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("fraction of edges kept")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return write_figure(fig, path)  # atomic: a failed write leaves an old picture whole


_QKV_COLOURS = {"q": "#FF00FF", "k": "#00FF00", "v": "#0000FF", None: "#000000"}


def to_dot(graph: Graph, max_penwidth: float = 5.0) -> str:
    """The circuit (edges in ``graph.in_graph``) as Graphviz DOT text.

    Edge width follows |score|; colour: q/k/v inputs magenta/green/blue, others black,
    dashed when the score is negative. In the grouped view (:mod:`jaxinterp.graph`) a
    ``<k>``/``<v>`` edge ends at ``a{l}.kv{g}``, key/value head ``g``'s shared input.
    """
    spec = graph.spec
    used = [(n, s, d) for n, s, d in spec.edges if graph.in_graph[s, d]]
    if not used:
        return "digraph circuit {}\n"
    top = max(abs(float(graph.scores[s, d])) for _, s, d in used) or 1.0
    lines = ["digraph circuit {", '  rankdir=TB; node [shape=box, style="filled,rounded", fontname=Helvetica];']
    nodes = {n.split("->")[0] for n, _, _ in used} | {n.split("->")[1].split("<")[0] for n, _, _ in used}
    for node in sorted(nodes):
        colour = "#cfe2f3" if node.startswith("a") else "#d9ead3" if node.startswith("m") else "#fce5cd"
        lines.append(f'  "{node}" [fillcolor="{colour}"];')
    for name, s, d in used:
        parent, child = name.split("->")
        qkv = child[-2] if child.endswith(">") else None
        child = child.split("<")[0]
        score = float(graph.scores[s, d])
        width = max(0.6, max_penwidth * abs(score) / top)
        style = "dashed" if score < 0 else "solid"
        lines.append(f'  "{parent}" -> "{child}" [penwidth={width:.2f}, color="{_QKV_COLOURS[qkv]}", style={style}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_circuit(graph: Graph, path: str, title: str = "") -> str:
    """Draw the circuit to ``path`` (by extension: png, svg, pdf) and write its DOT text
    beside it (``.dot``). Uses Graphviz's ``dot`` when installed, else matplotlib with
    nodes laid out by layer, so a picture never needs a system package."""
    dot = to_dot(graph)
    stem, ext = os.path.splitext(path)
    atomic_write_text(stem + ".dot", dot)
    exe = shutil.which("dot")
    if exe is not None:
        atomic_write_with(path, lambda tmp: subprocess.run([exe, f"-T{ext.lstrip('.') or 'png'}", "-o", tmp],
                                                           input=dot.encode(), check=True))
        return path
    return _draw_circuit_matplotlib(graph, path, title)


def _node_position(spec, name: str) -> tuple[float, float]:
    """(x, y) of a node: one row per attention layer and per MLP, heads spread along x."""
    if name == "input":
        return (spec.n_heads - 1) / 2, 0.0
    if name == "logits":
        return (spec.n_heads - 1) / 2, 2 * spec.n_layers + 1.0
    if name.startswith("m"):
        return (spec.n_heads - 1) / 2, 2 * int(name[1:]) + 2.0
    layer, head = name.split(".")
    if head.startswith("kv"):  # the grouped view's shared k/v input: below the middle of its query heads
        group = spec.n_heads // spec.n_kv_inputs
        return int(head[2:]) * group + (group - 1) / 2, 2 * int(layer[1:]) + 0.55
    return float(head[1:]), 2 * int(layer[1:]) + 1.0


def _draw_circuit_matplotlib(graph: Graph, path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = graph.spec
    used = [(n, s, d) for n, s, d in spec.edges if graph.in_graph[s, d]]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * spec.n_heads + 2), max(4, 0.8 * spec.n_layers * 2 + 2)), dpi=120)
    top = max([abs(float(graph.scores[s, d])) for _, s, d in used] or [1.0]) or 1.0
    nodes = set()
    for name, s, d in used:
        parent, child = name.split("->")
        qkv = child[-2] if child.endswith(">") else None
        child = child.split("<")[0]
        nodes |= {parent, child}
        (x0, y0), (x1, y1) = _node_position(spec, parent), _node_position(spec, child)
        score = float(graph.scores[s, d])
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", lw=0.4 + 3 * abs(score) / top, alpha=0.7,
                                    color=_QKV_COLOURS[qkv], ls="--" if score < 0 else "-",
                                    connectionstyle="arc3,rad=0.15", shrinkA=9, shrinkB=9))
    for name in nodes:
        x, y = _node_position(spec, name)
        colour = "#cfe2f3" if name.startswith("a") else "#d9ead3" if name.startswith("m") else "#fce5cd"
        ax.text(x, y, name, ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round", fc=colour, ec="black", lw=0.6))
    ax.set_xlim(-1, spec.n_heads)
    ax.set_ylim(-0.7, 2 * spec.n_layers + 1.7)
    ax.axis("off")
    ax.set_title(title or f"circuit: {len(used)} edges, {len(nodes)} nodes "
                 "(q magenta, k green, v blue; dashed = negative)", fontsize=9)
    fig.tight_layout()
    return write_figure(fig, path)  # atomic: a failed write leaves an old picture whole


def plot_sweep(results: list[dict], path: str) -> str:
    """Faithfulness curves: one panel per (model, task), one line per method / steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(len(models), len(tasks), figsize=(4.5 * len(tasks), 3.2 * len(models)),
                             dpi=110, squeeze=False)
    for r in results:
        ax = axes[models.index(r["model"])][tasks.index(r["task"])]
        c = r["curve"]
        y = np.array([np.nan if v is None else v for v in c["faithfulness"]], float)
        label = r["method"] + (f" ({r['ig_steps']} steps)" if r["ig_steps"] else "")
        ax.plot(np.maximum(c["n_edges"], 1), y, marker="o", ms=3, label=label)
    for i, m in enumerate(models):
        for j, t in enumerate(tasks):
            ax = axes[i][j]
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_title(f"{m} / {t}", fontsize=9)
            ax.set_xlabel("edges in circuit")
            ax.set_ylabel("faithfulness")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return write_figure(fig, path)  # atomic: a failed write leaves an old picture whole
