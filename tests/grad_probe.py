"""Run a DAM training (``python tests/grad_probe.py OUT_FILE CONFIG [overrides]``, also under torchrun) recording,
at every optimizer step, each coefficient's ``p.grad`` as AdamW receives it (after DDP's all-reduce); process 0
saves them to OUT_FILE as ``[step][parameter] -> tensor``. Used by tests/test_gradients.py."""

import sys

import torch

from dam.training.config import load_config
from dam.training.loop import train

grads: list[list[torch.Tensor]] = []
adamw_step = torch.optim.AdamW.step


def recording_step(self: torch.optim.AdamW, *args, **kwargs):  # type: ignore[no-untyped-def]
    grads.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
    return adamw_step(self, *args, **kwargs)


torch.optim.AdamW.step = recording_step  # type: ignore[method-assign]
out, config, *overrides = sys.argv[1:]
train(load_config(config, overrides))
if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
    torch.save(grads, out)
