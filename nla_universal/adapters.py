"""Per-model linear adapters `enc_M : d_M → d_shared`, `dec_M : d_shared → d_M` and their least-squares fits.

Conventions (DESIGN.md): state-dict keys `encoders.<tag>.weight` [d_shared, d_M] and
`decoders.<tag>.weight` [d_M, d_shared], forward `x @ W.T (+ b)`. Both maps are affine and take rows
already rescaled (`h` to √d_M, shared vectors to √d_shared): the one place that rescales and applies
them is `nla/path.py`. Fits take arrays; the pipeline reads the run folder.

The shared space is centred by default: the anchor's encoder is the identity minus μ, the mean of
the anchor's normalised train rows, and every other enc_M targets n(h_anchor) − μ. Pooled rows share
one dominant direction (cos ≈ 0.99 with μ on the demo models), so without centring the
passage-specific part is a few percent of the vector the AV reads and the AR regresses; each dec_M
carries a bias that puts its model's mean back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import io
from .activations import Activations
from .config import check_tag, opt
from .errors import DataError
from .lstsq import FitResult, fit_linear_path
from .metrics import fve_centred, fve_meannorm, normalised_mean, normalize_rows

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapters.safetensors"
META_FILE = "adapters.json"
# λ choices scored on val by stages that have val rows. It reaches λ ≫ mean(diag XᵀX) because refit-dec fits
# d_shared inputs from a few dozen rows, the AR's readings of a near-collapsed AV: there the best fit is
# (almost) the intercept; a grid ending at 0.1 always chose its edge there, and the fit amplified the AR's noise.
DEFAULT_RIDGE_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
SUMMARY_KEYS = ("N", "solver", "ridge", "condition", "fallback", "val")


@dataclass
class AdapterFitConfig:
    """How enc_M / dec_M are fitted."""

    bias: bool = opt(False, "fit an intercept (rows are centred before the solve; always on in a centred shared "
                            "space); the seed had none")
    ridge: float = opt(0.0, "ridge strength λ as a multiple of mean(diag XᵀX); 0 = plain least squares")
    ridge_grid: list[float] = opt(
        help="candidate ridge strengths (replaces `ridge`): each is fitted on train, the best val "
        "fve_centred is kept and every candidate's score is reported (e.g. [0, 1e-3, 1e-1, 10])",
        factory=list,
    )
    min_overlap: int = opt(32, "fewest train passages a tag must share with the anchor")
    max_condition: float = opt(
        1e6,
        "largest estimated condition number of X for the float64 normal-equation solve (weight error "
        "≲ cond²·1e-16, fitted values far better); above it the fit uses SVD least squares (gelsd)",
    )


# ---------------------------------------------------------------------------------------------
# The adapter module and its files


class PoolAdapters(torch.nn.Module):
    """enc_M / dec_M for every tag of a pool; the anchor's pair is the identity."""

    def __init__(self, d_shared: int, anchor: str):
        super().__init__()
        self.d_shared = int(d_shared)
        self.anchor = check_tag(anchor)
        self.encoders = torch.nn.ModuleDict()
        self.decoders = torch.nn.ModuleDict()
        self.dims: dict[str, int] = {}

    @property
    def tags(self) -> list[str]:
        return list(self.dims)

    def add(self, tag: str, enc_weight, dec_weight, enc_bias=None, dec_bias=None) -> None:
        check_tag(tag)
        enc_w, dec_w = torch.as_tensor(enc_weight).float(), torch.as_tensor(dec_weight).float()
        d_model = enc_w.shape[1]
        if enc_w.shape != (self.d_shared, d_model) or dec_w.shape != (d_model, self.d_shared):
            raise DataError(
                f"{tag}: encoder {tuple(enc_w.shape)} / decoder {tuple(dec_w.shape)} do not fit d_shared={self.d_shared}",
                f"encoder must be [{self.d_shared}, d_M], decoder [d_M, {self.d_shared}]",
            )
        if tag == self.anchor and d_model != self.d_shared:
            raise DataError(f"anchor {tag} has d_model {d_model} ≠ d_shared {self.d_shared}", "d_shared is the anchor's width")
        device = next(self.parameters()).device if self.dims else torch.device("cpu")
        self.encoders[tag] = _linear(enc_w, enc_bias).to(device)
        self.decoders[tag] = _linear(dec_w, dec_bias).to(device)
        self.dims[tag] = int(d_model)

    def _map(self, maps: torch.nn.ModuleDict, tag: str, x: torch.Tensor, width: int) -> torch.Tensor:
        if tag not in maps:
            raise DataError(f"no adapter for tag {tag!r}", f"known tags: {', '.join(self.tags)}; fit adapters for it")
        if x.shape[-1] != width:
            raise DataError(f"{tag}: input width {x.shape[-1]} ≠ {width}", "pass rows of the tag's own space")
        return maps[tag](x)

    @property
    def centre(self) -> np.ndarray | None:
        """μ subtracted by the anchor's encoder (None when the shared space is not centred)."""
        bias = self.encoders[self.anchor].bias
        return None if bias is None else -bias.detach().double().cpu().numpy()

    def encode(self, tag: str, h: torch.Tensor) -> torch.Tensor:
        """enc_M on rows already rescaled to √d_M."""
        return self._map(self.encoders, tag, h, self.dims.get(tag, -1))

    def decode(self, tag: str, v: torch.Tensor) -> torch.Tensor:
        """dec_M on shared-space rows already rescaled to √d_shared."""
        return self._map(self.decoders, tag, v, self.d_shared)

    def decoder_has_bias(self, tag: str) -> bool:
        """dec_M is affine (it puts the model's mean back in a centred shared space): a refit must fit an intercept."""
        return self.decoders[tag].bias is not None

    def set_decoder(self, tag: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Replace dec_M (a refit) by a map of the same shape and kind (affine or linear)."""
        old = self.decoders[tag]
        if tuple(weight.shape) != tuple(old.weight.shape) or (bias is None) != (old.bias is None):
            raise DataError(f"{tag}: refitted decoder {tuple(weight.shape)} (intercept {bias is not None}) does not "
                            f"replace {tuple(old.weight.shape)} (intercept {old.bias is not None})",
                            "refit with an intercept exactly when the bundle's decoder has one")
        with torch.no_grad():
            old.weight.copy_(weight.float())
            if bias is not None:
                old.bias.copy_(bias.float())

    def encoder_parameters(self, tags: list[str]) -> dict[str, torch.nn.Parameter]:
        """These tags' encoder parameters by stable name (`<tag>.weight`, `<tag>.bias`), to train with the AV."""
        return {f"{tag}.{name}": p for tag in tags for name, p in self.encoders[tag].named_parameters()}

    def state_bytes(self, tag: str) -> bytes:
        """enc_M's tensors as bytes: what a cache of this tag's explanations is keyed by."""
        return b"".join(p.detach().float().cpu().numpy().tobytes() for p in self.encoders[tag].parameters())

    def _meta(self) -> dict:
        return {
            "d_shared": self.d_shared,
            "anchor": self.anchor,
            "dims": dict(self.dims),
            "bias": {t: {"enc": self.encoders[t].bias is not None, "dec": self.decoders[t].bias is not None} for t in self.tags},
        }

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with io.atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        io.write_text(folder / META_FILE, json.dumps(self._meta(), indent=2))

    @classmethod
    def load(cls, folder: str | Path, expect_tags=None, expect_d_shared: int | None = None) -> "PoolAdapters":
        folder = Path(folder)
        refit = f"rerun `nla-universal fit-adapters` (or copy the folder holding {folder.name}/ again, whole)"
        try:
            meta = json.loads((folder / META_FILE).read_text())
            state = load_file(str(folder / WEIGHTS_FILE))
            dims = {str(t): int(d) for t, d in meta["dims"].items()}
            d_shared, anchor = int(meta["d_shared"]), str(meta["anchor"])
            bias = {t: {"enc": bool(meta["bias"][t]["enc"]), "dec": bool(meta["bias"][t]["dec"])} for t in dims}
        except FileNotFoundError as exc:
            raise DataError(f"adapters missing in {folder}: {exc.filename}", refit) from None
        except Exception as exc:  # safetensors/json raise several types for corrupt files
            raise DataError(f"corrupt adapters in {folder}: {exc}", refit) from None
        if expect_d_shared is not None and d_shared != expect_d_shared:
            raise DataError(f"adapters in {folder} map to d_shared={d_shared}, expected {expect_d_shared}", refit)
        missing = sorted(set(expect_tags or ()) - set(dims))
        if missing:
            raise DataError(f"adapters in {folder} lack tags {missing} (have {sorted(dims)})", refit)
        adapters = cls(d_shared, anchor)
        expected_keys = set()
        for tag, d in dims.items():
            parts = {}
            for side, shape in (("encoders", (d_shared, d)), ("decoders", (d, d_shared))):
                keys = [f"{side}.{tag}.weight"] + ([f"{side}.{tag}.bias"] if bias[tag][side[:3]] else [])
                for key in keys:
                    want = shape if key.endswith("weight") else shape[:1]
                    if key not in state or tuple(state[key].shape) != want:
                        got = tuple(state[key].shape) if key in state else "missing"
                        raise DataError(f"{folder / WEIGHTS_FILE}: {key} is {got}, expected {want}", refit)
                    parts[key.replace(f".{tag}.", ".")] = state[key]
                expected_keys.update(keys)
            adapters.add(tag, parts["encoders.weight"], parts["decoders.weight"], parts.get("encoders.bias"), parts.get("decoders.bias"))
        extra = sorted(set(state) - expected_keys)
        if extra:
            raise DataError(f"{folder / WEIGHTS_FILE} holds unexpected tensors {extra[:5]}", refit)
        return adapters


def _linear(weight: torch.Tensor, bias) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.as_tensor(bias).float())
    return layer


