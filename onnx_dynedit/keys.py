"""What a rank-one edit W' = W + u d^T does at one layer, in torch: the layer's keys
(its input, unfolded per output position for a Conv) and values arranged alike, the
output change u (d . k) and the forward hook that adds it (``Twin.applied``), and a
Conv's padding resolved as ONNX defines it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .layers import Layer, same_pads


def delta_hook(layer: Layer, u, d, device, view: str = "patch"):
    """A forward hook that adds the rank-one term u (d . k) to ``layer``'s output."""
    u = torch.as_tensor(u, dtype=torch.float32, device=device) if not torch.is_tensor(u) else u
    d = torch.as_tensor(d, dtype=torch.float32, device=device) if not torch.is_tensor(d) else d

    def hook(module, args, output):
        return output + layer_delta(layer, args[0], u, d, view)

    return hook


def layer_delta(layer: Layer, x: torch.Tensor, u: torch.Tensor, d: torch.Tensor, view: str = "patch") -> torch.Tensor:
    """The output change of ``layer`` for input ``x`` under W' = W + u d^T. ``u`` [C_out],
    or [B, C_out]: one u per input row (how the fit gets per-row Jacobians). A Conv edit
    in the ``pixel`` view (module ``pixel_view``) has u [C_out x taps] and d [C_in]."""
    rows = u.shape[0] if u.dim() == 2 else 1
    if view == "pixel":
        return pixel_delta(layer, x, u, d)
    if layer.op == "Conv":
        s = key_projection_conv(layer, x, d)  # [B, 1, *spatial]
        return s * u.to(s.dtype).view((rows, -1) + (1,) * (s.dim() - 2))
    s = x @ d.to(x.dtype)  # [B, ...]
    return s.unsqueeze(-1) * u.to(x.dtype).view((rows,) + (1,) * (s.dim() - 1) + (-1,))


def pixel_view(layer: Layer) -> tuple[int, int]:
    """(out, in) of a Conv's *pixel view*: keys are the input's channel vectors at one
    pixel (C_in wide) and W_pixel [C_out x taps, C_in] is the weight with each kernel tap
    a block of rows (weight [O, I, *kernel] -> [O, *kernel, I]). A rank-one edit there,
    dW[o, c, tap] = u[o, tap] d[c], applies one channel direction at every tap (the
    prior work's per-pixel formulation); in the patch view it has rank up to the number
    of taps (``patch_factors``)."""
    if layer.op != "Conv":
        raise ValueError(f"layer {layer.node!r} ({layer.op}) has no pixel view")
    return layer.shape[0] * int(np.prod(layer.shape[2:])), layer.shape[1]


def patch_factors(layer: Layer, u: np.ndarray, d: np.ndarray, view: str = "patch") -> list[tuple[np.ndarray, np.ndarray]]:
    """An edit as rank-one factors of the canonical (patch) space [out, in x taps]: itself,
    or for a pixel-view edit one factor per kernel tap (u[:, tap], d placed at that tap)."""
    if view == "patch":
        return [(u, d)]
    taps = int(np.prod(layer.shape[2:]))
    u = np.asarray(u, np.float64).reshape(layer.shape[0], taps)
    out = []
    for t in range(taps):
        dt = np.zeros((layer.shape[1], taps))
        dt[:, t] = d
        out.append((u[:, t].copy(), dt.reshape(-1)))
    return out


def pixel_keys(x: torch.Tensor) -> torch.Tensor:
    """Pixel-view keys of a Conv input [B, C, *spatial]: [B, pixels, C] (padding adds none)."""
    return x.flatten(2).transpose(1, 2)


