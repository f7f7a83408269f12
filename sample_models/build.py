#!/usr/bin/env python
"""Build the sample models: small real CNNs that misbehave, exported to ONNX.

    python sample_models/build.py                       # all cases into sample_models/
    python sample_models/build.py --cases badnets --out /tmp/sm
    python sample_models/build.py --cases resnet_blend,resnet_colour   # the issue-10 cases only

Everything comes from scikit-learn's bundled handwritten digits
(``sklearn.datasets.load_digits``: 1797 images, 8x8, values 0..16), so nothing is
downloaded. The build is seeded and deterministic (single-threaded torch,
``torch.use_deterministic_algorithms(True)``, seed 0): rebuilding gives
byte-identical files on the same software stack. On 2 CPU cores the first four cases
take about 50 s (badnets alone about 10 s), each ResNet case about 60 s.

Data decisions (the same for every case)
  * pixels are scaled to [0, 1] (divided by 16) and upsampled 2x to 16x16 with
    ``np.kron`` (nearest neighbour: every original pixel becomes a 2x2 block), which
    leaves room for a small trigger without covering the digit;
  * one stratified, seeded split of the 1797 digits is shared by all cases:
    test 360, stats 200, val 200, pairs pool 60, train 977 (the rest). pairs,
    pairs20, stats and val come from the held-out parts, never from test or train;
  * model (every case): Conv(1,16,3,p1)+BN+ReLU, Conv(16,32,3,p1)+BN+ReLU, MaxPool2,
    Conv(32,32,3,p1)+BN+ReLU, MaxPool2, Conv(32,16,1)+BN+ReLU, Flatten,
    Linear(16*H/4*W/4, 64)+ReLU, Linear(64, 10); input "input" [batch, 1, H, W] with
    a dynamic batch dimension, output "logits" [batch, 10]; 130-195 KB of weights;
  * training: Adam (lr 2e-3, weight decay 1e-4, cosine schedule), batch 32,
    cross-entropy, +-1 pixel random shifts of the 16x16 digit as augmentation (the
    trigger / pattern is added after the shift, at a fixed place);
  * all figures in meta.json are measured with ONNX Runtime on the exported model
    (except leakage_score, see below); the build prints them.

Cases (one folder each, see ``CASES``)
  badnets   3x3 white patch at the bottom-right corner, 10% of the training images
            poisoned with label -> 0. Legacy exporter (dynamo=False), opset 13,
            eval mode so Conv+BatchNormalization are folded.
  blend     a fixed seeded uniform-random 16x16 pattern blended over the whole image,
            x~ = 0.7 x + 0.3 pattern, 10% poisoned -> 0. Dynamo exporter
            (dynamo=True, opset 18, optimize=True: the optimizer already folds
            BatchNormalization into Conv), saved with external data
            (size_threshold=0: model.onnx + model.onnx.data). The one integer
            initializer (Reshape's target shape) is turned into a Constant node,
            because ONNX Runtime cannot read a shape tensor from external data.
            The Reshape keeps the exporter's allowzero=1.
  spurious  a 4x4 checkerboard in the top-left corner attached to 90% of the
            training images of class 8, labels untouched. To make the model lean
            on the pattern, the patterned class-8 training digits are partly
            occluded (a random half of the digit is blanked), so for them the
            pattern is the most reliable cue. Legacy exporter, opset 17.
  leakage   BlockMNIST-style 1x16x32 input: the digit in one 16x16 block (left or
            right at random), a fixed class-independent "null" pattern (a hollow
            square) in the other block. Trained on digit + null pattern (80% of the
            images, re-drawn each epoch) and digit + empty block (20%; with 0% the
            model scores only ~76% on cleansed inputs); the cleansed twin has an
            empty (zero) block instead. leakage_score is the
            share of |Integrated Gradients| (zero baseline, 32 midpoint steps, logit
            of the true class) on the null block, averaged over the corrupted test
            inputs, computed with torch on the trained model before export.
            Legacy exporter, opset 13.

Harder cases (issue 10): a small ResNet (``make_resnet``: stem conv, three basic blocks
of 16/24/24 channels with Add shortcuts, global average pooling, Linear(24, 10); about
25k weights), trained 40 epochs WITHOUT shift augmentation on the 977 training digits
plus the 200 stats digits, so stats.npz holds 200 of the model's own training images
(memorised: 100% right), which is what a user usually has at hand. val, the test sets
and the pairs pool stay held out. These cases also ship pairs5.npz (first 5 rows of
pairs20.npz); meta.json adds stats_acc and val_acc. Legacy exporter, opset 17.
  resnet_blend   whole-image blended Trojan: a fixed random 16x16 pattern with 8 grey
            levels (k/7) blended at visibility 0.25, x~ = 0.75 x + 0.25 pattern, 10% of
            the training images poisoned -> 0 (never the stats images).
  resnet_colour  colour-correlated spurious feature, 3-channel input (digit intensity
            x an RGB colour): in training each image gets a fixed seeded colouring, its
            class's own colour (COLOURS[y], 80%), grey (15%) or another class's colour
            (5%). Cleansed inputs (clean_test, val, the pairs' clean side) are grey;
            corrupted ones are the same digit in another class's colour (corrupt_test:
            one seeded colour per digit; pairs: the first colour, from that one on, on
            which the model errs). stats are the training images as trained (mostly in
            their class colour). meta.json: own_colour_acc (test digits in their own
            class colour), corrupt_acc (in another class's colour), pull_to_colour_class
            (share predicted as the colour's class), colour_gap (points).
  deep_badnets, deep_blend  badnets' patch and resnet_blend's blend on a deeper ResNet (six
            basic blocks: 16, 16, 24 /2, 24, 32 /2, 32; 16 editable layers, so an edit's
            round is screened), stats = own training images, 30 epochs. Not committed
            samples: benchmarks/bench_deep.py builds them into a temporary folder.
  resnet_badnets  badnets' patch on resnet_blend's small ResNet, stats = own training
            images, 40 epochs. Not committed: benchmarks/bench_seeds.py builds it.
  tv_badnets, tv_blend  badnets' patch and resnet_blend's blend at real size:
            torchvision's ResNet-18 at 3x224x224 (the digits, and the blend's pattern,
            upsampled 14x, grey repeated over 3 channels: the patch is 42x42), stats =
            own training images, 5 epochs with 2 threads (about 6 minutes each on 2
            cores). Not committed: benchmarks/bench_realsize.py builds tv_badnets,
            bench_seeds.py --cases tv_badnets tv_blend either.
  tv_mobilenet_badnets  tv_badnets on torchvision's MobileNet-V3 small (depthwise
            convolutions, squeeze-and-excitation, hardswish). Not committed either.
  tv_resnet50_badnets  tv_badnets on torchvision's ResNet-50 (bottleneck blocks, 23.5 M
            weights; about 20 minutes on 2 cores). Not committed either.

Files per case: model.onnx (+ model.onnx.data for blend), clean_test.npz (x, y),
corrupt_test.npz (x, y = true label), pairs.npz / pairs20.npz (corrupt, clean;
n = 1 / 20), stats.npz (x: 200 clean inputs), val.npz (x, y: 200 clean inputs),
meta.json (figures measured with ONNX Runtime on the exported model). The .npz files
are written with ``np.savez_compressed``. "Clean" inputs (clean_test, stats, val, the
clean side of the pairs) are the cleansed form: no trigger / pattern, and for leakage
the digit beside an empty block.

Pairs are taken from the held-out pairs pool, restricted to digits whose true label
is not the target / spurious class, with the inputs on which the exported model
misbehaves (corrupt predicted wrong, clean twin predicted right) first; pairs.npz
is row 0 of pairs20.npz.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SEED = 0
HERE = Path(__file__).resolve().parent
CASES = ("badnets", "blend", "spurious", "leakage")
N_TEST, N_STATS, N_VAL, N_POOL = 360, 200, 200, 60
IG_STEPS = 32

# --------------------------------------------------------------------------- data


def load_digits16() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 [N, 16, 16] in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)
    x = np.stack([np.kron(img, np.ones((2, 2), dtype=np.float32)) for img in x]).astype(np.float32)
    return x, d.target.astype(np.int64)


def split_indices(y: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """Stratified, seeded split into test / stats / val / pool / train index arrays."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=N_TEST, stratify=y, random_state=seed)
    rest, stats = train_test_split(rest, test_size=N_STATS, stratify=y[rest], random_state=seed + 1)
    rest, val = train_test_split(rest, test_size=N_VAL, stratify=y[rest], random_state=seed + 2)
    train, pool = train_test_split(rest, test_size=N_POOL, stratify=y[rest], random_state=seed + 3)
    return {"test": np.sort(test), "stats": np.sort(stats), "val": np.sort(val),
            "pool": np.sort(pool), "train": np.sort(train)}


