"""PNG figures (matplotlib, Agg backend): `dynedit locate --plot` and `dynedit edit --plot`.

Pure rendering: every number comes in as data from the library's results; the PNG is
written atomically with the usual permissions (io.atomic_write_bytes).
"""

from __future__ import annotations

import io as _io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import atomic_write_bytes

CHOSEN = "#d62728"
SCORED = "#1f77b4"
REFUSED = "#9e9e9e"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def model_title(label: str) -> str:
    """``folder/name`` of a model path (the file name alone is "model.onnx" for every sample)."""
    p = Path(label)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


# ------------------------------------------------------------------------ locate --plot


@dataclass(frozen=True)
class Bar:
    node: str
    score: float | None      # None: not scored (refused), with ``reason``
    reason: str | None = None


def layer_bars(loc, layer_map) -> list[Bar]:
    """Every layer of the map in graph order: the scored ones with their score, the others
    (not editable, or refused by the localisation) with the reason."""
    scored = {a.layer.node: a.score for a in loc.in_graph_order}
    skipped = dict(loc.skipped)
    bars = []
    for layer in sorted(layer_map.layers, key=lambda l: l.node_index):
        if layer.node in scored:
            bars.append(Bar(layer.node, float(scored[layer.node])))
        elif layer.node in skipped:
            bars.append(Bar(layer.node, None, skipped[layer.node]))
        elif not layer.editable:
            bars.append(Bar(layer.node, None, layer.reason or "not editable"))
    return bars


def _score_axes(ax, bars: list[Bar], chosen: str | None, *, scores_label: str = "layer scored") -> None:
    plt = _pyplot()
    from matplotlib.patches import Patch

    xs = np.arange(len(bars))
    top = max([b.score for b in bars if b.score is not None] + [0.0]) or 1.0
    for x, b in zip(xs, bars):
        if b.score is None:
            ax.bar(x, top * 0.04, color="white", edgecolor=REFUSED, hatch="///", linewidth=0.8)
            ax.text(x, top * 0.06, "refused", rotation=90, ha="center", va="bottom", fontsize=6.5, color="#616161")
        else:
            ax.bar(x, b.score, color=CHOSEN if b.node == chosen else SCORED)
    ax.set_xticks(xs)
    ax.set_xticklabels([b.node for b in bars], rotation=45, ha="right", fontsize=7)
    for tick, b in zip(ax.get_xticklabels(), bars):
        if b.score is None:
            tick.set_color("#757575")
    ax.set_xlabel("layer (graph order)", fontsize=8)
    ax.set_ylabel("editability score G", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    handles = [Patch(color=SCORED, label=scores_label)]
    if chosen is not None:
        handles.insert(0, Patch(color=CHOSEN, label=f"chosen: {chosen}"))
    if any(b.score is None for b in bars):
        handles.append(Patch(facecolor="white", edgecolor=REFUSED, hatch="///", label="refused (reason below)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", frameon=False)
    ax.set_ylim(0, top * 1.25)
    del plt


def _reasons(bars: list[Bar], width: int = 110) -> str:
    import textwrap

    lines = [f"{b.node}: {b.reason}" for b in bars if b.score is None]
    out = []
    for line in lines:
        out += textwrap.wrap(line, width) or [""]
    return "\n".join(out)


def write_locate_plot(path, loc, layer_map, *, model_label: str) -> None:
    """Bar chart of the layers' editability scores in graph order: the chosen layer in
    red, refused layers hatched and named with their reason under the chart."""
    plt = _pyplot()
    bars = layer_bars(loc, layer_map)
    chosen = loc.chosen.layer.node if loc.chosen else None
    note = _reasons(bars)
    n_notes = note.count("\n") + 1 if note else 0
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(bars) + 2.0), 3.6 + 0.16 * n_notes), dpi=120)
    _score_axes(ax, bars, chosen)
    ax.set_title(f"editability of the layers of {model_title(model_label)}\n"
                 f"chosen: {chosen or 'none'} (IG {loc.steps} steps on {loc.target})", fontsize=9)
    fig.tight_layout()
    if note:
        fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.16 * n_notes / fig.get_figheight())
        fig.text(0.01, 0.01, note, fontsize=6.5, color="#424242", va="bottom", ha="left", family="monospace")
    _save(fig, path)


