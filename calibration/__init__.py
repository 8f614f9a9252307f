"""Calibration stage: calibration data, INT8 (Q/DQ) ONNX for TensorRT and for CPUs."""