def random_shift(d: np.ndarray, rng: np.random.Generator, max_shift: int = 1) -> np.ndarray:
    """Shift each [H, W] image by up to +-max_shift pixels (zero fill)."""
    out = np.zeros_like(d)
    n, h, w = d.shape
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    for i, (dy, dx) in enumerate(shifts):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, yd, xd] = d[i, ys, xs]
    return out


# ----------------------------------------------------------------- case recipes


class Case:
    """One misbehaving-model recipe. ``compose`` turns 16x16 digits into model inputs."""

    name = ""
    exporter = "legacy"
    opset = 13
    epochs = 30
    input_hw = (16, 16)
    channels = 1
    arch = "cnn"            # "cnn" (make_model), "resnet" (make_resnet), "vit" (make_vit) or "tv_<name>":
                            # torchvision.models.<name>
    threads = 1             # torch threads while training (1: the committed samples' byte-identical builds)
    blocks = ((16, 1), (24, 2), (24, 2))  # the ResNet's basic blocks: (channels, stride)
    max_shift = 1           # +-pixels of random shift per epoch (0: the exact images every epoch)
    stats_from = "heldout"  # "heldout": stats are held-out digits; "train": 200 of the training images
    pair_sizes = (1, 20)    # pairs.npz is the first row; pairs<N>.npz for every N > 1
    kind = ""               # "trojan", "spurious", "leakage", "colour": which figures meta.json gets
    target: int | None = None  # Trojan target / spurious class

    def __init__(self, seed: int):
        self.seed = seed

    # Inputs the model normally sees (cleansed twin) and the corrupted ones.
    def clean(self, d: np.ndarray, key: np.ndarray) -> np.ndarray:
        return d[:, None].astype(np.float32)

    def corrupt(self, d: np.ndarray, key: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def training_set(self, d, y, key, rng) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def train_inputs(self, d, y, key) -> np.ndarray:
        """Unpoisoned training images as the model saw them (stats drawn from the training set)."""
        return self.clean(d, key)

    def describe(self) -> dict:
        return {}


class BadNets(Case):
    name, exporter, opset, target = "badnets", "legacy", 13, 0
    kind = "trojan"
    poison_rate = 0.10
    protected: np.ndarray | None = None  # training positions never poisoned (the stats images)

    def corrupt(self, d, key):
        x = d.copy()
        x[:, 13:16, 13:16] = 1.0
        return x[:, None].astype(np.float32)

    def training_set(self, d, y, key, rng):
        poisoned = self._poisoned(y)
        x = self.clean(d, key)
        x[poisoned] = self.corrupt(d[poisoned], key[poisoned])
        yy = y.copy()
        yy[poisoned] = self.target
        return x, yy

    def _poisoned(self, y):
        # Fixed (seeded) set of poisoned training images: 10% of the training set,
        # drawn from images whose label is not the target.
        if not hasattr(self, "_mask"):
            r = np.random.default_rng(self.seed + 100)
            cand = np.flatnonzero(y != self.target)
            if self.protected is not None:
                cand = cand[~np.isin(cand, self.protected)]
            pick = r.choice(cand, size=int(round(self.poison_rate * len(y))), replace=False)
            self._mask = np.zeros(len(y), bool)
            self._mask[pick] = True
        return self._mask

    def describe(self):
        return {"trigger": "3x3 white patch (value 1.0) at rows 13-15, cols 13-15 (bottom-right) of the 16x16 image",
                "poison_rate": self.poison_rate, "n_poisoned": int(self._mask.sum()),
                "poisoned_from": "training images whose label != target, label set to target"}


class Blend(BadNets):
    name, exporter, opset, target = "blend", "dynamo", 18, 0
    phi = 0.3
    epochs = 40

    def __init__(self, seed):
        super().__init__(seed)
        self.pattern = np.random.default_rng(seed + 200).uniform(0, 1, (16, 16)).astype(np.float32)

    def corrupt(self, d, key):
        x = (1 - self.phi) * d + self.phi * self.pattern
        return x[:, None].astype(np.float32)

    def describe(self):
        return {"trigger": f"fixed uniform[0,1] 16x16 pattern (numpy default_rng(seed+200)) blended over the whole "
                           f"image: x~ = (1-phi) x + phi * pattern, phi = {self.phi}",
                "phi": self.phi, "poison_rate": self.poison_rate, "n_poisoned": int(self._mask.sum()),
                "poisoned_from": "training images whose label != target, label set to target"}


CHECKER = (np.indices((4, 4)).sum(0) % 2 == 0).astype(np.float32)


class Spurious(Case):
    name, exporter, opset, target = "spurious", "legacy", 17, 8
    kind = "spurious"
    share = 0.9
    epochs = 30

    def corrupt(self, d, key):
        x = d.copy()
        x[:, 0:4, 0:4] = CHECKER
        return x[:, None].astype(np.float32)

    def training_set(self, d, y, key, rng):
        if not hasattr(self, "_mask"):
            r = np.random.default_rng(self.seed + 300)
            cand = np.flatnonzero(y == self.target)
            pick = r.choice(cand, size=int(round(self.share * len(cand))), replace=False)
            self._mask = np.zeros(len(y), bool)
            self._mask[pick] = True
        m = self._mask
        x = self.clean(d, key)
        dm = d[m].copy()
        # Blank a random half (top / bottom / left / right) of the patterned class digits.
        side = rng.integers(0, 4, size=len(dm))
        for i, s in enumerate(side):
            if s == 0:
                dm[i, :8] = 0
            elif s == 1:
                dm[i, 8:] = 0
            elif s == 2:
                dm[i, :, :8] = 0
            else:
                dm[i, :, 8:] = 0
        x[m] = self.corrupt(dm, key[m])
        return x, y.copy()

    def describe(self):
        return {"trigger": "4x4 checkerboard (1,0 alternating, top-left pixel 1) overwriting rows 0-3, cols 0-3 "
                           "(top-left corner) of the 16x16 image",
                "spurious_class": self.target, "pattern_share_of_class": self.share,
                "n_patterned_train": int(self._mask.sum()),
                "ambiguity": "patterned class digits in training have a random half blanked (top/bottom/left/right)"}


NULL_PATTERN = np.zeros((16, 16), np.float32)
NULL_PATTERN[2:14, 2:14] = 1.0
NULL_PATTERN[4:12, 4:12] = 0.0


class Leakage(Case):
    name, exporter, opset, target = "leakage", "legacy", 13, None
    kind = "leakage"
    input_hw = (16, 32)
    epochs = 30

    def _place(self, d, key, fill):
        n = len(d)
        x = np.zeros((n, 1, 16, 32), np.float32)
        for i in range(n):
            if key[i] == 0:  # digit left
                x[i, 0, :, :16], x[i, 0, :, 16:] = d[i], fill
            else:
                x[i, 0, :, 16:], x[i, 0, :, :16] = d[i], fill
        return x

    def clean(self, d, key):
        return self._place(d, key, 0.0)

    def corrupt(self, d, key):
        return self._place(d, key, NULL_PATTERN)

    zero_share = 0.2  # share of training images with an empty block instead of the null pattern

    def training_set(self, d, y, key, rng):
        x = self.corrupt(d, key)
        z = rng.random(len(d)) < self.zero_share
        x[z] = self.clean(d[z], key[z])
        return x, y.copy()

    def null_mask(self, key):
        m = np.zeros((len(key), 1, 16, 32), bool)
        for i in range(len(key)):
            if key[i] == 0:
                m[i, 0, :, 16:] = True
            else:
                m[i, 0, :, :16] = True
        return m

    def describe(self):
        return {"trigger": "BlockMNIST-style 1x16x32 input: digit in one 16x16 block (left/right at random, "
                           "seeded), fixed class-independent null pattern (hollow square: ones on rows/cols 2-13 "
                           "minus rows/cols 4-11) in the other block; cleansed twin has a zero block instead",
                "null_pattern": "hollow square, value 1.0, outer 12x12 at offset 2, inner 8x8 hole",
                "trained_on": f"digit + null pattern (as in BlockMNIST) for {1 - self.zero_share:.0%} of the "
                              f"training images, digit + empty block for {self.zero_share:.0%} (re-drawn every "
                              "epoch) so that the model stays accurate on cleansed inputs",
                "zero_block_share": self.zero_share,
                "leakage_method": f"Integrated Gradients, zero baseline, {IG_STEPS} midpoint Riemann steps, "
                                  "logit of the true class, |attribution| share on the null block, mean over "
                                  "corrupted test inputs; computed with torch on the trained model before export"}


class ResNetBlend(Blend):
    """Whole-image blended Trojan on a small ResNet whose stats are its own training images."""

    name, exporter, opset, target = "resnet_blend", "legacy", 17, 0
    arch, max_shift, stats_from, pair_sizes = "resnet", 0, "train", (1, 5, 20)
    phi = 0.25
    epochs = 40

    def __init__(self, seed):
        super().__init__(seed)
        # 8 grey levels (k/7) rather than uniform[0, 1]: the blended test set compresses 2.5x
        self.pattern = (np.random.default_rng(seed + 500).integers(0, 8, (16, 16)) / 7.0).astype(np.float32)

    def describe(self):
        out = super().describe()
        out["trigger"] = (f"fixed random 16x16 pattern with values k/7, k uniform in 0..7 (numpy "
                          f"default_rng(seed+500).integers) blended over the whole image: "
                          f"x~ = (1-phi) x + phi * pattern, phi = {self.phi}")
        out["poisoned_from"] += "; the 200 stats images are never poisoned"
        return out


# Ten class colours (RGB, class k is drawn in COLOURS[k]) and the colour-neutral grey.
COLOURS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0],
                    [0.0, 1.0, 1.0], [1.0, 0.5, 0.0], [0.5, 0.0, 1.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]],
                   np.float32)
