"""ONNX backend: ``export_onnx(deploy_artifact, out_dir)`` writes ``model.onnx`` (binary
layers as the ``ai.bqc`` custom domain, packed weights) and ``model_fakequant.onnx`` (standard
ops, runs in onnxruntime). See docs/onnx.md."""
from .export import FILES, FORMS, OPSET, OnnxExport, export_module, export_onnx, verify_fakequant
from .ops import DOMAIN, DOMAIN_VERSION, OPS
from bqc.deploy import step_inputs as example_inputs  # the deploy graph's step inputs (older import path)

__all__ = ["export_onnx", "export_module", "example_inputs", "verify_fakequant", "OnnxExport",
           "FILES", "FORMS", "OPSET", "DOMAIN", "DOMAIN_VERSION", "OPS"]
