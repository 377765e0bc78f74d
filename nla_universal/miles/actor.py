"""`NLAPolicyActor`: Miles' FSDP train actor with the AV's LoRA and the vector injection.

Installed by `miles_patches.apply()` (the factory builds it for `--train-backend fsdp`); Miles' own
training step, reference pass, checkpoints and weight sync run unchanged around four additions:

- `_build_model_with_attn_bridge`: the trunk Miles builds gets the bundle's `av/` LoRA (peft,
  trainable; the base stays frozen, so Miles' optimizer moves only the adapter). Miles builds the
  frozen reference through the same method, so the reference is the SFT AV, as in `nla-universal rl`;
- `_get_model_inputs_args`: takes `nla_vec` / `nla_vec_positions` out of the batch (an HF model
  would refuse them) and arms the embedding hook of `packed.py`, so the policy pass, the reference
  pass and the training forward all see the injected rows the rollout saw;
- after `init`: the AV's input map, marker and scale from the bundle, the hooks on both models, LoRA
  dropout off (as every RL forward of `train/rl_roles.py`), and the weight updater reading
  `MergedLoraView` so SGLang gets plain merged weights;
- `save_nla_adapter(folder)`: the trained adapter (+ input map) for the bundle, on every rank.

This needs CUDA, FSDP2 and megatron-core (Miles' log-prob kernel): it never runs on CPU. CPU tests
build the object without `init` and call `_install_injection` and `_get_model_inputs_args`.
"""

from __future__ import annotations

import torch.distributed as dist
from miles.backends.fsdp_utils.actor import FSDPTrainRayActor  # the defining module: miles_patches rebinds the package's name

from ..models import input_embedding
from ..nla.av import AV
from ..nla.bundle import read_meta
from ..nla.input_map import InputMap
from ..nla.lora import load_lora
from ..nla.markers import check_marker
from ..nla.prompts import render_av_prompt
from .args import bundle_dir
from .context import POSITIONS, VEC
from .packed import PackedInjection
from .weights import MergedLoraView, save_gathered_adapter


class NLAPolicyActor(FSDPTrainRayActor):
    """The AV policy (and its frozen SFT reference) in Miles' FSDP backend; see the module docstring."""

    def init(self, args, role, *, with_ref=False, with_opd_teacher=False, recv_ckpt_src_rank=None, indep_dp_info):
        start = super().init(args, role, with_ref=with_ref, with_opd_teacher=with_opd_teacher,
                             recv_ckpt_src_rank=recv_ckpt_src_rank, indep_dp_info=indep_dp_info)
        if not args.debug_rollout_only:
            self._install_injection()
            self.weight_updater.model = MergedLoraView(self.model)
        return start

    def _build_model_with_attn_bridge(self, checkpoint_path, init_context):
        model, patched = super()._build_model_with_attn_bridge(checkpoint_path, init_context)
        return load_lora(model, bundle_dir(self.args) / "av", trainable=True), patched

    def _install_injection(self) -> None:
        """The bundle's injection (marker, scale, input map) on this actor's models, dropout off."""
        folder = bundle_dir(self.args)
        meta = read_meta(folder)
        check_marker(self.tokenizer, meta.av.marker,
                     lambda c: render_av_prompt(self.tokenizer, meta.av.prompt_template, meta.anchor_tag, c))
        embedding = input_embedding(self.model)
        input_map = None
        if meta.av.input_map:
            input_map = InputMap.load(folder / "av", meta.d_shared, int(embedding.weight.shape[1]))
            input_map.requires_grad_(False)
        self._nla_av = AV(self.model, self.tokenizer, meta.av.marker, meta.av.prompt_template, meta.av.injection_scale,
                          input_map=input_map)  # AV() turns the model's dropout off, as every RL forward does
        self._nla_injection = PackedInjection(self._nla_av)
        self._nla_hooks = [self._nla_injection.attach(embedding)]
        if getattr(self, "ref_model", None) is not None:
            self.ref_model.eval()
            self._nla_hooks.append(self._nla_injection.attach(input_embedding(self.ref_model)))

    def _get_model_inputs_args(self, batch: dict) -> dict:
        extra = dict(batch.get("multimodal_train_inputs") or {})
        self._nla_injection.arm(extra.pop(VEC, None), extra.pop(POSITIONS, None))
        return super()._get_model_inputs_args({**batch, "multimodal_train_inputs": extra})

    def save_nla_adapter(self, folder: str) -> None:
        """Write the trained adapter and the input map into `folder` (a collective: call on every rank)."""
        rank0 = dist.get_rank() == 0
        save_gathered_adapter(self.model, folder, write=rank0)
        if rank0 and self._nla_av.input_map is not None:
            self._nla_av.input_map.save(folder)
        dist.barrier()
