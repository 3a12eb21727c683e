"""Writing files so that none is ever half-written, or written by two processes at once.

A file is written to a temporary file beside it and moved over it only when complete (:func:`atomic_write`); a folder
is built beside it and takes its place only when complete (:func:`folder_replaced_when_done`), so that no reader ever
sees a part. An error or Ctrl-C (and, under utils.run_cli, the signals that end a job) leaves the old file or folder as
it was and removes the temporary one; a process killed outright (SIGKILL, out of memory) leaves its temporary files
and folders, named with its pid and host, and a later run removes them (:func:`remove_killed_writes`,
:func:`temp_folder_beside`). A folder is written by one process at a time (:func:`written_alone`): its lock file is
released by the system when the process ends, killed or not.

No torch here (the slow import), as in utils.
"""
import errno
import hashlib
import math
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
from contextlib import contextmanager

import cv2
import numpy as np
import tifffile

from utils import STOP_SIGNALS, DataError, UsageError

import fcntl  # noqa: E402  (POSIX only: after utils, which names WSL on Windows)


def current_umask():
    """This process's umask now, not at the import: a notebook or script may set its own later. Linux's
    /proc/self/status tells it without changing it; elsewhere it is set and put back, the strictest meanwhile, in
    case another thread creates a file then."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextmanager
def locked(path):
    """Hold an exclusive lock on the file ``path`` for the block: the file exists while it is held and is removed
    after; the system drops the lock when the process ends, killed or not (the file then stays, unlocked, and the
    next holder takes it). Yields None when taken, else the pid of the process that holds it (text, '' if unknown),
    and the block runs without the lock. On a file system that takes no locks (a Lustre or NFS mount without them)
    the block runs as if it held it, after a note. A symbolic link at ``path`` is a DataError, and so is another
    user's lock file that this user may not read."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        fd, others = open_lock_file(path)
        if fd is None:  # another user's, removed meanwhile by the process that took it over: open the path again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            yield holder
            return
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                os.close(fd)
                e.filename = path
                raise
            if not others:  # another user's file, opened read-only, would not take this pid: replaced first, below
                print(f"note: {path}: this file system takes no file locks ({e.strerror}), so nothing stops a "
                      "second process from writing the same files", file=sys.stderr)
                break
        try:
            opened, named = os.fstat(fd), os.stat(path)
            current = (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)
        except FileNotFoundError:
            current = False
        if current and not others:
            break
        try:
            # another user's file whose process ended (it would hold the lock): removed, still locked, as a releasing
            # holder removes its own, and this process makes its own. Only while the path still names it: a process
            # that took it over first may have replaced it by its own lock file, held.
            if current:
                os.remove(path)
        finally:
            os.close(fd)  # else the last holder removed the file as this one opened it: open the path again
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as e:
            e.filename = path  # a full disk: name the lock file
            raise
        yield None
    finally:
        os.remove(path)
        os.close(fd)


def open_lock_file(path):
    """(descriptor, whether it is another user's read-only file: :func:`others_lock_file`) of the lock file ``path``,
    made when missing; (None, True) when another user's file went as it was opened. Not through a symbolic link (one
    in a folder from elsewhere: the pid written into it would replace its target), which is a DataError."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), False
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{path} is a symbolic link, not a lock file of this toolkit: remove the link (the file it "
                            "points to is left as it is)") from None
        if e.errno != errno.EACCES or not os.path.isfile(path):
            raise
        return others_lock_file(path), True


def others_lock_file(path):
    """A read-only descriptor of the lock file ``path`` that another user's process made without write permission
    for this user (their umask): enough to take the lock, or to learn that it is held and by whom. None when the file
    is gone (another process took it over and removed it)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise DataError(f"{path} is another user's lock file, which this user may not read: it marks a folder that "
                        "their process writes; remove it once no process of theirs runs here") from None


def lock_file_beside(folder):
    """The lock file of a folder replaced as a whole (a lock file inside would go with it): .<name>.lock beside its
    real path, so that a symbolic link and its target share one, as train.py's models/.<name>.lock."""
    real = os.path.realpath(folder)
    return os.path.join(os.path.dirname(real), f".{temp_stem(real)}.lock")


