"""Rollout engines: generate completions from prompt embeddings built on the trainer side.

The server engines (vLLM, SGLang) and their lifecycle helpers load on first use, so importing the
package costs only the in-process engine.
"""

import importlib

from .base import FINISH_LENGTH, FINISH_STOP, Completion, RolloutEngine, SamplingParams
from .hf import HFRolloutEngine

_LAZY = {
    "VLLMRolloutEngine": ".vllm", "VLLMServerConfig": ".vllm", "start_vllm": ".vllm",
    "SGLangRolloutEngine": ".sglang", "SGLangServerConfig": ".sglang", "start_sglang": ".sglang",
    "BASE": ".servers", "ClientSettings": ".servers", "LocalServer": ".servers", "ServerIdentity": ".servers",
    "ServerError": ".servers", "ServerFailed": ".servers", "ServerRefused": ".servers",
    "ServerStartError": ".servers", "ServerUnreachable": ".servers", "attach": ".servers",
}

__all__ = ["Completion", "FINISH_LENGTH", "FINISH_STOP", "HFRolloutEngine", "RolloutEngine", "SamplingParams", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
