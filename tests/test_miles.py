"""The Miles extension on CPU, against the vendored Miles (third_party/miles-31f1ca9.tar.gz) with SGLang
stood in (tests/miles_stub.py): the contract and the rebinding, our hooks called through Miles' own call
sites, the whole rollout → reward → advantage → AR-update chain against `rl_step` on a real tiny bundle
and the SGLang stand-in, the trainer-side injection against the AV, the driver's argument handling,
and bad input. What needs CUDA, FSDP2 and SGLang is tools/gpu/miles_check.py's."""

import argparse
import asyncio
import dataclasses
import importlib.util
import logging
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import miles_stub
from nla_universal.errors import ConfigError, DataError, NLAError
from nla_universal.models import input_embedding, load_model
from nla_universal.nla import UniversalNLA
from nla_universal.nla.bundle import read_meta, spec_from_dict
from nla_universal.nla.injection import InjectionError, inject
from nla_universal.rollout import FINISH_LENGTH, FINISH_STOP, Completion
from nla_universal.rollout.servers import ServerRefused
from nla_universal.train.rl import Batch, lr_scale, rl_step, step_batch
from nla_universal.train.rl_math import reward as rl_reward
from nla_universal.train.rl_roles import LocalRoles
from sglang_standin import SGLangStandIn

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("miles") is None,
                       reason="Miles is not installed: pip install --no-deps third_party/miles-31f1ca9.tar.gz"),
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.timeout(300),
]
G = 3  # samples per prompt
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def stubs():
    """SGLang (and the light packages Miles imports at module level) stood in while this module runs; what
    Miles changes process-wide on import and in parse_args (root logging, an unraisable hook that exits
    the process; pytest itself resets the warning filters after each test) is put back afterwards."""
    saved = sys.unraisablehook, logging.root.level, list(logging.root.handlers)
    miles_stub.install(fsdp=True, arguments=True, rollout=True)
    yield
    miles_stub.uninstall()
    sys.unraisablehook, level, logging.root.handlers[:] = saved
    logging.root.setLevel(level)


BASE_ARGV = ["--train-backend", "fsdp", "--actor-num-gpus-per-node", "1", "--rollout-batch-size", "2",
             "--n-samples-per-prompt", str(G), "--global-batch-size", str(2 * G), "--rollout-max-response-len", "6",
             "--num-rollout", "2", "--use-kl-loss", "--kl-loss-type", "k3", "--kl-loss-coef", "0.05",
             "--sglang-disable-radix-cache", "--no-nla-penalise-failed"]


def miles_args(run: Path, *extra: str, checked: bool = True, **attrs):
    """The namespace Miles' hooks get: our driver's `parse` (Miles' own parse_args and validation with our
    flags, then check_args) of a realistic command line; `checked=False` only builds Miles' parser with
    ours and parses, for settings the checks must refuse. `attrs` stand for what Miles sets at run time."""
    from miles.utils.arguments import get_miles_extra_args_provider

    from nla_universal.miles import train
    from nla_universal.miles.args import add_nla_arguments, with_defaults

    argv = ["--nla-run-dir", str(run), *BASE_ARGV, *extra]
    saved = sys.argv
    try:
        if checked:
            args = train.parse(argv)  # Miles' parse_args reads sys.argv
        else:
            sys.argv = ["test", *with_defaults(argv)]
            parser = argparse.ArgumentParser()
            get_miles_extra_args_provider(add_nla_arguments)(parser)
            args = parser.parse_args(sys.argv[1:])
    finally:
        sys.argv = saved
    for key, value in {"sglang_router_ip": "127.0.0.1", **attrs}.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def bundle(refitted):
    return refitted / "bundle"


