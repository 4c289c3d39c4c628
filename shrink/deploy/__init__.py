"""Deployment: ONNX export with onnxruntime parity, ONNX graph passes, latency benchmarks.

Import the submodules directly; ``onnx`` and ``onnxruntime`` are imported inside the functions
that need them.
"""
