"""Peak memory of predict.py on a time-lapse TIFF stack, and whether two checkouts write the same stacks.

    python bench/stack_memory.py --frames 120 --size 512
    python bench/stack_memory.py --frames 120 --size 512 --checkouts /path/to/old .

Builds a 16-bit ImageJ time-lapse (TYX, ``--frames`` planes of ``--size`` x ``--size``, bright blobs the size of
the bundled model's nuclei on a noisy background, calibrated at 0.325 um per pixel) in a temporary folder, and runs
``predict.py --name nuclei --instances --overlay --save_prob`` on it from each checkout (default: this one), each
in a fresh process, timed by os.wait4: peak RSS ("Maximum resident set size") and wall time, all runs before any
output is read back. Each checkout's ``<id>*.tif`` are then read back with tifffile and compared with the first
checkout's: pixels, dtype, axes, ImageJ metadata and resolution; then every file written, the tables too, byte for
byte, but prediction.yml. Prints a table, then as the last line one JSON object with every figure.
"""
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402  (after the path set-up above)
import tifffile  # noqa: E402

from utils import ArgumentParser, run_cli  # noqa: E402

SUFFIXES = ("", "_prob", "_instances", "_overlay")
PIXEL_SIZE = 0.325


def make_stack(path, frames, size, seed=0):
    """A uint16 time-lapse [frames, size, size]: Gaussian blobs ~19 px across (the bundled model's nuclei) drifting
    from frame to frame, on a noisy background, written as a calibrated ImageJ TYX stack."""
    rng = np.random.default_rng(seed)
    count = max(1, size * size // 1500)
    centres = rng.uniform(10, size - 10, (count, 2))
    yy, xx = np.mgrid[:size, :size]
    stack = np.empty((frames, size, size), np.uint16)
    for t in range(frames):
        plane = rng.normal(400, 40, (size, size))
        for cy, cx in centres + t * 0.5:
            y0, y1, x0, x1 = (max(0, int(c) - 20) for c in (cy, cy + 40, cx, cx + 40))
            y1, x1 = min(size, y1), min(size, x1)
            plane[y0:y1, x0:x1] += 3000 * np.exp(-((yy[y0:y1, x0:x1] - cy % size) ** 2 +
                                                   (xx[y0:y1, x0:x1] - cx % size) ** 2) / (2 * 6.0 ** 2))
        stack[t] = np.clip(plane, 0, 65535)
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "TYX", "unit": "um"},
                     resolution=(1 / PIXEL_SIZE, 1 / PIXEL_SIZE))


def run_predict(checkout, stack, out_dir, device):
    """predict.py of ``checkout`` on ``stack`` in a fresh process -> (peak RSS MiB, wall seconds)."""
    command = [sys.executable, os.path.join(checkout, "predict.py"), "--name", "nuclei", "--input", stack,
               "--output", out_dir, "--instances", "--overlay", "--save_prob", "--device", device]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{checkout}/predict.py failed ({proc.returncode}):\n{output.decode(errors='replace')[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def read_stack(path):
    """(pixels, axes, ImageJ metadata, resolution) of a TIFF stack as tifffile reads it."""
    with tifffile.TiffFile(path) as tif:
        return tif.asarray(), tif.series[0].axes, tif.imagej_metadata, tif.pages.first.resolution


def differences(out_dir, reference_dir, img_id):
    """The outputs of ``out_dir`` that differ from ``reference_dir``'s, with what differs: the stacks read back, then
    every file (the stacks, objects.csv, images.csv) byte for byte."""
    found = []
    for suffix in SUFFIXES:
        name = f"{img_id}{suffix}.tif"
        new, old = read_stack(os.path.join(out_dir, name)), read_stack(os.path.join(reference_dir, name))
        if new[0].dtype != old[0].dtype or not np.array_equal(new[0], old[0]):
            found.append(f"{name}: pixels")
        found += [f"{name}: {what}" for what, a, b in zip(("axes", "ImageJ metadata", "resolution"), new[1:], old[1:])
                  if a != b]
    # prediction.yml records each run's own command, folder and time (and an older checkout writes none)
    for name in sorted((set(os.listdir(out_dir)) | set(os.listdir(reference_dir))) - {"prediction.yml"}):
        new, old = os.path.join(out_dir, name), os.path.join(reference_dir, name)
        if not (os.path.isfile(new) and os.path.isfile(old) and filecmp.cmp(new, old, shallow=False)):
            found.append(f"{name}: bytes")
    return found


def main(argv):
    p = ArgumentParser(prog="bench/stack_memory.py", description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=120, help="time points of the stack")
    p.add_argument("--size", type=int, default=512, help="height and width of each plane")
    p.add_argument("--checkouts", nargs="+", default=[ROOT], metavar="DIR",
                   help="checkouts of this project whose predict.py to run, one after the other (the first is the "
                        "reference of the comparison)")
    p.add_argument("--device", default="cpu", help="predict.py --device")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stack_memory_") as tmp:
        stack = os.path.join(tmp, "movie.tif")
        make_stack(stack, args.frames, args.size)
        print(f"input: {args.frames} x {args.size}x{args.size} uint16 TYX, {os.path.getsize(stack) / 2**20:.0f} MiB")
        # Every run before any output is read back: a child's peak RSS counts this process's memory at the fork,
        # which reading a 1000-frame run's stacks took to 3 GiB, above the next run's own peak
        runs = [run_predict(os.path.abspath(checkout), stack, os.path.join(tmp, f"out{k}"), args.device)
                for k, checkout in enumerate(args.checkouts)]
        for k, (checkout, (rss, seconds)) in enumerate(zip(args.checkouts, runs)):
            out_dir = os.path.join(tmp, f"out{k}")
            written = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir)) / 2**20
            diff = differences(out_dir, os.path.join(tmp, "out0"), "movie")
            rows.append({"checkout": os.path.abspath(checkout), "peak_rss_mib": round(rss),
                         "seconds": round(seconds, 1), "written_mib": round(written), "same_as_first": not diff,
                         "differences": diff})
            same = ", outputs identical to the first" if not diff else ", DIFFERENT: " + "; ".join(diff)
            print(f"{checkout}: peak RSS {rss:.0f} MiB, {seconds:.1f} s, {written:.0f} MiB written{same * bool(k)}")
    print(json.dumps({"bench": "stack_memory", "frames": args.frames, "size": args.size, "rows": rows}))


if __name__ == "__main__":
    run_cli(main)
