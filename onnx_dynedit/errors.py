"""One error hierarchy for the whole library.

``DynEditError`` and its subclasses are *user* errors: something about the input (a
file, a tensor, an option) is wrong, and the message says what, which object, and what
to try. The CLI prints them as one line and exits with ``exit_code``. Anything else
(including ``InternalError``) is a bug and keeps its traceback.

Exit codes (a contract for pipelines):
  0  success / every check passed
  1  a check failed (parity outside tolerance, a verification gate, an edit that could
     not meet its target within budget)
  2  unusable input (unreadable model, bad npz, unknown layer, unsupported op, ...)
"""

from __future__ import annotations


class DynEditError(Exception):
    """A user-facing error: one line, no traceback, non-zero exit."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message}; {self.hint}"
        return " ".join(text.split())


class InputError(DynEditError):
    """An input (model file, npz, option value) cannot be used."""


class ModelLoadError(InputError):
    """The ONNX file cannot be read, parsed, checked, or its external data found."""


class UnsafeInputError(InputError):
    """A file asks for something unsafe: paths outside its folder, absurd sizes, pickles."""


class DataError(InputError):
    """An .npz / .npy input does not fit the model (keys, shapes, dtypes, values)."""


class ConversionError(InputError):
    """The torch twin cannot be built (unsupported op, converter failure)."""


class LayerError(InputError):
    """A layer / initializer named by the user does not exist or cannot be edited."""


class OutputError(InputError):
    """The output path cannot be written (would overwrite the input, bad folder...)."""


class CheckFailed(DynEditError):
    """A check ran and did not pass (parity, verification gate, edit target)."""

    exit_code = 1


class ParityError(CheckFailed):
    """The torch twin does not reproduce ONNX Runtime within tolerance."""


class EditError(CheckFailed):
    """An edit could not be made safely (non-finite weights, nothing acceptable)."""


class InternalError(Exception):
    """A bug in onnx-dynedit: always shown with its traceback."""