@pytest.fixture(scope="module")
def served(bundle):
    """The SGLang stand-in serving what Miles' weight sync would send: the trunk with the AV's LoRA merged
    (built from MergedLoraView, so a wrong name or merge fails here)."""
    from nla_universal.miles.weights import MergedLoraView

    av = UniversalNLA.load(bundle, parts=("av",), trained=False).av
    loaded = load_model(spec_from_dict(read_meta(bundle).av.base, "av.base"))
    loaded.model.load_state_dict(dict(MergedLoraView(av.model).state_dict().items()), strict=True)
    with SGLangStandIn(loaded.model.eval(), loaded.tokenizer) as server:
        yield server


def port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def critic_host(bundle, tmp_path):
    from nla_universal.miles.critic import MilesCriticHost

    return MilesCriticHost(str(bundle), None, "cpu", ar_lr=1e-3, clip_grad=1.0, ckpt_root=str(tmp_path / "ar"), num_cpus=1)


def rollout(args, groups, host):
    """The groups through Miles' own generate_and_rm_group, with our generate and reward in it."""
    from miles.rollout.inference_rollout import inference_rollout_common as common

    from nla_universal.miles.reward import local_critic

    state = object.__new__(common.GenerateState)
    state.args, state.aborted = args, False
    state.generate_function = common.load_generate_function(args.custom_generate_function_path)
    state.generate_fn_semaphore = asyncio.Semaphore(4)
    sampling = common.compute_sampling_params(args, temperature=args.rollout_temperature, top_p=args.rollout_top_p,
                                              top_k=args.rollout_top_k, max_new_tokens=args.rollout_max_response_len)

    async def run():
        return await asyncio.gather(*[common.generate_and_rm_group(state, g, sampling) for g in groups])

    with local_critic(host):
        return asyncio.run(run())


# ---------------------------------------------------------------------------------------------- the contract


def test_the_vendored_miles_fulfils_the_contract_and_the_factory_builds_our_actor(monkeypatch):
    import miles.backends.fsdp_utils as fsdp_package
    import miles.ray.train.actor_factory as factory

    import miles_patches
    from nla_universal.miles.actor import NLAPolicyActor

    original = fsdp_package.FSDPTrainRayActor
    monkeypatch.setattr(fsdp_package, "FSDPTrainRayActor", original)  # undone after the test
    built = []

    class Remote:  # what ray.remote(...)(cls) returns, recording the class Miles' factory chose
        def options(self, **kw):
            return self

        def remote(self, *a, **kw):
            return SimpleNamespace(get_master_addr_and_port=SimpleNamespace(remote=lambda: ("127.0.0.1", 1)))

    monkeypatch.setattr(factory.ray, "remote", lambda *a, **kw: (lambda cls: built.append(cls) or Remote()))
    monkeypatch.setattr(factory.ray, "get", lambda ref: ref)
    args = SimpleNamespace(train_env_vars={}, dumper_source_patcher_config_train=None, offload_train=False,
                           train_backend="fsdp", use_fault_tolerance=False, offload_train_target=None)

    def allocate():
        factory.allocate_gpus_for_actor(args, gpus_per_cell=1, pg=(None, [0], [0]), num_gpus_per_actor=0.4,
                                        indep_dp_store_addr=None, role="actor", cell_index=0)
        return built[-1]

    assert allocate() is original
    miles_patches.apply()  # checks hooks + actor symbols first
    assert allocate() is NLAPolicyActor and issubclass(NLAPolicyActor, original)
    miles_patches.apply()  # idempotent: still our class, whose base is Miles' own
    assert allocate() is NLAPolicyActor and NLAPolicyActor.__mro__[1] is original


