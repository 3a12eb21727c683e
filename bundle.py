"""Make a finished run the toolkit's bundled model: pretrained/<name>/ with fp16 weights and their SHA-256.

    python bundle.py --name dsb2018_full_UNet_crop256_borders_longer --as nuclei

Writes pretrained/<as>/model.pth (the best weights, stored as fp16: half the size, and the network is evaluated
in fp32 or bf16 anyway), model.pth.sha256 (checked on every load), config.yml, split.csv and log.csv, and the
post-processing that val.py --tune chose for the run (postprocessing.yml) when it has one for these weights. A run
under models/<name>/ always wins over pretrained/<name>/ when both exist. Git keeps every version of a weights
file in every clone forever, so replace the bundled model only with a clearly better one; the model card
(pretrained/<name>/README.md) is written by hand.
"""
import os
import shutil

import yaml

import config
from files import folder_replaced_when_done, sha256_file
from utils import ArgumentParser, UsageError, run_cli

COPIED = ("config.yml", "split.csv", "log.csv")


def build_parser():
    p = ArgumentParser(prog="bundle.py",
                       description="Copy models/<name>/ to pretrained/<as>/ with fp16 weights and their SHA-256.")
    p.add_argument("--name", required=True, help="run name (a folder in models/)")
    p.add_argument("--as", dest="bundle_name", default=None,
                   help="the name users load it by (default: the run name); a stable one, such as nuclei, lets a "
                        "better model replace it without breaking anyone's commands")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    given = args.bundle_name is not None
    name = config.check_run_name(args.bundle_name if given else args.name, "--as" if given else "--name")
    src = config.run_dir(config.check_run_name(args.name, "--name"))
    if not os.path.isdir(src):
        raise UsageError(f"--name {args.name}: no run of that name in models/"
                         f"{config.run_name_suggestion(args.name, bundled=False)}")
    missing = [f for f in ("model.pth",) + COPIED if not os.path.isfile(os.path.join(src, f))]
    if missing:
        raise UsageError(f"{src} lacks {', '.join(missing)}: bundle a finished run")
    # Heavy imports only now, so that --help and flag errors answer at once.
    import torch

    from checkpoints import load_checkpoint, load_run

    # refused now, as predict.py would refuse it: a config.yml it cannot use (the original pytorch-nested-unet's), or
    # weights that do not fit it
    cfg, _ = load_run(args.name, torch.device("cpu"))
    weights = load_checkpoint(os.path.join(src, "model.pth"), torch.device("cpu"))
    tuned, stale = config.tuned_post_processing(args.name, cfg.borders)
    if stale:
        print(f"{stale}; not bundled")
    dst = os.path.join(config.PRETRAINED_DIR, name)
    # built beside, then put in place whole: stopped halfway, new weights never sit beside the old checksum
    with folder_replaced_when_done(dst) as tmp:
        if os.path.isdir(dst):  # the model card and its pictures stay
            shutil.copytree(dst, tmp, dirs_exist_ok=True)
        path = os.path.join(tmp, "model.pth")
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, path)
        bundled = sha256_file(path)
        with open(path + ".sha256", "w") as f:
            f.write(f"{bundled}  model.pth\n")
        for copied in COPIED:
            shutil.copyfile(os.path.join(src, copied), os.path.join(tmp, copied))
        held = os.path.join(tmp, config.TUNED_FILE)
        if os.path.exists(held):  # chosen for the weights bundled before
            os.remove(held)
        if tuned:
            with open(os.path.join(src, config.TUNED_FILE), encoding="utf-8") as f:
                record = yaml.safe_load(f)
            # the fp16 weights run in fp32 or bf16, as the weights it was chosen for did: the choice holds for them
            record["weights_sha256"] = bundled
            with open(held, "w", encoding="utf-8") as f:  # inside the folder replaced when complete
                yaml.safe_dump(record, f, sort_keys=False)
    size = os.path.getsize(os.path.join(dst, "model.pth"))
    copied = COPIED + (config.TUNED_FILE,) * bool(tuned)
    print(f"wrote {dst}/ (model.pth {size / 2**20:.1f} MiB fp16, its SHA-256, {', '.join(copied)}); "
          f"use it with: python predict.py --name {name} --input <images> --output <folder> --instances")
    return dst


if __name__ == "__main__":
    run_cli(main)
