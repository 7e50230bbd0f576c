"""Torch-free knowledge of model files: safetensors headers, family detection, and the diffusers
configs a single-file checkpoint's tensor shapes imply."""
