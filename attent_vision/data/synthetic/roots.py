"""Which folder an embedded generator may write into, and where its own files go.

A generator writes into ``root`` only when ``root``

- does not exist and may be created: ``create=True``, or ``create="auto"`` (the configs' default) with ``root``
  inside ``data_dir`` (``paths.data_dir``); ``create=False`` never creates it;
- is an empty folder;
- or holds a set that the same generator wrote (its marker ``<root>/.attent/generator.json``, or the meta.json of
  a set written before the marker existed).

Anything else (a real dataset, someone's files) is refused with one line before a single file is written, and is
never overwritten or deleted. The marker and the generation lock live in ``<root>/.attent/``, never beside
``root``: its parent may be read-only or shared. A complete set is reused before any of this, without writing, so a
read-only copy anywhere works.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CREATE_KEY",
    "GENERATOR_NAME",
    "STATE_DIR",
    "RootOwner",
    "claim_root",
    "claimed_root",
    "generation_lock",
    "is_inside",
    "parse_create",
    "read_json",
]

STATE_DIR = ".attent"
_MARKER = "generator.json"
_LOCK = "generate.lock"
GENERATOR_NAME = "attent_vision.data.synthetic"  # the marker's and meta.json's "generator"
CREATE_KEY = "data.synthetic.create"


@dataclass(frozen=True, kw_only=True)
class RootOwner:
    """The generator claiming a root.

    Attributes:
        kind: Written into the marker; a root marked with another kind is refused.
        legacy: Recognises a set this generator wrote before the marker existed (its meta.json).
        foreign: Advice when the root holds the real dataset this generator imitates (how to train on it), or None.
    """

    kind: str
    legacy: Callable[[Path], bool]
    foreign: Callable[[Path], str | None]


def _config_error(message: str) -> Exception:
    from .errors import ConfigError  # imports torch: only when there is an error to report

    return ConfigError(message)


def _root_error(message: str) -> Exception:
    from .errors import DataRootError

    return DataRootError(message)


def parse_create(value: Any) -> bool | str:
    """``data.synthetic.create`` as True, False or "auto"; raises ConfigError on anything else."""
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _config_error(f"{CREATE_KEY}: must be auto, true or false, got {value!r}")


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``folder`` or lies below it, after resolving symlinks and ``..`` (neither need exist)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker(kind: str) -> str:
    return json.dumps({"generator": GENERATOR_NAME, "kind": kind}, sort_keys=True) + "\n"


def _listing(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _create(root: Path, *, create: bool | str, data_dir: str | os.PathLike[str] | None, key: str) -> None:
    if create is True or (create == "auto" and data_dir is not None and is_inside(root, data_dir)):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _config_error(f"{key}: cannot create {root} ({error.strerror or error})") from None
        return
    if create is False:
        raise _config_error(
            f"{key}: {root} does not exist and {CREATE_KEY}=false does not create it; create the folder, or set "
            f"{CREATE_KEY}=true"
        )
    where = f"paths.data_dir ({data_dir})" if data_dir is not None else "paths.data_dir"
    raise _config_error(
        f"{key}: {root} does not exist; the synthetic data is created on its own only inside {where}: pass "
        f"{CREATE_KEY}=true to create it there, or give an existing folder"
    )


def _check_contents(root: Path, *, owner: RootOwner, key: str) -> None:
    marker = read_json(root / STATE_DIR / _MARKER)
    if marker is not None and marker.get("generator") == GENERATOR_NAME:
        if marker.get("kind") == owner.kind:
            return
        raise _root_error(
            f"{key}: {root} holds the embedded {marker.get('kind')} data, not the {owner.kind} data; refusing to "
            "write into it: choose another folder"
        )
    try:
        entries = sorted(name for name in os.listdir(root) if name != STATE_DIR)
    except OSError as error:
        raise _config_error(f"{key}: cannot read {root} ({error.strerror or error})") from None
    if not entries or owner.legacy(root):
        return
    advice = owner.foreign(root)
    if advice is not None:
        raise _root_error(f"{key}: {root} {advice}")
    raise _root_error(
        f"{key}: {root} is not empty and holds no synthetic data ({_listing(entries)}); refusing to write into it: "
        "choose a new or empty folder"
    )


def _write_marker(root: Path, kind: str) -> None:
    state = root / STATE_DIR
    path = state / _MARKER
    text = _marker(kind)
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return
    state.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{_MARKER}.", suffix=".tmp", dir=state)
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
        os.replace(tmp, path)  # ranks that claim an empty root together write the same text
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def claim_root(
    root: str | os.PathLike[str],
    *,
    owner: RootOwner,
    create: bool | str = True,
    data_dir: str | os.PathLike[str] | None = None,
    key: str = "data.root",
) -> Path:
    """Makes ``root`` a folder ``owner`` may generate into (see the module docstring), or raises without writing.

    Args:
        root: The dataset root.
        owner: The generator.
        create: Whether a missing root is created: True, False, or "auto" (only inside ``data_dir``).
        data_dir: ``paths.data_dir``, where "auto" creates a missing root.
        key: The setting that named ``root``, for the messages.

    Returns:
        ``root`` as a Path, marked as ``owner``'s (``<root>/.attent/generator.json``).

    Raises:
        ConfigError: ``root`` is missing and may not be created, is a file, or cannot be written.
        DataRootError: ``root`` holds files the generator did not write (a ConfigError and a FileExistsError).
    """
    root = Path(root)
    create = parse_create(create)
    if not os.path.lexists(root):
        _create(root, create=create, data_dir=data_dir, key=key)
    elif not root.is_dir():
        raise _config_error(f"{key}: {root} is not a folder")
    else:
        _check_contents(root, owner=owner, key=key)
    try:
        _write_marker(root, owner.kind)
    except OSError as error:
        raise _config_error(f"{key}: cannot write into {root} ({error.strerror or error})") from None
    return root


@contextlib.contextmanager
def generation_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive lock inside ``root`` (``<root>/.attent/generate.lock``): processes that start together (DDP
    ranks, sweep jobs) generate once. ``root`` must exist (see `claim_root`)."""
    state = Path(root) / STATE_DIR
    state.mkdir(exist_ok=True)
    with open(state / _LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def claimed_root(
    root: str | os.PathLike[str],
    *,
    owner: RootOwner,
    create: bool | str = True,
    data_dir: str | os.PathLike[str] | None = None,
    key: str = "data.root",
) -> Iterator[Path]:
    """`claim_root`, then `generation_lock` held for the body."""
    path = claim_root(root, owner=owner, create=create, data_dir=data_dir, key=key)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(generation_lock(path))
        except OSError as error:
            raise _config_error(f"{key}: cannot lock {path} ({error.strerror or error})") from None
        yield path