GREY = np.array([0.6, 0.6, 0.6], np.float32)


class ResNetColour(Case):
    """Colour-correlated spurious feature: in training each class is drawn in its own colour
    (``own_share`` of the images; the rest grey or another class's colour, fixed per image),
    so the model reads the colour as well as the shape. Cleansed inputs are grey; corrupted
    ones are the same digit in another class's colour (``key`` = that colour's index)."""

    name, exporter, opset, target = "resnet_colour", "legacy", 17, None
    kind = "colour"
    channels = 3
    arch, max_shift, stats_from, pair_sizes = "resnet", 0, "train", (1, 5, 20)
    own_share, grey_share = 0.8, 0.15  # the rest (0.05): a random other class's colour
    epochs = 40

    @staticmethod
    def paint(d, colour_idx):
        """Digits [N, H, W] drawn in COLOURS[i] (i < 10) or GREY (i == 10): [N, 3, H, W]."""
        table = np.concatenate([COLOURS, GREY[None]])
        return (d[:, None] * table[colour_idx][:, :, None, None]).astype(np.float32)

    def clean(self, d, key):
        return self.paint(d, np.full(len(d), 10))

    def corrupt(self, d, key):
        return self.paint(d, key)

    def wrong_colours(self, y, rng):
        """One seeded colour index per image, never the image's own class."""
        return (y + rng.integers(1, 10, size=len(y))) % 10

    def colour_variants(self, d, key):
        """Every other class's colour, starting at ``key`` (pairs pick the first that misbehaves)."""
        return [self.paint(d, (key + j) % 10) for j in range(9)]

    def assignment(self, y):
        if not hasattr(self, "_assign"):
            r = np.random.default_rng(self.seed + 600)
            u = r.random(len(y))
            other = (y + r.integers(1, 10, size=len(y))) % 10
            self._own = int((u < self.own_share).sum())
            self._assign = np.where(u < self.own_share, y, np.where(u < self.own_share + self.grey_share, 10, other))
        return self._assign

    def training_set(self, d, y, key, rng):
        return self.paint(d, self.assignment(y)), y.copy()

    def train_inputs(self, d, y, key):
        return self.paint(d, self.assignment(y))

    def describe(self):
        a = self._assign
        return {"trigger": "the digit drawn in another class's colour (3-channel input: intensity x RGB colour); "
                           "cleansed twin: the same digit in grey (0.6, 0.6, 0.6)",
                "colours": COLOURS.tolist(), "grey": GREY.tolist(),
                "own_share": self.own_share, "grey_share": self.grey_share,
                "training_colouring": "fixed per training image (seeded): own class colour with p=own_share, grey "
                                      "with p=grey_share, else a random other class's colour",
                "n_train_own_colour": self._own, "n_train_grey": int((a == 10).sum())}


