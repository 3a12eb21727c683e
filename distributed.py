"""DistributedDataParallel under torchrun: process-group setup, rank checks and reductions.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op for one process.
NCCL is used on CUDA (one GPU per process, cuda:LOCAL_RANK) and gloo on the CPU.
"""
import os

import torch
import torch.distributed as dist

from utils import UsageError


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_rank():
    """This process's rank as torchrun gave it (0 without torchrun), known before the process group is set up."""
    return int(os.environ.get("RANK", 0))


def setup(device):
    """Initialise the process group when launched by torchrun; returns the device this process uses (on CUDA the GPU
    of its LOCAL_RANK; a UsageError when there is no such GPU)."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= count:
            raise UsageError(f"torchrun started local process {local_rank} but PyTorch sees {count} CUDA "
                             f"GPU{'s' * (count != 1)} here, and each process takes one: give torchrun "
                             f"--nproc_per_node={count} or fewer (or train.py --device cpu)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def cleanup(finished):
    """Leave the process group. ``finished``: every process ended its work normally, so they first wait for each
    other and none tears the group down while rank 0 still writes its files (gloo has aborted a process that did);
    after an error or Ctrl-C they do not wait, as another process may never arrive."""
    if is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_initialized() else 0


def world_size():
    return dist.get_world_size() if is_initialized() else 1


def local_world_size():
    """The processes torchrun started on this machine (its LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main():
    """True on the process that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def reduce_sum(tensor):
    """Sum a tensor over all processes (in place and returned); unchanged for a single process."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module):
    """Copy rank 0's buffers (BatchNorm running statistics) to every process, so that all ranks evaluate
    exactly the weights rank 0 saves."""
    if is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier():
    if is_initialized():
        dist.barrier()
