"""Weights on disk: Hugging Face safetensors checkpoints read into the sharded model, and saved from it."""
