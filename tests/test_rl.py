"""Joint RL: the math, the two layouts (bit-identical), gradient routing, the frozen reference, resumption,
bad input, and a toy task where the reward depends on the vector."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from nla_universal.errors import ConfigError, DataError
from nla_universal.nla import UniversalNLA
from nla_universal.pipeline import rl
from nla_universal.rollout import SamplingParams
from nla_universal.train.rl import RLConfig
from nla_universal.train.rl_math import group_advantages, kl_k3, policy_loss, reward
from nla_universal.train.rl_roles import LocalRoles, PolicyRole, ReferenceRole
from tiny_run import TINY_RL, ar_sft, av_sft, copy_run, fresh_copy, metric_lines, rl_cfg, run_cfg, trained_tensors

pytestmark = pytest.mark.usefixtures("one_thread")
# A random trunk never closes its <explanation> tags: its samples are scored on their raw text.
# ---------------------------------------------------------------------------------------------- math


def test_group_advantages_centre_and_scale_within_each_group():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    adv = group_advantages(r, 3)
    torch.testing.assert_close(adv[:3], torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4, rtol=0)
    assert torch.equal(adv[3:], torch.zeros(3))
    torch.testing.assert_close(group_advantages(r, 3, scale_by_std=False)[:3], torch.tensor([-1.0, 0.0, 1.0]))
    with pytest.raises(ConfigError, match="groups of 4"):
        group_advantages(r, 4)


def test_policy_loss_is_reinforce_on_policy_and_clips_off_policy():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss, clipped = policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    # ratio 1: d loss / d logp = −adv / (tokens of the sample) / samples
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -0.25], [0.5, 0.0]]))
    assert float(clipped) == 0.0
    _, clipped = policy_loss(logp.detach() + 1.0, logp.detach(), adv, mask)
    assert float(clipped) == 1.0


def test_k3_kl_is_zero_for_equal_policies_and_positive_otherwise():
    a = torch.log_softmax(torch.randn(4, 5), -1)
    mask = torch.ones(4, 5)
    assert float(kl_k3(a, a, mask)) == 0.0
    assert float(kl_k3(a, a + 0.3 * torch.randn(4, 5), mask)) > 0


def test_reward_penalises_failed_and_non_finite_samples():
    gold = torch.randn(3, 8)
    pred = torch.stack([gold[0], -gold[1], torch.full((8,), float("nan"))])
    r = reward(pred, gold, torch.tensor([True, False, True]), penalty=-2.0)
    assert float(r[0]) == pytest.approx(0.0, abs=1e-5) and float(r[1]) == -2.0 and float(r[2]) == -2.0


# ---------------------------------------------------------------------------------------------- the stage


def test_colocated_and_separate_give_bit_identical_steps(refitted, tmp_path):
    runs = {p: fresh_copy(refitted, tmp_path / p) for p in ("colocated", "separate")}
    for placement, run in runs.items():
        record = rl.run(rl_cfg(run, placement))
        assert set(record["final"]) >= {"reward_mean", "kl", "ar_loss", "clip_fraction", "distinct", "response_len"}
    a, b = (metric_lines(r) for r in runs.values())
    assert len(a) == 3 and a == b, "losses, rewards, KL and AR loss must agree to the last bit"
    assert a[0]["kl"] == 0.0 and a[-1]["kl"] > 0.0  # the policy starts at the reference, then moves
    ta, tb = (trained_tensors(r) for r in runs.values())
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    before = trained_tensors(refitted)
    assert any(not torch.equal(before[k], ta[k]) for k in ta if k.startswith("av/")), "the AV must train"
    assert not torch.equal(before["ar/value_head.safetensors:weight"], ta["ar/value_head.safetensors:weight"])
    stages = [s["stage"] for s in yaml.safe_load((runs["colocated"] / "bundle" / "nla_meta.yaml").read_text())["stages"]]
    assert stages == ["sft-ar", "sft-av", "refit-dec", "rl"] and (runs["colocated"] / "rl" / "rl.png").is_file()


def test_gradients_reach_every_trained_tensor_and_never_the_base(refitted):
    roles = LocalRoles.build(refitted / "bundle", "colocated", None, torch.device("cpu"), 1e-3, 1e-3, 1.0)
    nla = UniversalNLA.load(refitted / "bundle", parts=("ar",))
    v = nla.encode(torch.randn(2, 64), "tiny-llama")
    completions = roles.generate(v, ["tiny-llama"] * 2, SamplingParams(max_new_tokens=4, seed=1))
    responses = [c.token_ids for c in completions]
    ref = roles.reference_logprobs(v, ["tiny-llama"] * 2, responses)
    roles.policy_update(v, ["tiny-llama"] * 2, responses, torch.tensor([1.0, -1.0]), ref, 0.1, 0.2, 1.0)
    roles.critic_update(["a text", "another text"], v, 1.0)
    model = roles.policy.av.model
    named = dict(model.named_parameters())
    av = [n for n in named if ".av." in n]
    ar = [n for n in named if ".ar." in n]
    assert av and ar and all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in av + ar if "lora_B" in n)
    assert all(named[n].grad is not None for n in av + ar)
    assert roles.critic.ar.value_head.weight.grad is not None
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n), "the base must stay frozen"
    assert all(p.grad is None for n, p in named.items() if ".av_ref." in n), "the reference must stay frozen"


def test_the_reference_stays_the_sft_av(refitted, tmp_path):
    run = fresh_copy(refitted, tmp_path / "run")
    roles = LocalRoles.build(run / "bundle", "colocated", None, torch.device("cpu"), 1e-2, 1e-2, 1.0)
    sft = UniversalNLA.load(run / "bundle")
    tags = ["tiny-gpt2"] * 2
    v = sft.encode(torch.randn(2, 64), "tiny-gpt2")
    responses = [[5, 6, 7], [8, 9]]
    for _ in range(2):  # move the policy well away from where it started
        roles.policy_update(v, tags, responses, torch.tensor([1.0, -1.0]), roles.reference_logprobs(v, tags, responses), 0.0, 0.2, 1.0)
    expected = sft.av.sequence_log_probs(v, tags, responses).per_token
    assert torch.equal(roles.reference_logprobs(v, tags, responses), expected)
    with roles.policy.use("av"), torch.no_grad():
        moved = roles.policy.av.sequence_log_probs(v, tags, responses).per_token
    assert not torch.equal(moved, expected)


def test_kill_9_mid_rl_then_rerun_gives_the_uninterrupted_weights(refitted, tmp_path):
    clean = fresh_copy(refitted, tmp_path / "clean")
    rl.run(rl_cfg(clean, "colocated", steps=4))
    killed = fresh_copy(refitted, tmp_path / "killed")
    args = [sys.executable, "-m", "nla_universal.cli", "rl", f"run.run_dir={killed}", f"run.pool={killed / 'pool.yaml'}",
            *[f"rl.{k}={v}" for k, v in {**TINY_RL, "steps": 4}.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not list((killed / "rl" / "checkpoints" / "ar").glob("step-000002/_SUCCESS")):
        assert proc.poll() is None and time.time() < deadline, "the RL run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "stages" / "rl.json").exists()
    assert subprocess.run(args, capture_output=True, env=env, timeout=600).returncode == 0
    a, b = trained_tensors(clean), trained_tensors(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metric_lines(killed)] == [1, 2, 3, 4] and metric_lines(killed) == metric_lines(clean)


def test_bad_input_is_refused_before_any_step(refitted, tmp_path, prepared):
    run = fresh_copy(refitted, tmp_path / "run")
    with pytest.raises(ConfigError, match="group_size=1"):
        rl.run(rl_cfg(run, "colocated", group_size=1))
    with pytest.raises(ConfigError, match="kl_coef=-0.1"):
        rl.run(rl_cfg(run, "colocated", kl_coef=-0.1))
    with pytest.raises(ConfigError, match=r"tags \['nope'\] are not in the bundle"):
        rl.run(rl.RLStageConfig(run=run_cfg(run), rl=RLConfig(**TINY_RL), tags=["nope"]))
    early = copy_run(prepared, tmp_path / "early")
    ar_sft(early, steps=1)
    av_sft(early, input_map="none")
    with pytest.raises(DataError, match="has not been through refit-dec"):
        rl.run(rl_cfg(early, "colocated"))
    assert not (run / "rl").exists() and not (early / "rl").exists()


# ---------------------------------------------------------------------------------------------- a toy task


class KeywordCritic:
    """A critic whose reading of a text is known: "alpha" → v1, "beta" → v2, anything else → nothing. The
    reward then depends on the vector, and only an AV that answers by its vector earns it. It trains nothing."""

    def __init__(self, vectors: torch.Tensor):
        self.vectors = vectors

    def predict(self, texts):
        return torch.stack([self.vectors[0] if "alpha" in t else self.vectors[1] if "beta" in t
                            else torch.zeros_like(self.vectors[0]) for t in texts])

    def update(self, texts, gold, lr_scale):
        return {"ar_loss": 0.0, "ar_grad_norm": 0.0}

    def checkpoint(self, root, step, keep):
        pass

    def restore(self, root, step):
        pass


@pytest.mark.slow
def test_rl_makes_the_av_answer_by_the_vector(smollm2_spec, tmp_path):
    from nla_universal.activations import TagRows
    from nla_universal.models import load_model
    from nla_universal.nla import AV, AVConfig
    from nla_universal.train.rl import run_rl

    torch.manual_seed(0)
    policy = AV.create(load_model(smollm2_spec), AVConfig(), canonical_tag="smollm2-135m")
    answers = ["alpha", "beta"]
    # the two vectors are the words' own embedding rows: the trunk reads word-like rows (as the input map makes them)
    with torch.no_grad():
        vectors = torch.stack([policy.embedding(torch.tensor(policy.tokenizer(" " + a, add_special_tokens=False)["input_ids"])).mean(0)
                               for a in answers])
    # SFT on both answers for both vectors: the AV learns the answer format and a marginal that ignores the vector
    batch = policy.build_sft_batch(vectors.repeat(2, 1), ["x"] * 4, ["alpha", "beta", "beta", "alpha"])
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(8):
        opt.zero_grad()
        policy.sft_loss(batch).backward()
        opt.step()
    policy.save(tmp_path / "sft")
    reference = AV.load(tmp_path / "sft", load_model(smollm2_spec), policy.marker, policy.template, policy.injection_scale,
                        canonical_tag="smollm2-135m", trainable=False)
    roles = LocalRoles(PolicyRole(policy, lr=2e-4, clip_grad=1.0), ReferenceRole(reference), KeywordCritic(vectors))
    rows = {"x": TagRows("x", ["v1", "v2"], vectors.numpy(), [None, None])}
    cfg = RLConfig(steps=10, prompts_per_step=2, group_size=6, max_new_tokens=16, kl_coef=0.02, warmup_steps=2,
                   checkpoint_every=100)
    run_rl(roles, lambda H, tag: torch.as_tensor(H), rows, cfg, tmp_path / "rl")
    rewards = [json.loads(line)["reward_mean"] for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1 and np.mean(rewards[-3:]) > -0.1, rewards
    texts = [e.text for e in policy.explain(vectors, ["x", "x"], SamplingParams(greedy=True, max_new_tokens=12))]
    assert texts == answers, texts
