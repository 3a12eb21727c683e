"""Small helpers shared by the scripts: user-facing errors, flag types, atomic writes, dataset folders.

No torch here (the slow import), so that every script's ``--help`` answers at once.
"""
import argparse
import ctypes
import ctypes.util
import errno
import hashlib
import io
import math
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import sys
import tempfile
import traceback
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import cv2
import tifffile
from tqdm import tqdm

if sys.platform == "win32":  # file locks, signals and process checks below are POSIX's
    sys.exit("error: this toolkit runs on Linux and macOS; on Windows, run it in WSL (Windows Subsystem for Linux)")
import fcntl  # noqa: E402  (POSIX only: after the check above)

import psutil  # noqa: E402  (after the check: it refuses a platform it does not know, as the tests fake Windows)


class UserError(Exception):
    """A mistake the user can fix. The message is one or two lines naming the file or flag and the fix.

    ``exit_code`` follows the Unix convention used by argparse: 2 for a usage error (a flag), 1 for a data
    error (a file).
    """

    exit_code = 1


class UsageError(UserError):
    """A bad flag or flag combination (exit code 2)."""

    exit_code = 2


class DataError(UserError):
    """A missing, unreadable or inconsistent input file (exit code 1)."""

    exit_code = 1


def quiet_opencv():
    """Keep OpenCV from logging a file it cannot decode on stderr itself: the DataError that names the file says it
    in one line. Its logging module is cv2.utils.logging since OpenCV 4.13, cv2.setLogLevel before (1: fatal)."""
    logging = getattr(cv2.utils, "logging", None)
    if logging is not None:
        logging.setLogLevel(logging.LOG_LEVEL_FATAL)
    else:
        cv2.setLogLevel(1)


# What run_cli's out-of-memory error tells each script's user to lower: only flags that script has (a run's own
# --batch_size changes only when it starts again)
MEMORY_FLAGS = {"train.py": "a smaller --batch_size or --crop_size (with --overwrite)",
                "predict.py": "a smaller --batch_size or --tile", "val.py": "a smaller --batch_size"}


