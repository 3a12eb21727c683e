"""Evaluate a trained run on its validation split (or its test split) and write what it predicted.

    python val.py --name dsb2018_96_NestedUNet_wDS
    python val.py --name dsb2018_96_NestedUNet_wDS --split test --tta

Reads models/<name>/config.yml, model.pth and split.csv; prints pooled IoU, mean per-image IoU and mean
per-image Dice; writes outputs/<name>/<class>/<id>.png (probability x 255, 8-bit PNG; runs trained with
--borders True also borders/<id>.png), scores.csv (one row per image, worst first, with its kind: fluorescence,
stained or bright-field, see dataset.image_modality; with a ``dsb`` column, the
DSB2018 instance score, when inputs/<dataset>/labels/ holds 16-bit instance labels: nuclei split by
--separation, the other ways printed beside it), overlays/<id>.png (image | truth | prediction | errors) and
summary.png.
"""
import argparse
import os

from config import add_amp_arg, add_separation_args
from utils import ArgumentParser, run_cli

# what val.py prints for each --separation, in the order the DSB2018 scores follow the chosen one
SEPARATION_NAMES = {"cc": "connected components", "watershed": "watershed", "borders": "learned borders"}


def build_parser():
    p = ArgumentParser(prog="val.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Evaluate models/<name>/model.pth on the run's own split. When "
                                   "inputs/<dataset>/labels/ exists, also the DSB2018 instance score of the nuclei "
                                   "that --separation, --min_size and --min_confidence make (the other separations "
                                   "printed beside it).")
    p.add_argument("--name", required=True, help="run name (a folder in models/)")
    p.add_argument("--split", default="val", choices=["val", "test", "train"], help="which ids of split.csv")
    p.add_argument("--tta", action="store_true", help="average the four flips (test-time augmentation)")
    p.add_argument("--prune", type=int, default=None, choices=[1, 2, 3, 4],
                   help="NestedUNet with deep supervision: run only the sub-network up to head X0,L")
    add_separation_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_amp_arg(p)
    p.add_argument("--batch_size", type=int, default=None, help="default: the run's batch size")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--output", default=None, help="folder for the outputs (default outputs/<name>)")
    p.add_argument("--no_overlays", action="store_true", help="skip overlays/ and summary.png")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    from config import INPUTS_DIR, run_dir

    import numpy as np
    import pandas as pd
    import torch

    from dataset import MODALITIES
    from engine import Precision, evaluate
    from instances import choose_separation, dsb_scores, object_filters, read_labels
    from metrics import per_image_scores
    from trainer import build_criterion, load_run, make_eval_loader, read_split
    from utils import UsageError, atomic_imwrite, atomic_write, choose_device
    from visualize import denormalize, overlay_panel, write_summary

    filters = object_filters(args.min_size, args.min_confidence)
    device = choose_device(args.device)
    cfg, model = load_run(args.name, device, args.prune)
    args.separation = choose_separation(args.separation, cfg.borders, args.name)
    methods = [m for m in SEPARATION_NAMES if m != "borders" or cfg.borders]
    methods.insert(0, methods.pop(methods.index(args.separation)))
    mdir = run_dir(args.name)
    split = read_split(os.path.join(mdir, "split.csv"))
    ids = split.loc[split["split"] == args.split, "img_id"].tolist()
    if not ids:
        raise UsageError(f"{mdir}/split.csv has no '{args.split}' ids (train with --test_size for a test split)")
    cfg.num_workers = args.num_workers
    cfg.batch_size = args.batch_size or cfg.batch_size
    loader = make_eval_loader(cfg, os.path.join(INPUTS_DIR, cfg.dataset), ids, device)
    kinds = dict(zip(loader.dataset.img_ids, loader.dataset.modalities()))
    out_dir = args.output or os.path.join("outputs", args.name)
    rows = []
    labels_dir = os.path.join(INPUTS_DIR, cfg.dataset, "labels")
    labelled = {i for i in ids if os.path.isfile(os.path.join(labels_dir, i + ".png"))}
    dsb = {m: [] for m in methods}
    classes = cfg.num_classes

    def save_batch(meta, images, logits, masks):
        probs = torch.sigmoid(logits).cpu().numpy()
        ious, dices = (s.cpu().numpy() for s in per_image_scores(logits[:, :classes], masks[:, :classes]))
        for i, img_id in enumerate(meta["img_id"]):
            for c in range(probs.shape[1]):
                atomic_imwrite(os.path.join(out_dir, str(c) if c < classes else "borders", img_id + ".png"),
                               np.round(probs[i, c] * 255).astype(np.uint8))
            rows.append({"img_id": img_id, "iou": float(ious[i]), "dice": float(dices[i]), "kind": kinds[img_id]})
            if img_id in labelled:  # DSB2018 instance score at the evaluated size
                truth = read_labels(os.path.join(labels_dir, img_id + ".png"), probs.shape[2:])
                border = probs[i, classes] if cfg.borders else None
                for method, score in dsb_scores(probs[i, 0], truth, methods, border=border, **filters).items():
                    dsb[method].append(score)
                rows[-1]["dsb"] = dsb[args.separation][-1]
            if not args.no_overlays:
                atomic_imwrite(os.path.join(out_dir, "overlays", img_id + ".png"),
                               overlay_panel(denormalize(images[i]), masks[i, 0].cpu().numpy() > 0, probs[i, 0]))

    precision = Precision.choose(device, args.amp)
    scores = evaluate(precision.prepare(model), loader, build_criterion(cfg), precision, desc=args.split,
                      prune=args.prune, tta=args.tta, on_batch=save_batch, classes=classes)
    table = pd.DataFrame(rows).sort_values("iou", kind="stable").reset_index(drop=True)
    with atomic_write(os.path.join(out_dir, "scores.csv")) as f:
        table.to_csv(f, index=False, float_format="%.6f")
    if not args.no_overlays:
        write_summary(os.path.join(out_dir, "overlays"), table, os.path.join(out_dir, "summary.png"))
    what = f"{args.split} split, {len(ids)} images, {precision.describe()}" + (", flip TTA" if args.tta else "") + \
        (f", pruned at L={args.prune}" if args.prune else "")
    per_kind = table.groupby("kind")["iou"].agg(["size", "mean"])
    by_kind = ", ".join(f"{k} {per_kind['mean'][k]:.4f} ({per_kind['size'][k]})" for k in MODALITIES
                        if k in per_kind.index)
    print(f"{args.name} ({what}):\n"
          f"  IoU  {scores['iou']:.4f} pooled   {scores['iou_mean']:.4f} mean per image\n"
          f"  Dice {scores['dice']:.4f} pooled   {scores['dice_mean']:.4f} mean per image\n"
          f"  mean IoU by image kind (images): {by_kind}\n" +
          (f"  DSB2018 score {', '.join(f'{np.mean(v):.4f} ({SEPARATION_NAMES[m]})' for m, v in dsb.items())}, "
           f"mean over the {len(labelled)} images with instance labels\n" if labelled else "") +
          f"  worst image {table['img_id'][0]} (IoU {table['iou'][0]:.3f}); files in {out_dir}/ "
          f"(scores.csv, {'' if args.no_overlays else 'overlays/, summary.png, '}probability PNGs per class)")
    if labelled:
        scores.update(dsb=float(table["dsb"].mean()), **{f"dsb_{m}": float(np.mean(v)) for m, v in dsb.items()})
    return scores


if __name__ == "__main__":
    run_cli(main)
