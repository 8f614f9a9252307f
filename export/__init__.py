"""Export stage: torch -> ONNX (FP32/FP16), the TensorRT build plan and the builder that
applies it through Polygraphy."""
