"""model/: CLIP towers, losses, checkpoints, tokenizer: a library that knows nothing of the trainer's files.

Losses and checkpoints live in model.losses and model.checkpoint (imported on demand: checkpoint
loading pulls in safetensors/DeepSpeed only when used).
"""
from model.clip import CLIP, build_model, get_model_config, list_models
from model.tokenizer import CONTEXT_LENGTH, get_tokenizer

__all__ = ["CLIP", "build_model", "get_model_config", "list_models", "CONTEXT_LENGTH", "get_tokenizer"]
