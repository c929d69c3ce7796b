"""Distilled students: feature knowledge distillation, latent consistency (LCM / LCM-LoRA)."""
