"""What the nla-universal Miles extension relies on in Miles, checked on Miles' own objects.

Each `Expect` names one Miles symbol and what must hold for our hooks to be called the way they are
written: its parameter names in order (`inspect.signature`), the call sites in its source that call
into our code or that our code imitates (`inspect.getsource`), and the fields or attributes it must
have. All of it was read at radixark/miles@MILES_COMMIT (the source is in third_party/); a
Miles that differs in any of them is refused before any work, naming the symbol and the fix.
Version strings are not used: Miles' `setup.py` says 0.1.0 across hundreds of commits.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from nla_universal.errors import NLAError

from . import MILES_COMMIT

SHORT = MILES_COMMIT[:7]
FIX = (f"install Miles at the pinned commit {MILES_COMMIT}: `pip install --no-deps third_party/miles-{SHORT}.tar.gz` "
       "(or a checkout of radixark/miles at that commit). Moving to another Miles means re-reading this call site "
       "and changing miles_patches/contract.py and MILES_COMMIT together")

DEPS_FIX = ("run the driver where Miles runs: SGLang (the sglang-miles build), megatron-core and a CUDA torch "
            "installed beside it (tools/gpu/miles_check.py lists the environment)")


class MilesMismatch(NLAError):
    """The installed Miles is not the one the extension was written against."""


@dataclass(frozen=True)
class Expect:
    module: str
    qualname: str  # "" = the module itself
    why: str
    params: tuple[str, ...] | None = None  # parameter names, in order
    calls: tuple[str, ...] = ()  # text its source must contain
    fields: tuple[str, ...] = ()  # dataclass fields or attributes it must have

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.qualname}" if self.qualname else self.module


HOOKS = (
    Expect("miles.utils.types", "Sample", "the data source, generate and reward read and fill these fields",
           fields=("group_index", "index", "prompt", "tokens", "multimodal_train_inputs", "response", "response_length",
                   "reward", "loss_mask", "rollout_log_probs", "status", "metadata", "validate")),
    Expect("miles.utils.types", "Sample.Status", "generate sets COMPLETED or TRUNCATED; ABORTED samples are penalised",
           fields=("COMPLETED", "TRUNCATED", "ABORTED")),
    Expect("miles.rollout.data_source", "DataSource.get_samples", "NLADataSource implements it",
           params=("self", "num_samples")),
    Expect("miles.rollout.data_source", "DataSource.add_samples", "NLADataSource implements it",
           params=("self", "samples")),
    Expect("miles.rollout.data_source", "DataSource.save", "NLADataSource persists its cursor", params=("self", "rollout_id")),
    Expect("miles.rollout.data_source", "DataSource.load", "NLADataSource restores its cursor", params=("self", "rollout_id")),
    Expect("miles.rollout.base_types", "GenerateFnInput", "generate reads these", fields=("state", "sample", "sampling_params",
                                                                                         "evaluation", "args")),
    Expect("miles.rollout.base_types", "GenerateFnOutput", "generate returns it", fields=("samples",)),
    Expect("miles.rollout.inference_rollout.compatibility", "_is_legacy_generate_fn",
           "it must classify our `generate(input)` as the new form", params=("fn",),
           calls=('params[0] != "input"',)),
    Expect("miles.rollout.inference_rollout.inference_rollout_common", "generate_and_rm",
           "it calls our generate with a GenerateFnInput and our reward per sample",
           params=("state", "sample", "sampling_params", "evaluation"),
           calls=("await generate_fn(", "GenerateFnInput(", "sample.reward = await async_rm(args, sample)")),
    Expect("miles.rollout.inference_rollout.inference_rollout_common", "generate_and_rm_group",
           "with --group-rm it calls our reward once per group",
           calls=("await batched_async_rm(args, group, inplace_set_reward_field=True)",)),
    Expect("miles.rollout.rm_hub", "async_rm", "it awaits our reward on one sample", params=("args", "sample", "kwargs"),
           calls=("await rm_function(args, sample, **kwargs)",)),
    Expect("miles.rollout.rm_hub", "batched_async_rm", "it awaits our reward on a list and sets sample.reward itself",
           params=("args", "samples", "inplace_set_reward_field", "kwargs"),
           calls=("await rm_function(args, samples, **kwargs)", "sample.reward = reward")),
    Expect("miles.ray.rollout.train_data_conversion", "_post_process_rewards",
           "it hands our post-process the flattened samples and uses its (raw, normalised) rewards",
           calls=("return f(args, samples)",)),
    Expect("miles.ray.rollout.train_data_conversion", "convert_samples_to_train_data",
           "the driver trains the AR on the samples named by sample_indices",
           calls=('"sample_indices": [sample.index for sample in samples]',
                  'train_data["multimodal_train_inputs"] = [sample.multimodal_train_inputs for sample in samples]')),
)

ACTOR = (
    Expect("miles.ray.train.actor_factory", "allocate_gpus_for_actor", "miles_patches rebinds the class it imports at call time",
           params=("args", "gpus_per_cell", "pg", "num_gpus_per_actor", "indep_dp_store_addr", "role", "cell_index"),
           calls=("from miles.backends.fsdp_utils import FSDPTrainRayActor",)),
    Expect("miles.backends.fsdp_utils.actor", "FSDPTrainRayActor.init", "NLAPolicyActor extends it",
           params=("self", "args", "role", "with_ref", "with_opd_teacher", "recv_ckpt_src_rank", "indep_dp_info"),
           calls=("self._build_model_with_attn_bridge(self.args.hf_checkpoint, init_context)", "self.weight_updater = (")),
    Expect("miles.backends.fsdp_utils.actor", "FSDPTrainRayActor.train", "the driver calls it through Miles' train group",
           params=("self", "rollout_id", "rollout_data_ref", "witness_info", "attempt")),
    Expect("miles.backends.fsdp_utils.actor", "FSDPTrainRayActor._build_model_with_attn_bridge",
           "NLAPolicyActor adds the AV's LoRA to the model it builds", params=("self", "checkpoint_path", "init_context")),
    Expect("miles.backends.fsdp_utils.actor", "FSDPTrainRayActor._create_ref_model",
           "the frozen reference gets the SFT LoRA through the same builder",
           params=("self", "ref_load_path"), calls=("self._build_model_with_attn_bridge(ref_load_path, init_context)",)),
    Expect("miles.backends.fsdp_utils.actor", "FSDPTrainRayActor._get_model_inputs_args",
           "NLAPolicyActor takes the nla_* tensors out of the batch there", params=("self", "batch"),
           calls=('model_args.update(batch["multimodal_train_inputs"])',)),
    Expect("miles.backends.fsdp_utils.actor", "FSDPTrainRayActor._compute_log_prob",
           "the reference and policy log-prob passes must go through _get_model_inputs_args",
           calls=("model_args = self._get_model_inputs_args(batch)", "logits = active_model(**model_args).logits")),
    Expect("miles.backends.fsdp_utils.actor", "FSDPTrainRayActor._train_step",
           "the training forward must go through _get_model_inputs_args",
           calls=("model_args = self._get_model_inputs_args(batch)",)),
    Expect("miles.backends.fsdp_utils.update_weight_utils", "UpdateWeight.update_weights",
           "NLAPolicyActor hands it a merged-LoRA view of the model", params=("self",),
           calls=("self.model.state_dict().items()", 'getattr(self.model, "_fsdp_sync_dtypes", None)')),
    Expect("miles.backends.training_utils.data", "get_batch", "nla_vec_positions is shifted to packed positions there",
           calls=('key.endswith("_positions")', "mm_tensor = mm_tensor + sample_offsets[i]")),
)

DRIVER = (
    Expect("miles.utils.arguments", "parse_args", "the driver adds its flags through it", params=("add_custom_arguments",)),
    Expect("miles.utils.arguments", "get_miles_extra_args_provider", "our flags are added to Miles' parser",
           calls=("parser = add_custom_arguments(parser)",)),
    Expect("miles.ray.placement_group", "create_placement_groups", "the driver places Miles' actors with it",
           params=("args",), calls=('"actor": (pg, actor_pg_reordered_bundle_indices, actor_pg_reordered_gpu_ids)',)),
    Expect("miles.ray.placement_group", "create_rollout_manager", "the driver starts the rollout manager with it",
           params=("args", "pg")),
    Expect("miles.ray.placement_group", "create_training_models", "the driver builds the AV actors with it",
           params=("args", "pgs", "rollout_manager")),
    Expect("miles.ray.actor_group", "RayTrainGroup.train", "the driver trains the AV through it",
           params=("self", "rollout_id", "rollout_data_pack", "external_data")),
    Expect("miles.ray.actor_group", "RayTrainGroup.update_weights", "the driver pushes the AV to SGLang through it",
           params=("self", "rollout_id")),
    Expect("miles.ray.actor_group", "RayTrainGroup.__init__", "the driver asks every AV rank (_actor_handles) to "
           "save the adapter", calls=("self._actor_handles = self._allocate_gpus_for_actor(",)),
    Expect("miles.ray.rollout.rollout_manager", "", "the driver reads sample_indices from generate's result",
           calls=("return dict(sample_indices=sample_indices, data_ref=data_ref)", "self.data_source = data_source_cls(args)")),
)


def _resolve(expect: Expect):
    try:
        obj = importlib.import_module(expect.module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing and not missing.startswith("miles"):  # Miles is there, one of its own dependencies is not
            raise _mismatch(expect, f"cannot be imported: {missing} is not installed", DEPS_FIX) from None
        raise _mismatch(expect, f"cannot be imported ({type(exc).__name__}: {exc})") from None
    for part in filter(None, expect.qualname.split(".")):
        if not hasattr(obj, part):
            raise _mismatch(expect, "does not exist")
        obj = getattr(obj, part)
    return obj


def _mismatch(expect: Expect, detail: str, fix: str = FIX) -> MilesMismatch:
    return MilesMismatch(f"the installed Miles does not fit nla-universal's Miles extension (written against "
                         f"radixark/miles@{SHORT}): {expect.symbol} {detail}; we rely on it because {expect.why}", fix)


def check_one(expect: Expect) -> None:
    obj = _resolve(expect)
    if expect.params is not None:
        got = tuple(inspect.signature(obj).parameters)
        if got != expect.params:
            raise _mismatch(expect, f"takes ({', '.join(got)}), expected ({', '.join(expect.params)})")
    if expect.calls:
        source = inspect.getsource(obj)
        missing = [c for c in expect.calls if c not in source]
        if missing:
            raise _mismatch(expect, f"no longer contains `{missing[0]}`")
    if expect.fields:
        have = set(getattr(obj, "__dataclass_fields__", {})) | set(dir(obj))
        missing = [f for f in expect.fields if f not in have]
        if missing:
            raise _mismatch(expect, f"has no {', '.join(missing)}")


def check_all(expects) -> None:
    for expect in expects:
        check_one(expect)
