"""Atomic file and folder writing: build under a temporary name in the same folder, then rename.

A reader (or a killed writer) never sees a half-written result file or folder.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from domadapt.errors import UserError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it
# A full disk, an exhausted quota, a file-size limit: the write fails, nothing else is wrong.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows: needs write
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, keep_previous: str | os.PathLike | None = None
                ) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else delete it.

    The file is synced before the rename (so a crash never leaves an empty result behind) and
    gets the permissions an ordinary new file would (umask), not mkstemp's private 0600. With
    `keep_previous`, the file `path` held until now is renamed there first (a crash between the
    two renames leaves only `keep_previous`: readers fall back to it). Running out of space
    (ENOSPC, EDQUOT, EFBIG) is a UserError naming `path`, which is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        _fsync(tmp_path)
        if keep_previous is not None and path.is_file():
            os.replace(path, keep_previous)
        os.replace(tmp_path, path)
    except OSError as e:
        if tmp_path.name:
            tmp_path.unlink(missing_ok=True)
        if e.errno not in NO_SPACE:
            raise
        raise UserError(f"no space left to write {path} ({e.strerror}); it was left as it was "
                        f"and nothing finished is lost: free space and re-run to continue"
                        ) from None
    except BaseException:
        if tmp_path.name:
            tmp_path.unlink(missing_ok=True)
        raise


def write_fully(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` as the whole content of the file `path`, then check its size on disk: a
    write cut short (a file-size limit, a full disk) is an OSError naming `path`, never a
    silently truncated file."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None
    if size != len(data):
        raise OSError(errno.EFBIG, f"only {size} of {len(data)} bytes written", os.fspath(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *,
                       keep_previous: str | os.PathLike | None = None) -> None:
    """`write_fully` through `atomic_path`."""
    with atomic_path(path, keep_previous=keep_previous) as tmp:
        write_fully(tmp, data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike, *,
                      keep_previous: str | os.PathLike | None = None) -> None:
    """`torch.save` through `atomic_path`. Serialized in memory first: torch's own file writer
    reports a full disk as an opaque RuntimeError, a plain write as ENOSPC."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue(), keep_previous=keep_previous)


# -- CSV ----------------------------------------------------------------------------------------

# What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """`value` inert in a spreadsheet (the OWASP rule): a string starting with = + - @, a tab
    or a carriage return gets a leading single quote, unless the whole string is a number
    ('-4.8', '+18.5'); anything else comes back unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def csv_text(frame: Any, **to_csv: Any) -> str:
    """`frame.to_csv(**to_csv)` (a pandas DataFrame) with every text cell, column and index
    label `spreadsheet_safe`; numbers are left as they are. The one way domadapt writes CSV."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    safe = frame.copy()
    for i, dtype in enumerate(frame.dtypes):
        if is_object_dtype(dtype) or is_string_dtype(dtype):
            safe.iloc[:, i] = frame.iloc[:, i].map(spreadsheet_safe)
    safe = safe.rename(index=spreadsheet_safe, columns=spreadsheet_safe)
    return safe.to_csv(**to_csv)


def atomic_write_csv(path: str | os.PathLike, frame: Any, **to_csv: Any) -> None:
    """`csv_text` through `atomic_write_text`."""
    atomic_write_text(path, csv_text(frame, **to_csv))


class CorruptFile(ValueError):
    """A file whose stored checksums do not match its content (bit rot, a torn copy)."""


def verify_zip(path: str | os.PathLike) -> None:
    """Check every member of a zip file (torch.save's format) against its stored CRC-32;
    CorruptFile naming the first bad member. torch.load checks none: a flipped bit in a
    tensor would load silently."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError) as e:
        raise CorruptFile(f"not a complete zip file: {e}") from None
    if bad is not None:
        raise CorruptFile(f"checksum mismatch in {bad}")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


@contextmanager
def atomic_directory(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success rename it to `dest`.

    A killed or failed build leaves no `dest` behind (only a hidden `.<name>.*.tmp` folder when
    the process was killed outright). `dest` must not exist or be an empty folder.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def require_absent(dest: Path) -> None:
    """UserError unless `dest` is free for `atomic_directory` (missing or an empty folder)."""
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise UserError(f"output folder already exists and is not empty: {dest}")


def cache_dir() -> Path:
    """The one folder for every cache domadapt keeps (generated datasets, resized images, the
    BIN kernels): `$DOMADAPT_CACHE`, else `$XDG_CACHE_HOME/domadapt`, else `~/.cache/domadapt`."""
    if env := os.environ.get("DOMADAPT_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "domadapt"
