"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: two of train_loop.py's setup
steps where one process can outrun the other, made to. Prints one line per process for each step.

1. The checks of a new output_dir, in train_loop's order, the main process slow to remove the folder that
   the shared-folder check made, and rank 1 slow to list it (as on a loaded machine or over NFS).
2. A turn of the main process first (as for the data) that the main process ends with a UserError."""

import os
import sys
import time
from pathlib import Path

from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imgft import outputs, runtime  # noqa: E402
from imgft.errors import UserError, run_as_script  # noqa: E402

LIST_FOLDER, REMOVE_FOLDER = os.listdir, os.rmdir


def slow_listdir(path):
    time.sleep(1)  # rank 1: the main process removes the folder meanwhile, if it has not waited
    return LIST_FOLDER(path)


def slow_rmdir(path):
    time.sleep(0.5)  # the main process: rank 1 has looked at the folder by then, if it has not waited
    return REMOVE_FOLDER(path)


def main(argv=None):
    output_dir = sys.argv[1]
    accelerator = Accelerator(cpu=True)
    if accelerator.process_index == 1:
        os.listdir = slow_listdir
    else:
        os.rmdir = slow_rmdir
    outputs.check_every_process_sees_output_dir(accelerator, output_dir)
    finished = outputs.check_output_dir(output_dir, resume_requested=False, overwrite=False, config={})
    print(f"rank {accelerator.process_index}: finished {finished}", flush=True)

    with runtime.main_process_first(accelerator):
        if accelerator.is_main_process:
            raise UserError("the data is refused")
        print(f"rank {accelerator.process_index} read the data after a refusal", flush=True)


run_as_script(main)  # as train_loop.py ends: an error line, exit code 2, the process group left
