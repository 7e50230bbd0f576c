"""Diffusers config folders and the CLIP tokenizer, shipped as package data."""
