"""Ray jobs around the bitlm library: distributed training, data preparation and MLflow tracking."""
