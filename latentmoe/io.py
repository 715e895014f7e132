"""The small shared jobs, each written once: atomic writes, directory commits, destinations we own, JSON reads
with a one-line error, the one-line error text, figure saving, and unit constants.

How latentmoe writes files (the rules are in docs/safety.md; this module is where they are kept):

* **Atomic.** A file is written to a temporary sibling (``.latentmoe-tmp-NAME-XXXX``), fsynced and renamed over
  its destination, so a reader sees the old file or the new one, never half of one. A directory (a checkpoint,
  an export) is built under a temporary name beside its destination and renamed into place the same way.
* **Owned.** Every directory a command creates holds a marker, ``.latentmoe.json``, naming the command's kind and
  the entries it wrote. A command only ever removes or replaces entries its marker lists (plus its own
  ``.latentmoe-tmp-*`` temporaries); a destination holding anything else is refused with a
  :class:`DestinationError` naming the first foreign entry, unless the caller passes ``overwrite=True`` — and even
  then foreign entries are left alone, and one that has the name of a file we must write is still refused.
* **Temporaries of a crash** carry the ``.latentmoe-tmp-`` prefix (the marker of a temporary), so the next start
  in the same directory can find and remove them (:func:`remove_stale_temporaries`) and report what it removed.

Nothing here imports torch: the planner, which is torch-free, uses the unit constants.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------ units

KILO = 10**3
MEGA = 10**6
GIGA = 10**9
TERA = 10**12
BYTES_PER_KIB = 2**10
BYTES_PER_MIB = 2**20
BYTES_PER_GIB = 2**30
MS_PER_S = 1_000
US_PER_S = 1_000_000
BITS_PER_BYTE = 8
SIZE_UNITS = {
    "KB": KILO, "MB": MEGA, "GB": GIGA, "TB": TERA,
    "KIB": BYTES_PER_KIB, "MIB": BYTES_PER_MIB, "GIB": BYTES_PER_GIB, "TIB": 2**40,
}

FILE_MODE = 0o644
DIR_MODE = 0o755
TEMP_PREFIX = ".latentmoe-tmp-"
OWNER_FILE = ".latentmoe.json"
OWNER_FORMAT = 1
ERROR_TEXT_LIMIT = 300
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
# Temporaries written by latentmoe before the .latentmoe-tmp- prefix existed (0.1.0): same role, old names.
_LEGACY_TEMP = re.compile(r"^\.checkpoint-\d+\.(tmp|old)-[A-Za-z0-9_]+$")


class DestinationError(ValueError):
    """A destination holds files latentmoe did not write (or cannot be written); the message names the entry."""


def parse_size(size: int | str, *, what: str = "size") -> int:
    """Bytes from an int or a string: a number and an optional unit — B, KB/MB/GB/TB (powers of 1000),
    KiB/MiB/GiB/TiB (powers of 1024), any case: ``"2GiB"``, ``"1.5GB"``, ``"500 MB"``, ``"4096"``. Anything else, or
    a size under one byte, is a ValueError naming ``what``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE_RE.match(size) if isinstance(size, str) else None
        unit = match.group(2).upper() if match else None
        if match is None or (unit and unit.removesuffix("B") and unit not in SIZE_UNITS):
            raise ValueError(f"{what} {size!r} is not a size like 2GiB, 512MiB, 1.5GB or 4096 (bytes)")
        value = int(float(match.group(1)) * SIZE_UNITS.get(unit, 1))
    if value < 1:
        raise ValueError(f"{what} must be at least one byte, got {size!r}")
    return value


