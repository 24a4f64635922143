"""`eval_mode(module)`: a block in which `module` is in eval mode, its mode restored after.

Plain torch and free of fgray imports, so every layer (methods, eval, engine) may use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put `module` in eval mode for the block and give it back in the mode it had (train or
    eval), also when the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
