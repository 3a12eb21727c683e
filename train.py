"""Train a UNet or UNet++ (NestedUNet) for nucleus segmentation.

    python train.py --dataset dsb2018_96 --arch NestedUNet --deep_supervision True
    python train.py --config configs/seed_dsb2018_96_NestedUNet_wDS.yml --epochs 20
    python train.py --resume dsb2018_96_NestedUNet_wDS            # continue after a crash or Ctrl-C
    python train.py --config configs/... --auto_resume            # a requeued job: start, continue, or say done
    torchrun --nproc_per_node=4 train.py ...                      # several GPUs (DDP)

Writes models/<name>/: config.yml, split.csv (with the SHA-256 of the val and test images' files), log.csv (one row
per epoch), model.pth (best weights by val IoU, a plain state dict), last.pth (everything needed to resume),
curves.png.
"""
from config import fit_saved_workers, parse_train_args, saved_setting_note
from utils import UsageError, run_cli


def main(argv):
    args = parse_train_args(argv)
    workers_note = fit_saved_workers(args, argv)
    # Heavy imports only now, so that --help and flag errors answer at once.
    from distributed import launched_rank
    from engine import random_states_kept
    from trainer import Trainer, completion_note, run_lock

    with random_states_kept(), run_lock(args.name):
        complete = args.auto_resume and args.resume and completion_note(args)
        if complete:  # exit 0: a requeued job of a finished run ends its loop instead of failing or training again
            if launched_rank() == 0:
                print(complete, flush=True)
            return
        if workers_note and launched_rank() == 0:
            print(workers_note, flush=True)
        try:
            trainer = Trainer(args)
        except UsageError as e:
            raise UsageError(f"{e}{saved_setting_note(e, args, argv)}") from None
        with trainer:
            trainer.fit()
            trainer.print_summary()


if __name__ == "__main__":
    run_cli(main)