@contextmanager
def written_alone(folder, flag, lock_file=None):
    """One process at a time writes ``folder``: the block holds ``lock_file`` (:func:`locked`; by default
    :func:`lock_file_beside` the folder), and a second process is refused with a UsageError naming the folder, the
    first one's pid and ``flag``, before it writes anything there; two at once would mix their files, or one would
    replace what the other wrote."""
    with locked(lock_file or lock_file_beside(folder)) as holder:
        if holder is not None:
            by = f" (pid {holder})" if holder else ""
            raise UsageError(f"{folder} is being written by another process{by}; wait for it to end, or choose "
                             f"another {flag}")
        yield


def made_in(folder, make, **kwargs):
    """``make(dir=folder, **kwargs)`` (tempfile.mkstemp or mkdtemp); an OSError (a read-only folder, a full disk)
    names ``folder``, where the user can act, not the temporary name."""
    try:
        return make(dir=folder, **kwargs)
    except OSError as e:
        raise OSError(e.errno, e.strerror, folder) from None


@contextmanager
def atomic_write(path, mode="w", **kwargs):
    """Open a temporary file beside ``path`` and move it over ``path`` only when the block succeeds.

    A crash or Ctrl-C inside the block leaves the old file untouched and no partial file behind. Text is written in
    UTF-8 whatever the locale.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = made_in(directory, tempfile.mkstemp, prefix=f".{temp_stem(path)}.{writer()}.", suffix=".tmp")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")  # not the locale's: the toolkit reads its CSVs back as UTF-8
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the permissions open() would
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            e.filename = path  # a write or fsync (a full disk) names no file
        raise


@contextmanager
def interrupts_held():
    """Hold Ctrl-C (SIGINT) and :data:`STOP_SIGNALS` until the block ends, then act on those received: files written
    together in the block (a run's model.pth, log.csv and last.pth of one epoch) are all of one moment, and
    torch.save, which turns a KeyboardInterrupt into a RuntimeError, is never cut off. Main thread only.

    A Python handler of SIGCHLD is held too: PyTorch's raises for a DataLoader worker that died (the out-of-memory
    killer's SIGKILL). Raised between the write of last.pth and the line after it that records the epoch as saved,
    it made train.py say that no epoch was saved and to start again with --overwrite."""
    received = []
    signals = [signal.SIGINT, *STOP_SIGNALS]
    if callable(signal.getsignal(signal.SIGCHLD)):  # left alone otherwise: a handler makes each child's exit interrupt
        signals.append(signal.SIGCHLD)             # the system calls of C code that may not retry them
    held = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    for sig in received:  # only when the block succeeded: an error inside it is the one to report
        signal.raise_signal(sig)  # one ignored before the block (SIG_IGN) does nothing, and the next one acts


def sha256_file(path):
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_imwrite(path, image):
    """Write an image with OpenCV atomically; the format comes from ``path``'s extension (PNG keeps 16 bit)."""
    ok, buf = cv2.imencode(os.path.splitext(path)[1] or ".png", image)
    if not ok:
        raise DataError(f"could not encode an image for {path}")
    with atomic_write(path, "wb") as f:
        f.write(buf.tobytes())


@contextmanager
def atomic_tiff_pages(path, shape, dtype, axes, pixel_size=None):
    """Write an ImageJ TIFF page by page, atomically as :func:`atomic_write` does: a stack of ``shape`` and
    ``dtype`` (uint8/uint16) with ``axes`` ("TYX", "ZYX" or "TZYX": [N, H, W], [T, Z, H, W], or RGB with a last axis
    of 3), so that Fiji opens it as a stack or hyperstack, calibrated in micrometres with ``pixel_size`` (um per
    pixel). Yields ``write(index, page)``, which puts page ``index`` (counted over the plane axes in C order) [H, W]
    or [H, W, 3] in its place, in any order, so that no page is held. With every page written, the file is the one
    tifffile.imwrite of the whole stack gives."""
    rgb = len(shape) == len(axes) + 1
    metadata, resolution = {"axes": axes + ("S" if rgb else "")}, None
    if pixel_size is not None:
        metadata["unit"], resolution = "um", (1 / pixel_size, 1 / pixel_size)
    page_shape, dtype = tuple(shape[len(axes) - 2:]), np.dtype(dtype)
    pages, page_bytes = math.prod(shape[:len(axes) - 2]), math.prod(page_shape) * dtype.itemsize
    with atomic_write(path, "wb") as f:
        # the header and a hole for the pixels: an uncompressed ImageJ TIFF holds its pages one after another there.
        # A FileHandle to name the file: tifffile wants a name, and os.fdopen's file has its number for one
        offset, _ = tifffile.imwrite(tifffile.FileHandle(f, name=os.path.basename(path)), shape=shape, dtype=dtype,
                                     returnoffset=True, imagej=True, photometric="rgb" if rgb else "minisblack",
                                     metadata=metadata, resolution=resolution)

        def write(index, page):
            if not 0 <= index < pages or page.shape != page_shape or page.dtype != dtype:  # would garble the file
                raise ValueError(f"{path}: page {index} {page.dtype} {page.shape}, expected one of {pages} pages "
                                 f"{dtype} {page_shape}")
            try:
                f.seek(offset + index * page_bytes)
                f.write(np.ascontiguousarray(page))
            except OSError as e:  # a full disk names no file; the stacks removed with this one would name theirs
                e.filename = path if e.filename is None else e.filename
                raise

        yield write


def check_output_folder(path, flag="--output"):
    """Refuse, before any work, an output folder that exists as a file or that this user cannot write in (or
    create: its nearest existing parent is checked); os.makedirs or the first write would fail after the work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file; give a folder for the outputs")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is a file; give a folder for the outputs")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: no permission to write in {existing}; give a folder you can write to")


# Who writes a temporary file or folder, in its name: <pid>@<host>, so that on a file system shared between machines
# (a cluster's) only this machine's are judged by their pid; names without @<host> are of earlier versions
def host_name(raw):
    """``raw`` (socket.gethostname()) as a file name part: letters, digits and '-', at most 32 characters, with a
    short hash of ``raw`` when it had to be changed (10.1.2.3 and 10.1.2.4 must stay two machines)."""
    clean = re.sub(r"[^A-Za-z0-9-]", "-", raw)
    if clean != raw or len(clean) > 32 or not clean:
        clean = f"{clean[:24]}-{hashlib.sha1(raw.encode()).hexdigest()[:7]}"
    return clean


HOST = host_name(socket.gethostname())
WRITER_PATTERN = r"(\d{1,7})(?:@([A-Za-z0-9-]+))?"  # pids are below 2^22 on Linux
# atomic_write's .<name>.<writer>.<random>.tmp (tempfile's random part: 8 of a-z, 0-9 and _)
KILLED_WRITE = re.compile(r"\..+\." + WRITER_PATTERN + r"\.[a-z0-9_]{8}\.tmp", re.ASCII)


def temp_stem(path):
    """The part of a temporary name taken from ``path``'s file name: at most 100 bytes of it, so that the name with
    its writer and random part stays within the file systems' 255 bytes."""
    return os.path.basename(path).encode()[:100].decode("utf-8", "ignore")


def writer():
    """This process as the writer of a temporary file: '<pid>@<host>'."""
    return f"{os.getpid()}@{HOST}"


def writer_gone(pid, host):
    """True when the writer of a temporary file, process ``pid`` on ``host`` (None: this machine), was killed; a
    writer on another machine is never taken for gone."""
    return host in (None, HOST) and process_gone(pid)


def process_gone(pid):
    """True when no process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def remove_killed_writes(folder):
    """Remove the temporary files that :func:`atomic_write` leaves in ``folder`` when its process is killed
    (SIGKILL, out of memory), so that they do not pile up unseen: only files named as it names them, of a
    process that no longer runs (another one writing there now keeps its own)."""
    for entry in os.scandir(folder):
        m = KILLED_WRITE.fullmatch(entry.name)
        if m and entry.is_file(follow_symlinks=False) and writer_gone(int(m.group(1)), m.group(2)):
            os.remove(entry.path)


def temp_folder_beside(path):
    """A new empty folder beside ``path`` (same file system, so :func:`replace_folder` can move it there), with the
    permissions os.makedirs would give (mkdtemp makes it private), a group's set-group-ID bit included. Such folders
    (.<name>.tmp-<writer>-<random>) that a killed process left beside ``path`` are removed first, those of a process
    still building kept; one killed between :func:`replace_folder`'s two renames (``path`` missing, the old folder
    aside as <build>.old) is completed first: its finished build, else the old folder, takes the place."""
    path = os.path.abspath(path)
    parent, prefix = os.path.dirname(path), "." + temp_stem(path) + ".tmp-"
    os.makedirs(parent, exist_ok=True)
    killed = re.compile(re.escape(prefix) + WRITER_PATTERN + r"-\w+(\.old)?", re.ASCII)
    left = [e.path for e in os.scandir(parent) if (m := killed.fullmatch(e.name)) and e.is_dir(follow_symlinks=False)
            and writer_gone(int(m.group(1)), m.group(2))]
    swaps = sorted((f for f in left if f.endswith(".old")), key=lambda old: not os.path.isdir(old[:-len(".old")]))
    for old in swaps:  # those whose finished build is there first
        if os.path.lexists(path):
            break
        finished = old[:-len(".old")]
        try:
            os.rename(finished if os.path.isdir(finished) else old, path)
        except OSError:
            if not os.path.lexists(path):  # else another process completed it first
                raise
    for folder in left:
        shutil.rmtree(folder, ignore_errors=True)
    tmp = made_in(parent, tempfile.mkdtemp, prefix=f"{prefix}{writer()}-")
    # mkdir gave it the set-group-ID bit of a group's shared folder; a chmod without it would clear it, and what is
    # made inside would get the user's own group, which the colleagues cannot read or replace
    os.chmod(tmp, 0o777 & ~current_umask() | os.stat(tmp).st_mode & stat.S_ISGID)
    return tmp


@contextmanager
def folder_replaced_when_done(dst):
    """Build a folder that takes the place of ``dst`` only when complete: yields a new empty folder beside it; when
    the block succeeds it replaces ``dst`` (:func:`replace_folder`), when it fails (an error, Ctrl-C, one of
    :data:`STOP_SIGNALS`) it is removed and ``dst`` stays as it was. A symlinked ``dst`` stays a link: its target is
    what is replaced."""
    dst = os.path.realpath(dst)
    tmp = temp_folder_beside(dst)
    try:
        yield tmp
        replace_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(dst, flag, marker="images", what="a dataset folder"):
    """Refuse to write a folder over ``dst`` unless it is absent, empty, or ``what`` this toolkit wrote before
    (it holds ``marker``: images/ for a dataset, scores.csv for val.py's outputs), and never the current folder
    or one that holds it."""
    real = os.path.realpath(dst)
    if os.path.commonpath([os.getcwd(), real]) == real:
        raise UsageError(f"{flag} {dst} is the current folder or holds it; choose another {flag}")
    if os.path.lexists(dst):
        if not os.path.isdir(dst):
            raise UsageError(f"{flag} {dst} exists and is not a folder; choose another {flag}")
        if os.listdir(dst) and not os.path.exists(os.path.join(dst, marker)):
            raise UsageError(f"{flag} {dst} exists and is not {what} (no {marker} inside); refusing to replace it, "
                             f"choose another {flag}")


def replace_folder(tmp, dst):
    """Move the finished folder ``tmp`` to ``dst`` (absent, an empty folder, or an old dataset folder). The two
    renames that swap an old folder, and the old folder's removal, run with Ctrl-C and :data:`STOP_SIGNALS` held, so
    ``dst`` never goes missing between them and the old one is not left behind."""
    if os.path.isdir(dst) and not os.listdir(dst):
        os.rmdir(dst)
    if not os.path.lexists(dst):
        os.replace(tmp, dst)
        return
    old = tmp + ".old"
    with interrupts_held():
        os.rename(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
