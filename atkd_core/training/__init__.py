"""Training: one DeepSpeed loop for teacher fine-tuning (sft) and student distillation (kd, atkd)."""