def test_a_miles_whose_symbols_differ_is_refused_naming_the_symbol_and_the_fix(monkeypatch):
    import miles.ray.train.actor_factory as factory
    from miles.backends.fsdp_utils.actor import FSDPTrainRayActor

    import miles_patches
    from miles_patches.contract import MilesMismatch

    with monkeypatch.context() as m:
        m.setattr(FSDPTrainRayActor, "_get_model_inputs_args", lambda self, batch, packed: {})
        with pytest.raises(MilesMismatch) as caught:
            miles_patches.check()
    message = str(caught.value)
    assert "FSDPTrainRayActor._get_model_inputs_args takes (self, batch, packed), expected (self, batch)" in message
    assert miles_patches.MILES_COMMIT in message and "pip install --no-deps third_party/miles-31f1ca9.tar.gz" in message

    def allocate_gpus_for_actor(args, gpus_per_cell, pg, num_gpus_per_actor, indep_dp_store_addr, role, cell_index):
        from miles.backends.fsdp_utils.actor import FSDPTrainRayActor  # the rebinding would miss this import

        return FSDPTrainRayActor

    with monkeypatch.context() as m:
        m.setattr(factory, "allocate_gpus_for_actor", allocate_gpus_for_actor)
        with pytest.raises(MilesMismatch, match="(?s)no longer contains `from miles.backends.fsdp_utils import "
                           "FSDPTrainRayActor`.*rebinds the class it imports at call time"):
            miles_patches.check()
    if importlib.util.find_spec("sglang.srt.constants") is None:  # a CPU machine: the driver side cannot import
        with pytest.raises(MilesMismatch, match="(?s)sglang.srt.constants is not installed.*fix: run the driver where Miles runs"):
            miles_patches.check(driver=True)
    miles_patches.check()


def test_miles_loads_our_hooks_in_the_forms_we_wrote():
    from miles.rollout.data_source import DataSource
    from miles.rollout.inference_rollout.compatibility import _is_legacy_generate_fn, load_generate_function
    from miles.utils.misc import load_function

    from nla_universal.miles import generate, reward
    from nla_universal.miles.args import HOOKS
    from nla_universal.miles.data_source import NLADataSource

    assert not _is_legacy_generate_fn(generate.generate)
    assert load_generate_function(HOOKS["custom_generate_function_path"]) is generate.generate  # the new form, unwrapped
    assert load_function(HOOKS["data_source_path"]) is NLADataSource and issubclass(NLADataSource, DataSource)
    assert load_function(HOOKS["custom_rm_path"]) is reward.reward and asyncio.iscoroutinefunction(reward.reward)
    assert load_function(HOOKS["custom_reward_post_process_path"]) is reward.post_process


# ---------------------------------------------------------------------------------------------- data source


