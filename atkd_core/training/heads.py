"""The output layer taken out of the model's forward and applied inside the loss (fused-linear).

The model runs with its output layer bypassed (it returns the final hidden states), and the loss
is then computed by calling the output layer's own module on those hidden states with the loss as
its forward: wrappers that act on that module's forward and backward (DeepSpeed ZeRO-3 gathers its
partitioned weight there) see exactly the calls they would see for plain logits. Tied input and
output embeddings need nothing special: the loss's weight gradient accumulates into the one
parameter. See docs/architecture.md, "From a batch to the loss".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace

import torch
from torch import Tensor

from atkd_core.errors import UserError
from atkd_core.losses.inputs import LinearHead
from atkd_core.losses.objective import ObjectiveOutput

# Config fields of architectures whose logits are not the output layer's plain output: applying the
# layer inside the loss would silently drop the transformation, so such models are refused.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class OutputLayer:
    """A model's output layer (weight [V', H], optional bias), applied by the loss instead of the model."""

    def __init__(self, model: torch.nn.Module, vocab_size: int) -> None:
        """Take ``model``'s output layer; UserError when its logits are transformed after it."""
        config = getattr(model, "config", None)
        transforms = [name for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
        architecture = type(model).__name__
        if transforms:
            raise UserError(
                f"{architecture} transforms its logits after the output layer ({', '.join(transforms)}), which "
                "loss.fused_linear does not apply; set loss.fused_linear: false for this model"
            )
        get_layer = getattr(model, "get_output_embeddings", None)
        layer = get_layer() if callable(get_layer) else None
        weight = getattr(layer, "weight", None)
        if not isinstance(layer, torch.nn.Module) or not isinstance(weight, Tensor):
            raise UserError(
                f"{architecture} has no output layer with a weight (get_output_embeddings); "
                "set loss.fused_linear: false for this model"
            )
        self.module, self.weight, self.vocab_size = layer, weight, vocab_size

    def bypassed(self) -> AbstractContextManager[None]:
        """While inside, the model's forward returns its final hidden states [B, T, H] as its logits."""
        return _forward_replaced(self.module, _identity)

    def head(self, hidden: Tensor) -> LinearHead:
        """The layer over ``hidden`` [..., H], not yet multiplied out."""
        bias = getattr(self.module, "bias", None)
        return LinearHead(hidden, self.weight, bias if isinstance(bias, Tensor) else None, self.vocab_size)

    def apply(self, hidden: Tensor, loss_fn: Callable[[LinearHead], ObjectiveOutput]) -> ObjectiveOutput:
        """``loss_fn`` on the head over ``hidden``, run as the layer module's forward (see module doc)."""
        produced: list[ObjectiveOutput] = []

        def forward(inputs: Tensor) -> Tensor:
            produced.append(loss_fn(self.head(inputs)))
            return produced[0].loss

        with _forward_replaced(self.module, forward):
            # The module's hooks may hand back a new tensor (ZeRO-3 attaches its backward hook there).
            loss = self.module(hidden)
        return replace(produced[0], loss=loss)


def _identity(hidden: Tensor) -> Tensor:
    return hidden


@contextmanager
def _forward_replaced(module: torch.nn.Module, forward: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """``module.forward`` is ``forward`` while inside; afterwards whatever it was, including a
    forward a wrapper had set on the instance (accelerate's hooks do)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