# -------------------------------------------------------------------------- edit --plot


@dataclass(frozen=True)
class PairView:
    """One given pair, before and after the edit (arrays shaped like one model input)."""

    corrupt: np.ndarray
    clean: np.ndarray
    attr_before: np.ndarray       # |IG| on the corrupted input, shipped model, for its predicted class
    attr_after: np.ndarray        # |IG| on the corrupted input, edited model, for its predicted class
    label_corrupt: str            # e.g. "class 0 (p 1.00)": the shipped model on the corrupted input
    label_clean: str              # the shipped model on the clean twin
    label_after: str              # the edited model on the corrupted input


@dataclass(frozen=True)
class Round:
    """Layer scores of one localisation round (node -> score) and the layer edited then."""

    scores: dict
    edited: str | None


def _image(x: np.ndarray):
    """An array to show: [H, W] (gray) or [H, W, 3]; None for non-image inputs."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 3:
        a = np.moveaxis(a, 0, -1)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if a.ndim == 3:
        return a.mean(0)
    if a.ndim == 2:
        return a
    return None


def _heat(attr: np.ndarray):
    a = np.abs(np.asarray(attr, dtype=np.float64))
    if a.ndim == 3:
        return a.sum(0)
    return a if a.ndim == 2 else None


def _share(attr: np.ndarray, region: np.ndarray) -> float | None:
    total = float(np.abs(attr).sum())
    return float(np.abs(attr)[region].sum()) / total if total > 0 and region.any() else None


def _box(region: np.ndarray):
    """Bounding box ((row0, row1), (col0, col1)) of the changed pixels, None when none."""
    r = region.any(0) if region.ndim == 3 else region
    if r.ndim != 2 or not r.any() or r.all():
        return None
    rows, cols = np.nonzero(r)
    return (int(rows.min()), int(rows.max())), (int(cols.min()), int(cols.max()))


def write_edit_plot(path, pairs: list[PairView], rounds: list[Round], layer_order: list[str], *,
                    model_label: str, summary: str) -> None:
    """Rows: for each of the first few given pairs, the corrupted and clean inputs and the
    input attribution of the corrupted input before and after the edit (one colour scale
    per row, so the two maps compare); last row: the layer scores of each localisation
    round (the layer edited in that round marked)."""
    import textwrap

    plt = _pyplot()
    n = len(pairs)
    image = n and _image(pairs[0].corrupt) is not None
    height = (2.4 if image else 1.7) * n + 3.2
    fig = plt.figure(figsize=(8.0, height), dpi=110)
    grid = fig.add_gridspec(n + 1, 4, height_ratios=[1.0] * n + [1.45], hspace=0.75, wspace=0.25)
    for i, p in enumerate(pairs):
        region = np.asarray(p.corrupt != p.clean)
        before, after = _share(p.attr_before, region), _share(p.attr_after, region)
        shares = ["" if s is None else f"\n{100 * s:.0f}% of it in the box" for s in (before, after)]
        titles = [f"corrupted input\nshipped: {p.label_corrupt}", f"clean twin\nshipped: {p.label_clean}",
                  f"attribution, shipped model{shares[0]}", f"attribution, edited model\nedited: {p.label_after}"
                  f"{shares[1]}"]
        axes = [fig.add_subplot(grid[i, j]) for j in range(4)]
        (_image_row if image else _curve_row)(axes, p, region, titles, i)
    _round_scores(fig.add_subplot(grid[n, :]), plt, rounds, layer_order)
    fig.suptitle(f"dynedit edit: {model_title(model_label)}\n" + "\n".join(textwrap.wrap(summary, 100)), fontsize=9)
    fig.subplots_adjust(top=1.0 - 1.15 / height, bottom=0.9 / height, left=0.09, right=0.98)
    _save(fig, path)


def _image_row(axes, p: PairView, region: np.ndarray, titles: list[str], i: int) -> None:
    """One pair as images: inputs in grey, attribution maps on one sqrt colour scale, the
    box where the pair differs drawn on each."""
    from matplotlib.colors import PowerNorm
    from matplotlib.patches import Rectangle

    hb, ha = _heat(p.attr_before), _heat(p.attr_after)
    vmax = max(float(hb.max()), float(ha.max()), 1e-12)
    box = _box(region)
    for j, (ax, (arr, cmap)) in enumerate(zip(axes, [(_image(p.corrupt), "gray"), (_image(p.clean), "gray"),
                                                     (hb, "magma"), (ha, "magma")])):
        # sqrt scale: a few strong pixels would otherwise leave the rest black
        kw = {"norm": PowerNorm(0.5, vmin=0.0, vmax=vmax)} if j >= 2 else {}
        ax.imshow(arr, cmap=cmap if arr.ndim == 2 else None, interpolation="nearest", **kw)
        if box is not None:  # where the pair differs
            (r0, r1), (c0, c1) = box
            ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False,
                                   edgecolor="#00bcd4", linewidth=1.0))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[j], fontsize=7)
        if j == 0:
            ax.set_ylabel(f"pair {i + 1}", fontsize=8)


def _curve_row(axes, p: PairView, region: np.ndarray, titles: list[str], i: int) -> None:
    """One pair as curves over the flattened input (inputs that are not images)."""
    for j, (ax, (arr, kind)) in enumerate(zip(axes, [(p.corrupt, "x"), (p.clean, "x"), (p.attr_before, "a"),
                                                     (p.attr_after, "a")])):
        ax.plot(np.asarray(arr, dtype=np.float64).reshape(-1), lw=0.8, color="#424242" if kind == "x" else CHOSEN)
        ax.set_title(titles[j], fontsize=7)
        ax.tick_params(labelsize=6)


def _round_scores(ax, plt, rounds: list[Round], layer_order: list[str]) -> None:
    """Grouped bars: each round's layer scores over the best of the round, in graph
    order, the layer edited in that round outlined."""
    if not rounds:
        ax.axis("off")
        ax.text(0.5, 0.5, "no localisation: the layers were pinned or nothing needed an edit",
                ha="center", va="center", fontsize=8)
        return
    xs = np.arange(len(layer_order))
    width = 0.8 / len(rounds)
    colours = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(rounds)))
    for r_i, rnd in enumerate(rounds):
        best = max([v for v in rnd.scores.values() if np.isfinite(v)] + [0.0]) or 1.0
        vals = [rnd.scores.get(node, np.nan) / best for node in layer_order]
        label = f"round {r_i + 1}" + (f": edited {rnd.edited}" if rnd.edited else ": no edit kept")
        pos = xs - 0.4 + width * (r_i + 0.5)
        ax.bar(pos, np.nan_to_num(vals), width, color=colours[r_i], label=label)
        if rnd.edited in layer_order:
            k = layer_order.index(rnd.edited)
            ax.bar(pos[k], np.nan_to_num(vals[k]), width, color=colours[r_i], edgecolor=CHOSEN, linewidth=1.6)
    ax.set_xticks(xs)
    ax.set_xticklabels(layer_order, rotation=30, ha="right", fontsize=7)
    ax.set_xlabel("layer (graph order)", fontsize=8)
    ax.set_ylabel("score / best of the round", fontsize=8)
    ax.set_ylim(0, 1.35)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, frameon=False, loc="upper left", ncol=min(len(rounds), 3))
    ax.set_title("layer scores of each localisation round (red outline: the layer edited in that round)",
                 fontsize=8)


__all__ = ["write_locate_plot", "write_edit_plot", "PairView", "Round", "layer_bars", "model_title"]