def format_bytes(n: float) -> str:
    """``1.5 GiB``-style text for a byte count (binary units, as memory is reported)."""
    for unit, scale in (("TiB", 2**40), ("GiB", BYTES_PER_GIB), ("MiB", BYTES_PER_MIB), ("KiB", BYTES_PER_KIB)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------------ errors


def one_line(exc: BaseException | str, *, limit: int = ERROR_TEXT_LIMIT) -> str:
    """An exception (or text) as one line of at most ``limit`` characters — how every user-facing error is shown.

    OS errors name their file (``[Errno 28] No space left on device: 'x'`` becomes
    ``x: No space left on device``)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        text = f"{where}: {exc.strerror}" if where else exc.strerror
    else:
        text = str(exc)
    text = " ".join(text.split()) or (type(exc).__name__ if isinstance(exc, BaseException) else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: str | os.PathLike, *, error: type[Exception] = ValueError, what: str = "") -> Any:
    """The JSON value in ``path``; any failure (missing, unreadable, not UTF-8, not JSON) is ``error`` with one
    line naming the file (``what`` says what the file is, e.g. "config")."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{label}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{label}: cannot read ({exc.strerror or one_line(exc)})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


# ------------------------------------------------------------------------------------------------ atomic files


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_file(parent: str | os.PathLike, name: str) -> Path:
    """A new empty temporary file in ``parent`` for the eventual entry ``name`` (our temporary prefix)."""
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f"{TEMP_PREFIX}{name}-")
    os.close(fd)
    return Path(tmp)


def temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new empty temporary directory in ``parent`` for the eventual entry ``name`` (mode 0755)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=f"{TEMP_PREFIX}{name}-"))
    os.chmod(path, DIR_MODE)  # mkdtemp makes it private
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write to; on success it is fsynced and renamed onto ``path``,
    on failure removed. For writers that want a file name (safetensors, matplotlib, tokenizers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, path.name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)  # mkstemp makes it private (0600)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, value: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Render a ``matplotlib.figure.Figure`` (object API: no pyplot state) to a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def commit_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Publish a fully written temporary directory as ``final``: fsync every file, then one atomic rename.

    ``final`` must not exist (a directory rename cannot replace a non-empty one; callers that replace one of
    our own directories move it aside first, see :func:`replace_owned_directory`)."""
    tmp, final = Path(tmp), Path(final)
    for entry in tmp.rglob("*"):
        if entry.is_file():
            os.chmod(entry, FILE_MODE)
            fsync_file(entry)
    os.chmod(tmp, DIR_MODE)
    if final.exists():
        raise DestinationError(f"{final}: already exists")
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


# ------------------------------------------------------------------------------------------------ ownership


@dataclass
class Ownership:
    """What ``.latentmoe.json`` in a directory says: which command kind made it and which entries it wrote."""

    kind: str
    entries: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"created_by": "latentmoe", "format": OWNER_FORMAT, "kind": self.kind, "entries": sorted(self.entries)}


def read_ownership(directory: str | os.PathLike) -> Ownership | None:
    """The marker of a directory latentmoe made, or None (absent or not ours)."""
    path = Path(directory) / OWNER_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("created_by") != "latentmoe" or not isinstance(data.get("kind"), str):
        return None
    entries = data.get("entries", [])
    return Ownership(kind=data["kind"], entries=[e for e in entries if isinstance(e, str)])


def write_ownership(directory: str | os.PathLike, ownership: Ownership) -> None:
    write_json_atomic(Path(directory) / OWNER_FILE, ownership.to_dict())


def claim(directory: str | os.PathLike, kind: str, names: Iterable[str]) -> None:
    """Record ``names`` (entries of ``directory``) as written by us; creates the marker if needed."""
    directory = Path(directory)
    owner = read_ownership(directory) or Ownership(kind)
    new = set(names) - set(owner.entries)
    if new or not (directory / OWNER_FILE).is_file():
        owner.entries = sorted(set(owner.entries) | new)
        write_ownership(directory, owner)


def disown(directory: str | os.PathLike, names: Iterable[str]) -> None:
    """Drop ``names`` from the marker (after we removed them)."""
    owner = read_ownership(directory)
    if owner is None:
        return
    gone = set(names)
    owner.entries = [e for e in owner.entries if e not in gone]
    write_ownership(directory, owner)


def is_temporary(name: str) -> bool:
    """Whether a directory entry is one of our temporaries (by its prefix, or the 0.1.0 checkpoint names)."""
    return name.startswith(TEMP_PREFIX) or bool(_LEGACY_TEMP.match(name))


def foreign_entries(directory: str | os.PathLike, ownership: Ownership | None) -> list[str]:
    """Entries of ``directory`` that we did not write (sorted); [] for an absent or empty directory."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    ours = set(ownership.entries) if ownership else set()
    return sorted(
        p.name for p in directory.iterdir() if p.name != OWNER_FILE and p.name not in ours and not is_temporary(p.name)
    )


