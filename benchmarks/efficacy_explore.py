"""One repair, measured on the held-out test sets: the harness of the efficacy exploration.

    python benchmarks/efficacy_explore.py CASE PAIRS.npz ['{"augment": 64, ...}']

Runs ``edit_model`` (stats + val unless "_val": false / "_stats": false) with the given
RectifyConfig values, writes the ONNX model to a temporary folder and prints: clean
accuracy and "corrected" (share of corrupted test inputs now right; Trojans: labels other
than the target) before -> after, measured with ONNX Runtime, the accepted edits, the
degradation the loop saw, its stop reason and success, timings and the steps.
"_affine": true / "_gain": true replace the synthetic pairs by the per-element affine /
per-pair channel-gain transplant (the exploration before ``transplant`` existed in the
library; ``{"transplant": "affine"}`` is the same with the library's ridge 1e-4 instead
of 1e-3). One process per row; rows of the exploration table in docs/results.md.
"""
import sys, json, time, warnings, logging
warnings.filterwarnings("ignore")
from pathlib import Path
import numpy as np, onnxruntime as ort
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from onnx_dynedit.api import edit_model
import torch; torch.set_num_threads(1)
case, pf = sys.argv[1], sys.argv[2]
kw = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
use_val = kw.pop("_val", True); use_stats = kw.pop("_stats", True)
if kw.pop("_log", False): logging.basicConfig(level=logging.INFO)
if kw.pop("_affine", False):
    import onnx_dynedit.rectify as R
    def affine_pairs(corrupt, clean, pool, m, *, match=False, lam=1e-3, **_):
        n = len(corrupt)
        x = clean.reshape(n, -1).astype(np.float64); t = corrupt.reshape(n, -1).astype(np.float64)
        # per element: min sum_j (a x_j + b - t_j)^2 + lam n (a - 1)^2
        sx, sxx, st, sxt = x.sum(0), (x * x).sum(0), t.sum(0), (x * t).sum(0)
        L = lam * n
        # normal equations [[sxx+L, sx],[sx, n]] [a,b] = [sxt+L, st]
        det = (sxx + L) * n - sx * sx
        a = ((sxt + L) * n - sx * st) / det
        b = ((sxx + L) * st - sx * (sxt + L)) / det
        m = min(m, len(pool)); src = pool[len(pool) - m:]
        lo = min(float(corrupt.min()), float(clean.min())); hi = max(float(corrupt.max()), float(clean.max()))
        syn = np.clip(src.reshape(m, -1) * a + b, lo, hi).reshape(src.shape).astype(corrupt.dtype)
        return np.concatenate([corrupt, syn]), np.concatenate([clean, src.astype(clean.dtype)])
    R.transplant_pairs = affine_pairs
if kw.pop("_gain", False):
    import onnx_dynedit.rectify as R
    def gain_pairs(corrupt, clean, pool, m, *, match=False, **_):
        n, c = corrupt.shape[:2]
        num = (corrupt * clean).reshape(n, c, -1).sum(2); den = (clean * clean).reshape(n, c, -1).sum(2) + 1e-12
        g = num / den  # [n, c] per-pair channel gains
        syn, src = [], []
        for i in range(len(pool)):
            j = i % n
            sp = pool[i] * g[j][:, None, None]
            if np.abs(sp).sum() >= 0.5 * np.abs(pool[i]).sum():
                syn.append(np.clip(sp, 0, 1)); src.append(pool[i])
            if len(syn) >= m: break
        syn, src = np.array(syn, corrupt.dtype), np.array(src, clean.dtype)
        return np.concatenate([corrupt, syn]), np.concatenate([clean, src])
    R.transplant_pairs = gain_pairs
d = ROOT / "sample_models" / case
meta = json.loads((d / "meta.json").read_text())
ct, xt = np.load(d / "clean_test.npz"), np.load(d / "corrupt_test.npz")
def pred(p, x):
    s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]); return s.run(None, {"input": x})[0].argmax(1)
def figs(p):
    pc, px = pred(p, ct["x"]), pred(p, xt["x"]); y = ct["y"]
    sel = y != meta["target"] if "target" in meta else np.ones(len(y), bool)
    global ALLC
    ALLC = 100 * (px == y).mean()
    return 100 * (pc == y).mean(), 100 * (px[sel] == y[sel]).mean()
c0, k0 = figs(d / "model.onnx")
import tempfile
out = Path(tempfile.mkdtemp()) / f"{case}.onnx"
t = time.perf_counter()
o = edit_model(d / "model.onnx", d / pf, out, stats=d / "stats.npz" if use_stats else None, val=d / "val.npz" if use_val else None, device="cpu", **kw)
dt = time.perf_counter() - t
r = o.result
c1, k1 = figs(out) if o.output is not None else (c0, k0)
print(f"{case} {pf} {sys.argv[3] if len(sys.argv)>3 else '{}'}: clean {c0:.2f}->{c1:.2f} (drop {c0-c1:.2f}) corrected {k0:.2f}->{k1:.2f} corrupt_acc_all {ALLC:.2f} | edits {[e.layer.node for e in r.edits]} degr {r.degradation:.4f} ({r.degradation_kind}) stop '{r.stopped_because}' success {r.success} {dt:.1f}s", {k: round(v,1) for k,v in r.timings.items()}, "fit_losses", [ (s.node, s.accepted, round(s.gap_after,3), s.fixed_after) for s in r.steps])