# ---------------------------------------------------------------------------------------------
# Fits on activations


def _finite_rows(tag: str, X: np.ndarray) -> np.ndarray:
    bad = int((~np.isfinite(X)).any(axis=1).sum())
    if bad:
        raise DataError(f"{tag}: {bad} of {X.shape[0]} activation rows hold NaN/inf",
                        f"re-extract {tag} (fp32 pooling; check for overflow at sink channels)")
    return X


def _rows_by_id(acts: Activations) -> dict[str, int]:
    index = {p: i for i, p in enumerate(acts.passage_ids)}
    if len(index) != len(acts.passage_ids):
        raise DataError(f"{acts.tag}: several rows per passage (pool={acts.meta.get('pool')})",
                        "adapters are fitted on one row per passage: extract with pool mean or last")
    return index


def aligned_rows(model: Activations, anchor: Activations, ids: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Passage ids of `ids` present in both stores, and the two row blocks in that order."""
    mi, ai = _rows_by_id(model), _rows_by_id(anchor)
    shared = [p for p in ids if p in mi and p in ai]
    return shared, model.X[[mi[p] for p in shared]], anchor.X[[ai[p] for p in shared]]


def _fve_report(fit: FitResult, X: np.ndarray, Y: np.ndarray, Xv: np.ndarray, Yv: np.ndarray, mu: np.ndarray) -> dict:
    report = {"in_sample": {"fve_centred": fve_centred(Y, fit.predict(X), mu), "fve_meannorm": fve_meannorm(Y, fit.predict(X))}}
    if len(Xv):
        pv = fit.predict(Xv)
        report["val"] = {"N": len(Xv), "fve_centred": fve_centred(Yv, pv, mu), "fve_meannorm": fve_meannorm(Yv, pv)}
    return report


def _fit_rows(kind: str, tag: str, X, Y, Xv, Yv, cfg: AdapterFitConfig, names: tuple[str, str]) -> tuple[FitResult, dict]:
    """Fit n(X) → n(Y) (choosing the ridge on val when a grid is given); `names` label X's and Y's
    rows in errors (e.g. the tag and the anchor)."""
    X, Xv = (normalize_rows(_finite_rows(names[0], a)) for a in (X, Xv))
    Y, Yv = (normalize_rows(_finite_rows(names[1], a)) for a in (Y, Yv))
    grid = list(cfg.ridge_grid) or [cfg.ridge]
    if len(grid) > 1 and not len(Xv):
        raise DataError(f"{tag}: ridge_grid needs val rows to choose from, and there are none",
                        "give the corpus a val split (val_fraction > 0) or set a single ridge")
    fits = fit_linear_path(X, Y, grid, bias=cfg.bias, max_condition=cfg.max_condition)
    mu = normalised_mean(Y)
    selection = {}
    if len(fits) > 1:
        scores = [fve_centred(Yv, f.predict(Xv), mu) for f in fits]
        best = int(np.argmax(scores))
        at_top = best == len(grid) - 1
        if at_top:  # the val optimum may lie beyond the grid: say so rather than report it as the best
            log.warning("%s %s: val chose the largest ridge of the grid (%g); a larger one may fit better "
                        "(extend fit.ridge_grid)", kind, tag, grid[best])
        fits, grid = [fits[best]], [grid[best]]
        selection = {"ridge_selection": {"grid": list(cfg.ridge_grid), "val_fve_centred": scores, "at_top": at_top}}
    fit = fits[0]
    report = {"fit": kind, "tag": tag, "N": len(X), "d_in": X.shape[1], "d_out": Y.shape[1], **fit.summary(),
              "ridge": grid[0], **selection, **_fve_report(fit, X, Y, Xv, Yv, mu)}
    return fit, report


def fit_encoder(h_model: Activations, h_anchor: Activations, train_ids: list[str], val_ids: list[str],
                cfg: AdapterFitConfig) -> tuple[FitResult, dict]:
    """enc_M: n(h_M) → n(h_anchor) on the train passages both stores hold; scored on val."""
    ids, X, Y = aligned_rows(h_model, h_anchor, train_ids)
    model_train = len(set(train_ids) & set(h_model.passage_ids))
    if len(ids) < cfg.min_overlap:
        raise DataError(
            f"{h_model.tag}: only {len(ids)} train passages shared with anchor {h_anchor.tag} "
            f"({model_train} train rows for {h_model.tag}); need ≥ {cfg.min_overlap}",
            "extract both tags on the same passages.parquet (or lower min_overlap)",
        )
    _, Xv, Yv = aligned_rows(h_model, h_anchor, val_ids)
    fit, report = _fit_rows("encoder", h_model.tag, X, Y, Xv, Yv, cfg, (h_model.tag, f"anchor {h_anchor.tag}"))
    report["train_rows_without_anchor"] = model_train - len(ids)
    return fit, report


def fit_decoder(V_train: np.ndarray, h_train: np.ndarray, *, tag: str, cfg: AdapterFitConfig,
                V_val: np.ndarray | None = None, h_val: np.ndarray | None = None, kind: str = "decoder") -> tuple[FitResult, dict]:
    """dec_M: n(v) at √d_shared → n(h_M) at √d_M, rows aligned by the caller (train split only)."""
    if len(V_train) < cfg.min_overlap:
        raise DataError(f"{tag}: {len(V_train)} rows to fit the decoder; need ≥ {cfg.min_overlap}", "use more train passages")
    V_val = np.zeros((0, np.shape(V_train)[1])) if V_val is None else V_val
    h_val = np.zeros((0, np.shape(h_train)[1])) if h_val is None else h_val
    return _fit_rows(kind, tag, V_train, h_train, V_val, h_val, cfg, (f"{tag} shared-space inputs", tag))


def encode_rows(fit_or_adapters: FitResult | PoolAdapters, tag: str, h: np.ndarray) -> np.ndarray:
    """n(enc_M(n(h))) at √d_shared: what the AV receives and what the decoder is fitted from."""
    if isinstance(fit_or_adapters, FitResult):
        v = fit_or_adapters.predict(normalize_rows(h))
    else:
        with torch.no_grad():
            v = fit_or_adapters.encode(tag, torch.as_tensor(normalize_rows(h)).float()).double().numpy()
    return normalize_rows(v)


def _centred(fit: FitResult, centre: np.ndarray | None) -> FitResult:
    """The same map followed by `− centre` (an intercept fit against n(h_anchor) becomes one against n(h_anchor) − μ)."""
    if centre is None:
        return fit
    return replace(fit, bias=fit.bias - torch.as_tensor(centre, dtype=fit.bias.dtype))


def fit_tag(acts: Activations, anchor: Activations, train_ids: list[str], val_ids: list[str],
            cfg: AdapterFitConfig, centre: np.ndarray | None = None) -> tuple[FitResult, FitResult, dict, dict]:
    """enc_M against the anchor (minus `centre`, the shared space's μ, when given), then the
    linear-ceiling dec_M from enc_M's outputs back to n(h_M). Both get an intercept when centring."""
    tag = acts.tag
    if centre is not None:
        cfg = replace(cfg, bias=True)
    enc, enc_report = fit_encoder(acts, anchor, train_ids, val_ids, cfg)
    enc = _centred(enc, centre)
    index = _rows_by_id(acts)
    h_tr = acts.X[[index[p] for p in train_ids if p in index]]
    h_va = acts.X[[index[p] for p in val_ids if p in index]]
    dec, dec_report = fit_decoder(encode_rows(enc, tag, h_tr), h_tr, tag=tag, cfg=cfg,
                                  V_val=encode_rows(enc, tag, h_va), h_val=h_va, kind="linear_ceiling_decoder")
    return enc, dec, enc_report, dec_report


def anchor_adapters(anchor: Activations, train_ids: list[str], val_ids: list[str], cfg: AdapterFitConfig,
                    centre: bool) -> tuple[PoolAdapters, dict | None]:
    """Adapters holding the anchor's pair: the identity, or (centred) identity − μ and its fitted dec."""
    _finite_rows(anchor.tag, anchor.X)
    adapters = PoolAdapters(anchor.d, anchor.tag)
    eye = torch.eye(anchor.d)
    if not centre:
        adapters.add(anchor.tag, eye, eye.clone())
        return adapters, None
    index = _rows_by_id(anchor)
    h_tr, h_va = (anchor.X[[index[p] for p in ids if p in index]] for ids in (train_ids, val_ids))
    mu = normalised_mean(h_tr)
    v_tr, v_va = (normalize_rows(normalize_rows(h) - mu) for h in (h_tr, h_va))  # n(enc_anchor(n(h)))
    dec, report = fit_decoder(v_tr, h_tr, tag=anchor.tag, cfg=replace(cfg, bias=True), V_val=v_va, h_val=h_va,
                              kind="linear_ceiling_decoder")
    adapters.add(anchor.tag, eye, dec.weight, torch.as_tensor(-mu, dtype=torch.float32), dec.bias)
    return adapters, report
