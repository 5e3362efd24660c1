"""Run directories, atomic JSON/JSONL/figure writes, checksummed JSON and the environment record.

Layout: `runs/<experiment>/<timestamp>/` with `config.json`, `env.json`, `metrics.jsonl`,
`summary.json`, `figures/*.png`. Every file is written to a temporary sibling and moved into
place with `os.replace`, so a killed run never leaves a truncated file. Files read back as
data (`write_json_checked`) also carry a sha256 over their bytes, so a corrupted one is refused.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .devices import intra_op_threads


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import (os.umask can only be read by setting it, which races between threads)
_UMASK = _read_umask()


def jsonable(obj: Any) -> Any:
    """`obj` with arrays as lists, numpy scalars as Python numbers, non-finite floats as
    strings (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)):
        return jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else str(value)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary file in the same folder + `os.replace`),
    readable by others (mode 0644 less the umask; `mkstemp` alone gives 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON (numpy/jax arrays become lists; NaN a string)."""
    text = json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(path, text.encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def lock_config(path: str | os.PathLike, config: Any, name: str = "run") -> None:
    """Make a run directory belong to one config: the first call writes `config` (a dataclass
    or anything `jsonable`) to `path`; a later call (a resume) with another config is refused,
    as it would mix the two configs' numbers.

    **Raises:** `ValueError` naming the directory and `name` when `path` holds another config.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    # as it reads back: tuples become lists, NaN a string
    wanted = json.loads(json.dumps(jsonable(config)))
    path = Path(path)
    if not path.exists():
        write_json(path, wanted)
    elif read_json(path) != wanted:
        raise ValueError(
            f"{path.parent} holds a run of another {name} config: resume it with its own "
            "config.json, or use a new run directory."
        )


# the last two lines of a checksummed JSON file: the digest of every byte before them
_CHECKSUM_TAIL = re.compile(rb'  "sha256": "([0-9a-f]{64})"\n}\n\Z')


def write_json_checked(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `{"data": obj, "sha256": ...}` as indented JSON, the sha256 taken over
    every byte of the file before its `"sha256"` line (the two lines after the body are fixed;
    `read_json_checked` checks both).

    **Arguments:** `path`; `obj`: anything `write_json` writes (arrays become lists, NaN a
    string).

    **Returns:** the path written.
    """
    body = json.dumps({"data": jsonable(obj)}, indent=2)[: -len("\n}")] + ",\n"
    digest = hashlib.sha256(body.encode()).hexdigest()
    return atomic_write_bytes(path, (body + f'  "sha256": "{digest}"\n}}\n').encode())


def read_json_checked(path: str | os.PathLike) -> Any:
    """The `obj` of a file written by `write_json_checked`, once its checksum matches.

    **Raises:** `ValueError` (naming the file) when the file has no checksum line (truncated,
    or not written by `write_json_checked`) or its bytes do not match the checksum (edited or
    corrupted after it was written); `OSError` when it cannot be read.
    """
    raw = Path(path).read_bytes()
    tail = _CHECKSUM_TAIL.search(raw)
    if tail is None:
        raise ValueError(
            f"{path} ends without the sha256 line of a checksummed gaugejax file (truncated, "
            "or not written by write_json_checked): refusing to read it."
        )
    if hashlib.sha256(raw[: tail.start()]).hexdigest() != tail.group(1).decode():
        raise ValueError(
            f"{path} does not match its sha256 checksum (changed or corrupted after it was "
            "written): refusing to read it."
        )
    return json.loads(raw)["data"]


class RunLocked(RuntimeError):
    """Another process holds the lock of a run directory (`run_lock`)."""


@contextlib.contextmanager
def run_lock(path: str | os.PathLike):
    """Hold an exclusive lock on the file `path` (created with its folder) while the block
    runs: the one process allowed to write a run directory. The lock is the kernel's
    (`fcntl.flock`), so a killed holder releases it with its last file descriptor, and a
    stale lock file never blocks a resume. The holder's pid and host (`"<pid> on <host>"`) are
    in the file while it holds it (so a refusal names them), and the file is empty after a
    release.

    **Raises:** `RunLocked` when another process (or another open lock in this one) holds it,
    naming the holder's pid and host.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLocked(
                f"{path.parent} is in use: process {holder} holds {path.name}; wait for it to "
                "finish (or stop it) before writing this run directory."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {platform.node() or 'unknown host'}".encode(), 0)
        try:
            yield path
        finally:  # emptied on release: a finished run's files do not depend on its pid
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (flushed and fsynced; a torn last line is the only
    possible loss, and readers skip it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(jsonable(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file, skipping a torn final line."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def save_figure(fig, path: str | os.PathLike, dpi: int = 120, *, close: bool = False) -> Path:
    """Save a matplotlib figure atomically as PNG; with `close`, close it too (pyplot keeps
    every open figure: a long run that does not close them holds their memory)."""
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    path = atomic_write_bytes(path, buf.getvalue())
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def make_run_dir(root: str | os.PathLike, experiment: str) -> Path:
    """A new, empty `root/<experiment>/<UTC timestamp>/` (suffixed if it already exists)."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / experiment / stamp
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:  # mkdir is the atomic test: concurrent callers never share a directory
        path = base if n == 0 else base.with_name(f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    """The commit of the gaugejax checkout this process imports, and whether it has uncommitted
    changes (None for both outside a git checkout, e.g. an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode or status.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def env_info() -> dict:
    """Versions, devices, numerical settings and the git commit of this process (for
    `env.json`)."""
    packages = ["gaugejax", "jax", "jaxlib", "equinox", "diffrax", "optax", "lineax", "numpy"]
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": _git(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {p: _version(p) for p in packages},
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        # XLA:CPU's intra-op pool (NPROC): part of what a CPU timing measured
        "intra_op_threads": intra_op_threads(),
        "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        # how its programs were compiled (`gj.use_fast_compile`): results can move in the
        # last bits between the two
        "disable_most_optimizations": bool(jax.config.read("jax_disable_most_optimizations")),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
