"""Backends (onnx, tvm). Installed as ``bqc.backends``."""