def test_the_data_source_serves_valid_groups_in_nla_universal_rl_order_and_resumes(bundle, tmp_path):
    from miles.utils.types import Sample

    from nla_universal.miles.args import rl_config
    from nla_universal.miles.data_source import NLADataSource

    args = miles_args(bundle.parent, "--save", str(tmp_path / "ckpt"))
    source = NLADataSource(args)
    source.add_samples([])  # what Miles does after every rollout
    first, second = source.get_samples(2), source.get_samples(2)
    nla = UniversalNLA.load(bundle, parts=("av",), trained=False)
    indices = []
    for k, groups in enumerate((first, second)):
        expected = step_batch(nla.encode, source.rows, source.dataset,
                              dataclasses.replace(rl_config(args), prompts_per_step=2), k)
        for g, group in enumerate(groups):
            assert len(group) == G and len({s.group_index for s in group}) == 1
            vector, tag = expected.vectors[g * G], expected.tags[g * G]
            ids = nla.av.prompt_ids(tag)
            for sample in group:
                sample.validate()
                indices.append(sample.index)
                assert isinstance(sample, Sample) and sample.status is Sample.Status.PENDING and sample.reward is None
                assert sample.tokens == ids and sample.metadata["nla_tag"] == tag
                assert torch.equal(sample.metadata["nla_vec"], vector)
                mm = sample.multimodal_train_inputs
                assert torch.equal(mm["nla_vec"], vector[None]) and mm["nla_vec_positions"].dtype == torch.long
                assert ids[int(mm["nla_vec_positions"])] == nla.av.marker.token_id
            group[0].metadata["nla_vec"].add_(1.0)  # deep copies: the group's other samples keep their vector
            assert torch.equal(group[1].metadata["nla_vec"], vector)
    assert sorted(indices) == list(range(4 * G)) and [g[0].group_index for g in first + second] == [0, 1, 2, 3]
    assert len(source.dataset) == sum(len(r) for r in source.rows.values())

    source.save(0)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("0")  # Miles' own checkpoint beside it
    resumed = NLADataSource(miles_args(bundle.parent, "--load", str(tmp_path / "ckpt")))
    resumed.load(0)
    again, uninterrupted = resumed.get_samples(2), source.get_samples(2)
    assert [[s.index for s in g] for g in again] == [[s.index for s in g] for g in uninterrupted]
    assert all(torch.equal(a[0].metadata["nla_vec"], b[0].metadata["nla_vec"]) for a, b in zip(again, uninterrupted))
    with pytest.raises(ConfigError, match="keep --over-sampling-batch-size fixed"):
        source.get_samples(3)
    with pytest.raises(ConfigError, match="drop --partial-rollout"):
        source.add_samples([first[0]])


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("group_rm", [False, True], ids=["per-sample-rm", "group-rm"])
def test_rollout_reward_advantages_and_ar_update_equal_rl_step(bundle, served, tmp_path, group_rm):
    from miles.ray.rollout.train_data_conversion import convert_samples_to_train_data
    from miles.utils.types import Sample

    from nla_universal.miles.args import rl_config
    from nla_universal.miles.data_source import NLADataSource
    from nla_universal.miles.reward import post_process

    args = miles_args(bundle.parent, *(["--group-rm"] if group_rm else []), sglang_router_port=port(served))
    torch.manual_seed(0)
    groups = rollout(args, NLADataSource(args).get_samples(2), host := critic_host(bundle, tmp_path))
    samples = [s for g in groups for s in g]
    av = UniversalNLA.load(bundle, parts=("av",), trained=False).av
    for s in samples:
        s.validate()
        assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED) and s.response_length > 0
        assert s.tokens[:len(s.tokens) - s.response_length] == av.prompt_ids(s.metadata["nla_tag"])
        assert len(s.rollout_log_probs) == len(s.loss_mask) == s.response_length and isinstance(s.reward, float)
    requests = served.requests[-len(samples):]
    assert all("input_embeds" in r and "input_ids" not in r and "text" not in r for r in requests)

    # rl_step on the same completions, with an independent AR of the same bundle
    cfg = rl_config(args)
    completions = [Completion(s.tokens[-s.response_length:], s.response, s.rollout_log_probs,
                              FINISH_STOP if s.status == Sample.Status.COMPLETED else FINISH_LENGTH) for s in samples]
    vectors = torch.stack([s.metadata["nla_vec"] for s in samples])
    reference = LocalRoles.build_one("critic", bundle, None, torch.device("cpu"), 1e-3, 1.0)
    seen = {}

    class SameCompletions:
        def generate(self, vectors, tags, sampling):
            return completions

        def critic_predict(self, texts):
            seen["pred"] = reference.critic_predict(texts)
            return seen["pred"]

        def reference_logprobs(self, vectors, tags, responses):
            return torch.zeros(len(responses), max(map(len, responses)))

        def policy_update(self, vectors, tags, responses, advantages, *rest):
            seen["advantages"] = advantages
            return {"kl": 0.0}

        def critic_update(self, texts, gold, lr):
            seen["texts"] = texts
            return reference.critic_update(texts, gold, lr)

    metrics = rl_step(SameCompletions(), Batch(vectors, [s.metadata["nla_tag"] for s in samples]), cfg, 0)
    rewards = torch.tensor([s.reward for s in samples])
    expected = rl_reward(seen["pred"], vectors, torch.ones(len(samples), dtype=torch.bool), cfg.reward, cfg.failed_penalty)
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)
    assert metrics["reward_mean"] == pytest.approx(float(rewards.mean()), abs=1e-5)

    train = convert_samples_to_train_data(args, samples, metadata={}, custom_convert_samples_to_train_data_func=None,
                                          custom_reward_post_process_func=post_process)
    torch.testing.assert_close(torch.tensor(train["rewards"]), seen["advantages"], atol=1e-4, rtol=0)
    assert train["raw_reward"] == [s.reward for s in samples] and train["sample_indices"] == [s.index for s in samples]
    # Miles' own GRPO normalisation divides by the unbiased std: √(G/(G−1)) less spread than rl_math's
    miles_own = convert_samples_to_train_data(args, samples, metadata={}, custom_convert_samples_to_train_data_func=None,
                                              custom_reward_post_process_func=None)["rewards"]
    torch.testing.assert_close(torch.tensor(miles_own), seen["advantages"] * math.sqrt((G - 1) / G), atol=1e-3, rtol=0)

    # the AR trains on exactly these samples, as rl_step's critic update did
    ar = host.train_on(train["sample_indices"], lr_scale(0, cfg))
    assert ar["ar_loss"] == pytest.approx(metrics["ar_loss"], abs=1e-6) and ar["ar_samples"] == len(samples)
    assert host.scored == {}
    with pytest.raises(DataError, match="scored no sample with index"):
        host.train_on(train["sample_indices"], 1.0)


