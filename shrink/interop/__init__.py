"""Interoperability: ``torch.nn.utils.prune`` masks in, safetensors + JSON plans out.

Import the submodules directly; this package imports nothing, so its leaf
:mod:`~shrink.interop.prune_masks` can be used below the pipeline without cycles.
"""
