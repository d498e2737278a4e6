"""Training: reconstruction losses, the data-parallel trainer and decoder fine-tuning."""