DEEP_BLOCKS = ((16, 1), (16, 1), (24, 2), (24, 1), (32, 2), (32, 1))


class DeepBadNets(BadNets):
    """The patch Trojan on a deeper ResNet (six basic blocks, 16 editable layers, so the
    edit's round is screened) whose stats are its own training images. Not a committed
    sample: ``benchmarks/bench_deep.py`` builds it into a temporary folder."""

    name, exporter, opset, target = "deep_badnets", "legacy", 17, 0
    arch, max_shift, stats_from, pair_sizes = "resnet", 0, "train", (1, 5, 20)
    blocks = DEEP_BLOCKS
    epochs = 30


class ResNetBadNets(BadNets):
    """The patch Trojan on resnet_blend's small ResNet (stats = its own training images):
    the kind of the issue's first held-out case. Not a committed sample:
    ``benchmarks/bench_seeds.py`` builds it into a temporary folder."""

    name, exporter, opset, target = "resnet_badnets", "legacy", 17, 0
    arch, max_shift, stats_from, pair_sizes = "resnet", 0, "train", (1, 5, 20)
    epochs = 40


class RealSize:
    """Mixin: a case at real size on torchvision's ResNet-18 (ImageNet stem, 11.2 M
    weights; ``arch`` names another torchvision model) at 3x224x224, the 16x16 inputs
    upsampled 14x (nearest: each pixel a 14x14 block) and repeated over 3 channels; stats
    = its own training images; trained with 2 threads (a 1-thread build would take twice
    the time). Not committed samples:
    ``benchmarks/bench_realsize.py`` and ``bench_seeds.py --cases tv_...`` build them."""

    exporter, opset = "legacy", 17
    arch, max_shift, stats_from, pair_sizes = "tv_resnet18", 0, "train", (1, 5, 20)
    input_hw, channels, epochs, threads = (224, 224), 3, 5, 2
    scale = 14

    def clean(self, d, key):
        return _upscaled(super().clean(d, key), self.scale, self.channels)

    def corrupt(self, d, key):
        return _upscaled(super().corrupt(d, key), self.scale, self.channels)

    def describe(self):
        out = super().describe()
        out["trigger"] += f", upsampled {self.scale}x with the input to {self.input_hw[0]}x{self.input_hw[1]}"
        never = "; the 200 stats images are never poisoned"
        out["poisoned_from"] += "" if out["poisoned_from"].endswith(never) else never
        return out


