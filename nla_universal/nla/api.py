"""`UniversalNLA`: a bundle as one object — verbalize activations, reconstruct them from text.

    nla = UniversalNLA.load("bundle/")
    texts = nla.verbalize(h, "gpt2-medium")           # h: [N, d_M] or [d_M]
    h_hat = nla.reconstruct(texts, "gpt2-medium")     # [N, d_M]
    report = nla.roundtrip(h, "gpt2-medium")          # every metric + the explanations

Path: h → n(h) at √d_M → enc_M (affine; subtracts the shared space's mean when centred) → AV
(injected at injection_scale) → text → AR → n(·) at √d_shared → dec_M (adds the model's mean back).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..adapters import PoolAdapters
from ..config import ModelSpec
from ..errors import ConfigError, NLAError
from ..metrics import all_metrics
from ..models import load_model
from ..rollout import RolloutEngine, SamplingParams
from .ar import AR, ARConfig, default_mse_scale
from .av import AV, AVConfig, Explanation
from .bundle import (FVE_REPORT_FILE, ARMeta, AVMeta, NLAMeta, TagInfo, check_adapters_match, check_d_shared, read_meta,
                     read_reports, spec_from_dict, spec_to_dict, write_bundle)
from .injection import rescale
from .prompts import check_ar_template, check_av_template


class UniversalNLA:
    """AV + AR + per-model adapters, with the sidecar that ties them together."""

    def __init__(self, meta: NLAMeta, av: AV, ar: AR, adapters: PoolAdapters, reports: dict[str, Any] | None = None):
        self.meta = meta
        self.av = av
        self.ar = ar
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
    def load(cls, folder: str | Path, cache_dir: str | None = None, device: str | None = None,
             engine: RolloutEngine | None = None) -> "UniversalNLA":
        """A saved bundle; every file and every recorded id is checked against the live trunk and tokenizer."""
        folder = Path(folder)
        meta = read_meta(folder)
        adapters = PoolAdapters.load(folder / "adapters", expect_tags=list(meta.tags), expect_d_shared=meta.d_shared)
        check_adapters_match(meta, adapters)
        av_model = load_model(spec_from_dict(meta.av.base, "av.base"), cache_dir=cache_dir)
        check_d_shared(meta, av_model.d_model, "AV")
        verbalizer = AV.load(folder / "av", av_model, meta.av.marker, meta.av.prompt_template, meta.av.injection_scale,
                             canonical_tag=meta.anchor_tag, engine=engine)
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
        self.av.model.to(device)
        self.ar.to(device)
        self.adapters.to(device)
        return self

    def _adapter_device(self) -> torch.device:
        return next(self.adapters.parameters()).device

    # ------------------------------------------------------------------ the two directions

    def _check_tag(self, tag: str) -> int:
        if tag not in self.meta.tags:
            raise NLAError(f"unknown tag {tag!r}", f"this bundle knows: {', '.join(self.meta.tags)}")
        return self.meta.tags[tag].d_model

    def _rows(self, h, tag: str) -> torch.Tensor:
        d = self._check_tag(tag)
        h = (h if isinstance(h, torch.Tensor) else torch.as_tensor(np.asarray(h, dtype=np.float32))).detach().float().cpu()
        if h.dim() == 1:
            h = h[None]
        if h.dim() != 2 or h.shape[1] != d or h.shape[0] == 0:
            raise NLAError(
                f"{tag}: got activations of shape {tuple(h.shape)}, expected [N, {d}] or [{d}] (d_model of {tag})",
                f"pass rows taken at {tag}'s layer {self.meta.tags[tag].layer}",
            )
        bad = int((~torch.isfinite(h)).any(dim=1).sum())
        if bad:
            raise NLAError(f"{tag}: {bad} of {h.shape[0]} activation rows hold NaN or inf", "drop or fix those rows")
        return h

    def shared_vectors(self, h, tag: str) -> torch.Tensor:
        """`enc_M(n(h))`: the vectors the AV reads, `[N, d_shared]`."""
        rows = self._rows(h, tag)
        with torch.no_grad():
            return self.adapters.encode(tag, rescale(rows, math.sqrt(rows.shape[1])).to(self._adapter_device()))

    def explain(self, h, tag: str, sampling: SamplingParams | None = None) -> list[Explanation]:
        """Explanations with their parse flags and raw completions."""
        vectors = self.shared_vectors(h, tag)
        return self.av.explain(vectors, [tag] * len(vectors), sampling)

    def verbalize(self, h, tag: str, **sampling) -> list[str]:
        """One explanation per row of `h`. Greedy unless sampling options (SamplingParams fields) say otherwise."""
        return [e.text for e in self.explain(h, tag, SamplingParams(**{"greedy": True, **sampling}))]

    def reconstruct(self, texts: Sequence[str] | str, tag: str) -> torch.Tensor:
        """`[N, d_M]`: AR(text) rescaled to √d_shared, then dec_M."""
        self._check_tag(tag)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise NLAError("reconstruct needs a non-empty list of strings", "pass the explanations as a list of str")
        shared = rescale(self.ar.reconstruct(texts), math.sqrt(self.meta.d_shared)).to(self._adapter_device())
        with torch.no_grad():
            return self.adapters.decode(tag, shared).cpu()

    def roundtrip(self, h, tag: str, **sampling) -> dict:
        """Every metric between n(h) and its reconstruction through text, plus the explanations.

        fve_centred is NaN for a single row (it needs the rows' own mean)."""
        rows = self._rows(h, tag)
        explanations = self.explain(rows, tag, SamplingParams(**{"greedy": True, **sampling}))
        texts = [e.text for e in explanations]
        predicted = self.reconstruct(texts, tag).numpy()
        gold = rescale(rows, math.sqrt(rows.shape[1])).numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            metrics = all_metrics(gold, predicted)
        if len(rows) < 2:
            metrics["fve_centred"] = float("nan")
        return {**metrics, "explanations": texts, "parsed": [e.parsed for e in explanations]}
