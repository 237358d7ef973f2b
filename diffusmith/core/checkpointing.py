"""Gradient checkpointing for one repeated block, switched by two flags the model's forward receives.

Checkpointing keeps only a block's inputs during the forward pass and recomputes the block's activations
during backward, which trades compute for memory. The offload variant also moves what checkpointing still
keeps (the block's tensor inputs) to CPU memory until backward needs them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn


def gradient_checkpoint_forward(
    module: nn.Module,
    use_gradient_checkpointing: bool,
    use_gradient_checkpointing_offload: bool,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Call ``module(*args, **kwargs)``, checkpointed when asked and when autograd is recording.

    ``use_gradient_checkpointing_offload`` implies checkpointing: the saved block inputs go to CPU memory
    (pinned when CUDA is available) and come back for the recomputation in backward. With both flags off, or
    under ``torch.no_grad()`` / ``torch.inference_mode()``, this is a plain call.
    """
    if not (use_gradient_checkpointing or use_gradient_checkpointing_offload) or not torch.is_grad_enabled():
        return module(*args, **kwargs)

    # torch's non-reentrant checkpoint saves its positional tensor inputs through the saved-tensor hooks
    # (so save_on_cpu sees them) but only holds keyword tensors by reference, which would keep them on the
    # GPU. Passing everything positionally makes the offload apply to keyword inputs too.
    names = list(kwargs)
    num_args = len(args)

    def call(*flat: Any) -> Any:
        return module(*flat[:num_args], **dict(zip(names, flat[num_args:], strict=True)))

    flat_inputs = (*args, *(kwargs[name] for name in names))
    if use_gradient_checkpointing_offload:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return torch.utils.checkpoint.checkpoint(call, *flat_inputs, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(call, *flat_inputs, use_reentrant=False)
