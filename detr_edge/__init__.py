"""detr-edge: DETR from a PyTorch checkpoint to real-time detection on NVIDIA GPUs and Jetson.

One import namespace over the stages (each a folder at the repository root, mapped here
by the package's build configuration) and the application layer above them:

    detr_edge.runtime      numpy + OpenCV + a backend: preprocessing, postprocessing,
                           backends (onnxruntime, TensorRT), sources, the pipeline, sinks
    detr_edge.train        PyTorch: the model, checkpoints, losses, data, training, evaluation
    detr_edge.calibration  calibration data, INT8 Q/DQ files, the sensitivity search
    detr_edge.export       torch -> ONNX, FP16, the TensorRT build plan and builder
    detr_edge.cli, .check, .calibrate, .deploy, .demo, .info
                           the application layer: the command line, the checker, the
                           calibrate and deploy pipelines, the demo, reports

Imports flow down: the runtime imports nothing of ours, train and calibration import the
runtime, export the stages below it, and the application layer the stages; no stage
imports the application layer.
"""

__version__ = "0.1.0"
