"""The compile cache: object code on disk, keyed by a hash of everything that shaped it.

An entry is written to a temporary file and renamed into place, so a reader never sees half
of one, and two processes writing the same entry both leave a whole one. Each entry carries
a SHA-256 of its payload: a truncated or damaged entry is detected, ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

MAGIC = b"CNNC-CACHE-1\n"


def cache_dir() -> Path:
    """`$CNNC_CACHE_DIR`, else `$XDG_CACHE_HOME/cnnc`, else `~/.cache/cnnc`."""
    if "CNNC_CACHE_DIR" in os.environ:
        return Path(os.environ["CNNC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnc"


def key_of(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def entry_path(key: str) -> Path:
    return cache_dir() / f"{key}.obj"


def load(key: str) -> bytes | None:
    """The payload stored under `key`, or None when it is absent or damaged."""
    try:
        raw = entry_path(key).read_bytes()
    except OSError:
        return None
    header = len(MAGIC) + 64
    if len(raw) < header or not raw.startswith(MAGIC):
        return None
    checksum, payload = raw[len(MAGIC):header].decode("ascii", "replace"), raw[header:]
    if hashlib.sha256(payload).hexdigest() != checksum:
        return None
    return payload


def store(key: str, payload: bytes) -> None:
    """Store `payload` under `key`; a cache that cannot be written is skipped silently,
    since it only saves time."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{key[:16]}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as file:
            file.write(MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + payload)
        os.replace(temporary, entry_path(key))
    except OSError:
        return