def run_cli(main, argv=None):
    """Run ``main(argv)`` and turn a UserError into a one-line message and its exit code. The process first keeps
    freed memory (:func:`keep_freed_memory`) and silences OpenCV's own log (the errors name the file instead).

    With ``--debug`` among the arguments the full traceback is shown instead. Ctrl-C exits with 130
    and a short message, and so do the signals that end a job (:data:`STOP_SIGNALS`); the scripts themselves make
    sure no half-written file is left behind.
    """
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory()
    quiet_opencv()
    try:
        with stop_signals_as_interrupts():
            return main(argv)
    except UserError as e:
        if "--debug" in argv:  # a debugger's post-mortem still sees the frames' variables
            raise
        release_locals(e)
        prog = os.path.basename(sys.argv[0]) or "toolkit"
        clear_line = "\r\033[K" if sys.stderr.isatty() else ""  # over a progress bar the error stopped
        print(f"{clear_line}{prog}: error: {user_message(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # a path that cannot be written or read: a folder where a file goes, no permission, disk full
        if "--debug" in argv or e.strerror is None:
            raise
        release_locals(e)
        prog = os.path.basename(sys.argv[0]) or "toolkit"
        where = e.filename2 or e.filename
        print(f"{prog}: error: {f'{where}: ' if where else ''}{e.strerror} (check the path, its permissions and the "
              "free disk space)", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:  # torch's allocators raise RuntimeErrors (CUDA's a subclass of it)
        if "--debug" in argv or not out_of_memory(e):
            raise
        release_locals(e)
        prog = os.path.basename(sys.argv[0]) or "toolkit"
        first = (str(e).strip().splitlines() or ["MemoryError"])[0][:160]
        fix = f"give {MEMORY_FLAGS[prog]}, or " if prog in MEMORY_FLAGS else ""
        print(f"{prog}: error: out of memory ({first}); {fix}free the memory other processes hold", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        release_locals(e)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def out_of_memory(error):
    """Whether ``error`` says an allocation failed: Python's MemoryError, torch's CPU allocator ("can't allocate
    memory") or CUDA's OutOfMemoryError ("out of memory")."""
    text = str(error)
    return isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def release_locals(error):
    """Clear the local variables of the finished frames that ``error`` and the errors it chains passed through (a
    traceback keeps only the code and line numbers). They may hold a DataLoader: freed now, it ends its workers
    through their own exit, which removes their pymp-* folders in TMPDIR. Kept with the error, it would live until the
    interpreter's exit whenever the error is in a reference cycle (as one a loader worker raised is, through its
    re-raising frame), and multiprocessing would then end the workers with SIGTERM (dataset.quiet_worker's os._exit,
    which skips that removal); a loader freed by the garbage collector also waits 5 s for each worker first."""
    seen = set()
    while error is not None and id(error) not in seen:  # a chain set by hand may loop
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


# What ends a job besides Ctrl-C: kill and timeout (SIGTERM), a closed terminal (SIGHUP), a batch system's warning
# before its time limit (Slurm's --signal: SIGUSR1 or SIGUSR2, which would otherwise kill at once)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@contextmanager
def stop_signals_as_interrupts():
    """Within the block, :data:`STOP_SIGNALS` stop the script as Ctrl-C does (a KeyboardInterrupt), so that it
    cleans up its temporary files and says how to go on; SIGHUP that nohup ignores stays ignored. (A handler set
    outside Python reads as None and is given back as the default.)"""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in previous.items():
        if not (sig == signal.SIGHUP and handler is signal.SIG_IGN):
            signal.signal(sig, raise_keyboard_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def raise_keyboard_interrupt(signum, frame):
    """Signal handler: a signal that ends a job (:data:`STOP_SIGNALS`) is handled as Ctrl-C, so that a script cleans
    up its temporary files as it does for Ctrl-C. After SIGHUP the terminal is gone and printing to it would fail
    (EIO) before the cleanup ends: what is printed then goes nowhere, as under nohup."""
    if signum == signal.SIGHUP:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            if os.isatty(fd):
                os.dup2(devnull, fd)
    raise KeyboardInterrupt


def progress_bar(iterable=None, **kwargs):
    """tqdm with the toolkit's defaults: redrawn as work goes on at a terminal; written every 30 s to a file (a batch
    job's log), which would otherwise take a line's worth of bar ten times a second."""
    try:
        terminal = sys.stderr is not None and sys.stderr.isatty()
    except ValueError:  # closed
        terminal = False
    if not terminal:
        kwargs.setdefault("mininterval", 30)
        kwargs.setdefault("maxinterval", kwargs["mininterval"])  # tqdm's monitor redraws after 10 s otherwise
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def usable_cpus():
    """The CPUs this process may run on (>= 1): those a batch job or taskset gave it (Slurm's --cpus-per-task), not
    all of the machine's (os.cpu_count), and no more than the CPU time its cgroup's quota allows (a container's
    --cpus, a Kubernetes limit; :func:`cgroup_cpus`). macOS, which cannot restrict them, counts all."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpus()
    return cpus if quota is None else min(cpus, quota)


def cgroup_cpus(root="/"):
    """The CPUs' worth of time (an int >= 1, rounded up: 0.5 CPU gives 1) that the tightest CFS quota of this
    process's cgroup or of one above it allows, as :func:`cgroup_folders` finds them under ``root``: cgroup v2's
    cpu.max ("<quota> <period>", "max <period>" for none) or v1's cpu.cfs_quota_us / cpu.cfs_period_us (-1 for
    none). None when no quota is set."""
    folders, v1 = cgroup_folders("cpu", root)
    limits = []
    for folder in folders:
        try:
            if v1:
                with open(os.path.join(folder, "cpu.cfs_quota_us")) as f:
                    quota = f.read().strip()
                with open(os.path.join(folder, "cpu.cfs_period_us")) as f:
                    period = int(f.read())
            else:
                with open(os.path.join(folder, "cpu.max")) as f:
                    quota, period = f.read().split()
                period = int(period)
            if quota.isdigit() and period > 0:  # "max" or -1: no quota
                limits.append(max(1, math.ceil(int(quota) / period)))
        except (OSError, ValueError):
            pass
    return min(limits, default=None)


def ram():
    """(total, available) bytes of RAM this process may use: psutil's (available counts the page cache the kernel
    can drop), capped by the memory limit of its cgroup or of one above it (a container's, a batch job's such as
    Slurm's --mem): going past that limit gets the process killed, however much RAM the machine has."""
    memory = psutil.virtual_memory()
    total, available = memory.total, memory.available
    for limit, used in cgroup_memory():
        total, available = min(total, limit), min(available, max(limit - used, 0))
    return total, available


def cgroup_memory(root="/"):
    """[(limit, used)] bytes of each memory cgroup with a limit from this process's own up to the top, as
    :func:`cgroup_folders` finds them under ``root``: cgroup v2's memory.max and memory.current, or v1's
    memory.limit_in_bytes and memory.usage_in_bytes, ``used`` less the inactive page cache (memory.stat), which the
    kernel drops before it kills."""
    folders, v1 = cgroup_folders("memory", root)
    files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if v1 \
        else ("memory.max", "memory.current", "inactive_file")
    found = []
    for folder in folders:
        try:
            with open(os.path.join(folder, files[0])) as f:
                limit = f.read().strip()
            with open(os.path.join(folder, files[1])) as f:
                used = int(f.read())
            with open(os.path.join(folder, "memory.stat")) as f:
                stat = dict(line.split() for line in f if len(line.split()) == 2)
            if limit.isdigit() and int(limit) < 2 ** 60:  # "max", or v1's 2^63 rounded to pages: no limit
                found.append((int(limit), used - int(stat.get(files[2], 0))))
        except (OSError, ValueError):
            pass
    return found


def cgroup_folders(controller, root="/"):
    """([folder], v1): the folders under ``root``/sys/fs/cgroup of this process's cgroups that hold ``controller``'s
    files ('cpu', 'memory'), its own first and then each one above it up to the top, as ``root``/proc/self/cgroup
    names them: in cgroup v1's hierarchy of that controller when it has one (hybrid hosts keep an empty v2 one
    beside it), else in v2's (``v1`` False). A container that shows its own cgroup as / is read at the top, where
    it is mounted. ([], False) without /proc/self/cgroup (macOS) or a matching line."""
    try:
        with open(os.path.join(root, "proc", "self", "cgroup")) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return [], False
    v1 = [path for _, controllers, path in entries if controller in controllers.split(",")]
    v2 = [path for number, controllers, path in entries if number == "0" and not controllers]
    if not (v1 or v2):
        return [], False
    top = os.path.join(root, "sys", "fs", "cgroup", *((controller,) if v1 else ()))
    path, folders = (v1 or v2)[0].strip("/"), []
    while path:
        folders.append(os.path.join(top, path))
        path = os.path.dirname(path)
    return folders + [top], bool(v1)


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    By default every block over 128 KiB (up to 32 MiB once the threshold adapts) is its own mmap, unmapped when
    freed; a training step frees and allocates its activations again, so each step faults every page of them
    back in (zero-filled by the kernel). Turning mmap off and the heap trimming down makes the step reuse the
    same memory; bench/kernel_time.py measures the difference. Returns True when applied (glibc only; other C
    libraries are left alone). Forked DataLoader workers inherit it.
    """
    name = ctypes.util.find_library("c")
    if not name or "libc.so" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def user_message(e):
    """The message of a UserError without the worker traceback that a DataLoader worker wraps around it.

    An error raised in a worker process comes back as ``DataError("Caught DataError in DataLoader worker
    process 0.\nOriginal Traceback ...\nutils.DataError: <message>")``; the user only needs <message>.
    """
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = None
    for last in re.finditer(rf"^(?:\w+\.)*{re.escape(type(e).__name__)}: ", text, re.M):
        pass
    return text[last.end():].strip() if last else text.strip().splitlines()[-1]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help lines end with ``(default: X)`` where that tells something: not for a default of None (the help says
    what happens then), not for on/off switches, and not where the help already names its default."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default is None or action.nargs == 0 or "default" in help:
            return help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``prog: error: <message> (see: python prog --help)``, exit code 2,
    instead of the whole usage text above the message, and whose --help shows the defaults (HelpFormatter).

    Flags are taken by their whole names only: argparse's abbreviations would read train.py's ``--scale 0.5`` (a
    predict.py flag) as ``--scale_jitter 0.5``. One flag given under two of its names (``--lr 0.1
    --learning_rate 0.01``) is refused rather than the last one kept without a word."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        flags = [flag_name(a) for a in (args[:args.index("--")] if "--" in args else args)]
        for action in self._actions:
            names = sorted({f for f in flags if f in action.option_strings})
            if len(names) > 1:
                self.error(f"{' and '.join(names)} set the same flag; keep one")
        return super().parse_known_args(args, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see: python {self.prog} --help)\n")


def flag_name(token):
    """The flag a command-line token names: '--lr' of '--lr=0.1', '-b' of '-b16' (a short flag with its value
    attached), the token itself otherwise."""
    if token.startswith("--"):
        return token.split("=", 1)[0]
    return token[:2] if token.startswith("-") and len(token) > 2 else token


def str2bool(v):
    """Parse True/False/1/0/yes/no (any case) for argparse; the seed's flags pass these as strings."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "y", "t", "on"):
        return True
    if s in ("false", "0", "no", "n", "f", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False (or 1/0), got {v!r}")


def bool_or_auto(v):
    """Parse auto or True/False (as str2bool) for argparse: 'auto' or a bool."""
    if str(v).strip().lower() == "auto":
        return "auto"
    try:
        return str2bool(v)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, True or False (or 1/0), got {v!r}") from None


def float_or_auto(v):
    """Parse auto or a number for argparse: 'auto' or a float."""
    if str(v).strip().lower() == "auto":
        return "auto"
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {v!r}") from None


def integer(v):
    """Parse an integer for argparse; also a whole float such as 8.0 (YAML recipes hold those)."""
    try:
        number = float(v)
    except (TypeError, ValueError):
        number = None
    if isinstance(v, bool) or number is None or not number.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}")
    return int(number)


def path_arg(v):
    """An argparse type: a file or folder path, not empty (an empty --output would silently mean the default), with
    ~ expanded as the shell would (it does not in a YAML recipe or after --flag=)."""
    if not v.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {v!r}")
    return os.path.expanduser(v)


def file_extension(v):
    """An argparse type: a file name extension with its dot, such as .png or .tif."""
    if not v.startswith(".") or len(v) < 2 or "/" in v or "\\" in v:
        suggestion = "." + (v.replace("*", "").strip(".") or "png")
        raise argparse.ArgumentTypeError(f"expected an extension with its dot, such as {suggestion}; got {v!r}")
    return v


def at_least(minimum):
    """An argparse type: an integer (:func:`integer`) of at least ``minimum``."""
    def parse(v):
        number = integer(v)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v!r}")
        return number

    parse.__name__ = f"integer >= {minimum}"
    return parse


def device_name(v):
    """Parse --device for argparse: auto, cpu, cuda or cuda:N."""
    s = str(v).strip().lower()
    if s not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", s):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")
    return s


AMP_MODES = ("auto", "bf16", "fp16", "fp32")


def amp_mode(v):
    """Parse --amp for argparse: auto, bf16, fp16 or fp32. True/False (the flag's old values, still in saved
    config.yml files) mean auto and fp32."""
    s = str(v).strip().lower()
    s = {"true": "auto", "1": "auto", "yes": "auto", "false": "fp32", "0": "fp32", "no": "fp32"}.get(s, s)
    if s not in AMP_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(AMP_MODES)}, got {v!r}")
    return s


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(v):
    """Parse --compile for argparse: False (no compile), True (torch.compile's default mode) or a mode name."""
    s = str(v).strip().lower()
    if s in ("false", "0", "no", "off"):
        return False
    s = {"true": "default", "1": "default", "yes": "default", "on": "default"}.get(s, s)
    if s not in COMPILE_MODES:
        raise argparse.ArgumentTypeError(f"expected True, False or one of {', '.join(COMPILE_MODES)}, got {v!r}")
    return s


def check_run_name(name, flag="--name"):
    """A run name is a plain folder name: no path separators, no '..', not absolute."""
    if not name:
        raise UsageError(f"{flag} is empty; give a plain name such as 'dsb2018_96_NestedUNet_wDS' (or leave it out)")
    if name in (".", "..") or os.path.isabs(name) or "/" in name or "\\" in name:
        plain = os.path.basename(os.path.normpath(name))
        example = plain if plain not in ("", ".", "..") and "\\" not in plain else "dsb2018_96_NestedUNet_wDS"
        raise UsageError(f"{flag} {name!r} must be a plain name such as {example!r}, not a path")
    return name


def check_new_run_name(name, given=True):
    """A new run's name also has no leading '-' (the commands printed to evaluate it would read it as a flag), no
    space at either end and no control character (unseen in ``ls``). Runs named so before still load. ``given``:
    by --name, else made from --dataset (the message says so)."""
    control = [c for c in name if unicodedata.category(c) == "Cc"]
    if name.startswith("-") or name != name.strip() or control:
        example = "".join(c for c in name if c not in control).strip().lstrip("-") or "dsb2018_96_NestedUNet_wDS"
        what = f"--name {name!r}" if given else f"the run name {name!r} (made from --dataset)"
        raise UsageError(f"{what} must not start with '-', start or end with a space, or hold a control character; "
                         f"give --name {shlex.quote(example)}")


def printable_path(path):
    """``path`` as it can be printed: bytes that are not UTF-8 (which Python keeps as surrogates) as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_utf8_names(paths):
    """Refuse a file name that is not valid UTF-8 (a Latin-1 name unzipped from a Windows archive, say): OpenCV
    crashes reading it, and no message or CSV file could hold it."""
    for path in paths:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"the name {printable_path(path)} is not valid UTF-8; rename it (e.g. convmv -f "
                            "latin1 -t utf8 --notest <file>)") from None


def clipped(text, width):
    """``text`` on one line, at most ``width`` (>= 3) characters: cut after a whole word, or inside a first word
    that is longer, with '...' where it was cut."""
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    cut = text[:max(width - 3, 0)]
    if " " in cut and text[len(cut)] != " ":  # the cut splits a word: drop it
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip() + "..."


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
    torch.save, which turns a KeyboardInterrupt into a RuntimeError, is never cut off. Main thread only."""
    received = []
    held = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
            for sig in (signal.SIGINT, *STOP_SIGNALS)}
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


