"""The on-disk formats of image data, read as hostile input: CIFAR's pickled batches and idx files
(Fashion-MNIST's format, plain or gzip'd). Both the data sets (`data_dir`) and the pictures a
person brings to `search.predict` come through here.

Why so careful: a pickle can carry code that runs while it is read, and a header can declare
sizes the file does not hold (a gzip'd idx file that inflates to gigabytes, dimensions whose
product wraps past 2^64). So a pickle is read with an unpickler that admits only what a CIFAR
batch holds (dicts, lists, bytes, ints and numeric numpy arrays), and every declared size is
checked against a budget and against the file before anything is allocated.

Example:
    >>> batch = read_cifar_pickle(Path("data/cifar-10-batches-py/test_batch"))  # doctest: +SKIP
    >>> cifar_images(batch, Path("test_batch")).shape                           # doctest: +SKIP
    (10000, 3, 32, 32)
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from search.config.errors import SearchError

#: The most bytes one data file may hold, or declare: CIFAR-100's training batch, the largest
#: file of the supported data sets, is 155 MB. A file over it is refused before it is read.
MAX_FILE_BYTES = 256 * 2**20
#: The most pickle opcodes a CIFAR batch may take (CIFAR-100's training batch takes about
#: 250,000): bounds the Python objects a hostile pickle can make out of few bytes.
MAX_PICKLE_OPS = 1_000_000
CIFAR_ROW = 3 * 32 * 32  # one image: the R plane, then G, then B, each 32x32 row-major


def regular_file(path: Path, what: str) -> int:
    """The size of `path`, which must be a regular file (not a folder, a device such as
    /dev/zero that reads forever, a pipe that blocks, or a link loop) of at most MAX_FILE_BYTES.

    Raises:
        SearchError: naming the file and what it is instead; `what` names the caller's key.
    """
    try:
        info = path.stat()
    except OSError as error:
        raise SearchError(f"{what}{path}: cannot be read ({error.strerror or error}).") from None
    if not stat.S_ISREG(info.st_mode):
        raise SearchError(f"{what}{path}: not a regular file.")
    if info.st_size > MAX_FILE_BYTES:
        raise SearchError(f"{what}{path}: {info.st_size / 2**20:.0f} MB, more than the "
                          f"{MAX_FILE_BYTES // 2**20} MB a data file may hold here.")
    return info.st_size


# ----------------------------------------------------------------------------------------------
# CIFAR batches: pickled dicts, unpickled with only the globals such a dict needs
# ----------------------------------------------------------------------------------------------

def _numeric(dtype: np.dtype) -> np.dtype:
    # Object arrays would let the pickle build arbitrary objects inside numpy: numbers only.
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"an array of {dtype} (only numeric arrays are data)")
    return dtype


def _dtype(spec: Any, *args: Any) -> np.dtype:
    # A type code such as "u1"; bytes where the file was written by Python 2 (the originals).
    code = spec.decode("latin1") if isinstance(spec, bytes) else spec
    if not isinstance(code, str):
        raise pickle.UnpicklingError(f"a dtype of {type(spec).__name__}")
    return _numeric(np.dtype(code, *args[:2]))


_RECONSTRUCT = np.zeros(1, np.uint8).__reduce__()[0]           # numpy's own, whatever its path
_FROMBUFFER = np.zeros(1, np.uint8).__reduce_ex__(5)[0]        # protocol 5's array builder


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"an array of type {subtype!r}")
    return _RECONSTRUCT(np.ndarray, shape, _dtype(dtype))


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _FROMBUFFER(buffer, _numeric(np.dtype(dtype)), shape, order)


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    # Python 3's protocol 2 writes bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than of text as latin1")
    return text.encode("latin1")


# (module, name) -> what the unpickler gets instead: checked stand-ins, never the real callables.
_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,   # numpy 1 (the original files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits the globals listed in `_ALLOWED`, and nothing else: no function, class or module
    a pickle names outside that list is looked up, so none can run."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a data file does "
                                         "not hold (it may carry code)") from None


def _count_ops(data: bytes) -> None:
    """Walks the opcodes without building anything, so that a small pickle cannot make millions
    of objects (each few bytes of pickle can be tens of bytes of Python object)."""
    import pickletools  # noqa: PLC0415 - needed only here

    for count, _ in enumerate(pickletools.genops(data), 1):
        if count > MAX_PICKLE_OPS:
            raise pickle.UnpicklingError(f"more than {MAX_PICKLE_OPS:,} pickle operations")


def read_cifar_pickle(path: Path, what: str = "") -> dict[bytes, Any]:
    """A CIFAR batch file as the dict it pickles (keys as bytes, as `encoding="bytes"` gives).

    Raises:
        SearchError: the file is not a regular file of bounded size, not a pickle, names a
            global no CIFAR batch holds, or is not a dict; no code in it has run.
    """
    regular_file(path, what)
    try:
        data = path.read_bytes()
        _count_ops(data)
        batch = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 - whatever broke the reading, it is no CIFAR batch
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SearchError(f"{what}{path}: not a CIFAR batch file ({reason}).") from None
    if not isinstance(batch, dict):
        raise SearchError(f"{what}{path}: not a CIFAR batch file (it holds a "
                          f"{type(batch).__name__}, not a dict).")
    return batch


def cifar_images(batch: dict[bytes, Any], path: Path, what: str = "") -> np.ndarray:
    """The batch's `data` rows as (N, 3, 32, 32) uint8 images (each row is exactly NCHW)."""
    rows = batch.get(b"data")
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2 \
            or rows.shape[1] != CIFAR_ROW:
        found = (f"{rows.dtype} array of shape {rows.shape}" if isinstance(rows, np.ndarray)
                 else type(rows).__name__)
        raise SearchError(f"{what}{path}: not a CIFAR batch file (its data must be a uint8 "
                          f"array of rows of {CIFAR_ROW} bytes, 32x32 pixels with 3 channels; "
                          f"it holds a {found}).")
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------
# idx files: a big-endian header (magic 0x0000 0x08 ndim, then the dims), then raw uint8
# ----------------------------------------------------------------------------------------------

