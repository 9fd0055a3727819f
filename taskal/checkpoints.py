"""Safe loading and saving of model checkpoints.

``torch.load`` unpickles, and unpickling an untrusted file can run arbitrary code. This module
loads checkpoints with ``torch.load(..., weights_only=True)`` and a small allow-list of the
harmless types that mmengine checkpoints carry besides tensors, so a checkpoint from a model zoo,
a colleague or an mmengine ``Runner`` loads without trusting it. A file that needs anything else
is refused with a one-line :class:`ValueError` naming the refused global; callers that trust the
file pass ``trusted=True`` (CLI: ``--trust-checkpoint``) to unpickle it in full.

What a real mmengine ``Runner`` checkpoint (``meta``, ``state_dict``, ``message_hub``,
``optimizer``, ``param_schedulers``, ``ema_state_dict``) needs beyond torch's own allow-list:

* ``mmengine.logging.history_buffer.HistoryBuffer``: the logged scalars in ``message_hub``.
  Its ``__setstate__`` only stores data, but it also writes the pickled ``statistics_methods``
  into a dict shared by the whole class, so :func:`load_checkpoint` puts that dict back as it
  was after every load.
* ``builtins.getattr``, replaced by a stand-in that only answers ``getattr(HistoryBuffer, m)``
  for the four default statistics methods (``min``, ``max``, ``current``, ``mean``): pickle
  protocol 2 stores those methods that way. The real ``getattr`` is never allowed.
* ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype`` and
  ``numpy._core.multiarray.scalar`` (also under their numpy 1.x names ``numpy.core.*``):
  numpy arrays and scalars in the logged history (``eta``, losses, times).
* the numpy dtype classes of booleans and numbers (``numpy.dtypes.Float64DType`` ...): a
  pickled ``numpy.dtype`` is rebuilt as an instance of one of them. Object, structured, string
  and datetime dtypes are left out.

None of these can run code of the file's choosing: they only build arrays, scalars, dtypes and
plain objects from data.

:func:`load_weights` loads a checkpoint into a module after checking keys and shapes, so a
mismatch leaves the module untouched, and :func:`save_weights` writes a checkpoint atomically
that :func:`load_checkpoint` reads back without ``trusted``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from torch import nn

__all__ = ["SAFE_GLOBAL_NAMES", "load_checkpoint", "load_weights", "save_weights"]

_TRUST_HINT = (
    "pass trusted=True (CLI: --trust-checkpoint) only for a file you trust, "
    "since full unpickling can run arbitrary code"
)

# The statistics methods HistoryBuffer registers by default and pickles as getattr(cls, name).
_HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")

# pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p): how a legacy (non-zip) torch.save
# file starts.
_LEGACY_HEADERS = tuple(
    pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p) for p in range(2, 6)
)
_ZIP_HEADER = b"PK\x03\x04"


def _history_buffer_getattr(obj: object, name: str) -> Any:
    """Stand-in for ``builtins.getattr`` during a weights-only load.

    Pickle protocol 2 stores ``HistoryBuffer.min`` as ``getattr(HistoryBuffer, "min")``; this
    answers exactly those lookups and refuses every other one.

    Args:
        obj: The object whose attribute the checkpoint asks for.
        name: The attribute name.

    Returns:
        The default ``HistoryBuffer`` statistics method ``name``.

    Raises:
        pickle.UnpicklingError: For anything but ``HistoryBuffer`` and a default method name.
    """
    if obj is HistoryBuffer and isinstance(name, str) and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"GLOBAL builtins.getattr is allowed only as getattr(HistoryBuffer, "
        f"{'|'.join(_HISTORY_BUFFER_METHODS)}), not getattr({obj!r}, {name!r})"
    )


def _numpy_dtype_classes() -> list[type]:
    """The numpy dtype classes of booleans and numbers (``numpy.dtypes.Float64DType`` ...)."""
    classes: set[type] = set()
    for scalar_type in set(np.sctypeDict.values()):
        dtype = np.dtype(scalar_type)
        if dtype.kind in "biufc":
            classes.add(type(dtype))
    return sorted(classes, key=lambda cls: cls.__name__)


@lru_cache(maxsize=1)
def _safe_globals() -> tuple[Any, ...]:
    """The allow-list handed to ``torch.serialization.safe_globals``.

    Returns:
        Classes and functions, or ``(object, "dotted.name")`` pairs for globals stored under a
        name other than the object's own.
    """
    # The functions numpy itself pickles arrays and scalars with, under the names numpy 2
    # (numpy._core) and numpy 1 (numpy.core) write them.
    reconstruct = np.zeros(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    entries: list[Any] = [
        HistoryBuffer,
        (_history_buffer_getattr, "builtins.getattr"),
        np.ndarray,
        np.dtype,
    ]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        entries += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    entries.extend(_numpy_dtype_classes())
    return tuple(entries)


def _global_name(entry: Any) -> str:
    if isinstance(entry, tuple):
        return str(entry[1])
    return f"{entry.__module__}.{entry.__qualname__}"


SAFE_GLOBAL_NAMES: tuple[str, ...] = tuple(sorted({_global_name(e) for e in _safe_globals()}))
"""Dotted names of the globals :func:`load_checkpoint` allows besides torch's own."""


