"""Evaluate a trained run on its validation split (or its test split, or another dataset) and write what it
predicted.

    python val.py --name dsb2018_96_NestedUNet_wDS
    python val.py --name dsb2018_96_NestedUNet_wDS --split test --tta
    python val.py --name dsb2018_full_UNet_crop256 --dataset dsb2018_test_full     # every image of a test set

With ``--dataset`` every image of inputs/<dataset>/ is scored, at the run's evaluation size (resized for a run
trained on resized images, the image's own size for a crop-trained run), and the outputs go to
outputs/<name>_on_<dataset>/, never over the run's own validation outputs.

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

from config import INPUTS_DIR, add_amp_arg, add_separation_args, saved_run_dir
from utils import ArgumentParser, UsageError, run_cli

# what val.py prints for each --separation, in the order the DSB2018 scores follow the chosen one
SEPARATION_NAMES = {"cc": "connected components", "watershed": "watershed", "borders": "learned borders"}


def build_parser():
    p = ArgumentParser(prog="val.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Evaluate models/<name>/model.pth on the run's own split. When "
                                   "inputs/<dataset>/labels/ exists, also the DSB2018 instance score of the nuclei "
                                   "that --separation, --min_size and --min_confidence make (the other separations "
                                   "printed beside it).")
    p.add_argument("--name", required=True, help="run name (a folder in models/)")
    p.add_argument("--split", default=None, choices=["val", "test", "train"],
                   help="which ids of split.csv (default val)")
    p.add_argument("--dataset", default=None,
                   help="score every image of inputs/<dataset>/ instead (a dataset the run was not trained on, e.g. "
                        "the test set that preprocess_dsb2018.py makes from stage1_test)")
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


def evaluation_ids(args, cfg):
    """(dataset folder, ids to score, what they are) for --split (ids from the run's split.csv) or --dataset (every
    image of that dataset)."""
    from dataset import list_ids  # deferred with the other heavy imports: --help stays fast
    from trainer import read_split

    if args.dataset is not None:
        if args.split is not None:
            raise UsageError("--split picks ids of the run's own dataset; with --dataset every image is scored, so "
                             "give one of the two")
        dataset_dir = args.dataset if os.path.isdir(os.path.join(args.dataset, "images")) else \
            os.path.join(INPUTS_DIR, args.dataset)
        ids = list_ids(dataset_dir, cfg.img_ext, cfg.mask_ext, cfg.num_classes)
        return dataset_dir, ids, f"all of {dataset_dir} (not trained on)"
    split_name = args.split or "val"
    mdir = saved_run_dir(args.name)
    split = read_split(os.path.join(mdir, "split.csv"))
    ids = split.loc[split["split"] == split_name, "img_id"].tolist()
    if not ids:
        raise UsageError(f"{mdir}/split.csv has no '{split_name}' ids (train with --test_size for a test split)")
    return os.path.join(INPUTS_DIR, cfg.dataset), ids, f"{split_name} split"


def main(argv):
    args = build_parser().parse_args(argv)
    import numpy as np
    import pandas as pd
    import torch

    from dataset import MODALITIES
    from engine import Precision, evaluate
    from instances import choose_separation, dsb_scores, object_filters, read_labels
    from metrics import per_image_scores
    from trainer import build_criterion, load_run, make_eval_loader
    from utils import atomic_imwrite, atomic_write, choose_device
    from visualize import denormalize, overlay_panel, write_summary

    filters = object_filters(args.min_size, args.min_confidence)
    device = choose_device(args.device)
    cfg, model = load_run(args.name, device, args.prune)
    args.separation = choose_separation(args.separation, cfg.borders, args.name)
    methods = [m for m in SEPARATION_NAMES if m != "borders" or cfg.borders]
    methods.insert(0, methods.pop(methods.index(args.separation)))
    dataset_dir, ids, part = evaluation_ids(args, cfg)
    cfg.num_workers = args.num_workers
    cfg.batch_size = args.batch_size or cfg.batch_size
    loader = make_eval_loader(cfg, dataset_dir, ids, device)
    kinds = dict(zip(loader.dataset.img_ids, loader.dataset.modalities()))
    out_dir = args.output or os.path.join("outputs", args.name if args.dataset is None else
                                          f"{args.name}_on_{os.path.basename(os.path.normpath(args.dataset))}")
    rows = []
    layout = loader.dataset.layout
    labelled = {i for i in ids if layout.labels(i) is not None}
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
                truth = read_labels(layout.labels(img_id), probs.shape[2:])
                border = probs[i, classes] if cfg.borders else None
                for method, score in dsb_scores(probs[i, 0], truth, methods, border=border, **filters).items():
                    dsb[method].append(score)
                rows[-1]["dsb"] = dsb[args.separation][-1]
            if not args.no_overlays:
                atomic_imwrite(os.path.join(out_dir, "overlays", img_id + ".png"),
                               overlay_panel(denormalize(images[i]), masks[i, 0].cpu().numpy() > 0, probs[i, 0]))

    precision = Precision.choose(device, args.amp)
    scores = evaluate(precision.prepare(model), loader, build_criterion(cfg), precision, desc="eval",
                      prune=args.prune, tta=args.tta, on_batch=save_batch, classes=classes)
    table = pd.DataFrame(rows).sort_values("iou", kind="stable").reset_index(drop=True)
    with atomic_write(os.path.join(out_dir, "scores.csv")) as f:
        table.to_csv(f, index=False, float_format="%.6f")
    if not args.no_overlays:
        write_summary(os.path.join(out_dir, "overlays"), table, os.path.join(out_dir, "summary.png"))
    what = f"{part}, {len(ids)} images, {precision.describe()}" + (", flip TTA" if args.tta else "") + \
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
