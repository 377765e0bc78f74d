"""The three RL roles — AV policy, frozen AV reference (= the SFT AV), AR critic — and their layouts.

Each role is a small object that owns its model, its optimiser and its checkpoints; the in-process
`LocalRoles` composes them, and the Ray actors (`distributed/`) host the same objects, one per actor
or all in one. Layouts:

- `colocated`: ONE frozen base. The policy is LoRA `av`, the reference the frozen SFT adapter `av_ref`,
  the AR the same modules' blocks 0..K under LoRA `ar` (peft `layers_to_transform`) plus its value
  head. About 0.4× the parameters of three copies (reference/rl-colocated.md).
- `separate`: three copies — the reference layout, and what one actor per role holds (`per_role`).

peft's adapter switch turns `requires_grad` off for every other adapter, which silently drops
gradients still waiting for a backward; so each role runs forward AND backward before the next
switch (the "split order"), and every switch re-enables the trainable tensors. No gradient
checkpointing: a recompute after a switch would run under the wrong adapter. Policy and reference
log-probs are computed in fp32 (bf16 puts a ~1e-3 noise floor under the KL); LoRA dropout is off in
every RL forward, so policy and reference agree exactly at step 0 and a rerun is deterministic.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from peft import PeftModel

from ..errors import DataError
from ..models import load_model
from ..nla.api import UniversalNLA
from ..nla.ar import AR, VALUE_HEAD_FILE, load_value_head
from ..nla.av import AV
from ..nla.bundle import read_meta, spec_from_dict
from ..nla.input_map import InputMap
from ..nla.loss import mse_nrm
from ..nla.lora import add_saved_adapter
from ..nla.markers import check_marker
from ..nla.prompts import render_av_prompt
from ..rollout import Completion, SamplingParams
from .loop import load_checkpoint, save_checkpoint
from .rl_math import kl_k3, policy_loss

POLICY, REFERENCE, CRITIC = "av", "av_ref", "ar"
Use = Callable[[str], contextlib.AbstractContextManager]


class Placement(enum.StrEnum):
    colocated = "colocated"  # one frozen base serves all three roles
    separate = "separate"  # three copies in one process
    per_role = "per_role"  # one Ray actor per role (and per rollout engine)


class SharedBase:
    """Which adapter of the one base is active. The switch turned every other adapter's tensors off:
    re-enable the trainable ones."""

    def __init__(self, model: PeftModel, trainable: Sequence[torch.nn.Parameter]):
        self.model = model
        self.trainable = list(trainable)

    @contextlib.contextmanager
    def use(self, adapter: str) -> Iterator[None]:
        self.model.set_adapter(adapter)
        for p in self.trainable:
            p.requires_grad_(True)
        yield


@contextlib.contextmanager
def _own_model(adapter: str) -> Iterator[None]:
    yield


def _owned(module: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if f".{adapter}." in n or n.startswith("value_head")}


class _Trained:
    """Parameters, their AdamW, a per-role gradient clip, checkpoints."""

    name = ""

    def __init__(self, params: dict[str, torch.nn.Parameter], lr: float, clip_grad: float):
        self.params, self.lr, self.clip_grad = params, lr, clip_grad
        self.opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)

    def step(self, loss: torch.Tensor, lr_scale: float) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.clip_grad or math.inf))
        if not math.isfinite(norm):  # before the optimiser step: no NaN reaches a weight or a checkpoint
            raise DataError(f"non-finite gradient (norm {norm}) in the {self.name} update",
                            "lower the learning rates; the last checkpoint is intact")
        for group in self.opt.param_groups:
            group["lr"] = self.lr * lr_scale
        self.opt.step()
        return norm

    def checkpoint(self, root: Path, step: int, keep: int) -> None:
        save_checkpoint(root / self.name, step, self.params, self.opt, keep)

    def restore(self, root: Path, step: int) -> None:
        load_checkpoint(root / self.name / f"step-{step:06d}", self.params, self.opt)


class PolicyRole(_Trained):
    """The AV being trained: samples explanations and takes the clipped PG + k3 KL step."""

    name = "av"

    def __init__(self, av: AV, lr: float, clip_grad: float, use: Use = _own_model):
        super().__init__(_owned(av.model, av.adapter_name), lr, clip_grad)
        self.av, self.use = av, use

    def generate(self, vectors: torch.Tensor, tags: Sequence[str], sampling: SamplingParams) -> list[Completion]:
        with self.use(POLICY), torch.no_grad():
            return self.av.generate(vectors, tags, sampling)

    def update(self, vectors: torch.Tensor, tags: Sequence[str], responses: Sequence[Sequence[int]], advantages: torch.Tensor,
               ref_logprobs: torch.Tensor, kl_coef: float, clip_eps: float, lr_scale: float) -> dict[str, float]:
        with self.use(POLICY):
            lp = self.av.sequence_log_probs(vectors, tags, responses)
            pg, clip_fraction = policy_loss(lp.per_token, lp.per_token.detach(), advantages.to(lp.mask.device), lp.mask, clip_eps)
            kl = kl_k3(lp.per_token, ref_logprobs.to(lp.mask.device), lp.mask)
            grad_norm = self.step(pg + kl_coef * kl, lr_scale)
        return {"policy_loss": float(pg.detach()), "kl": float(kl.detach()), "clip_fraction": float(clip_fraction),
                "av_grad_norm": grad_norm}

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, for a rollout copy to load (names without the adapter)."""
        return {n.replace(f".{self.av.adapter_name}.", "."): p.detach().cpu() for n, p in self.params.items()}