@contextlib.contextmanager
def _history_buffer_methods_restored() -> Iterator[None]:
    """Put ``HistoryBuffer``'s class-wide statistics methods back as they were on exit.

    ``HistoryBuffer.__setstate__`` updates a dict shared by the class with the methods a
    checkpoint names; this keeps a loaded file from changing them for the whole process.
    """
    methods: dict[str, Any] = HistoryBuffer._statistics_methods
    saved = dict(methods)
    try:
        yield
    finally:
        if methods != saved:
            methods.clear()
            methods.update(saved)


def _check_format(path: Path) -> None:
    """Raise unless ``path`` looks like a file written by ``torch.save``.

    Args:
        path: An existing file.

    Raises:
        ValueError: If it is neither a torch zip archive nor a legacy torch file.
    """
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_HEADER):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path} is not a PyTorch checkpoint (broken zip archive: {e})") from e
        if any(n.endswith("/constants.pkl") for n in names):
            raise ValueError(
                f"{path} is not a PyTorch checkpoint but a TorchScript archive "
                "(load it with torch.jit.load)"
            )
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise ValueError(f"{path} is not a PyTorch checkpoint (a zip archive without data.pkl)")
        return
    if not head.startswith(_LEGACY_HEADERS):
        raise ValueError(f"{path} is not a PyTorch checkpoint (not a file written by torch.save)")


def _refused_globals(path: Path, message: str) -> list[str]:
    """Name what a weights-only load refused.

    Args:
        path: The checkpoint.
        message: The ``UnpicklingError`` message from ``torch.load``.

    Returns:
        The refused globals, or an empty list where neither the file nor the message names one.
    """
    with contextlib.suppress(Exception):
        with torch.serialization.safe_globals(list(_safe_globals())):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if unsafe:
            return sorted(unsafe)
    for pattern in (r"GLOBAL ([\w.]+)", r"but got <class '([\w.]+)'>"):
        match = re.search(pattern, message)
        if match:
            return [match.group(1)]
    return []


def _one_line(message: str) -> str:
    """The reason in torch's multi-line error message, without torch's advice around it."""
    text = message.split("WeightsUnpickler error:")[-1]
    text = text.split("Check the documentation of torch.load")[0]
    for line in text.splitlines():
        line = line.strip().removeprefix("Weights only load failed.").strip()
        if line and not line.startswith(("In PyTorch 2.6", "Please file an issue")):
            return line
    return "no reason given"


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    trusted: bool = False,
    map_location: Any = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint, by default without running any code from it.

    Args:
        path: A file written by ``torch.save``: an mmengine/OpenMMLab checkpoint, a dict with a
            ``state_dict`` key, or a bare state dict.
        trusted: Unpickle the file in full (``weights_only=False``). Only for files you trust:
            unpickling can run arbitrary code.
        map_location: Passed to ``torch.load``.

    Returns:
        The checkpoint as a dict. A bare state dict (a mapping of names to tensors) comes back as
        ``{"state_dict": it}``, so callers always read ``ckpt["state_dict"]``; a dict with a
        ``state_dict`` key comes back as loaded.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``path`` is not a PyTorch checkpoint, if (without ``trusted``) it needs a
            global outside the allow-list, or if it holds no state dict.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a PyTorch checkpoint (not a regular file)")
    _check_format(path)
    try:
        if trusted:
            obj = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with (
                _history_buffer_methods_restored(),
                torch.serialization.safe_globals(list(_safe_globals())),
            ):
                obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if trusted:
            raise
        refused = _refused_globals(path, str(e))
        what = (
            f"needs global {', '.join(refused)}, which is not on the allow-list of safe types"
            if refused
            else f"cannot be loaded safely (weights-only unpickler: {_one_line(str(e))})"
        )
        raise ValueError(f"checkpoint {path} {what}; {_TRUST_HINT}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path} is not a PyTorch checkpoint or is corrupt: {_one_line(str(e))}"
        ) from e

    if isinstance(obj, Mapping) and "state_dict" in obj:
        return obj if isinstance(obj, dict) else dict(obj)
    if _is_state_dict(obj):
        return {"state_dict": obj}
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise ValueError(
            f"checkpoint {path} holds no state dict: a dict without a 'state_dict' key and "
            f"not a mapping of tensors (keys: {keys})"
        )
    raise ValueError(
        f"checkpoint {path} holds no state dict: it holds a {type(obj).__qualname__}, not a dict"
    )


