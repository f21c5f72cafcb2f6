"""Lets `accelerate launch` with an FSDP config run FSDP2 on CPU processes (gloo), for the tests only.

Accelerate turns FSDP on only for GPU-like backends (`AcceleratorState` ignores `ACCELERATE_USE_FSDP` under
`MULTI_CPU`), though FSDP2's `fully_shard` itself runs on CPU tensors over gloo. The tests put this directory on
`PYTHONPATH` of the launched processes; Python imports `sitecustomize` at start-up, and this one relabels the CPU
process group as multi-GPU just before an `Accelerator` is built, so that accelerate, the Trainer and
DistillationTrainer take their real FSDP2 code paths (sharded student and teacher, gathered checkpoints) on the CPU.
Nothing else changes: the device stays `cpu` and the backend `gloo`.
"""

import os


if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and "LOCAL_RANK" in os.environ:
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    _original_init = accelerate.Accelerator.__init__

    def _init_with_fsdp_on_cpu(self, *args, **kwargs):
        state = PartialState()
        if state.distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        _original_init(self, *args, **kwargs)

    accelerate.Accelerator.__init__ = _init_with_fsdp_on_cpu
