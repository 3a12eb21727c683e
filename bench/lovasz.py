"""Batched Lovasz hinge (lovasz_losses.lovasz_hinge) against the seed's per-image Python loop
(bench/lovasz_reference.py): forward + backward on the same random logits and masks.

For each case (batch x height x width) and device it checks that the two losses and their gradients agree
(max abs difference printed), then times forward + backward of each (median of ``--repeats`` runs after
warm-up) and prints the speed-up. The last line is one JSON object with all the figures.

    python bench/lovasz.py --quick
    python bench/lovasz.py                          # B=16 96x96 and B=16 256x256, CPU and CUDA when present
"""
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from lovasz_losses import lovasz_hinge  # noqa: E402
from lovasz_reference import lovasz_hinge_per_image_loop  # noqa: E402
from timing import cpu_counts, cpu_name, device_list, sync  # noqa: E402
from utils import ArgumentParser  # noqa: E402

IMPLS = {"batched": lovasz_hinge, "loop": lovasz_hinge_per_image_loop}


def parse_args(argv=None):
    p = ArgumentParser(prog="bench/lovasz.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small case, few repeats")
    p.add_argument("--device", default="auto", help="auto (CPU, plus CUDA when present), cpu or cuda")
    p.add_argument("--cases", default=None, help="comma-separated BxHxW, default 16x96x96,16x256x256 "
                   "(--quick: 16x96x96)")
    p.add_argument("--repeats", default=None, type=int, help="timed runs per measurement (default 20, --quick 5)")
    p.add_argument("--warmup", default=3, type=int, help="untimed runs first")
    args = p.parse_args(argv)
    args.cases = args.cases or ("16x96x96" if args.quick else "16x96x96,16x256x256")
    args.repeats = args.repeats or (5 if args.quick else 20)
    try:
        args.case_list = [tuple(int(v) for v in c.lower().split("x")) for c in args.cases.split(",") if c.strip()]
    except ValueError:
        p.error(f"--cases {args.cases!r}: expected e.g. 16x96x96,16x256x256")
    if any(len(c) != 3 or min(c) < 1 for c in args.case_list):
        p.error(f"--cases {args.cases!r}: expected positive BxHxW, e.g. 16x96x96")
    return args


def make_inputs(b, h, w, device, seed=0):
    """Logits ~ 2*N(0, 1) and blob-like masks (some images empty, one full), the same on every device."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b, 1, h, w, generator=g)
    noise = torch.nn.functional.avg_pool2d(torch.randn(b, 1, h, w, generator=g), 9, 1, 4)
    labels = (noise > 0.1).float()
    if b > 2:
        labels[0] = 0.0
        labels[1] = 1.0
    return logits.to(device), labels.to(device)


def fwd_bwd(fn, logits, labels):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, labels)
    loss.backward()
    return loss.detach(), x.grad


def time_impl(fn, logits, labels, device, warmup, repeats):
    for _ in range(warmup):
        fwd_bwd(fn, logits, labels)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd_bwd(fn, logits, labels)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for device in device_list(args.device):
        for b, h, w in args.case_list:
            logits, labels = make_inputs(b, h, w, device)
            (loss_b, grad_b), (loss_l, grad_l) = (fwd_bwd(IMPLS[k], logits, labels) for k in ("batched", "loop"))
            loss_diff = (loss_b - loss_l).abs().item()
            grad_diff = (grad_b - grad_l).abs().max().item()
            agree = torch.allclose(loss_b, loss_l, rtol=1e-5, atol=1e-6) and \
                torch.allclose(grad_b, grad_l, rtol=1e-4, atol=1e-7)
            ms = {k: 1000 * time_impl(fn, logits, labels, device, args.warmup, args.repeats) for k, fn in IMPLS.items()}
            rows.append({"device": device, "batch": b, "height": h, "width": w, "loss": round(loss_b.item(), 6),
                         "loss_max_abs_diff": loss_diff, "grad_max_abs_diff": grad_diff, "agree": bool(agree),
                         "batched_ms": round(ms["batched"], 3), "loop_ms": round(ms["loop"], 3),
                         "speedup": round(ms["loop"] / ms["batched"], 3)})
    head = f"{'device':6} {'case':>12} {'loss':>9} {'|dloss|':>9} {'max|dgrad|':>10} {'agree':>5} " \
           f"{'loop ms':>9} {'batched ms':>10} {'speed-up':>8}"
    print(f"Lovasz hinge forward + backward, median of {args.repeats} after {args.warmup} warm-up")
    print(head)
    print("-" * len(head))
    for r in rows:
        case = f"{r['batch']}x{r['height']}x{r['width']}"
        print(f"{r['device']:6} {case:>12} {r['loss']:>9.5f} {r['loss_max_abs_diff']:>9.2e} "
              f"{r['grad_max_abs_diff']:>10.2e} {str(r['agree']):>5} {r['loop_ms']:>9.2f} {r['batched_ms']:>10.2f} "
              f"{r['speedup']:>7.2f}x")
    devices = {d: (torch.cuda.get_device_name(0) if d == "cuda" else cpu_name()) for d in {r["device"] for r in rows}}
    print(json.dumps({"bench": "lovasz", "torch": torch.__version__, "python": platform.python_version(),
                      **cpu_counts(), "torch_threads": torch.get_num_threads(), "devices": devices,
                      "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick, "rows": rows,
                      "all_agree": all(r["agree"] for r in rows)}), flush=True)
    return 0 if all(r["agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
