"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: train_loop.py's checks of a
new output_dir, in its order, with rank 1 slow to list the folder (as on a loaded machine or over NFS).
Prints one line per process: its rank and what check_output_dir answered."""

import os
import sys
import time
from pathlib import Path

from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imgft import outputs  # noqa: E402

output_dir = sys.argv[1]
accelerator = Accelerator(cpu=True)
list_folder = os.listdir


def slow_listdir(path):
    time.sleep(0.5)  # long enough for the main process to finish its own check meanwhile
    return list_folder(path)


if accelerator.process_index == 1:
    os.listdir = slow_listdir
outputs.check_every_process_sees_output_dir(accelerator, output_dir)
finished = outputs.check_output_dir(output_dir, resume_requested=False, overwrite=False, config={})
print(f"rank {accelerator.process_index}: finished {finished}", flush=True)
accelerator.end_training()  # leaves the process group: gloo may abort at exit otherwise
