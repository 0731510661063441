"""Deploying SAM without PyTorch: OnnxPredictor and automatic masks on the ONNX models ``samkit export-onnx`` writes (numpy, onnxruntime, Pillow)."""

from .amg import OnnxAutomaticMaskGenerator
from .predictor import OnnxPredictor

__all__ = ["OnnxAutomaticMaskGenerator", "OnnxPredictor"]
