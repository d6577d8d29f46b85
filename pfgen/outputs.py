"""Every file pfgen writes goes through here: output checks, one atomic writer, and run locks.

- `check_output_path` / `check_outputs`: before any work starts, each output's folder exists and is writable,
  no two outputs of one run share a path, and an existing file is refused unless overwriting was asked for.
- `with atomic_output(path) as tmp`: a temp path unique to this process beside `path`; on success the temp is
  given normal permissions and renamed over `path`, on any exception (Ctrl-C and SIGTERM included: the CLI
  turns those signals into KeyboardInterrupt) it is removed. A folder works the same way (`directory=True`).
- `output_lock(path)`: an `fcntl` lock beside an output (or in an output folder) so that two runs never write
  the same file; the second one is refused with the first one's pid. `output_locks(...)`: every output of a run.
- `PreviousVersion(path)`: what an output held before a run that may replace it step by step (a saved state),
  put back if the run fails before it has something consistent to keep (docs/reliability.md, section 1's rule).
- `signals_deferred()`: SIGINT / SIGTERM / SIGHUP wait until a step that must not be cut in two is done.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import signal
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pfgen.errors import PfgenError

PARTIAL = ".partial"  # marker in every temp name: `.NAME.<pid>-<random>.partial<suffix>`


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would have given the file
DIR_MODE = 0o777 & ~_umask()


def temp_path(path: Path) -> Path:
    """A temp name beside `path`, unique per process and call, that keeps `path`'s suffix (ffmpeg and
    Pillow pick the format from it) and starts with a dot (hidden from globs of finished outputs)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(3)}{PARTIAL}{path.suffix}")


def is_partial(path: Path) -> bool:
    return path.name.startswith(".") and PARTIAL in path.name


