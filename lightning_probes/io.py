"""Durable output: JSON Lines appended in bulk (one write and one flush per call), and summary files written
atomically (temp file + rename)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any, Optional

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    """Make NumPy/torch scalars JSON-friendly; non-finite floats become ``null`` (JSON has no NaN)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _dumps(record: Mapping[str, Any]) -> str:
    """One JSON line; the slow conversion runs only for records holding NaN/inf or NumPy/torch values."""
    try:
        return json.dumps(record, allow_nan=False)
    except (ValueError, TypeError):
        return json.dumps(_jsonable(record))


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666`` less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename.

    The file gets the permissions a normal write would give it (``0o666`` less the umask), not the ``0o600``
    of ``tempfile.mkstemp``, so a TensorBoard server or a colleague can read it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, json.dumps(_jsonable(obj), indent=2).encode())


def render_png(fig: Any, dpi: int = 90) -> bytes:
    """Render a matplotlib figure to PNG bytes (one draw)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def decode_png(png: bytes) -> Any:
    """PNG bytes to an ``(H, W, 3)`` uint8 array, for image loggers."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def atomic_save_npz(path: str, **arrays: Any) -> None:
    """Save NumPy arrays to an ``.npz`` file, atomically."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _complete_lines(path: str) -> list[str]:
    """The complete, valid JSON lines of a file, in order (a torn last line, from a crash, ends the list)."""
    lines: list[str] = []
    if not os.path.exists(path):
        return lines
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            lines.append(line)
    return lines


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Read the complete records of a JSON Lines file (a torn last line, from a crash, is skipped)."""
    return [json.loads(line) for line in _complete_lines(path)]


class JsonlWriter:
    """Append-only JSON Lines file; every ``write`` appends its records in one call and flushes (`RecordBuffer`
    in front of it decides how many records a ``write`` carries).

    The file opens lazily on the first write. On a fresh start an existing non-empty file is moved aside
    (``name.<timestamp>.jsonl``), never overwritten; a writer closed and reopened (fit, then test) appends. On
    resume, ``restore(n)`` makes the file hold exactly the first ``n`` records that existed when the checkpoint
    was taken (of itself, or of the file of the run being resumed), at once, so replayed steps are not
    duplicated and a checkpoint taken before the next write stores ``n`` again.

    Args:
        path: Path of the ``.jsonl`` file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle: Optional[io.TextIOWrapper] = None
        self.records_written = 0
        self._started = False  # after the first open or a restore, reopening appends

    def _move_aside(self) -> None:
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            root, ext = os.path.splitext(self.path)
            aside = f"{root}.{time.strftime('%Y%m%d-%H%M%S')}{ext}"
            os.replace(self.path, aside)
            log.warning("%s existed from an earlier run; moved it to %s", self.path, aside)

    def restore(self, count: int, source: Optional[str] = None) -> int:
        """Make the file hold the first ``count`` complete records of ``source`` (default: the file itself).

        Written atomically; returns the number of records kept (fewer than ``count``, with a warning, when
        the source holds fewer). Later writes append after them.
        """
        self.close()
        source = self.path if source is None else source
        lines = _complete_lines(source)
        if len(lines) < count:
            log.warning("%s holds %d records, fewer than the %d the checkpoint expects; continuing after them",
                        source, len(lines), count)
        kept = lines[:count]
        if os.path.abspath(source) != os.path.abspath(self.path) and not self._started:
            self._move_aside()
        atomic_write_bytes(self.path, "".join(kept).encode())
        self.records_written = len(kept)
        self._started = True
        return len(kept)

    def _open(self) -> io.TextIOWrapper:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if not self._started:
            self._move_aside()
        self._started = True
        return open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records (one JSON object per line) and flush."""
        lines = [_dumps(r) + "\n" for r in records]
        if not lines:
            return
        if self._handle is None:
            self._handle = self._open()
        self._handle.write("".join(lines))
        self._handle.flush()
        self.records_written += len(lines)

    def flush(self) -> None:
        """Flush (every write already does; kept for readers that want to be sure)."""
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        """Close the file; a later ``write`` reopens it in append mode."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# Lines of torch's wrapping of a weights-only refusal that are not the unpickler's own words.
_TORCH_WRAPPING = ("Weights only load failed", "Check the documentation", "In PyTorch 2.6", "(1)", "(2)",
                   "Please file an issue")
# Said where a caller has no way to trust a checkpoint (``init_from``).
_NO_TRUST = ("`init_from` never unpickles objects (--trust_checkpoints is for the commands that read checkpoints: "
             "analyze, ablate, zoo-dataset); save the checkpoint's state_dict alone with torch.save")


def _refusal_reason(message: str) -> str:
    """The weights-only unpickler's own words in torch's message, in one line, whatever torch wraps them in."""
    lines = [line.strip() for line in message.split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_TORCH_WRAPPING)] or lines or ["refused"]
    return useful[0].split(" was not an allowed global")[0].rstrip(".")[:300]


def _looks_like_torch_save(path: str) -> bool:
    """Whether a file is what ``torch.save`` writes: a zip archive, or (the legacy format) a pickle stream, which
    starts with the PROTO opcode ``0x80``."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            return True
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x80"
    except OSError:
        return False


