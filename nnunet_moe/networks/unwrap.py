"""The plain network behind nnU-Net's wrappers (DDP, torch.compile), in any nesting."""
from __future__ import annotations

import torch


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` without ``DistributedDataParallel`` (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(network, DistributedDataParallel):
            network = network.module
        elif isinstance(network, OptimizedModule):
            network = network._orig_mod
        else:
            return network
