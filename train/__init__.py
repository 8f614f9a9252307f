"""PyTorch stage: the DETR model, checkpoints (official / Hugging Face / ours), and
(later) matcher, set loss, data and the training loop."""