def test_trainer_side_injection_gives_the_rollout_log_probs(bundle, served, tmp_path):
    from nla_universal.miles.actor import NLAPolicyActor
    from nla_universal.miles.data_source import NLADataSource

    args = miles_args(bundle.parent, sglang_router_port=port(served))
    torch.manual_seed(1)
    samples = [g[0] for g in rollout(args, NLADataSource(args).get_samples(2), critic_host(bundle, tmp_path))]
    nla = UniversalNLA.load(bundle, parts=("av",), trained=False)  # the reference: our AV, unhooked
    policy = UniversalNLA.load(bundle, parts=("av",), trained=False).av.model
    actor = object.__new__(NLAPolicyActor)  # no init: that needs CUDA and FSDP
    actor.args, actor.model, actor.tokenizer, actor.ref_model = args, policy, nla.av.tokenizer, None
    actor._install_injection()
    embedding = nla.av.embedding

    def packed(batch_samples, pad=3):
        """A micro-batch as Miles' get_batch builds it for --qkv-format thd (padded, positions shifted)."""
        tokens = [torch.tensor(s.tokens) for s in batch_samples]
        offsets = torch.tensor([0] + [len(t) for t in tokens]).cumsum(0)[:-1]
        mm = {"nla_vec": torch.cat([s.multimodal_train_inputs["nla_vec"] for s in batch_samples]),
              "nla_vec_positions": torch.cat([s.multimodal_train_inputs["nla_vec_positions"] + o
                                              for s, o in zip(batch_samples, offsets)])}
        ids = torch.cat(tokens + [torch.zeros(pad, dtype=torch.long)])[None]
        positions = torch.cat([torch.arange(len(t)) for t in tokens] + [torch.zeros(pad, dtype=torch.long)])[None]
        return {"tokens": ids, "position_ids": positions, "multimodal_train_inputs": mm}

    # two samples packed: the rows the model reads are the rollout prompts' rows, the rest untouched
    batch = packed(samples)
    model_args = actor._get_model_inputs_args(batch)
    assert set(model_args) == {"input_ids", "position_ids", "attention_mask"} and "nla_vec" in batch["multimodal_train_inputs"]
    captured = []
    handle = input_embedding(policy).register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        policy(**model_args)
    handle.remove()
    rows, ids = captured[0][0], model_args["input_ids"][0]
    table = embedding.weight.detach()
    start = 0
    for s in samples:
        prompt = torch.tensor([s.tokens[:len(s.tokens) - s.response_length]])
        want = inject(table[prompt], prompt, nla.av.input_rows(s.metadata["nla_vec"][None], 1), nla.av.marker,
                      nla.av.injection_scale)[0]  # = AV.prompt_embeds' rows, what the rollout was sent
        torch.testing.assert_close(rows[start:start + prompt.shape[1]], want, atol=1e-6, rtol=0)
        start += prompt.shape[1]
        torch.testing.assert_close(rows[start:start + s.response_length], table[ids[start:start + s.response_length]],
                                   atol=0, rtol=0)
        start += s.response_length
    torch.testing.assert_close(rows[start:], table[ids[start:]], atol=0, rtol=0)

    # one sample: the trainer's log-probs of the response are the rollout's and the AV's own
    s = samples[0]
    with torch.no_grad():
        logits = policy(**actor._get_model_inputs_args(packed([s], pad=0))).logits[0].float()
    n = s.response_length
    trainer = torch.log_softmax(logits[-n - 1:-1], -1).gather(-1, torch.tensor(s.tokens[-n:])[:, None])[:, 0]
    av = nla.av.sequence_log_probs(s.metadata["nla_vec"][None], [s.metadata["nla_tag"]], [s.tokens[-n:]]).per_token[0]
    torch.testing.assert_close(trainer, av, atol=1e-5, rtol=0)
    torch.testing.assert_close(trainer, torch.tensor(s.rollout_log_probs), atol=1e-4, rtol=0)

    with pytest.raises(InjectionError, match="without activation vectors"):
        policy(**actor._get_model_inputs_args({**packed([s]), "multimodal_train_inputs": {}}))
    wrong = packed(samples)
    wrong["multimodal_train_inputs"]["nla_vec_positions"] = wrong["multimodal_train_inputs"]["nla_vec_positions"][:1]
    with pytest.raises(InjectionError, match="2 markers, 1 marker positions and 2 vectors"):
        policy(**actor._get_model_inputs_args(wrong))


