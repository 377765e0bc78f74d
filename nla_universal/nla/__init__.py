"""The AV (verbalizer) and AR (reconstructor) shared by every pooled model, and the bundle format."""

from .api import UniversalNLA
from .ar import AR, ARConfig
from .av import AV, AVConfig, Explanation, SequenceLogProbs
from .bundle import NLAMeta, TagInfo, read_meta
from .injection import InjectionError, embed_and_inject, inject, injecting, rescale
from .lora import LoraSettings
from .markers import MarkerSpec

__all__ = [
    "AR", "ARConfig", "AV", "AVConfig", "Explanation", "InjectionError", "LoraSettings", "MarkerSpec", "NLAMeta",
    "SequenceLogProbs", "TagInfo", "UniversalNLA", "embed_and_inject", "inject", "injecting", "read_meta", "rescale",
]
