"""`UniversalNLA`: a bundle as one object — the NLA path as methods, and the two directions for users.

    nla = UniversalNLA.load("bundle/")
    texts = nla.verbalize(h, "gpt2-medium")           # h: [N, d_M] or [d_M]
    h_hat = nla.reconstruct(texts, "gpt2-medium")     # [N, d_M]
    report = nla.roundtrip(h, "gpt2-medium")          # every metric + the explanations

The path (`nla/path.py` does the arithmetic): `encode(h, tag)` → v at √d_shared (enc_M subtracts the
shared space's mean when centred) → `verbalize_shared(v, tags)` (the AV, injected at
injection_scale) → text → `shared_from_text(texts)` (the AR) → `decode(v, tag)` (dec_M adds the
model's mean back). A bundle can be loaded with only its AV or only its AR (`parts=`), for layouts
that place them on different devices or processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..adapters import PoolAdapters
from ..config import ModelSpec
from ..errors import ConfigError, DataError, NLAError
from ..metrics import all_metrics
from ..models import load_model
from ..rollout import RolloutEngine, SamplingParams
from . import path
from .ar import AR, ARConfig, default_mse_scale
from .av import AV, AVConfig, Explanation
from .bundle import (FVE_REPORT_FILE, ARMeta, AVMeta, NLAMeta, TagInfo, check_adapters_match, check_d_shared, read_meta,
                     read_reports, spec_from_dict, spec_to_dict, write_bundle)
from .input_map import InputMap
from .prompts import check_ar_template, check_av_template

PARTS = ("av", "ar")
# Stages after which a part holds trained weights (a bundle records the stages that wrote it).
TRAINED_BY = {"av": ("sft-av", "rl"), "ar": ("sft-ar", "rl")}


def check_trained(meta: NLAMeta, parts: Sequence[str], folder: Path) -> None:
    for part in parts:
        if not set(TRAINED_BY[part]) & set(meta.stage_names):
            raise DataError(
                f"the {part.upper()} of bundle {folder} was never trained (the bundle records stages: "
                f"{', '.join(meta.stage_names) or 'none'})",
                f"run `nla-universal {TRAINED_BY[part][0]}` on it first",
            )


class UniversalNLA:
    """AV + AR + per-model adapters, with the sidecar that ties them together (either part may be absent)."""

    def __init__(self, meta: NLAMeta, av: AV | None, ar: AR | None, adapters: PoolAdapters,
                 reports: dict[str, Any] | None = None):
        self.meta = meta
        self._av = av
        self._ar = ar
        self.adapters = adapters
        self.reports = dict(reports or {})  # JSON reports by path in the bundle (fit reports, fve_report.json)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, trunk: ModelSpec, adapters: PoolAdapters, tags: dict[str, TagInfo], *, av: AVConfig | None = None,
               ar: ARConfig | None = None, teacher_id: str | None = None, cache_dir: str | None = None,
               engine: RolloutEngine | None = None, reports: dict[str, Any] | None = None) -> "UniversalNLA":
        """A fresh bundle on `trunk` (the anchor model): new LoRAs, identity value head, the given adapters.

        `reports`: JSON to carry in the bundle by relative path, e.g. `read_reports(fit_folder, "adapters/")`."""
        if trunk.tag != adapters.anchor:
            raise ConfigError(
                f"the trunk's tag {trunk.tag!r} is not the adapters' anchor {adapters.anchor!r}",
                "the AV/AR trunk is the anchor model: use the anchor's ModelSpec as trunk",
            )
        av_cfg, ar_cfg = av or AVConfig(), ar or ARConfig()
        check_av_template(av_cfg.template)
        check_ar_template(ar_cfg.template)
        av_model = load_model(trunk, cache_dir=cache_dir)
        ar_model = load_model(trunk, cache_dir=cache_dir, num_blocks="to_layer")
        verbalizer = AV.create(av_model, av_cfg, canonical_tag=trunk.tag, engine=engine)
        reconstructor = AR.create(ar_model, ar_cfg)
        d_shared = av_model.d_model
        meta = NLAMeta(
            d_shared=d_shared,
            anchor_tag=trunk.tag,
            tags=dict(tags),
            av=AVMeta(spec_to_dict(trunk), verbalizer.template, verbalizer.marker, verbalizer.injection_scale),
            ar=ARMeta(spec_to_dict(trunk), reconstructor.layer + 1, reconstructor.template,
                      ar_cfg.mse_scale or default_mse_scale(d_shared)),
            teacher_id=teacher_id,
        )
        check_adapters_match(meta, adapters)
        return cls(meta, verbalizer, reconstructor, adapters, reports)

    @classmethod
    def load(cls, folder: str | Path, cache_dir: str | None = None, device: str | torch.device | None = None,
             engine: RolloutEngine | None = None, *, parts: Sequence[str] = PARTS, trained: bool = True,
             generate_batch_size: int = 8, progress: bool = False) -> "UniversalNLA":
        """A saved bundle; every file is checked against its manifest and every recorded id against the
        live trunk and tokenizer. `parts`: load only "av" or only "ar". `trained`: refuse a part that no
        training stage has written (pipeline stages that continue training pass False)."""
        folder = Path(folder)
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or not parts:
            raise ConfigError(f"bundle parts {list(parts)}", f"load some of {PARTS}")
        meta = read_meta(folder)
        if trained:
            check_trained(meta, parts, folder)
        adapters = PoolAdapters.load(folder / "adapters")
        check_adapters_match(meta, adapters)
        verbalizer = reconstructor = None
        if "av" in parts:
            av_model = load_model(spec_from_dict(meta.av.base, "av.base"), cache_dir=cache_dir)
            check_d_shared(meta, av_model.d_model, "AV")
            verbalizer = AV.load(folder / "av", av_model, meta.av.marker, meta.av.prompt_template, meta.av.injection_scale,
                                 canonical_tag=meta.anchor_tag, engine=engine, generate_batch_size=generate_batch_size,
                                 progress=progress, has_input_map=bool(meta.av.input_map))
        if "ar" in parts:
            ar_model = load_model(spec_from_dict(meta.ar.base, "ar.base"), cache_dir=cache_dir, num_blocks=meta.ar.num_layers)
            check_d_shared(meta, ar_model.d_model, "AR")
            reconstructor = AR.load(folder / "ar", ar_model, meta.ar.template)
        nla = cls(meta, verbalizer, reconstructor, adapters, read_reports(folder))
        return nla.to(device) if device else nla

    def save(self, folder: str | Path, fve_report: dict | None = None) -> Path:
        """Write the bundle atomically; `fve_report` (if given) replaces the carried fve_report.json."""
        if fve_report is not None:
            self.reports[FVE_REPORT_FILE] = fve_report
        return write_bundle(folder, self.meta, self.av, self.ar, self.adapters, self.reports)

    def to(self, device: str | torch.device) -> "UniversalNLA":
        av_parts = (self._av.model, self._av.input_map) if self._av else ()
        for part in (*av_parts, self._ar, self.adapters):
            if part is not None:
                part.to(device)
        return self

    @property
    def av(self) -> AV:
        if self._av is None:
            raise NLAError("this UniversalNLA was loaded without its AV", "load the bundle with parts=('av', ...)")
        return self._av

    @property
    def ar(self) -> AR:
        if self._ar is None:
            raise NLAError("this UniversalNLA was loaded without its AR", "load the bundle with parts=(..., 'ar')")
        return self._ar

    def set_input_map(self, input_map: InputMap | None, report: dict | None) -> None:
        """Give the AV a (new) input map, recorded in the sidecar with how it was fitted."""
        self.av.input_map = None if input_map is None else input_map.to(self.av.embedding.weight.device)
        self.meta.av.input_map = None if input_map is None else dict(report or {})

    def eval(self) -> "UniversalNLA":
        """Dropout off in every loaded part (what a save or an inference pass expects)."""
        if self._av is not None:
            self._av.model.eval()
        if self._ar is not None:
            self._ar.eval()
        return self

    # ------------------------------------------------------------------ the path

    def _check_tag(self, tag: str) -> int:
        if tag not in self.meta.tags:
            raise NLAError(f"unknown tag {tag!r}", f"this bundle knows: {', '.join(self.meta.tags)}")
        return self.meta.tags[tag].d_model

    def encode(self, h, tag: str, *, grad: bool = False) -> torch.Tensor:
        """`[N, d_shared]`: the shared vectors of activations `h` of `tag` (what the AV reads, the AR's target)."""
        self._check_tag(tag)
        return path.encode(self.adapters, tag, h, grad=grad)

    def verbalize_shared(self, v: torch.Tensor, tags: str | Sequence[str], sampling: SamplingParams | None = None) -> list[Explanation]:
        """The AV's explanations of shared vectors `v` (one tag for all rows, or one per row)."""
        tags = [tags] * len(v) if isinstance(tags, str) else list(tags)
        for tag in set(tags):
            self._check_tag(tag)
        return self.av.explain(v, tags, sampling)

    def shared_from_text(self, texts: Sequence[str], *, grad: bool = False, progress: bool = False) -> torch.Tensor:
        """`[N, d_shared]`: the AR's reading of `texts` at √d_shared; `grad=True` keeps the graph (training)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise NLAError("the AR needs a non-empty list of strings", "pass the explanations as a list of str")
        out = self.ar(texts) if grad else self.ar.reconstruct(texts, progress=progress)
        return path.normalise_ar(out)

    def decode(self, v: torch.Tensor, tag: str) -> torch.Tensor:
        """`[N, d_M]`: shared vectors mapped back to `tag`'s space."""
        self._check_tag(tag)
        return path.decode(self.adapters, tag, v)

    # ------------------------------------------------------------------ the two directions, for users

    def explain(self, h, tag: str, sampling: SamplingParams | None = None) -> list[Explanation]:
        """Explanations of activations `h` with their parse flags and raw completions."""
        return self.verbalize_shared(self.encode(h, tag), tag, sampling)

    def verbalize(self, h, tag: str, **sampling) -> list[str]:
        """One explanation per row of `h`. Greedy unless sampling options (SamplingParams fields) say otherwise."""
        return [e.text for e in self.explain(h, tag, SamplingParams(**{"greedy": True, **sampling}))]

    def reconstruct(self, texts: Sequence[str] | str, tag: str) -> torch.Tensor:
        """`[N, d_M]`: the activations of `tag` that `texts` describe."""
        self._check_tag(tag)
        return self.decode(self.shared_from_text(texts), tag)

    def roundtrip(self, h, tag: str, **sampling) -> dict:
        """Every metric between h and its reconstruction through text, plus the explanations.

        fve_centred is NaN for a single row (it needs the rows' own mean)."""
        rows = path.as_rows(h, tag, self._check_tag(tag))
        explanations = self.explain(rows, tag, SamplingParams(**{"greedy": True, **sampling}))
        texts = [e.text for e in explanations]
        predicted = self.reconstruct(texts, tag).numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            metrics = all_metrics(rows.numpy(), predicted)
        if len(rows) < 2:
            metrics["fve_centred"] = float("nan")
        return {**metrics, "explanations": texts, "parsed": [e.parsed for e in explanations]}
