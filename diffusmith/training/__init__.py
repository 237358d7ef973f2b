"""Training: the inference pipeline's units with the scheduler in training mode; data, losses, LoRA."""