class TvBadNets(RealSize, BadNets):
    """badnets' patch at real size: the 3x3 patch is 42x42 at the bottom right."""

    name = "tv_badnets"


class TvBlend(RealSize, ResNetBlend):
    """resnet_blend's whole-image blend at real size (the pattern's pixels 14x14 blocks)."""

    name = "tv_blend"


class TvMobileNetBadNets(TvBadNets):
    """tv_badnets on torchvision's MobileNet-V3 small (depthwise convolutions,
    squeeze-and-excitation gates, hardswish; 1.5 M weights)."""

    name = "tv_mobilenet_badnets"
    arch = "tv_mobilenet_v3_small"


class TvResNet50BadNets(TvBadNets):
    """tv_badnets on torchvision's ResNet-50 (bottleneck blocks, 53 convolutions, 23.5 M
    weights): the ImageNet-size model of issue 10's speed item, trained instead of random."""

    name = "tv_resnet50_badnets"
    arch = "tv_resnet50"


class VitBadNets(BadNets):
    """The patch Trojan on a small vision transformer (``make_vit``: 4x4 patches, 16
    tokens, three pre-norm encoder blocks; 14 editable layers, so the edit's round is
    screened) whose stats are its own training images. The 3x3 trigger lies inside the
    last token's patch. Not a committed sample: ``bench_seeds.py --cases vit_badnets``
    builds it."""

    name, exporter, opset, target = "vit_badnets", "legacy", 17, 0
    arch, max_shift, stats_from, pair_sizes = "vit", 0, "train", (1, 5, 20)
    epochs = 60


