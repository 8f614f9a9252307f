"""Export stage: torch -> ONNX (FP32/FP16), TensorRT engines, and the backend checker.
It may import every other stage, so the `detr-edge` command line starts here."""
