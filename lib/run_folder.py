"""Output folders the scripts write, made safe before any work starts: every folder a run will write is checked
(a file in the way, a folder that cannot be created or written), one run at a time owns an output folder (a lock
file), and files that no textworld-rl run wrote are never overwritten (a marker file lists the ones it wrote).

Each check raises ValueError with one line that names the path and the fix; the scripts turn it into `error: ...`.

The lock (`LOCK_FILE`, JSON: pid, host, start time) is taken by the launch's main process only and released when the
run ends or its process exits; a lock whose process is gone (same host, that pid no longer runs) is taken over with
a warning. The marker (`MARKER_FILE`, JSON) lists the entries at the folder's top that textworld-rl scripts wrote.
"""

import atexit
import contextlib
import datetime
import fcntl
import fnmatch
import json
import os
import socket
import sys
from pathlib import Path

import psutil

from lib.games import default_cache_dir, would_generate

LOCK_FILE = ".textworld-rl.lock"
MARKER_FILE = ".textworld-rl-run.json"
GAMES_ENV = "TEXTWORLD_RL_GAMES"

# The folders this process has locked: resolved folder -> (lock file, whether this process created the folder).
_held: dict[Path, tuple[Path, bool]] = {}


# ---- paths


def check_writable_folder(path: Path, name: str, fix: str) -> None:
    """Raise ValueError unless `path` is a folder this process can write into, or one it can create. `name` says
    what the path is in the message (`--output_dir out`), `fix` what to do instead (`pass another --output_dir`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} is a file, not a folder: {fix} or move the file")
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{name} is under the file {existing}, not a folder: {fix} or move the file")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ValueError(f"{name} {where}: {fix} or fix the folder's permissions")


def games_cache_dir(games_dir: str | None) -> tuple[Path, str]:
    """(the games cache, the flag or variable that chose it) for a `--games_dir` value (None: not given, then
    $TEXTWORLD_RL_GAMES or ./games). An empty value would put generated games into the current folder: refused."""
    if games_dir is not None:
        if not games_dir.strip():
            raise ValueError("--games_dir is empty: pass a folder, or leave the flag out for "
                             f"${GAMES_ENV} or ./games")
        return Path(games_dir), "--games_dir"
    if GAMES_ENV in os.environ:
        if not os.environ[GAMES_ENV].strip():
            raise ValueError(f"${GAMES_ENV} is set but empty: set it to a folder, or unset it for ./games")
        return Path(os.environ[GAMES_ENV]), f"${GAMES_ENV}"
    return default_cache_dir(), "--games_dir"


def check_games_dir(games_dir: str | None, sources: list[tuple[str, str]]) -> Path:
    """The games cache for a `--games_dir` value (see games_cache_dir), checked for the (game source, split) pairs
    the run resolves: never a file, and writable when a game must be generated into it (a complete cache may be
    read-only, shared between users)."""
    path, source = games_cache_dir(games_dir)
    name = f"{source} {path}"
    fix = "pass another --games_dir" if source == "--games_dir" else f"set ${GAMES_ENV} to another folder"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} is a file, not a folder: {fix} or move the file")
    if any(would_generate(games, split, path) for games, split in sources):
        check_writable_folder(path, f"{name} (the games cache, where missing games are generated)", fix)
    return path


# ---- the lock


def is_launch_main_process() -> bool:
    """The process of rank 0 (or of a plain `python` run). Read from the launcher's environment: the lock is taken
    before accelerate has started (before the model loads)."""
    return os.environ.get("RANK", "") in ("", "0")


def lock_output_dir(folder: Path) -> None:
    """Make this process the owner of `folder` (created if missing) until release_output_dirs or the process exits.
    Raises ValueError naming the owner when another live run holds it; a stale lock is taken over with a warning."""
    folder = Path(folder)
    if folder.resolve() in _held:
        return  # an earlier main() of this process took it (scripts called in-process, as the tests do)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": now}
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        # Claims of this folder on this machine one at a time, so that two runs never both take over a stale lock.
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        owner = read_lock(lock)
        if owner is not None:
            if owner_alive(owner):
                raise ValueError(lock_held_message(folder, lock, owner))
            print(f"warning: {lock} was left by pid {owner['pid']} on {owner['host']} (started {owner['started']}), "
                  "which no longer runs: taking --output_dir over", file=sys.stderr)
        write_lock(lock, mine, replace=owner is not None)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        os.close(descriptor)
    _held[folder.resolve()] = (lock, created)


def read_lock(lock: Path) -> dict | None:
    """The owner a lock file names (pid, host, started), or None without one. An unreadable lock is no proof that
    its run has ended: ValueError."""
    try:
        owner = json.loads(lock.read_text())
        if not (isinstance(owner, dict) and {"pid", "host", "started"} <= owner.keys() and type(owner["pid"]) is int):
            raise ValueError("not a lock of textworld-rl")
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise ValueError(f"lock file {lock} is unreadable ({error}): delete it if no run uses its folder") from None
    return owner


def write_lock(lock: Path, owner: dict, replace: bool) -> None:
    """The lock written whole (a reader never sees half of it): beside it first, then linked (fails when another
    machine's run created one meanwhile) or, taking over a stale lock, renamed into place."""
    temporary = lock.with_name(f"{lock.name}.{owner['pid']}")
    temporary.write_text(json.dumps(owner) + "\n")
    try:
        if replace:
            os.replace(temporary, lock)
        else:
            os.link(temporary, lock)
    except FileExistsError:
        raise ValueError(lock_held_message(lock.parent, lock, read_lock(lock) or owner)) from None
    finally:
        temporary.unlink(missing_ok=True)


def owner_alive(owner: dict) -> bool:
    """Whether the run a lock names may still run: always on another machine (it cannot be asked); on this one,
    while its pid runs a process started before the lock was written (a later one reuses a dead run's pid)."""
    if owner["host"] != socket.gethostname():
        return True
    try:
        process = psutil.Process(owner["pid"])
        started = datetime.datetime.fromisoformat(owner["started"]).timestamp()
        # The lock's time has whole seconds; a process created after it is not its run.
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() < started + 1
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def lock_held_message(folder: Path, lock: Path, owner: dict) -> str:
    here = owner["host"] == socket.gethostname()
    fix = "wait for it to end or pass another --output_dir"
    if not here:  # its process cannot be checked from here
        fix += f"; if it no longer runs, delete {lock}"
    return (f"--output_dir {folder} is in use by another run: pid {owner['pid']} on {owner['host']}, started "
            f"{owner['started']} (lock file {lock}): {fix}")


def release_output_dirs() -> None:
    """Give up every output folder this process has locked (a script's run holds one), removing a folder again when
    this process created it and nothing was written into it."""
    while _held:
        folder, (lock, created) = _held.popitem()
        with contextlib.suppress(OSError, ValueError):
            if read_lock(lock)["pid"] == os.getpid():  # still ours: never remove a lock another run wrote since
                lock.unlink()
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()


atexit.register(release_output_dirs)  # a run that ends by an error, sys.exit or Ctrl-C gives its folder up too


# ---- the marker


def recorded_outputs(folder: Path) -> set[str]:
    """The names at the top of `folder` that textworld-rl scripts wrote (none without a readable marker)."""
    try:
        marker = json.loads((Path(folder) / MARKER_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return set()
    return set(marker.get("outputs", [])) if isinstance(marker, dict) else set()


def record_outputs(folder: Path, names: list[str]) -> None:
    """Add `names` (entries at the top of `folder`) to its marker before writing them: later runs may replace them."""
    folder = Path(folder)
    temporary = folder / f"{MARKER_FILE}.{os.getpid()}"
    outputs = sorted(recorded_outputs(folder) | set(names))
    temporary.write_text(json.dumps({"written_by": "textworld-rl", "outputs": outputs}, indent=2) + "\n")
    os.replace(temporary, folder / MARKER_FILE)


def check_no_foreign_outputs(folder: Path, outputs: tuple[str, ...]) -> None:
    """Raise ValueError when `folder` holds entries matching `outputs` (name patterns: what the run writes at the
    folder's top) that no textworld-rl run recorded: the run would overwrite a user's files."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    recorded = recorded_outputs(folder)
    foreign = sorted(path.name for path in folder.iterdir() if path.name not in recorded
                     and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in outputs))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"--output_dir {folder} holds {shown}, which this run would overwrite and no textworld-rl "
                         "run wrote: pass another --output_dir, or --overwrite_output_dir to replace them")
