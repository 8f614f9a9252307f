"""Light inference runtime: numpy + OpenCV (+ the chosen backend), never torch.

Owns the definitions every stage shares: preprocessing (letterbox + padding mask),
postprocessing, class names and the metadata that travels inside artifacts; and the
streaming runtime: backends, sources, the pipeline, sinks.

    from detr_edge.runtime.pipeline import stream
    for result in stream("model.onnx", "video.mp4"):
        print(result.index, result.detections["labels"])
"""