class ReferenceRole:
    """The frozen SFT AV: per-token log-probs of the sampled responses, no gradients."""

    def __init__(self, av: AV, use: Use = _own_model):
        self.av, self.use = av, use

    def logprobs(self, vectors: torch.Tensor, tags: Sequence[str], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        with self.use(REFERENCE), torch.no_grad():
            return self.av.sequence_log_probs(vectors, tags, responses).per_token.cpu()


class CriticRole(_Trained):
    """The AR: reconstructs each explanation (the reward), then trains on the same texts by mse_nrm."""

    name = "ar"

    def __init__(self, ar: AR, lr: float, clip_grad: float, use: Use = _own_model):
        super().__init__(_owned(ar, ar.adapter_name), lr, clip_grad)
        self.ar, self.use = ar, use

    def predict(self, texts: Sequence[str]) -> torch.Tensor:
        with self.use(CRITIC):
            return self.ar.reconstruct(list(texts))

    def update(self, texts: Sequence[str], gold: torch.Tensor, lr_scale: float) -> dict[str, float]:
        with self.use(CRITIC):
            pred = self.ar(list(texts))
            loss = mse_nrm(pred.float(), gold.to(pred.device).float()).mean()
            grad_norm = self.step(loss, lr_scale)
        return {"ar_loss": float(loss.detach()), "ar_grad_norm": grad_norm}


class LocalRoles:
    """The roles held by this process — all three, or one of them in a per-role Ray actor — behind the
    `Roles` interface of `train/rl.py` (a role that is absent here raises if asked for)."""

    def __init__(self, policy: PolicyRole | None = None, reference: ReferenceRole | None = None,
                 critic: CriticRole | None = None):
        self.policy, self.reference, self.critic = policy, reference, critic

    @classmethod
    def build(cls, folder: Path, placement: Placement, cache_dir: str | None, device: torch.device,
              av_lr: float, ar_lr: float, clip_grad: float) -> "LocalRoles":
        """All roles of the bundle in `folder` (one whose AV went through SFT), in one of the in-process layouts."""
        policy_av, reference_av, ar = load_roles(Path(folder), placement, cache_dir, device)
        shared = policy_av.model if policy_av.model is ar.model else None
        trainable = [*_owned(policy_av.model, policy_av.adapter_name).values(), *_owned(ar, ar.adapter_name).values()]
        use = SharedBase(shared, trainable).use if shared is not None else _own_model
        return cls(PolicyRole(policy_av, av_lr, clip_grad, use), ReferenceRole(reference_av, use),
                   CriticRole(ar, ar_lr, clip_grad, use))

    @classmethod
    def build_one(cls, role: str, folder: Path, cache_dir: str | None, device: torch.device, lr: float,
                  clip_grad: float) -> "LocalRoles":
        """One role alone (its own copy of the trunk): "policy", "reference" or "critic"."""
        if role == "policy":
            return cls(policy=PolicyRole(_placed(load_policy(folder, cache_dir), device), lr, clip_grad))
        if role == "reference":
            return cls(reference=ReferenceRole(_placed(load_reference(folder, cache_dir), device)))
        critic = load_critic(folder, cache_dir)
        critic.to(device).eval()
        return cls(critic=CriticRole(critic, lr, clip_grad))

    @property
    def trained(self) -> list[_Trained]:
        return [r for r in (self.policy, self.critic) if r is not None]

    def generate(self, vectors, tags, sampling):
        return self.policy.generate(vectors, tags, sampling)

    def critic_predict(self, texts):
        return self.critic.predict(texts)

    def reference_logprobs(self, vectors, tags, responses):
        return self.reference.logprobs(vectors, tags, responses)

    def policy_update(self, vectors, tags, responses, advantages, ref_logprobs, kl_coef, clip_eps, lr_scale):
        return self.policy.update(vectors, tags, responses, advantages, ref_logprobs, kl_coef, clip_eps, lr_scale)

    def critic_update(self, texts, gold, lr_scale):
        return self.critic.update(texts, gold, lr_scale)

    def checkpoint(self, root: Path, step: int, keep: int) -> None:
        for role in self.trained:
            role.checkpoint(root, step, keep)

    def restore(self, root: Path, step: int) -> None:
        for role in self.trained:
            role.restore(root, step)

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self.policy.lora_state()

    def save_part(self, part: str, folder: str | Path) -> None:
        """Write the trained "av" or "ar" into a bundle folder being assembled (each saves only its own adapter)."""
        (self.policy.av if part == "av" else self.critic.ar).save(folder)

    def parts(self) -> tuple[AV, AR]:
        """The trained AV and AR, for writing the bundle."""
        return self.policy.av, self.critic.ar


# ---------------------------------------------------------------------------------------------- building


def load_roles(folder: Path, placement: Placement, cache_dir: str | None, device: torch.device) -> tuple[AV, AV, AR]:
    """Policy AV, reference AV and AR of a bundle, on `device`, dropout off, in one of the two layouts."""
    build = _colocated if Placement(placement) == Placement.colocated else _separate
    policy, reference, ar = build(folder, cache_dir)
    ar.to(device).eval()
    return _placed(policy, device), _placed(reference, device), ar


def _placed(av: AV, device: torch.device) -> AV:
    av.model.to(device).eval()
    if av.input_map is not None:
        av.input_map.to(device).requires_grad_(False)
    return av


def load_policy(folder: Path, cache_dir: str | None) -> AV:
    """The bundle's AV alone (a rollout copy, or the policy of one actor per role)."""
    nla = UniversalNLA.load(folder, cache_dir=cache_dir, parts=("av",), trained=False)
    return nla.av


def load_reference(folder: Path, cache_dir: str | None) -> AV:
    meta = read_meta(folder)
    return AV.load(folder / "av", load_model(spec_from_dict(meta.av.base, "av.base"), cache_dir=cache_dir),
                   meta.av.marker, meta.av.prompt_template, meta.av.injection_scale, canonical_tag=meta.anchor_tag,
                   has_input_map=bool(meta.av.input_map), trainable=False)


def load_critic(folder: Path, cache_dir: str | None) -> AR:
    return UniversalNLA.load(folder, cache_dir=cache_dir, parts=("ar",), trained=False).ar


def _separate(folder: Path, cache_dir: str | None) -> tuple[AV, AV, AR]:
    return load_policy(folder, cache_dir), load_reference(folder, cache_dir), load_critic(folder, cache_dir)


def _colocated(folder: Path, cache_dir: str | None) -> tuple[AV, AV, AR]:
    """One base: the bundle's AV adapter twice (`av` trained, `av_ref` frozen) and its AR adapter on blocks 0..K."""
    meta = read_meta(folder)
    base = load_model(spec_from_dict(meta.av.base, "av.base"), cache_dir=cache_dir)
    check_marker(base.tokenizer, meta.av.marker,
                 lambda c: render_av_prompt(base.tokenizer, meta.av.prompt_template, meta.anchor_tag, c))
    model = PeftModel.from_pretrained(base.model, str(folder / "av"), adapter_name=POLICY, is_trainable=True)
    add_saved_adapter(model, folder / "av", REFERENCE)
    k = meta.ar.num_layers - 1
    add_saved_adapter(model, folder / "ar", CRITIC, layers=list(range(k + 1)))
    for name, p in model.named_parameters():  # the reference adapter never trains
        if f".{REFERENCE}." in name:
            p.requires_grad_(False)
    input_map = InputMap.load(folder / "av", meta.d_shared, base.d_model) if meta.av.input_map else None
    av_kw = dict(marker=meta.av.marker, template=meta.av.prompt_template, injection_scale=meta.av.injection_scale)
    policy = AV(model, base.tokenizer, adapter_name=POLICY, input_map=input_map, **av_kw)
    reference = AV(model, base.tokenizer, adapter_name=REFERENCE,
                   input_map=None if input_map is None else copy.deepcopy(input_map), **av_kw)
    head = torch.nn.Linear(meta.d_shared, meta.d_shared, bias=False)
    with torch.no_grad():
        head.weight.copy_(load_value_head(folder / "ar" / VALUE_HEAD_FILE, meta.d_shared))
    critic = AR(model, base.tokenizer, meta.ar.template, head, layer=k, adapter_name=CRITIC)
    model.set_adapter(POLICY)
    return policy, reference, critic