@pytest.mark.parametrize("trunk", ["bundle-llama", "gpt2-conv1d"])
def test_the_merged_view_is_what_merge_and_unload_gives_and_the_adapter_saves_whole(bundle, tmp_path, trunk):
    from nla_universal.config import ModelSpec
    from nla_universal.miles.weights import MergedLoraView, save_gathered_adapter
    from nla_universal.nla.lora import LoraSettings, attach_lora, load_lora

    if trunk == "bundle-llama":
        spec = spec_from_dict(read_meta(bundle).av.base, "av.base")
        model = UniversalNLA.load(bundle, parts=("av",), trained=False).av.model
    else:  # GPT-2's Conv1D stores weights transposed (peft's fan_in_fan_out)
        spec = ModelSpec(tag="tiny-gpt2", source="random", name="gpt2", layer=1)
        model = attach_lora(load_model(spec).model, LoraSettings(r=4, alpha=8), task_type="CAUSAL_LM")
    with torch.no_grad():  # a trained-looking adapter (B ≠ 0), so the merge is not the identity
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    view = dict(MergedLoraView(model).state_dict().items())
    save_gathered_adapter(model, tmp_path / "av", write=True)
    merged = model.merge_and_unload().state_dict()
    assert view.keys() == merged.keys()
    assert all(torch.allclose(view[k], merged[k], atol=1e-6) for k in merged)
    reloaded = load_lora(load_model(spec).model, tmp_path / "av", trainable=False).merge_and_unload().state_dict()
    assert all(torch.allclose(reloaded[k], merged[k], atol=1e-6) for k in merged)