def _strip_prefixes(
    state_dict: Mapping[str, Any], model_keys: set[str], prefixes: tuple[str, ...]
) -> dict[str, Any]:
    """Strip each prefix that every checkpoint key has and the model's keys do not."""
    out = dict(state_dict)
    for prefix in prefixes:
        if (
            prefix
            and out
            and all(k.startswith(prefix) for k in out)
            and not (model_keys and all(k.startswith(prefix) for k in model_keys))
        ):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(list(value.shape))
    return type(value).__qualname__


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    trusted: bool = False,
    strict: bool = True,
    prefix_strip: tuple[str, ...] = ("module.",),
) -> dict[str, Any]:
    """Load a checkpoint's state dict into ``model``, leaving it untouched on a mismatch.

    Keys and shapes are compared before anything is copied, so when this raises, ``model`` is
    exactly as it was.

    Args:
        model: The module to load into.
        path: The checkpoint (see :func:`load_checkpoint`).
        trusted: Unpickle the file in full; only for files you trust.
        strict: Require the checkpoint's keys to match the model's exactly. Without it, missing
            and unexpected keys are ignored; shape mismatches are always an error.
        prefix_strip: Prefixes (a ``DataParallel``/DDP ``module.``) to strip from the
            checkpoint's keys, each only where every key has it and the model's keys do not.

    Returns:
        The checkpoint dict from :func:`load_checkpoint`, ``meta`` and all, as loaded.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the checkpoint cannot be loaded safely (see :func:`load_checkpoint`), if
            its state dict is not a mapping of names, or if it does not match the model.
    """
    ckpt = load_checkpoint(path, trusted=trusted)
    raw = ckpt["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        raise ValueError(f"checkpoint {path}: 'state_dict' is not a mapping of names to tensors")
    expected = model.state_dict()
    state_dict = _strip_prefixes(raw, set(expected), prefix_strip)

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        k
        for k in expected
        if k in state_dict
        and isinstance(expected[k], torch.Tensor)
        and (
            not isinstance(state_dict[k], torch.Tensor) or state_dict[k].shape != expected[k].shape
        )
    ]
    if mismatched or (strict and (missing or unexpected)):
        parts = [
            f"{len(missing)} missing keys" + (f" (first: {missing[0]})" if missing else ""),
            f"{len(unexpected)} unexpected keys"
            + (f" (first: {unexpected[0]})" if unexpected else ""),
            f"{len(mismatched)} shape mismatches"
            + (
                f" (first: {mismatched[0]} ckpt {_shape(state_dict[mismatched[0]])} "
                f"vs model {_shape(expected[mismatched[0]])})"
                if mismatched
                else ""
            ),
        ]
        raise ValueError(f"checkpoint {path} does not match the model: {', '.join(parts)}")
    model.load_state_dict(state_dict, strict=strict)
    return ckpt


_PLAIN_SCALARS = (type(None), bool, int, float, str)


def _check_plain(value: Any, where: str, active: set[int]) -> None:
    """Raise unless ``value`` is built from JSON-like plain types only.

    Args:
        value: The value to check.
        where: Its location, for the error message (``meta['a'][0]``).
        active: ids of the containers being checked, to catch reference cycles.

    Raises:
        ValueError: Naming the first value of another type, or a reference cycle.
    """
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return
    if kind not in (dict, list, tuple):
        raise ValueError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}; checkpoint meta may hold only "
            "None, bool, int, float, str and lists, tuples and dicts (with str keys) of them"
        )
    if id(value) in active:
        raise ValueError(f"{where} contains itself (a reference cycle)")
    active.add(id(value))
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError(f"{where} has a key {key!r} that is not a str")
            _check_plain(item, f"{where}[{key!r}]", active)
    else:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", active)
    active.discard(id(value))


def save_weights(
    model: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any] | None = None
) -> None:
    """Write ``{"state_dict": ..., "meta": ...}`` atomically, loadable without ``trusted``.

    The tensors are moved to the CPU; the file is written to a temporary file in the same
    folder and renamed over ``path``, so readers never see a half-written checkpoint.

    Args:
        model: The module whose ``state_dict()`` to save.
        path: Where to write the checkpoint.
        meta: Extra information, made of JSON-like plain types only (``None``, ``bool``,
            ``int``, ``float``, ``str``, and lists, tuples and dicts with ``str`` keys of them).

    Raises:
        ValueError: If ``meta`` holds anything else, or the state dict holds a non-tensor.
        FileNotFoundError: If the folder of ``path`` does not exist.
    """
    meta = {} if meta is None else meta
    if type(meta) is not dict:
        raise ValueError(f"meta must be a dict, not a {type(meta).__qualname__}")
    _check_plain(meta, "meta", set())
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"state dict entry {key!r} is a {type(value).__qualname__}, not a tensor"
            )
        state_dict[key] = value.detach().cpu()

    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} for checkpoint {path} does not exist")
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"state_dict": state_dict, "meta": meta}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
