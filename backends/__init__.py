"""Backends (onnx, tvm). Installed as ``bqc.backends``.

Every backend takes a deploy artifact (:class:`bqc.deploy.DeployArtifact`) and nothing from
training: no artifact loading, calibration or folding here (tests/test_architecture.py keeps
the imports that way).
"""

#: every ``--backend`` of ``bqc lower``, in the order the CLI lists them
BACKENDS = ("onnx", "tvm-x86", "tvm-arm", "tvm-cuda")