@dataclass(frozen=True)
class Destination:
    """A checked output directory: ``ownership`` is its marker (None when new or empty), ``foreign`` the entries
    we did not write and leave alone (only non-empty with ``overwrite``)."""

    path: Path
    ownership: Ownership | None
    foreign: tuple[str, ...] = ()

    @property
    def is_new(self) -> bool:
        return self.ownership is None and not self.foreign


def check_destination(
    path: str | os.PathLike,
    *,
    kinds: Iterable[str],
    overwrite: bool = False,
    writes: Iterable[str] = (),
    option: str = "--overwrite",
) -> Destination:
    """Decide whether we may write into ``path`` (nothing is written or removed here).

    Allowed: a missing or empty directory; a directory whose marker is of one of ``kinds`` and that holds nothing
    else. With ``overwrite``, foreign entries are tolerated (and will be left alone) unless one of them is named
    in ``writes`` (a file we would have to replace). Anything else is a :class:`DestinationError` naming the
    entry. ``path`` must not be a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DestinationError(f"{path}: exists and is not a directory")
    ownership = read_ownership(path) if path.is_dir() else None
    kinds = tuple(kinds)
    if ownership is not None and ownership.kind not in kinds:
        raise DestinationError(
            f"{path}: holds a latentmoe {ownership.kind} directory, not a {' or '.join(kinds)}; choose another path"
        )
    foreign = foreign_entries(path, ownership)
    if foreign and not overwrite:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise DestinationError(
            f"{path}: holds files latentmoe did not write ({foreign[0]}{more}); choose an empty directory, "
            f"or pass {option} to write beside them (they are never removed)"
        )
    clash = sorted(set(foreign) & set(writes))
    if clash:
        raise DestinationError(f"{path / clash[0]}: exists and was not written by latentmoe; it is not replaced")
    return Destination(path=path, ownership=ownership, foreign=tuple(foreign))


def check_file_destination(
    path: str | os.PathLike, *, ours: Callable[[Path], bool], overwrite: bool = False, option: str = "--overwrite"
) -> None:
    """Decide whether we may write the single file ``path`` (nothing is written here): it must be new, or a file
    ``ours(path)`` recognises as one we wrote (a single file carries no directory marker, so its format must say
    so); any other existing file is a :class:`DestinationError` unless ``overwrite``. A directory never is."""
    path = Path(path)
    if path.is_dir():
        raise DestinationError(f"{path}: is a directory; name the file to write")
    if path.exists() and not overwrite and not ours(path):
        raise DestinationError(f"{path}: exists and was not written by latentmoe; pass {option} to replace it")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove our temporaries (a crash's leftovers) from ``directory``; return what was removed.

    Call this only at the start of a command that owns ``directory`` (no other writer of ours is active there)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if not is_temporary(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def remove_owned(directory: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Remove entries we own from ``directory`` (files, or directories that are wholly ours) and drop them from the
    marker. A directory entry keeps anything inside it that its own record does not list (see
    :func:`owned_tree_files`); it is then left in place and reported back as not removed."""
    directory = Path(directory)
    owner = read_ownership(directory)
    ours = set(owner.entries) if owner else set()
    kept: list[str] = []
    removed: list[str] = []
    for name in names:
        if name not in ours:
            raise DestinationError(f"{directory / name}: not written by latentmoe; not removed")
        entry = directory / name
        if entry.is_dir() and not entry.is_symlink():
            if not remove_owned_tree(entry):
                kept.append(name)
                continue
        else:
            entry.unlink(missing_ok=True)
        removed.append(name)
    disown(directory, removed)
    return kept


