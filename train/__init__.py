"""PyTorch stage: the DETR model, checkpoints (official / Hugging Face / ours), matcher,
set loss, data, the training loop and COCO evaluation."""
