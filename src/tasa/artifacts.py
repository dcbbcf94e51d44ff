"""Atomic artifact writing: write to a temporary sibling, then rename.

A reader never sees a half-written file, and a killed run leaves either the
old artifact or the new one.  Files get the usual permissions (0666 less the
process umask), so a serving process running as another user can read them.

JSON artifacts hold only valid JSON: a number that is not finite (NaN, e.g. the
standard error of a single item or an undefined rank correlation; or an infinity)
is written as ``null`` and listed, with its JSON path and value, under the
top-level key ``non_finite``; :func:`read_json` restores it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

NON_FINITE_KEY = "non_finite"
NON_FINITE_NOTE = ("numbers that were not finite, written as null: each one's path (keys and list indices) "
                   "and value; NaN means undefined for the data, e.g. the standard error of one item")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give: 0666 (files) or 0777 (directories) less the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def usual_modes(root: Path) -> None:
    """Give ``root`` and everything under it the usual modes: some writers (safetensors, mkdtemp) create
    0600 files and 0700 directories, which a serving process running as another user cannot read."""
    for path in [root, *Path(root).rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, usual_mode(directory=path.is_dir()))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, usual_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite(obj, path: tuple, found: list):
    """``obj`` with non-finite floats replaced by None, each recorded in ``found`` with its JSON path."""
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append({"path": list(path), "value": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")})
        return None
    if isinstance(obj, dict):
        return {k: _finite(v, (*path, k if isinstance(k, str) else json.dumps(k)), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, (*path, i), found) for i, v in enumerate(obj)]
    return obj


def json_bytes(obj) -> bytes:
    """Valid JSON of ``obj`` (a dict when it may hold non-finite numbers; see the module docstring)."""
    found: list = []
    clean = _finite(obj, (), found)
    if found:
        if not isinstance(clean, dict):
            raise ValueError(f"non-finite numbers at {found[0]['path']} in a JSON artifact that is not an object")
        clean = {**clean, NON_FINITE_KEY: {"note": NON_FINITE_NOTE, "values": found}}
    return (json.dumps(clean, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_atomic(path, json_bytes(obj))


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def from_json_text(text: str):
    """Parse a JSON artifact and put its non-finite numbers back (see :func:`json_bytes`)."""
    obj = json.loads(text)
    if isinstance(obj, dict) and isinstance(obj.get(NON_FINITE_KEY), dict):
        for entry in obj.pop(NON_FINITE_KEY).get("values", []):
            *head, last = entry["path"]
            target = obj
            for p in head:
                target = target[p]
            target[last] = _NON_FINITE[entry["value"]]
    return obj


def read_json(path: str | Path):
    """A JSON artifact written by :func:`write_json_atomic`, non-finite numbers restored."""
    return from_json_text(Path(path).read_text(encoding="utf-8"))


def fingerprint(inputs) -> str:
    """The sha256 (hex) of ``inputs`` as canonical JSON (sorted keys; non-JSON values by ``str``): the one
    fingerprint of what a result depends on, for run stages (tasa.stages), measured mixture points and the
    like.  Equal inputs give equal fingerprints in every process and version of tasa."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
