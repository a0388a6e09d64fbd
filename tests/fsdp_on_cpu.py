"""Run a training script under accelerate's FSDP2 on CPU processes (gloo), for the tests.

    accelerate launch --multi_gpu --num_processes 2 tests/fsdp_on_cpu.py examples/train_maskdit.py [flags]
    (with ACCELERATE_USE_CPU=true)

accelerate selects FSDP only for accelerator devices: on a CPU-only machine it sets up plain CPU data parallelism
(``MULTI_CPU``) even when asked for FSDP. torch's FSDP2 (``fully_shard``) itself runs on CPU with gloo, so this
runner switches the freshly built accelerate state from ``MULTI_CPU`` to ``FSDP`` (version 2) right after
``Accelerator.__init__``; everything after that (sharding in ``prepare``, sharded ``save_state``/``load_state``,
``get_state_dict`` gathering) is accelerate's and torch's own code, run for real. What it cannot show is what only
a GPU has: device placement, NCCL, mixed-precision policies. ``FSDP_ON_CPU_VERSION=1`` asks for FSDP version 1 (for
the script's checks that run before ``prepare``; the tests do not train under FSDP1).
"""

import os
import runpy
import sys

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_accelerator_init = Accelerator.__init__


def _init_as_fsdp(self, *args, **kwargs):
    _accelerator_init(self, *args, **kwargs)
    if self.state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected a multi-process CPU launch, got {self.state.distributed_type}")
    version = int(os.environ.get("FSDP_ON_CPU_VERSION", "2"))
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True if version == 2 else "FULL_SHARD",
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )
    # AcceleratorState copies PartialState's fields whenever it is built again (prepare does), so switch both.
    PartialState().distributed_type = DistributedType.FSDP
    self.state.distributed_type = DistributedType.FSDP


if __name__ == "__main__":
    Accelerator.__init__ = _init_as_fsdp
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