def read_checkpoint(path: str, argument: str, trust: bool = False, trust_option: bool = True) -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU, safely, and check it has a ``state_dict``.

    Checkpoints are pickles, and unpickling an arbitrary object can run code. The file is read with
    ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers (enough for the state dict
    and plain hyper-parameters). A checkpoint that needs more (a pickled object of some class, a blocked function
    such as ``os.system``) is refused unless ``trust`` is set, in which case it is read with ``weights_only=False``:
    only do so for files of known origin. Every refusal of the weights-only unpickler (a ``pickle.UnpicklingError``
    from it, however torch words it) is reported as one, naming ``--trust_checkpoints``.

    Args:
        path: The checkpoint file.
        argument: The argument that named it, for the error messages (``init_from``, ``ckpt_path``).
        trust: Read checkpoints that ``weights_only=True`` cannot read with full unpickling.
        trust_option: Whether the caller offers ``--trust_checkpoints``; without it (``init_from``) the refusal
            says how to save a checkpoint that needs no trust.

    Raises:
        ValueError: Naming ``argument``, when the file cannot be read, needs full unpickling without ``trust``
            (the message names ``--trust_checkpoints``), or holds no ``state_dict``.
    """
    import pickle

    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # only the weights-only unpickler raises it here: a refusal
        if not _looks_like_torch_save(path):  # a text file, say: no pickle to refuse, just not a checkpoint
            raise ValueError(f"Expected `{argument}` to be a Lightning checkpoint, but {path!r} could not be read "
                             f"with torch.load(weights_only=True): it is neither a torch.save zip archive nor a "
                             f"pickle ({_refusal_reason(str(err))})") from None
        if not trust:
            advice = ("If you trust where the file comes from, pass --trust_checkpoints" if trust_option
                      else _NO_TRUST)
            raise ValueError(f"Expected `{argument}` to be a checkpoint that torch.load(weights_only=True) can read, "
                             f"but {path!r} holds pickled objects ({_refusal_reason(str(err))}) that its unpickler "
                             f"refuses (or is no checkpoint at all); unpickling them could run code. {advice}"
                             ) from None
        checkpoint = _load_trusted(path, argument)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` to be a Lightning checkpoint, but {path!r} could not be read with "
                         f"torch.load(weights_only=True): {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        keys = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else None
        found = (f"keys {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}" if keys is not None
                 else f"a {type(checkpoint).__name__}")
        raise ValueError(f"Expected `{argument}` to be a Lightning checkpoint with a `state_dict`, but {path!r} "
                         f"holds {found}")
    return checkpoint


def _load_trusted(path: str, argument: str) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # any unpickling failure is the file's fault, reported as one line
        raise ValueError(f"Expected `{argument}` to be a Lightning checkpoint, but {path!r} could not be read even "
                         f"with full unpickling: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                         ) from None


def import_class(class_path: str, argument: str = "class_path") -> type:
    """The class named by a dotted ``class_path`` (``lightning_probes.models.MLP``).

    Raises:
        ValueError: Naming ``argument``, when the module or the class cannot be found.
    """
    import importlib

    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` to name an importable class, but {class_path!r} is not one "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(cls, type):
        raise ValueError(f"Expected `{argument}` to name a class, but {class_path!r} is a {type(cls).__name__}")
    return cls


def module_from_checkpoint(path: str, argument: str = "ckpt_path", trust: bool = False,
                           class_path: Optional[str] = None) -> Any:
    """Rebuild a ``LightningModule`` from its checkpoint alone: the class, its hyper-parameters and its weights.

    The file is read with `read_checkpoint` (``weights_only=True`` unless ``trust``). The class is ``class_path``
    or the ``_class_path`` LightningCLI stores in the hyper-parameters; it must be a ``LightningModule``. The
    constructor gets the stored hyper-parameters (``init_from``, which would load other weights first, is set to
    ``None``: the checkpoint's weights replace them anyway), then the state dict is loaded strictly.

    Returns:
        The module, on the CPU, in eval mode, with the checkpoint's ``epoch`` and ``global_step`` in the attribute
        ``loaded_checkpoint``.

    Raises:
        ValueError: Naming ``argument``: an unreadable checkpoint, no class to build, a class that is not a
            ``LightningModule``, hyper-parameters the class does not take, or weights that do not fit it.
    """
    import pytorch_lightning as pl

    checkpoint = read_checkpoint(path, argument, trust=trust)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    class_path = class_path or hparams.get("_class_path")
    if not isinstance(class_path, str):
        raise ValueError(f"Expected `{argument}` {path!r} to name its model class (LightningCLI stores it as "
                         "`_class_path` in the hyper-parameters), but it does not; rebuild the model from its config")
    cls = import_class(class_path, argument)
    if not issubclass(cls, pl.LightningModule):
        raise ValueError(f"Expected `{argument}` {path!r} to be the checkpoint of a LightningModule, but its class "
                         f"{class_path} is not one")
    kwargs = {key: value for key, value in hparams.items() if not str(key).startswith("_")}
    if "init_from" in kwargs:
        kwargs["init_from"] = None
    try:
        module = cls(**kwargs)
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except (TypeError, RuntimeError, ValueError) as err:
        raise ValueError(f"Expected `{argument}` {path!r} to rebuild a {cls.__name__} from its hyper-parameters and "
                         f"weights, but: {' '.join(str(err).split())[:400]}") from None
    module.loaded_checkpoint = {key: checkpoint.get(key) for key in ("epoch", "global_step")}
    return module.eval()
