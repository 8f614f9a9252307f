"""Light inference runtime: numpy + OpenCV (+ the chosen backend), never torch.

Owns the definitions every stage shares: preprocessing (letterbox + padding mask),
postprocessing, class names and the metadata that travels inside artifacts.
"""