def test_the_reward_reaches_the_ar_actor_by_name_and_the_ar_trains_on_what_it_scored(bundle, served, tmp_path,
                                                                                      monkeypatch):
    """The AR critic as the driver starts it (a named Ray actor on Miles' actor placement group; a CPU one here),
    found by name from the reward hook, as Miles' RolloutManager finds it."""
    ray = pytest.importorskip("ray")
    from ray.util.placement_group import placement_group, remove_placement_group

    from nla_universal.miles import reward
    from nla_universal.miles.critic import start_critic
    from nla_universal.miles.data_source import NLADataSource

    if ray.is_initialized():
        pytest.skip("a Ray cluster from another test module is still up")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(reward, "_handles", {})
    args = miles_args(bundle.parent, "--nla-critic-num-gpus", "0", sglang_router_port=port(served))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
    try:
        pg = placement_group([{"CPU": 1}])
        ray.get(pg.ready(), timeout=60)
        critic = start_critic(args, {"actor": (pg, [0], [0])}, str(tmp_path / "ar"))
        group = NLADataSource(args).get_samples(1)[0]
        for i, sample in enumerate(group):
            sample.response = f"<explanation>text {i}</explanation>"
        rewards = asyncio.run(reward.reward(args, group))  # through ray.get_actor(--nla-critic-name)
        assert len(rewards) == G and all(-4.0 <= r <= 0.0 for r in rewards)
        metrics = ray.get(critic.train_on.remote([s.index for s in group], 1.0), timeout=60)
        assert metrics["ar_samples"] == G and math.isfinite(metrics["ar_loss"])
        ray.kill(critic)
        remove_placement_group(pg)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------- the driver


def test_the_driver_fills_our_hooks_and_the_trunk_then_checks_miles_settings(bundle, monkeypatch, capsys):
    from nla_universal.miles import train
    from nla_universal.miles.args import HOOKS, check_args, rl_config, trunk_folder, with_defaults

    argv = ["--nla-run-dir", str(bundle.parent), "--custom-rm-path", "my.rm"]
    filled = with_defaults(argv)
    assert filled[:4] == argv and filled.count("--custom-rm-path") == 1
    trunk = trunk_folder(bundle, None)
    assert (Path(trunk) / "config.json").is_file()
    for flag, value in [("--data-source-path", HOOKS["data_source_path"]), ("--hf-checkpoint", trunk), ("--ref-load", trunk)]:
        assert filled[filled.index(flag) + 1] == value

    args = miles_args(bundle.parent)  # through Miles' own parse_args and validation, then check_args
    assert (args.train_backend, args.hf_checkpoint, args.custom_rm_path) == ("fsdp", trunk, HOOKS["custom_rm_path"])
    assert args.nla_run_dir == str(bundle.parent) and args.nla_critic_name == "nla-ar-critic"
    cfg = rl_config(args)
    assert (cfg.group_size, cfg.kl_coef, cfg.penalise_failed, cfg.scale_by_std) == (G, 0.05, False, True)
    bad = miles_args(bundle.parent, "--custom-rm-path", "my.rm", "--train-backend", "megatron",
                     "--kl-loss-type", "k1", "--global-batch-size", "4", checked=False, sglang_disable_radix_cache=False)
    with pytest.raises(ConfigError) as caught:
        check_args(bad)
    for text in ("--custom-rm-path nla_universal.miles.reward.reward", "--train-backend fsdp", "--kl-loss-type k3",
                 "--sglang-disable-radix-cache", "--global-batch-size = --rollout-batch-size × --n-samples-per-prompt"):
        assert text in caught.value.fix

    monkeypatch.setattr(sys, "argv", ["train"])
    with pytest.raises(ConfigError, match="--use-kl-loss --kl-loss-type k3"):
        train.parse(["--nla-run-dir", str(bundle.parent), *[a for a in BASE_ARGV if a != "--use-kl-loss"]])
    if importlib.util.find_spec("sglang.srt.constants") is None:  # this machine cannot run the driver: it says so
        assert train.main(["--nla-run-dir", str(bundle.parent), *BASE_ARGV]) == 2
        assert "fix: run the driver where Miles runs" in capsys.readouterr().err


