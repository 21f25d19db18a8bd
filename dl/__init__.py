"""PyTorch DDP training, models, and the MLflow model wrapper used at scoring time."""
