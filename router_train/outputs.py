"""Safe file output: atomic writes, output directories replaced only once the new content is complete,
and exports published by swapping one symlink."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so readers see either the old or the complete new content, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def check_output_dir(path: str | os.PathLike, *, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse an output path that is not a directory, or a non-empty directory without `overwrite`; touches nothing.

    Run it before any work, so that a bad output path fails at once; `staged_output_dir` writes there later.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise FileExistsError(f"{flag} {path} exists and is not a directory; remove it or choose another {flag}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty; pass --overwrite to replace it")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: cannot create files in {parent}; choose another {flag}")
    return path


@contextmanager
def staged_output_dir(path: str | os.PathLike, *, overwrite: bool, flag: str = "--out") -> Iterator[Path]:
    """A fresh temporary directory beside `path` to write into; when the block completes it replaces `path`
    (whose old content stays untouched until then), and when the block fails it is removed."""
    path = check_output_dir(path, overwrite=overwrite, flag=flag).resolve()
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with signals_deferred():  # a Ctrl-C between making the directory and naming it would leave it behind
            staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.chmod(staging, 0o755)
        yield staging
        replace_directory(staging, path)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # innermost first: the directories made for the output, if still empty
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def replace_directory(new: Path, target: Path) -> None:
    """Move the complete directory `new` to `target`, replacing a directory there, which is then removed.

    The old directory is renamed aside and `new` renamed in its place while SIGINT and SIGTERM wait, so an
    interrupt never leaves `target` missing or a copy of the old content behind.
    """
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    with signals_deferred():
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.replace(target, aside)  # a directory may replace an empty one
        os.replace(new, target)
        shutil.rmtree(aside)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (main thread only: signal handlers
    can only be set there; elsewhere the block runs unprotected)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in kinds}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)


def versions_dir(link: Path) -> Path:
    """The hidden directory holding the versions that the symlink `link` points to (`.NAME.versions`)."""
    return link.with_name(f".{link.name}.versions")


def new_version(link: Path) -> Path:
    """A fresh, empty directory for the next version of `link`; invisible at `link` until `publish_version`."""
    versions = versions_dir(link)
    versions.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-")
    version = Path(tempfile.mkdtemp(dir=versions, prefix=stamp))
    os.chmod(version, 0o755)
    return version


def publish_version(link: Path, version: Path) -> None:
    """Point `link` at the complete directory `version` with one atomic rename of a symlink, then remove
    the other versions. A real directory at `link` (an export of an earlier router-train) becomes a version."""
    versions = versions_dir(link)
    tmp = versions / f".link-{secrets.token_hex(4)}"
    os.symlink(os.path.relpath(version, link.parent), tmp)
    try:
        if link.is_dir() and not link.is_symlink():
            with signals_deferred():
                os.replace(link, Path(tempfile.mkdtemp(dir=versions, prefix="previous-")))
                os.replace(tmp, link)
        else:
            os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    remove_stale_versions(link)


def remove_stale_versions(link: Path) -> None:
    """Remove everything in the versions directory of `link` but the version it points to: replaced
    versions and the leftovers of interrupted runs."""
    versions = versions_dir(link)
    if not versions.is_dir():
        return
    current = link.resolve() if link.is_symlink() else None
    for entry in versions.iterdir():
        if entry.resolve() == current and not entry.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if not any(versions.iterdir()):
        versions.rmdir()
