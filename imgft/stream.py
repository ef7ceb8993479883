"""Training on a stream (--streaming): the DataLoader that reads this process's share, resumable mid-pass.

Each process reads its own shards (`datasets.distributed.split_dataset_by_node`) through torchdata's
StatefulDataLoader, whose state (the datasets IterableDataset's position in each worker) every checkpoint
saves for every process, so that a resume continues with the next unseen example. A pass over the stream
ends for all processes together, when one of them runs out: shares differ in length, and DDP needs every
process to take the same steps. Accelerate 1.15 would split the stream again in `prepare`, and its
`save_state` writes every process's loader state to one file (huggingface/accelerate#4164): hence this
loader, which `prepare` passes through. Also here: reading a streamed evaluation split's images again.
"""

import logging
import warnings

import datasets
import torch
from accelerate.utils import send_to_device
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from imgft import transforms
from imgft.errors import UserError
from imgft.runtime import log_once

# torchdata 0.11 calls a deprecated torch function each time a loader starts: nothing a user can act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


class StreamLoader:
    """This process's batches of a stream, on its device: what train_loop.py iterates with --streaming.

    `set_epoch` starts a pass (the shards' order and the shuffle buffer's draws follow it); iterating yields
    batches until a process runs out; `state_dict` / `load_state_dict` carry every process's position, for
    `accelerator.register_for_checkpointing`.
    """

    def __init__(self, stream, batch_size, loader_options, accelerator):
        self.rank, self.processes = accelerator.process_index, accelerator.num_processes
        self.share = split_dataset_by_node(
            stream, self.rank, self.processes, strategy=split_strategy(stream.num_shards, self.processes)
        )
        # drop_last: each worker ends its part of a pass with a partial batch (a batch of one breaks
        # BatchNorm); the next pass reads the shards in another order, and so leaves other examples out.
        self.loader = StatefulDataLoader(self.share, batch_size, drop_last=True, **loader_options)
        self.device = accelerator.device
        self.non_blocking = loader_options.get("pin_memory", False)  # a non_blocking copy needs pinned memory
        # A CPU process group for the small collectives below, none of them on the GPU.
        self.group = torch.distributed.new_group(backend="gloo") if self.processes > 1 else None

    def set_epoch(self, epoch):
        self.share.set_epoch(epoch)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            batch = next(batches, None)
            if not every_process_has_one(batch is not None, self.group):
                return  # the end of a pass: a batch this process still had is left for the next pass
            yield send_to_device(batch, self.device, non_blocking=self.non_blocking)

    def state_dict(self):
        """Every process's loader state, gathered: `save_state` writes a registered object's state from the
        main process only. A collective: every process calls it, as `save_state` does."""
        state = {"workers": self.loader.num_workers, "loader": self.loader.state_dict()}
        if self.group is None:
            return {"processes": [state]}
        states = [None] * self.processes
        torch.distributed.all_gather_object(states, state, group=self.group)
        return {"processes": states}

    def load_state_dict(self, saved):
        state = saved["processes"][self.rank]
        if state["workers"] != self.loader.num_workers:  # each worker's position is its own
            raise UserError(
                f"the stream was read with {state['workers']} DataLoader worker(s) per process, and resuming "
                f"it exactly needs as many: rerun with --num_workers {state['workers']}"
            )
        self.loader.load_state_dict(state["loader"])


def split_strategy(num_shards, processes):
    """How `split_dataset_by_node` divides the stream: whole shards when there are enough (each process reads
    and decodes only its own), else every example to one process in turn (each process reads all)."""
    if num_shards >= processes:
        if num_shards % processes:
            log_once(
                logging.WARNING,
                f"The stream has {num_shards} shards for {processes} processes: some processes read one more "
                "shard, and a pass ends when the others run out, so it leaves part of a shard out. Write a "
                f"multiple of {processes} shards to read all of it in each pass.",
            )
        return "shards"
    log_once(
        logging.WARNING,
        f"The stream has {num_shards} shard(s) for {processes} processes: each process reads and decodes "
        f"every example to keep one in {processes}. Write at least {processes} shards.",
    )
    return "examples"


def every_process_has_one(has_one, group):
    """Whether `has_one` holds on every process: a MIN all-reduce over the CPU `group` (None: one process)."""
    if group is None:
        return has_one
    flag = torch.tensor([int(has_one)])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item())


def images_in_evaluation_order(split, image_column, indices, batch_size, num_workers):
    """{index: RGB image} for `indices` of a streamed evaluation split, counted as its evaluation counted: the
    same map drops the same unreadable images, and a DataLoader with the same batch size and workers
    interleaves the workers' batches in the same order."""
    label_column = next(name for name, f in split.features.items() if isinstance(f, datasets.ClassLabel))
    as_read = transforms.with_stream_transform(split, _as_it_is, image_column, label_column)
    wanted, found = set(indices), {}
    loader = DataLoader(as_read, batch_size, num_workers=num_workers, collate_fn=_pixel_values)
    examples = (image for batch in loader for image in batch)
    for index, image in enumerate(examples):
        if index in wanted:
            found[index] = image
            if len(found) == len(wanted):
                break
    return found


def _as_it_is(image):
    return image


def _pixel_values(examples):
    return [example["pixel_values"] for example in examples]
