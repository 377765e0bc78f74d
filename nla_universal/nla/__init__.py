"""The AV (verbalizer) and AR (reconstructor) shared by every pooled model, and the bundle format.

Names are imported lazily: `import nla_universal.nla.injection` pulls in torch only, while
`from nla_universal.nla import UniversalNLA` loads the API (transformers, peft, pyarrow) on first use.
"""

from importlib import import_module

_HOME = {
    "UniversalNLA": "api", "AR": "ar", "ARConfig": "ar", "AV": "av", "AVConfig": "av", "Explanation": "av",
    "SequenceLogProbs": "av", "NLAMeta": "bundle", "TagInfo": "bundle", "read_meta": "bundle",
    "InjectionError": "injection", "embed_and_inject": "injection", "inject": "injection", "injecting": "injection",
    "rescale": "injection", "LoraSettings": "lora", "MarkerSpec": "markers",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOME[name]}", __name__), name)