def atomic_tiff_write(path, stack, axes):
    """Write a stack of uint8/uint16 pages atomically as an ImageJ TIFF with ``axes`` ("TYX", "ZYX" or "TZYX": the
    stack [N, H, W], [T, Z, H, W], or RGB with a last axis of 3), so that Fiji opens it as a stack or hyperstack."""
    rgb = stack.ndim == len(axes) + 1
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stack, imagej=True, photometric="rgb" if rgb else "minisblack",
                     metadata={"axes": axes + ("S" if rgb else "")})
    with atomic_write(path, "wb") as f:
        f.write(buffer.getbuffer())


class BatchedThreads:
    """Run ``fn(*args)`` jobs in one thread per usable CPU (or ``workers``), a batch at a time, and hand each result to
    ``on_result`` in the order the jobs were submitted.

    Jobs wait until the waiting ones hold ``buffer_mb`` MB (``nbytes`` each, as the caller counts them) or until
    :meth:`flush`; then they all run while the caller waits. Meant for per-image work in libraries that release
    the GIL (OpenCV, NumPy, SciPy, scikit-image) after a network that already uses every core: run beside it, the
    threads only compete with it for the cores. With ``desc``, a flush shows a progress bar of that name, so that
    the caller's own bar does not seem stuck while the jobs run. A context manager: leaving it stops the threads
    and drops the jobs not yet run.
    """

    def __init__(self, on_result, buffer_mb=256, workers=None, desc=None):
        self.on_result, self.desc = on_result, desc
        self.pool = ThreadPoolExecutor(workers or usable_cpus())
        self.waiting, self.waiting_bytes, self.buffer_bytes = [], 0, buffer_mb * 2 ** 20

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop the threads; jobs not yet run are dropped."""
        self.pool.shutdown(cancel_futures=True)

    def submit(self, fn, *args, nbytes=0):
        """Queue ``fn(*args)``; run the queue once it holds ``buffer_mb`` MB."""
        self.waiting.append((fn, args))
        self.waiting_bytes += nbytes
        if self.waiting_bytes >= self.buffer_bytes:
            self.flush()

    def flush(self):
        """Run every waiting job and pass the results to ``on_result``, in order."""
        results = self.pool.map(lambda job: job[0](*job[1]), self.waiting)
        for result in progress_bar(results, desc=self.desc, total=len(self.waiting), unit="img", leave=False,
                                   disable=self.desc is None or not self.waiting):
            self.on_result(result)
        self.waiting, self.waiting_bytes = [], 0


def first_few(items, n=3):
    """'a, b, c and 4 more': the first ``n`` of ``items`` sorted, for a message."""
    items = sorted(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


NEAR_NAMES = ("the names differ only in upper/lower case or in how accents are encoded, which a Mac or Windows "
              "ignores and this does not")


def near_names(wanted, available):
    """The names of ``available`` equal to one of ``wanted`` but for upper/lower case or the encoding of accents
    (Unicode NFC against NFD, as a Mac writes them), sorted; for a message (:data:`NEAR_NAMES`)."""
    def key(name):
        return unicodedata.normalize("NFC", name).casefold()
    keys, exact = {key(w) for w in wanted}, set(wanted)
    return sorted(a for a in available if a not in exact and key(a) in keys)


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