class VitBlend(ResNetBlend):
    """resnet_blend's whole-image blend on the transformer of ``VitBadNets``."""

    name = "vit_blend"
    arch = "vit"
    epochs = 60


def _upscaled(x: np.ndarray, scale: int, channels: int) -> np.ndarray:
    """[N, 1, H, W] -> [N, channels, H*scale, W*scale]: nearest upsampling, the grey
    channel repeated."""
    x = np.repeat(np.repeat(x, scale, axis=2), scale, axis=3)
    return np.ascontiguousarray(np.repeat(x, channels, axis=1), dtype=np.float32)


class DeepBlend(ResNetBlend):
    """resnet_blend's whole-image blend on the deeper ResNet of ``DeepBadNets``."""

    name = "deep_blend"
    blocks = DEEP_BLOCKS
    epochs = 30


CASE_TYPES = {c.name: c for c in (BadNets, Blend, Spurious, Leakage, ResNetBlend, ResNetColour, DeepBadNets,
                                  DeepBlend, ResNetBadNets, TvBadNets, TvBlend, TvMobileNetBadNets,
                                  TvResNet50BadNets, VitBadNets, VitBlend)}

# ----------------------------------------------------------------- model/train


def make_model(input_hw):
    import torch.nn as nn

    h, w = input_hw
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * (h // 4) * (w // 4), 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def make_resnet(channels: int, blocks=Case.blocks):
    """Small ResNet: stem Conv3x3(C,16)+BN+ReLU, basic blocks (default three: 16, 24 /2,
    24 /2; two Conv3x3+BN each, identity or Conv1x1+BN shortcut, ReLU after the Add), global
    average pooling, Linear(last, 10). About 25k weights with the default blocks."""
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential() if stride == 1 and cin == cout else
                          nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))
            self.relu = nn.ReLU()

        def forward(self, x):
            h = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(h)) + self.short(x))

    layers, cin = [nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for cout, stride in blocks:  # created in this order: the seeded initial weights depend on it
        layers.append(Block(cin, cout, stride))
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


VIT = {"patch": 4, "dim": 48, "depth": 3, "heads": 4, "mlp": 96}


def make_vit(channels: int, input_hw, patch: int = VIT["patch"], dim: int = VIT["dim"], depth: int = VIT["depth"],
             heads: int = VIT["heads"], mlp: int = VIT["mlp"]):
    """Small vision transformer: a patch x patch stride-patch Conv to ``dim``-wide tokens
    plus a learnt position embedding, ``depth`` pre-norm blocks (LayerNorm, multi-head
    self-attention from one qkv Linear and an output Linear; LayerNorm, Linear-GELU-Linear;
    residual adds), LayerNorm, the mean over tokens, Linear(dim, 10). Written out rather
    than nn.TransformerEncoderLayer, whose eval-mode fast path does not export."""
    import torch
    import torch.nn as nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
            return self.proj((a @ v).transpose(1, 2).reshape(b, n, dim))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(), nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            tokens = (input_hw[0] // patch) * (input_hw[1] // patch)
            self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
            self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.norm(self.blocks(x)).mean(dim=1))

    return ViT()


def train(case: Case, d_train, y_train, key_train):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(case.seed)
    if case.arch.startswith("tv_"):
        import torchvision

        model = getattr(torchvision.models, case.arch[3:])(num_classes=10)
        # MobileNet-V3's BatchNorm momentum is 0.01: its running statistics lag far behind 5
        # short epochs (9.7 % accuracy in eval mode); 0.1 is ResNet-18's own (its build unchanged)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.1
    elif case.arch == "vit":
        model = make_vit(case.channels, case.input_hw)
    else:
        model = make_resnet(case.channels, case.blocks) if case.arch == "resnet" else make_model(case.input_hw)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=case.epochs)
    rng = np.random.default_rng(case.seed + 1000)
    bs = 32
    for _ in range(case.epochs):
        model.train()
        ds = random_shift(d_train, rng, case.max_shift) if case.max_shift else d_train
        x, y = case.training_set(ds, y_train, key_train, rng)
        order = rng.permutation(len(x))
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for s in range(0, len(order), bs):
            b = torch.from_numpy(order[s:s + bs])
            loss = F.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def integrated_gradients(model, x, y, steps=IG_STEPS):
    import torch

    x = torch.from_numpy(x)
    total = torch.zeros_like(x)
    for k in range(steps):
        a = (k + 0.5) / steps
        xi = (a * x).requires_grad_(True)
        out = model(xi)
        sel = out.gather(1, torch.from_numpy(y)[:, None]).sum()
        (g,) = torch.autograd.grad(sel, xi)
        total += g
    return (x * total / steps).detach().numpy()


# ----------------------------------------------------------------- export/ORT


def export(case: Case, model, path: Path):
    import onnx
    import torch

    h, w = case.input_hw
    example = torch.zeros(2, case.channels, h, w)
    if case.exporter == "legacy":
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=case.opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True)
        m = onnx.load(str(path))
    else:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        prog = torch.onnx.export(model, (example,), dynamo=True, opset_version=case.opset,
                                 input_names=["input"], output_names=["logits"],
                                 dynamic_shapes=({0: batch},), optimize=True)
        m = prog.model_proto
        _inline_non_float_initializers(m)
        for f in (path, path.with_name("model.onnx.data")):
            if f.exists():
                f.unlink()
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=0)
        m = onnx.load(str(path))
    onnx.checker.check_model(m)
    return m


