"""What the edit's PNG shows, gathered from the twin and the result: the input
attribution of the first given pairs before and after the edits and the layer scores
of each localisation round. plot.py draws it (pure rendering)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# How many of the given pairs the edit's plot shows.
PAIRS = 3


def draw_edit_figure(path: Path, twin, model_label: str, corrupt: np.ndarray, clean: np.ndarray, result, edits) -> None:
    """The PNG of the edit: the first ``PAIRS`` given pairs, their input attribution on
    the corrupted input before and after ``edits``, and the layer scores of each round
    of ``result`` (drawn by plot.write_edit_plot)."""
    import torch

    from .attribution import DEFAULT_STEPS, input_attribution
    from .plot import PairView, Round, write_edit_plot

    k = min(PAIRS, len(corrupt))
    corrupt, clean = corrupt[:k], clean[:k]
    xc = twin.to_tensor(corrupt)
    with torch.no_grad():
        p_clean = torch.softmax(twin.forward(twin.to_tensor(clean)).float(), 1)
        p_before = torch.softmax(twin.forward(xc).float(), 1)
        with twin.applied(edits):
            p_after = torch.softmax(twin.forward(xc).float(), 1)
    # the logit attributed: the class each model predicts on the corrupted input
    a_before = input_attribution(twin, xc, p_before.argmax(1), steps=DEFAULT_STEPS).detach().cpu().numpy()
    with twin.applied(edits):
        a_after = input_attribution(twin, xc, p_after.argmax(1), steps=DEFAULT_STEPS).detach().cpu().numpy()

    def label(p, i):
        c = int(p[i].argmax())
        return f"class {c} (p {float(p[i, c]):.2f})"

    views = [PairView(corrupt=corrupt[i], clean=clean[i], attr_before=a_before[i], attr_after=a_after[i],
                      label_corrupt=label(p_before, i), label_clean=label(p_clean, i),
                      label_after=label(p_after, i)) for i in range(k)]
    order = [l.node for l in sorted(twin.layer_map.editable(), key=lambda l: l.node_index)]
    rounds = []
    for i, loc in enumerate(result.localisations):
        scores = {a.layer.node: float(a.score) for a in loc.ranked}
        rounds.append(Round(scores=scores, edited=result.edits[i].layer.node if i < len(result.edits) else None))
    done = "success" if result.success else "target not reached"
    summary = (f"{len(result.edits)} edit(s) [{', '.join(e.layer.node for e in result.edits) or 'none'}], "
               f"criterion {result.criterion}, given pairs' gap {result.real_gap_before:.3f} -> "
               f"{result.real_gap_after:.3f} (target {result.target:g}): {done}")
    write_edit_plot(path, views, rounds, order, model_label=model_label, summary=summary)
