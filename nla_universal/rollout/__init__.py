"""Rollout engines: generate completions from prompt embeddings built on the trainer side."""

from .base import FINISH_LENGTH, FINISH_STOP, Completion, RolloutEngine, SamplingParams
from .hf import HFRolloutEngine

__all__ = ["Completion", "FINISH_LENGTH", "FINISH_STOP", "HFRolloutEngine", "RolloutEngine", "SamplingParams"]