def partial_pid(path: Path) -> int | None:
    """The pid that wrote a temp file named by `temp_path`, if the name has one."""
    try:
        return int(path.name.rsplit(PARTIAL, 1)[0].rsplit(".", 1)[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def write_error(path: Path, exc: OSError) -> PfgenError:
    """One line for a failed write: what, where, why, and the fix."""
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
            errno.EROFS: "choose a writable folder", errno.EACCES: "choose a folder you can write to",
            errno.EPERM: "choose a folder you can write to"}.get(exc.errno)
    return PfgenError(f"cannot write {path}: {reason}", hint)


def _remove(tmp: Path) -> None:
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass


class atomic_output:  # noqa: N801 - used like contextlib.suppress: `with atomic_output(path) as tmp:`
    """Write to the temp path `__enter__` returns; it becomes `path` only when the block ends without an
    exception (or on `commit()`), and is removed otherwise (or on `discard()`).

    OSErrors (disk full, read-only folder) become one-line `PfgenError`s naming `path`.
    """

    def __init__(self, path: str | Path, *, directory: bool = False):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.directory = directory

    def __enter__(self) -> Path:
        if self.directory:
            try:
                self.tmp.mkdir(mode=0o700)
            except OSError as exc:
                raise write_error(self.path, exc) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
            return False
        self.discard()
        if isinstance(exc, OSError):
            raise write_error(self.path, exc) from None
        return False

    def commit(self) -> Path:
        try:
            if not self.tmp.exists():
                raise PfgenError(f"nothing was written to {self.path}")
            if self.directory:
                _umask_modes(self.tmp)
                self._replace_folder()
            else:
                os.chmod(self.tmp, FILE_MODE)
                os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise write_error(self.path, exc) from None
        except BaseException:
            self.discard()
            raise
        return self.path

    def _replace_folder(self) -> None:
        """The finished folder takes the place of `path`; an existing folder there (the caller checked that
        replacing it was asked for) is moved aside first and removed only after the rename."""
        old = None
        if self.path.is_dir() and not self.path.is_symlink():
            if any(self.path.iterdir()):
                old = temp_path(self.path)
                os.replace(self.path, old)
            else:
                self.path.rmdir()
        os.replace(self.tmp, self.path)
        if old is not None:
            _remove(old)

    def discard(self) -> None:
        _remove(self.tmp)


def _umask_modes(folder: Path) -> None:
    """Libraries write some files 0600 (safetensors); what pfgen writes follows the umask, like open() does."""
    os.chmod(folder, DIR_MODE)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def write_safetensors(tensors: dict, tmp: Path, metadata: dict[str, str]) -> None:
    """safetensors' `save_file` into a temp path; its own error for a failed write (disk full) becomes the
    OSError it wraps, which `atomic_output` turns into one line."""
    import re

    from safetensors.torch import save_file

    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except Exception as exc:
        code = re.search(r"code: (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_folder_writable(folder: Path) -> None:
    """Fail now, not after an hour of generation, when nothing can be created in `folder`."""
    if not folder.exists():
        raise PfgenError(f"output folder {folder} does not exist", "create it first or choose another path")
    if not folder.is_dir():
        raise PfgenError(f"{folder} is not a folder")
    probe = temp_path(folder / "write-check")
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        raise write_error(folder, exc) from None
    probe.unlink()


def check_output_path(path: str | Path, suffix: str | None = None, *, overwrite: bool = True,
                      option: str = "output") -> Path:
    """An output file that can be written: folder exists and is writable, right suffix, not a folder, and
    (with overwrite=False) not there yet."""
    path = Path(path).expanduser()
    if suffix and path.suffix.lower() != suffix:
        raise PfgenError(f"{option} file {path.name} must end in {suffix}")
    if path.is_dir():
        raise PfgenError(f"{option} path {path} is a folder", "give a file name")
    if path.exists() and not overwrite:
        raise PfgenError(f"{path} already exists", "pass --overwrite (-y) to replace it, or choose another name")
    check_folder_writable(path.parent)
    return path


def check_free_space(path: Path, needed: int, option: str, at_least: bool = False) -> None:
    """Refuse an output of known size (`at_least`: a lower bound of it) that its folder's free space cannot
    hold (checked before the work)."""
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        bound = "at least " if at_least else ""
        raise PfgenError(f"{option} {path} needs {bound}{needed / 2 ** 20:.1f} MiB, its folder has "
                         f"{free / 2 ** 20:.1f} MiB free", "free some space or write elsewhere")


def check_outputs(**outputs: Path | None) -> None:
    """Refuse two outputs of one run that share a path (one would destroy the other), and an output inside the
    frames folder (which holds this run's frames and nothing else: the next run with -y would refuse it)."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        key = Path(os.path.abspath(Path(path).expanduser()))
        option = "--" + option.replace("_", "-")
        if key in seen:
            raise PfgenError(f"{seen[key]} and {option} are the same file ({path})", "give each output its own path")
        seen[key] = option
    frames_dir = outputs.get("frames_dir")
    if frames_dir is not None:  # a frames folder holds this run's frames only (sinks.check_frames_dir)
        folder = Path(os.path.abspath(Path(frames_dir).expanduser()))
        for option, path in outputs.items():
            if path is not None and option not in ("frames_dir", "resume") and \
                    folder in Path(os.path.abspath(Path(path).expanduser())).parents:
                raise PfgenError(f"--{option.replace('_', '-')} {path} is inside the --frames-dir folder {frames_dir}",
                                 "that folder holds the frames only: write the file elsewhere")


class OutputLock:
    """An exclusive `fcntl` lock on `<folder>/.<name>.lock`, holding the owner's pid."""

    def __init__(self, lock_path: Path, what: Path):
        self.lock_path, self.what = lock_path, what
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise write_error(self.lock_path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise PfgenError(f"another pfgen run (pid {pid}) is writing {self.what}",
                                 "wait for it to finish, or choose another output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its previous owner removed while we waited for it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def output_lock(path: str | Path, *, beside: bool = False) -> OutputLock:
    """The lock of one output file (beside it) or of an output folder (inside it; `beside`: beside it too, for a
    folder that the run may create, so that a run before and a run after its creation take the same lock)."""
    path = Path(path)
    if path.is_dir() and not beside:
        return OutputLock(path / ".pfgen.lock", path)
    return OutputLock(path.with_name(f".{path.name}.lock"), path)


@contextmanager
def output_locks(files=(), folders=()):
    """Hold the locks of every output of one run (None entries skipped; a folder's lock is beside it)."""
    with ExitStack() as held:
        for path in files:
            if path is not None:
                held.enter_context(output_lock(path))
        for path in folders:
            if path is not None:
                held.enter_context(output_lock(path, beside=True))
        yield


class PreviousVersion:
    """What `path` held before this run, kept as a hidden hard link (no extra space; a copy where links are not
    supported) until `drop()` (the run's outcome stands) or `restore()` (put back what was there, or remove a
    file the run created)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.saved: Path | None = None
        if self.path.is_file():
            saved = temp_path(self.path)
            try:
                os.link(self.path, saved)
            except OSError:
                try:
                    shutil.copy2(self.path, saved)
                except OSError as exc:
                    _remove(saved)
                    raise write_error(saved, exc) from None
            self.saved = saved

    def drop(self) -> None:
        if self.saved is not None:
            _remove(self.saved)
            self.saved = None

    def restore(self) -> None:
        try:
            if self.saved is not None:
                os.replace(self.saved, self.path)
                self.saved = None
            else:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass


INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_deferred():
    """SIGINT, SIGTERM and SIGHUP that arrive during the block are recorded and handled (by the handler they
    would have met, the CLI's: KeyboardInterrupt) right after it, so the block's steps happen all or not at all.

    The handlers are swapped, not the main thread's signal mask: a process-directed signal (`kill`) goes to any
    thread that does not block it (the encoder's, the stdin reader's), and Python then runs its handler in the
    main thread at the next bytecode, inside the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in INTERRUPTS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler is not signal.SIG_IGN:
                signal.raise_signal(pending[0])


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove temp files in `folder` left by runs that are gone (their pid is not alive)."""
    removed = []
    for tmp in folder.glob(f".*{PARTIAL}*"):
        pid = partial_pid(tmp)
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        _remove(tmp)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