def test_the_shell_configs_submit_flags_that_miles_parses_and_our_checks_accept(bundle):
    """configs/miles-*.sh in DRY_RUN mode print their `ray job submit` line; its driver arguments must go through
    Miles' parse_args and check_args (an unknown or missing flag fails here, not on a GPU cluster)."""
    from nla_universal.miles import train

    for script, env in (("miles-1gpu.sh", {}), ("miles-ngpu.sh", {"NUM_GPUS": "8"})):
        out = subprocess.run([str(REPO / "configs" / script)], capture_output=True, text=True, timeout=60, check=True,
                             env={**os.environ, "DRY_RUN": "1", "RUN_DIR": str(bundle.parent), **env}).stdout
        words = shlex.split(out.strip().splitlines()[-1])
        assert words[words.index("--") + 2:words.index("--") + 4] == ["-m", "nla_universal.miles.train"]
        argv = words[words.index("nla_universal.miles.train") + 1:]
        saved = sys.argv
        try:
            args = train.parse(argv)
        finally:
            sys.argv = saved
        assert args.nla_run_dir == str(bundle.parent) and args.sglang_disable_radix_cache and args.use_kl_loss
        assert args.group_rm  # the AR scores a group in one call
        assert args.colocate == (script == "miles-1gpu.sh")


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_critic_missing_vectors_and_a_radix_cache_server_are_refused_with_the_fix(bundle, served, tmp_path,
                                                                                          monkeypatch):
    import ray
    from miles.rollout.base_types import GenerateFnInput
    from miles.utils.types import Sample

    from nla_universal.miles import reward
    from nla_universal.miles.data_source import NLADataSource
    from nla_universal.miles.generate import generate, sampling_from_miles

    args = miles_args(bundle.parent, sglang_router_port=port(served))
    sample = NLADataSource(args).get_samples(1)[0][0]
    sample.response, sample.status = "<explanation>x</explanation>", Sample.Status.COMPLETED
    monkeypatch.setattr(reward, "_handles", {})
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(NLAError, match="(?s)not in a Ray job.*fix: start the run with `python -m nla_universal.miles.train`"):
        asyncio.run(reward.reward(args, sample))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)

    def no_actor(name):
        raise ValueError(f"Failed to look up actor with name '{name}'")

    monkeypatch.setattr(ray, "get_actor", no_actor)
    with pytest.raises(NLAError, match="(?s)no AR critic actor named 'nla-ar-critic'.*--nla-critic-name"):
        asyncio.run(reward.reward(args, [sample]))

    bare = Sample(index=7, group_index=2)
    state = SimpleNamespace(args=args)
    with pytest.raises(DataError, match="(?s)sample 7 .* carries no activation vector.*--data-source-path "
                       "nla_universal.miles.data_source.NLADataSource"):
        asyncio.run(generate(GenerateFnInput(state=state, sample=bare, sampling_params={"max_new_tokens": 4}, evaluation=False)))
    with reward.local_critic(critic_host(bundle, tmp_path)), pytest.raises(DataError, match="carries no activation vector"):
        asyncio.run(reward.reward(args, [sample, bare]))

    with SGLangStandIn(served.model, served.tokenizer, radix_cache=True) as radix:
        on = miles_args(bundle.parent, sglang_router_port=port(radix))
        with pytest.raises(ServerRefused, match="(?s)disable_radix_cache.*fix: restart the SGLang server with "
                           "--disable-radix-cache \\(under Miles: --sglang-disable-radix-cache\\)"):
            asyncio.run(generate(GenerateFnInput(state=SimpleNamespace(args=on), sample=sample,
                                                 sampling_params={"max_new_tokens": 4}, evaluation=False)))
    with pytest.raises(ConfigError, match="cannot honour Miles' sampling parameters \\{'top_k': 20\\}"):
        sampling_from_miles({"max_new_tokens": 4, "temperature": 1.0, "top_k": 20})

    penalised = miles_args(bundle.parent, "--nla-penalise-failed")
    truncated = dataclasses.replace(sample, status=Sample.Status.TRUNCATED, index=99)
    with reward.local_critic(critic_host(bundle, tmp_path)):
        assert asyncio.run(reward.reward(penalised, truncated)) == -2.0
