"""Research on the colour-correlated spurious feature (issue 10): which kind of edit of the
resnet_colour sample's first conv can carry a confound that spans several input colours?

    python benchmarks/colour_variants.py [--pairs pairs5.npz]

Every variant edits the first conv only (its input is the image, so the confound enters
there) and is written into a copy of the ONNX file, measured with ONNX Runtime on the
held-out test sets: corrected = triggered test inputs (digits in another class's colour)
classified right; clean = grey test inputs; val = the case's val set.

Variants (d: key directions, u: values; C from the 200 stats inputs' keys, ridge 1e-2 as
the library's):
  patch rank r, local    the library's formulation: keys are 27-wide unfolded 3x3 patches,
                         W' = W + sum_j u_j d_j^T with d_j = C^-1 k*_j for the r top whitened
                         directions of the pairs' key differences and the u_j fitted by
                         least squares so that the layer's outputs on x~ match those on x
                         (the library's closed form for r = 1)
  pixel rank r, local    per-pixel keys (the 3 colour channels of one pixel), the direction
                         applied to every kernel tap: dW[o, c, tap] = sum_j U_j[o, tap] d_j[c]
                         (rank r in the [out x taps, in] view, up to 9 r in the patch view);
                         U fitted by least squares on the layer's outputs as above
  pixel rank r, output   the same directions, U fitted by L-BFGS on the network's logits on
                         the pairs (to the clean twins' logits) plus the locality term on 16
                         stats inputs (the library's output objective)
  luminance projection   not learnt from the pairs: every tap's 3 colour weights replaced by
                         their mean (W' = W P with P the projection onto grey): what a
                         colour-blind first conv gives (pixel rank 2), an upper bound
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASE = ROOT / "sample_models" / "resnet_colour"
RIDGE = 1e-2
LOCALITY = 16


def whitened_directions(keys: torch.Tensor, diffs: torch.Tensor, r: int) -> torch.Tensor:
    """[r, in]: d_j = C^-1 k*_j for the r top directions of the whitened key differences."""
    c = keys.T @ keys / len(keys)
    c += RIDGE * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    chol = torch.linalg.cholesky(c)
    diffs = diffs[diffs.norm(dim=1) > 1e-3 * diffs.norm(dim=1).max()]
    z = torch.linalg.solve_triangular(chol, diffs.T, upper=False).T
    a = torch.linalg.eigh(z.T @ z)[1][:, -r:]
    return torch.linalg.solve_triangular(chol.T, a, upper=True).T


def pixels(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class Stem:
    """The first conv of the model: its weight, padding, and the model with it replaced."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        node = next(n for n in model.graph.node if n.op_type == "Conv")
        self.name = node.input[1]
        self.w = torch.as_tensor(numpy_helper.to_array(next(i for i in model.graph.initializer
                                                            if i.name == self.name))).double()
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        self.pad = (pads[1], pads[3], pads[0], pads[2])  # F.pad order: left, right, top, bottom
        assert tuple(attrs.get("strides", [1, 1])) == (1, 1), "this study assumes a stride-1 stem"

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Unfolded keys [B * P, in * 9] (channel-major, then taps)."""
        cols = F.unfold(F.pad(x, self.pad), self.w.shape[2:])
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def values(self, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        out = F.conv2d(F.pad(x, self.pad), self.w if w is None else w)
        return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])

    def with_weight(self, w: torch.Tensor) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for init in m.graph.initializer:
            if init.name == self.name:
                init.CopyFrom(numpy_helper.from_array(w.float().numpy(), self.name))
        return m


def pixel_delta(stem: Stem, dirs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """dW [O, I, kh, kw] of a pixel edit: sum_j U_j[o, tap] d_j[c]; u [r, O, kh, kw]."""
    return torch.einsum("jokl,jc->ockl", u, dirs)


def pixel_local(stem: Stem, dirs: torch.Tensor, xc: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
    """Least-squares U for fixed pixel directions: the layer's outputs on x~ -> those on x."""
    s = torch.einsum("bchw,jc->bjhw", xc, dirs)                      # projections per pixel
    feats = stem.patches(s)                                           # [P, r * 9]
    target = stem.values(xk) - stem.values(xc)                        # [P, O]
    u = torch.linalg.lstsq(feats, target).solution                    # [r * 9, O]
    r, (o, _, kh, kw) = dirs.shape[0], stem.w.shape
    return pixel_delta(stem, dirs, u.T.reshape(o, r, kh, kw).permute(1, 0, 2, 3))