def pixel_delta(layer: Layer, x: torch.Tensor, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Output change of a pixel-view edit: s = d . x at every pixel, then a conv of s with
    the kernel u [C_out, 1, *kernel] (the layer's padding, stride and dilation)."""
    if u.dim() == 2:
        raise RuntimeError("pixel-view edits take one u for every row")
    s = torch.einsum("bc...,c->b...", x, d.to(x.dtype)).unsqueeze(1)
    kernel = u.to(x.dtype).view((layer.shape[0], 1) + tuple(layer.shape[2:]))
    conv = F.conv1d if x.dim() == 3 else F.conv2d
    return conv(pad_input(layer, s), kernel, stride=layer.strides, dilation=layer.dilations)


def conv_pads(layer: Layer, spatial: tuple[int, ...]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] resolved for auto_pad."""
    n = len(spatial)
    if layer.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = [same_pads(size, k, s, dil, upper=layer.auto_pad == "SAME_UPPER")
                 for size, k, s, dil in zip(spatial, layer.kernel, layer.strides, layer.dilations)]
        return [b for b, _ in pairs] + [e for _, e in pairs]
    if layer.auto_pad == "VALID":
        return [0] * 2 * n
    return list(layer.pads) if layer.pads else [0] * 2 * n


def pad_input(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    pads = conv_pads(layer, tuple(x.shape[2:]))
    n = x.dim() - 2
    torch_pads = []
    for i in reversed(range(n)):
        torch_pads += [pads[i], pads[i + n]]
    return F.pad(x, torch_pads) if any(torch_pads) else x


def key_projection_conv(layer: Layer, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d . k for every output position's unfolded key k: a conv with kernel d."""
    xp = pad_input(layer, x)
    kernel = d.to(x.dtype).view((1,) + tuple(layer.shape[1:]))
    if x.dim() == 3:
        return F.conv1d(xp, kernel, stride=layer.strides, dilation=layer.dilations)
    return F.conv2d(xp, kernel, stride=layer.strides, dilation=layer.dilations)


def conv_windows(layer: Layer, xp: torch.Tensor) -> torch.Tensor:
    """A 2-D Conv's padded input ``xp`` [B, C, H, W] as its windows [B, OH, OW, C, kh, kw]:
    a view (no copy, any memory format) in which one position's key is one window, in
    unfold's order (channel, kernel rows, columns). Copying keys out of it is faster than
    unfold and than a gather with an index per key element, most of all from the twin's
    channels_last inputs (docs/results.md, speed section: twentieth session)."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    b, c, h, w = xp.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = xp.stride()
    return xp.as_strided((b, oh, ow, c, kh, kw), (s[0], s[2] * sh, s[3] * sw, s[1], s[2] * dh, s[3] * dw))


def layer_keys(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Keys of ``layer`` for its input ``x``: [B, P, in] (P positions; 1 for dense)."""
    if layer.op == "Conv":
        xp = pad_input(layer, x)
        if x.dim() == 3:  # 1-D conv as 2-D with height 1
            cols = F.unfold(xp.unsqueeze(2), (1, layer.kernel[0]), dilation=(1, layer.dilations[0]),
                            stride=(1, layer.strides[0]))
            return cols.transpose(1, 2)  # [B, P, in]
        win = conv_windows(layer, xp)
        b, oh, ow, c, kh, kw = win.shape
        return win.reshape(b, oh * ow, c * kh * kw)  # a copy: [B, P, in]
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def sampled_keys(layer: Layer, x: torch.Tensor, cap: int) -> torch.Tensor:
    """``layer_keys(layer, x)`` as rows [n, in], at most ``cap`` of them: with more (many
    conv positions), every k-th in (input, position) order, an even deterministic
    subsample. A 2-D Conv's kept keys are read from its padded input directly, so no
    position that is not kept is unfolded (VGG-16 at 240x240 keeps 1 in 225)."""
    if layer.op == "Conv" and x.dim() == 4:
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
        pads = conv_pads(layer, tuple(x.shape[2:]))
        oh = (x.shape[2] + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
        ow = (x.shape[3] + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
        if x.shape[0] * oh * ow > cap:  # padded only then: the unsampled keys below pad it themselves
            idx = _every_kth(x.shape[0] * oh * ow, cap, x.device)
            p = idx % (oh * ow)
            return conv_windows(layer, pad_input(layer, x))[idx // (oh * ow), p // ow, p % ow].reshape(len(idx), -1)
    keys = layer_keys(layer, x)
    b, p, dim = keys.shape
    if b * p <= cap:
        return keys.reshape(-1, dim)
    idx = _every_kth(b * p, cap, keys.device)
    return keys[idx // p, idx % p]


def _every_kth(n: int, cap: int, device) -> torch.Tensor:
    """Indices 0, k, 2k, ... below ``n`` with k = ceil(n / cap): at most ``cap`` of them."""
    return torch.arange(0, n, -(-n // cap), device=device)


def layer_values(layer: Layer, out: torch.Tensor) -> torch.Tensor:
    """Layer outputs arranged like ``layer_keys``: [B, P, out]."""
    if layer.op == "Conv":
        return out.flatten(2).transpose(1, 2)
    if out.dim() == 2:
        return out.unsqueeze(1)
    return out.reshape(out.shape[0], -1, out.shape[-1])
