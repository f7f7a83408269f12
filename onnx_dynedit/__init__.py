"""onnx-dynedit: repair a shipped ONNX classifier with attribution-guided rank-one edits.

Importing this package does not import torch: `verify`, `diff` and the I/O helpers work
with onnx + onnxruntime + numpy alone. The editing pipeline (twin, attribution,
rectify) imports torch when it is used.
"""

__version__ = "0.1.0"
