"""Safe, atomic file I/O shared by every reader and writer.

- `.npy` files are read with `allow_pickle=False` always: a pickled object array is refused,
  never unpickled. Shape and dtype are checked against what the caller expects, and every
  problem becomes a `SparseADError` that names the file and the fix.
- Everything we write goes to a temp file in the same folder, is fsynced, then renamed over
  the target (`os.replace`), so a crash or a full disk leaves the previous file intact.
- Progress bars go through `progress_bar`, so `SPARSE_AD_NO_PROGRESS=1` (CI, batch jobs,
  `docker run` logs) silences every one of them.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparse_ad.errors import ConfigError, SparseADError


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call `write(f)` on a temp file beside `path`, fsync, then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SparseADError(f"{path}: could not create it in {path.parent} ({e.strerror or e}); pick a "
                            "writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise SparseADError(f"{path}: could not write ({e.strerror or e}); free disk space or fix "
                            "permissions, the previous file (if any) is intact") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def claim_folder(folder: Path, marker: str, settings: dict, what: str, has_output: bool = False,
                 notes: dict | None = None, flags: dict | None = None) -> None:
    """Record in `folder/marker` (JSON) the settings that `folder`'s resumable output is made
    with, or refuse to add to output made with other ones: a rerun with another grid,
    checkpoint or view count would otherwise keep the old files beside the new. `has_output`:
    the folder already holds output, so a missing marker means unknown settings (refused).
    `notes`: recorded beside them for readers, not compared (they follow from the settings).
    `flags`: the command-line option that sets a setting (e.g. engine: --engine): when only
    such settings differ, the error says which options would add to the folder."""
    path = Path(folder) / marker
    if not path.exists():
        if has_output:
            raise ConfigError(f"{folder}: holds {what} but no {marker} saying how they were made; pick another "
                              "--out, or delete them to make them again")
        atomic_write_text(path, json.dumps({**(notes or {}), **settings}, indent=2))
        return
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); delete it (it records how the {what} there were made) "
                          "or pick another --out") from None
    keys = [k for k, v in settings.items() if have.get(k) != v]
    if keys:
        changed = "; ".join(f"{k} {have.get(k)!r} (now {settings[k]!r})" for k in keys)
        same = (f"rerun with {' '.join(f'{flags[k]} {have[k]}' for k in keys)} to add to them, "
                if flags and all(k in flags and k in have for k in keys) else "")
        raise ConfigError(f"{folder}: holds {what} made with other settings: {changed}; {same}pick another "
                          "--out, or delete it to make them again")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unlink_quietly(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def _starts_with(path: Path, prefixes: tuple[bytes, ...]) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head.startswith(prefixes)


def load_npy(path: Path, *, ncols: int | None = None, kinds: str = "fiu",
             dtype=None) -> np.ndarray:
    """Load a 2-D numeric `.npy` without ever unpickling.

    ncols: required number of columns (None: any); kinds: allowed numpy dtype kinds
    (f float, i int, u unsigned); dtype: cast the result to this dtype.
    """
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SparseADError(f"{path}: file not found") from None
    except ValueError as e:
        if "pickle" in str(e).lower():   # numpy says so for any file without the .npy magic, too
            if not _starts_with(path, (b"\x93NUMPY", b"\x80")):
                raise SparseADError(f"{path}: not a .npy file (no .npy header); re-export it with numpy.save") from None
            raise SparseADError(f"{path}: holds a pickled object array, which is never loaded "
                                "(it could run code); re-save it as a plain numeric array") from None
        raise SparseADError(f"{path}: not a readable .npy file ({e}); re-export or delete it") from None
    except (OSError, EOFError) as e:
        raise SparseADError(f"{path}: truncated or not a .npy file ({e}); re-export or delete it") from None
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises SyntaxError, TokenError, ...
        raise SparseADError(f"{path}: corrupt .npy header ({type(e).__name__}); re-export or delete it") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in kinds:
        raise SparseADError(f"{path}: expected a numeric array (dtype kind in {kinds!r}), "
                            f"got dtype {getattr(arr, 'dtype', type(arr))}; re-export it")
    if arr.ndim != 2 or (ncols is not None and arr.shape[1] != ncols):
        want = f"(N, {ncols})" if ncols is not None else "(N, C)"
        raise SparseADError(f"{path}: expected shape {want}, got {arr.shape}; re-export it")
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise SparseADError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise SparseADError(f"{path}: not UTF-8 text; re-export it") from None
    except OSError as e:
        raise SparseADError(f"{path}: cannot read ({e.strerror or e}); check permissions") from None


def progress_bar(iterable=None, show: bool = True, **kwargs):
    """A tqdm bar, hidden when `show` is false or the environment sets SPARSE_AD_NO_PROGRESS."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not show or os.environ.get("SPARSE_AD_NO_PROGRESS", "") != "", **kwargs)