# The most a gzip stream inflates: about 1032 to 1 (deflate's limit), with room for headers.
_GZIP_RATIO = 1100


def idx_header(path: Path, ndim: int) -> tuple[int, ...] | None:
    """The dims declared by `path` if it starts as an idx file of `ndim` dims of uint8, else
    None (read from the first bytes only; a gzip'd file is inflated just that far)."""
    try:
        with _open(path) as file:
            head = file.read(4 + 4 * ndim)
    except (OSError, EOFError):
        return None
    if len(head) < 4 + 4 * ndim or head[:4] != bytes([0, 0, 0x08, ndim]):
        return None
    return tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def read_idx(path: Path, *, ndim: int, item_shape: tuple[int, ...] | None = None,
             what: str = "") -> np.ndarray:
    """Parses an idx file of unsigned bytes, refusing from its header, before allocating, what
    it cannot hold: items of another shape than `item_shape` (when given), more bytes than
    MAX_FILE_BYTES, or (plain) more or fewer bytes than the file has, or (gzip'd) more than
    its compressed size can inflate to. A gzip'd body is inflated into a buffer of the declared
    size, so a stream that inflates further is refused, never held.

    Args:
        what: the key the file came from (`images=`), put before the path in messages.
    """
    size = regular_file(path, what)
    header = 4 + 4 * ndim
    dims = idx_header(path, ndim)
    if dims is None:
        raise SearchError(f"{what}{path}: not an idx file of {ndim}-dimensional unsigned bytes "
                          f"(it must start with {bytes([0, 0, 8, ndim]).hex()} and {ndim} "
                          "big-endian sizes).")
    if item_shape is not None and dims[1:] != item_shape:
        raise SearchError(f"{what}{path}: holds items of shape {dims[1:]}, not {item_shape}.")
    declared = math.prod(dims)  # Python ints: no wrap-around, however large the dims
    budget = MAX_FILE_BYTES if path.suffix != ".gz" else min(MAX_FILE_BYTES, size * _GZIP_RATIO)
    if declared > budget or (path.suffix != ".gz" and declared != size - header):
        held = f"{size - header} bytes of data" if path.suffix != ".gz" else f"{size} bytes gzip'd"
        raise SearchError(f"{what}{path}: its header declares {'x'.join(map(str, dims))} bytes, "
                          f"but it holds {held} (at most {budget:,} can be read); the file is "
                          "truncated, corrupt or not what it claims.")
    body = bytearray(declared)
    try:
        with _open(path) as file:
            file.read(header)
            got, view = 0, memoryview(body)
            while got < declared and (n := file.readinto(view[got:])):
                got += n
            extra = file.read(1)
    except (OSError, EOFError, ValueError) as error:  # gzip.BadGzipFile is an OSError
        raise SearchError(f"{what}{path}: cannot be read ({error}).") from None
    if got != declared or extra:
        raise SearchError(f"{what}{path}: truncated or corrupt: its header declares "
                          f"{'x'.join(map(str, dims))} bytes, the data "
                          f"{'runs past that' if extra else f'ends after {got}'}.")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)