def owned_tree_files(directory: Path) -> set[str] | None:
    """Relative paths of the files a directory of ours holds by its own record: the names in its marker, or a
    checkpoint's manifest (``trainer_state.json``). None: no record, so nothing in it may be removed."""
    owner = read_ownership(directory)
    if owner is not None:
        return {*owner.entries, OWNER_FILE}
    state = directory / "trainer_state.json"
    try:
        manifest = json.loads(state.read_text(encoding="utf-8")).get("checkpoint_files")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(manifest, dict):
        return None
    return {*manifest, state.name}


def foreign_in_tree(directory: str | os.PathLike) -> list[str] | None:
    """Entries inside a directory of ours that its own record does not list (relative paths, sorted), or None when
    it has no record at all."""
    directory = Path(directory)
    files = owned_tree_files(directory)
    if files is None:
        return None
    foreign = []
    for entry in sorted(directory.iterdir()):
        if is_temporary(entry.name):
            continue
        if entry.name not in files:
            foreign.append(entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            inner = foreign_in_tree(entry)
            foreign += [f"{entry.name}/{x}" for x in (inner if inner is not None else ["*"])]
    return foreign


def remove_owned_tree(directory: str | os.PathLike) -> bool:
    """Delete the files a directory of ours records, then the directory if nothing else is left.

    Returns False (and leaves the directory, minus our files) when it holds something we did not write."""
    directory = Path(directory)
    files = owned_tree_files(directory)
    if files is None:
        return False
    for name in files:
        target = directory / name
        if target.is_dir() and not target.is_symlink():
            remove_owned_tree(target)
        else:
            target.unlink(missing_ok=True)
    remove_stale_temporaries(directory)
    try:
        directory.rmdir()
    except OSError:
        return False
    return True


def replace_owned_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Publish ``tmp`` as ``final`` where ``final`` may be an existing directory of ours: the old one is renamed to
    a temporary name first (never deleted before the new one is in place), then removed by its own record.

    An existing ``final`` holding anything its record does not list is refused (nothing is moved): a temporary
    directory of ours therefore only ever holds our own files, which is what lets a later start remove it."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        return commit_directory(tmp, final)
    foreign = foreign_in_tree(final)
    if foreign is None:
        raise DestinationError(f"{final}: exists and was not written by latentmoe; it is not replaced")
    if foreign:
        raise DestinationError(f"{final / foreign[0]}: was not written by latentmoe; {final} is not replaced")
    aside = temp_dir(final.parent, f"old-{final.name}")
    os.replace(final, aside / final.name)
    commit_directory(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
    return final


def publish_directory(tmp: str | os.PathLike, destination: Destination, *, kind: str) -> Path:
    """Make the fully written temporary directory ``tmp`` the content of a checked ``destination``.

    The marker in the result lists every entry of ``tmp``. A new or empty destination, or one that is wholly ours,
    is replaced by one rename (the old one is never removed before the new one is in place). A destination
    holding foreign entries (allowed only with ``overwrite``) keeps them: our entries are renamed in one by one,
    our previous entries that the new set lacks are removed, and the marker lists a superset of our files at
    every moment, so a crash part-way never makes a foreign file look like ours or ours look foreign."""
    tmp, final = Path(tmp), destination.path
    new_entries = sorted(p.name for p in tmp.iterdir() if p.name != OWNER_FILE and not is_temporary(p.name))
    write_ownership(tmp, Ownership(kind, new_entries))
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()  # rename() replaces only non-existent targets portably
    if not final.exists():
        return commit_directory(tmp, final)
    if not destination.foreign:
        return replace_owned_directory(tmp, final)
    old = destination.ownership.entries if destination.ownership else []
    write_ownership(final, Ownership(kind, sorted(set(old) | set(new_entries))))
    for name in new_entries:
        source, target = tmp / name, final / name
        if source.is_dir():
            replace_owned_directory(source, target)  # tmp is a sibling of final: same filesystem
        else:
            os.chmod(source, FILE_MODE)
            fsync_file(source)
            os.replace(source, target)
    stale = [name for name in old if name not in new_entries]
    remove_owned(final, stale)
    write_ownership(final, Ownership(kind, new_entries))
    shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(final)
    return final
