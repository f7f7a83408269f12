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

Options named in a message: the library speaks in its own terms. A message names an
option with ``option("input_shapes")`` (or ``option("device", "cpu")`` with a value);
``str(err)``, ``err.message`` and ``err.one_line()`` word it as a Python keyword
(``input_shapes``, ``device='cpu'``), and the CLI passes its own wording to
``one_line(words)`` (``--input-shape``, ``--device cpu``).
"""

from __future__ import annotations

import json
import re
from typing import Callable

# An option reference inside a message: MARK + JSON [name, value, python] + MARK.
_MARK = "\x1f"
_OPTION = re.compile(_MARK + "([^" + _MARK + "]*)" + _MARK)

# words(name, value, python) -> text: how one option reference reads.
OptionWords = Callable[[str, object, "str | None"], str]


def option(name: str, value=None, *, python: str | None = None) -> str:
    """A reference to the option ``name`` (a keyword of the library's functions), with
    an optional ``value`` as the command line would take it (True for a switch);
    ``python``: how the value reads as a Python keyword when not ``repr(value)``."""
    return _MARK + json.dumps([name, value, python]) + _MARK


def python_words(name: str, value=None, python: str | None = None) -> str:
    """``input_shapes``, ``device='cpu'``, ``in_place=True``."""
    if value is None:
        return name
    return f"{name}={python if python is not None else repr(value)}"


def render(text: str | None, words: OptionWords | None = None) -> str | None:
    """``text`` with every option reference worded by ``words`` (default: Python)."""
    if text is None:
        return None
    words = words or python_words
    return _OPTION.sub(lambda m: words(*json.loads(m.group(1))), text)


def short(exc: BaseException, limit: int = 200) -> str:
    """``exc``'s text on one line, cut to ``limit`` characters (a reason inside a message)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DynEditError(Exception):
    """A user-facing error: one line, no traceback, non-zero exit."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.raw_message = message  # option references kept (``option``), for another wording
        self.raw_hint = hint
        self.message = render(message)
        self.hint = render(hint)
        super().__init__(self.message if not hint else f"{self.message} ({self.hint})")

    def one_line(self, words: OptionWords | None = None) -> str:
        """The message and hint on one line, options worded by ``words`` (default: Python)."""
        message, hint = render(self.raw_message, words), render(self.raw_hint, words)
        text = message if not hint else f"{message}; {hint}"
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
