"""Deploying SAM without PyTorch: OnnxPredictor on the ONNX models ``samkit export-onnx`` writes (numpy, onnxruntime, Pillow)."""

from .predictor import OnnxPredictor

__all__ = ["OnnxPredictor"]