def patch_local(stem: Stem, dirs: torch.Tensor, xc: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
    feats = stem.patches(xc) @ dirs.T                                 # [P, r]
    target = stem.values(xk) - stem.values(xc)
    u = torch.linalg.lstsq(feats, target).solution                    # [r, O]
    return (u.T @ dirs).reshape(stem.w.shape)


def pixel_output(stem: Stem, twin, dirs: torch.Tensor, xc, xk, loc) -> torch.Tensor:
    """U by L-BFGS on the logits (pairs to the clean twins' logits, locality on ``loc``)."""
    layer = twin.layer_map.editable()[0]
    module = twin.module_of(layer)
    w0 = module.weight.detach().clone()
    with torch.no_grad():
        target, ref = twin.forward(xk.float()), twin.forward(loc.float())
    u = torch.zeros(dirs.shape[0], *stem.w.shape[:1], *stem.w.shape[2:], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([u], max_iter=300, line_search_fn="strong_wolfe")

    def run(x):
        module.weight.data = w0  # the edit goes in as a differentiable weight
        return F.conv2d(F.pad(x, stem.pad), w0 + pixel_delta(stem, dirs.float(), u), module.bias)

    def closure():
        opt.zero_grad()
        handle = module.register_forward_hook(lambda m, a, o: run(a[0]))
        try:
            loss = (F.mse_loss(twin.forward(xc.float()), target) / target.pow(2).mean()
                    + F.mse_loss(twin.forward(loc.float()), ref) / ref.pow(2).mean())
        finally:
            handle.remove()
        loss.backward()
        return loss

    opt.step(closure)
    return pixel_delta(stem, dirs, u.detach().double())


def accuracy(model: onnx.ModelProto, data) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return float((sess.run(None, {name: data["x"]})[0].argmax(1) == data["y"]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="pairs5.npz", help="pairs file of the resnet_colour case")
    args = ap.parse_args()
    from onnx_dynedit.io import load_model
    from onnx_dynedit.twin import Twin

    model = onnx.load(str(CASE / "model.onnx"))
    stem = Stem(model)
    data = {k: dict(np.load(CASE / f"{k}.npz")) for k in ("clean_test", "corrupt_test", "val")}
    pairs = np.load(CASE / args.pairs)
    stats = torch.as_tensor(np.load(CASE / "stats.npz")["x"]).double()
    xc, xk = torch.as_tensor(pairs["corrupt"]).double(), torch.as_tensor(pairs["clean"]).double()
    twin = Twin(load_model(CASE / "model.onnx"), "cpu")
    torch.manual_seed(0)

    def row(name, delta):
        m = model if delta is None else stem.with_weight(stem.w + delta)
        return (f"| {name} | {100 * accuracy(m, data['corrupt_test']):.2f} | {100 * accuracy(m, data['clean_test']):.2f} "
                f"| {100 * accuracy(m, data['val']):.2f} |")

    print(f"resnet_colour, {len(xc)} pairs ({args.pairs}); first conv {tuple(stem.w.shape)}\n")
    print("| variant (first conv only) | corrected % | clean (grey) % | val % |\n|---|---|---|---|")
    print(row("none (shipped model)", None))
    for r in (1, 2, 3, 4):
        dirs = whitened_directions(stem.patches(stats), stem.patches(xc) - stem.patches(xk), r)
        print(row(f"patch rank {r}, local", patch_local(stem, dirs, xc, xk)))
    for r in (1, 2, 3):
        dirs = whitened_directions(pixels(stats), pixels(xc) - pixels(xk), r)
        print(row(f"pixel rank {r}, local", pixel_local(stem, dirs, xc, xk)))
        print(row(f"pixel rank {r}, output + locality", pixel_output(stem, twin, dirs, xc, xk, stats[:LOCALITY])))
    grey = torch.full((3, 3), 1.0 / 3, dtype=torch.float64)
    print(row("luminance projection (not from the pairs)", torch.einsum("ockl,cd->odkl", stem.w, grey) - stem.w))


if __name__ == "__main__":
    main()