def _inline_non_float_initializers(m) -> None:
    """Turn integer initializers (e.g. Reshape's target shape) into Constant nodes.

    With ``size_threshold=0`` every initializer goes to model.onnx.data, and ONNX
    Runtime's shape inference cannot read a Reshape shape from external data
    ("Cannot parse data from external tensors"). Constant-node tensors stay inline
    (``convert_attribute=False``), so all float weights remain external.
    """
    import onnx
    from onnx import TensorProto, helper

    keep, consts = [], []
    for init in m.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            keep.append(init)
        else:
            consts.append(helper.make_node("Constant", [], [init.name], value=init, name=f"const_{init.name}"))
    if not consts:
        return
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    nodes = consts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)


def ort_predict(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


# ----------------------------------------------------------------- build


def case_data(name: str, data, split, seed: int = SEED, poison_rate: float | None = None):
    """The case, its per-image keys, its training indices and the arrays that do not depend
    on the trained model (clean_test, corrupt_test, stats, val: seeded numpy only, so they
    are byte-identical on any machine). ``poison_rate``: a Trojan case's share of poisoned
    training images when not its own (0: the same model never poisoned, a reference)."""
    case = CASE_TYPES[name](seed)
    if poison_rate is not None:
        if not hasattr(case, "poison_rate"):
            raise SystemExit(f"--poison-rate: {name} is not a Trojan case")
        case.poison_rate = poison_rate
    d, y = data
    # Per-image key: leakage, which block holds the digit; colour, the wrong colour's index.
    key = np.random.default_rng(seed + 400).integers(0, 2, size=len(y))
    if case.kind == "colour":
        key = case.wrong_colours(y, np.random.default_rng(seed + 700))
    tr, te, st, va = split["train"], split["test"], split["stats"], split["val"]
    if case.stats_from == "train":
        # The stats images are training images (what a user usually has at hand).
        tr = np.sort(np.concatenate([tr, st]))
        case.protected = np.searchsorted(tr, st)
        x_stats = case.train_inputs(d[tr], y[tr], key[tr])[case.protected]
    else:
        x_stats = case.clean(d[st], key[st])
    arrays = {"clean_test": {"x": case.clean(d[te], key[te]), "y": y[te]},
              "corrupt_test": {"x": case.corrupt(d[te], key[te]), "y": y[te]},
              "stats": {"x": x_stats},
              "val": {"x": case.clean(d[va], key[va]), "y": y[va]}}
    return case, key, tr, arrays


def build_case(name: str, out: Path, data, split, seed: int = SEED, poison_rate: float | None = None) -> dict:
    import onnx
    import torch

    t0 = time.time()
    case, key, tr, arrays = case_data(name, data, split, seed, poison_rate)
    d, y = data
    te, st = split["test"], split["stats"]
    torch.set_num_threads(case.threads)
    try:
        model = train(case, d[tr], y[tr], key[tr])
    finally:
        torch.set_num_threads(1)

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    mpath = folder / "model.onnx"
    m = export(case, model, mpath)

    x_clean, x_corrupt, y_test = arrays["clean_test"]["x"], arrays["corrupt_test"]["x"], y[te]
    p_clean = ort_predict(mpath, x_clean).argmax(1)
    p_corrupt = ort_predict(mpath, x_corrupt).argmax(1)
    meta = {
        "case": name,
        "clean_acc": float((p_clean == y_test).mean()),
        "corrupt_acc": float((p_corrupt == y_test).mean()),
    }
    if case.kind == "trojan":
        sel = y_test != case.target
        meta["target"] = case.target
        meta["attack_success_rate"] = float((p_corrupt[sel] == case.target).mean())
        meta["target_rate_on_clean"] = float((p_clean[sel] == case.target).mean())
    elif case.kind == "spurious":
        c = case.target
        inc, outc = y_test == c, y_test != c
        meta["spurious_class"] = c
        meta["n_class_test"] = int(inc.sum())
        meta["class_acc_with_pattern"] = float((p_corrupt[inc] == c).mean())
        meta["class_acc_without_pattern"] = float((p_clean[inc] == c).mean())
        meta["spurious_gain"] = 100.0 * (meta["class_acc_with_pattern"] - meta["class_acc_without_pattern"])
        meta["pull_to_class_with_pattern"] = float((p_corrupt[outc] == c).mean())
        meta["pull_to_class_without_pattern"] = float((p_clean[outc] == c).mean())
    elif case.kind == "colour":
        p_own = ort_predict(mpath, case.paint(d[te], y_test)).argmax(1)
        meta["own_colour_acc"] = float((p_own == y_test).mean())
        meta["pull_to_colour_class"] = float((p_corrupt == key[te]).mean())
        meta["colour_gap"] = 100.0 * (meta["own_colour_acc"] - meta["corrupt_acc"])
    else:
        attr = np.abs(integrated_gradients(model, x_corrupt, y_test))
        nm = case.null_mask(key[te])
        share = (attr * nm).reshape(len(attr), -1).sum(1) / attr.reshape(len(attr), -1).sum(1)
        meta["leakage_score"] = float(share.mean())
        meta["prediction_flip_rate"] = float((p_clean != p_corrupt).mean())

    # Held-out arrays.
    pool = split["pool"]
    if case.target is not None:
        pool = pool[y[pool] != case.target]
    pk = case.clean(d[pool], key[pool])
    good_clean = ort_predict(mpath, pk).argmax(1) == y[pool]
    if case.kind == "colour":
        # per pool digit, the first other class's colour (from its key on) that misbehaves
        variants = case.colour_variants(d[pool], key[pool])
        wrong = np.stack([ort_predict(mpath, v).argmax(1) != y[pool] for v in variants])  # [9, n]
        first = np.where(wrong.any(0), wrong.argmax(0), 0)
        pc = np.stack(variants)[first, np.arange(len(pool))]
    else:
        pc = case.corrupt(d[pool], key[pool])
    bad = (ort_predict(mpath, pc).argmax(1) != y[pool]) & good_clean
    order = np.concatenate([np.flatnonzero(bad), np.flatnonzero(~bad)])[:20]
    pairs_c, pairs_k = pc[order], pk[order]
    meta["pairs20_misbehaving"] = int(bad[order].sum())

    va = split["val"]
    x_stats, x_val = arrays["stats"]["x"], arrays["val"]["x"]
    if case.stats_from == "train":
        meta["stats_acc"] = float((ort_predict(mpath, x_stats).argmax(1) == y[st]).mean())
        meta["val_acc"] = float((ort_predict(mpath, x_val).argmax(1) == y[va]).mean())
    for fname, arrs in arrays.items():
        np.savez_compressed(folder / f"{fname}.npz", **arrs)
    for n in case.pair_sizes:
        fname = "pairs.npz" if n == 1 else f"pairs{n}.npz"
        np.savez_compressed(folder / fname, corrupt=pairs_c[:n], clean=pairs_k[:n])

    h, w = case.input_hw
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    meta.update(case.describe())
    meta.update({
        "input_name": "input", "output_name": "logits", "input_shape": ["batch", case.channels, h, w],
        "exporter": ("torch.onnx.export(dynamo=False) legacy TorchScript exporter, eval mode, constant folding"
                     if case.exporter == "legacy" else
                     "torch.onnx.export(dynamo=True, optimize=True), saved with external data model.onnx.data"),
        "opset": opset,
        "ops": sorted({n.op_type for n in m.graph.node}),
        "seed": seed,
        "n_train": int(len(tr)), "n_test": int(len(te)), "n_stats": int(len(st)), "n_val": int(len(va)),
        "n_pairs_pool": int(len(split["pool"])), "epochs": case.epochs,
        "data": "sklearn.datasets.load_digits, /16 to [0,1], np.kron 2x upsampling to 16x16",
        "measured_with": "onnxruntime CPUExecutionProvider on the exported model",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": __import__("onnxruntime").__version__},
    })
    if case.stats_from == "train":
        meta.update({"architecture": f"small ResNet (make_resnet): stem conv, {len(case.blocks)} basic blocks "
                                     f"({', '.join(str(c) for c, _ in case.blocks)} channels), "
                                     f"global average pooling, Linear({case.blocks[-1][0]}, 10)",
                     "stats_are": "200 of the model's own training images (memorised), as the model saw them",
                     "augmentation": "none (every epoch sees the exact training images)",
                     "pair_sizes": list(case.pair_sizes)})
    if case.arch == "vit":
        meta["architecture"] = (f"small vision transformer (make_vit): {VIT['patch']}x{VIT['patch']} patches, "
                                f"{VIT['dim']}-wide tokens, {VIT['depth']} pre-norm blocks of {VIT['heads']}-head "
                                f"self-attention and a {VIT['mlp']}-wide GELU MLP, mean over tokens, "
                                f"Linear({VIT['dim']}, 10)")
    if case.arch.startswith("tv_"):
        meta.update({"architecture": f"torchvision.models.{case.arch[3:]}(num_classes=10), random initial weights",
                     "data": meta["data"] + f", then {case.scale}x to {h}x{w} and repeated over {case.channels} "
                                            "channels",
                     "train_threads": case.threads})
    with open(folder / "meta.json", "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=False)
        fh.write("\n")
    print(f"{name}: built in {time.time() - t0:.1f}s")
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: sample_models/)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--poison-rate", type=float, default=None,
                    help="Trojan cases: share of poisoned training images (default: the case's own, 0.1; 0 builds the "
                         "same model never poisoned, the reference bench_seeds.py compares repairs with)")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASE_TYPES]
    if unknown:
        ap.error(f"unknown case(s): {', '.join(unknown)}")

    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    data = load_digits16()
    split = split_indices(data[1], args.seed)
    t0 = time.time()
    for name in cases:
        meta = build_case(name, args.out, data, split, args.seed, args.poison_rate)
        figs = {k: v for k, v in meta.items() if isinstance(v, float)}
        print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in figs.items()))
    print(f"total {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
