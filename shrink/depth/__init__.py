"""Depth pruning: remove whole blocks (encoder/decoder layers) from a model's stacks of blocks.

* :mod:`shrink.depth.stacks`: which ``nn.ModuleList`` is a stack of blocks
  (:func:`find_layer_stacks`), and the config counts and per-layer lists that follow a removal;
* :mod:`shrink.depth.influence`: ShortGPT's block influence ``1 - mean cos(input, output)``
  (:func:`block_influence`);
* :mod:`shrink.depth.remove`: :func:`remove_layers`, checked against the original with the
  removed blocks replaced by the identity on the hidden state.

``transformers`` is never imported: Hugging Face models are handled by duck typing.
"""

from shrink.depth.influence import block_influence
from shrink.depth.remove import DepthResult, remove_layers
from shrink.depth.stacks import find_layer_stacks

__all__ = ["DepthResult", "block_influence", "find_layer_stacks", "remove_layers"]
