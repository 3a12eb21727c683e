"""Small helpers shared by the scripts: user-facing errors, flag types, signals, CPUs and memory, progress bars,
per-image work in threads. Writing files safely (atomic writes, locks) is files.py's.

No torch here (the slow import), so that every script's ``--help`` answers at once.
"""
import argparse
import ctypes
import ctypes.util
import importlib.metadata
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import traceback
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import cv2
from tqdm import tqdm

if sys.platform == "win32":  # signals, and files.py's file locks and process checks, are POSIX's
    sys.exit("error: this toolkit runs on Linux and macOS; on Windows, run it in WSL (Windows Subsystem for Linux)")
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
        if "--debug" in argv or not (out_of_memory(e) or compile_failed(e)):
            raise
        release_locals(e)
        prog = os.path.basename(sys.argv[0]) or "toolkit"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if compile_failed(e):
            print(f"{prog}: error: --compile: torch.compile failed ({first}); leave out --compile, or fix its cause "
                  "(a working C++ compiler for the CPU, free space in TMPDIR)", file=sys.stderr)
            sys.exit(1)
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


def compile_failed(error):
    """Whether ``error`` is torch.compile's own (dynamo's or inductor's: no C++ compiler, a full TMPDIR, an operation
    it cannot compile), raised at the first step of a --compile run as a page of internal traceback. Told by the
    class's module, so that --help need not import torch."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


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


def stderr_is_terminal():
    """Whether progress bars draw on a terminal (not a file, a pipe or a closed stream)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except ValueError:  # closed
        return False


def progress_bar(iterable=None, **kwargs):
    """tqdm with the toolkit's defaults: redrawn as work goes on at a terminal; written every 30 s to a file (a batch
    job's log), which would otherwise take a line's worth of bar ten times a second."""
    if not stderr_is_terminal():
        kwargs.setdefault("mininterval", 30)
        kwargs.setdefault("maxinterval", kwargs["mininterval"])  # tqdm's monitor redraws after 10 s otherwise
    elif terminal_columns(sys.stderr) == 0:
        # a terminal whose size was never set (docker exec -t, script run from a job) reads 0 x 0, and tqdm then
        # draws nothing at all: a whole epoch without a sign. COLUMNS and LINES, else 80 x 24.
        size = shutil.get_terminal_size()
        kwargs.setdefault("ncols", size.columns)
        kwargs.setdefault("nrows", size.lines)
        kwargs.setdefault("dynamic_ncols", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def terminal_columns(stream):
    """The width in characters of the terminal ``stream`` writes to (0 for a terminal whose size was never set),
    None where it cannot be asked."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):  # no file descriptor (a stream replaced in Python), a closed one
        return None


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
        self.add_argument("--version", action=VersionAction, help="print the toolkit's version (its git commit) and "
                          "those of Python and torch, for a bug report, and exit")

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


class VersionAction(argparse.Action):
    """--version: prints :func:`version_line` and exits, computed only when asked (a git call)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line(parser.prog))  # to stdout, as argparse's own --version and --help
        parser.exit()


def version_line(prog):
    """'<prog>: toolkit <git commit>, Python 3.11.9, torch 2.13.0+cpu, Linux-...': what a bug report needs, without
    importing torch (its installed version is read from its package's metadata)."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return (f"{prog}: toolkit {code_version(os.path.dirname(os.path.abspath(__file__)))}, Python "
            f"{platform.python_version()}, torch {torch_version}, {platform.platform()}")


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
        # A bar below the caller's own at a terminal only: in a log file its cursor moves would land as escape codes
        for result in progress_bar(results, desc=self.desc, total=len(self.waiting), unit="img", leave=False,
                                   disable=self.desc is None or not self.waiting or not stderr_is_terminal()):
            self.on_result(result)
        self.waiting, self.waiting_bytes = [], 0


def code_version(folder):
    """The toolkit's version for the records of what made a folder of outputs (prediction.yml, evaluation.yml):
    ``git describe --always --dirty`` of the checkout in ``folder`` (a commit, '-dirty' when files were changed
    since), or 'unknown' outside a git checkout or without git."""
    try:
        done = subprocess.run(["git", "-C", folder, "describe", "--always", "--dirty"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


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
