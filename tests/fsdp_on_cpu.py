"""Run train_loop.py under Accelerate's FSDP on CPU processes (gloo), for tests/test_fsdp.py. Test-only.

Accelerate turns FSDP on only for GPUs and other accelerators: on CPU it runs plain DDP instead
(`PartialState` picks MULTI_CPU, and its FSDP1 path asks for a GPU). torch's FSDP2 itself runs on CPU with
gloo, so this shim has PartialState take the GPU path (MULTI_GPU over gloo) while keeping the device the CPU,
and has imgft not ask for CPU mode. Everything else, from `prepare` to `save_state`, `load_state` and
`get_state_dict`, is Accelerate's FSDP2 code as a GPU run uses it.
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/fsdp_on_cpu.py <train_loop.py arguments>
"""

import runpy
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import imgft.runtime  # noqa: E402


def gpu_backend_over_gloo(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


def cpu_device(self):
    self.device = torch.device("cpu")


PartialState._prepare_backend = gpu_backend_over_gloo
PartialState.set_device = cpu_device
imgft.runtime.distributed_without_gpu = lambda: False
sys.argv[0] = str(REPO / "train_loop.py")
runpy.run_path(sys.argv[0], run_name="__main__")
