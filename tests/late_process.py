"""Run by tests/test_exits.py under `accelerate launch --num_processes 2`: process 1 starts too late for the
process group to form in time (it sleeps before anything imgft runs), as a process that never arrives would.
Process 0 builds an Accelerator, which forms the group, as train_loop.py does first."""

import os
import sys
import time
from pathlib import Path

if os.environ["RANK"] == "1":
    time.sleep(float(sys.argv[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from accelerate import Accelerator  # noqa: E402

from imgft.errors import run_as_script  # noqa: E402


def main(argv=None):
    accelerator = Accelerator(cpu=True)
    print(f"rank {accelerator.process_index}: the process group formed", flush=True)


run_as_script(main)
