"""The RL stage on real Ray (a private local cluster, loopback, explicit CPU counts): step for step the
in-process run, for the colocated and the per-role placement; an actor killed by PID mid-run; bad input."""

import os
import signal

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token left behind by the tests' local cluster

from nla_universal.config import load_config  # noqa: E402
from nla_universal.distributed.config import RayConfig  # noqa: E402
from nla_universal.distributed.driver import RayRoles  # noqa: E402
from nla_universal.errors import ConfigError, NLAError  # noqa: E402
from nla_universal.pipeline import rl  # noqa: E402
from nla_universal.rollout.servers import ServerError  # noqa: E402
from nla_universal.train.rl import RLConfig  # noqa: E402
from tiny_run import TINY_RL, fresh_copy, metric_lines, run_cfg, trained_tensors  # noqa: E402

ray = pytest.importorskip("ray")
import ray.util.state  # noqa: E402  (the state API is a submodule)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(900)]


def start_local():
    """A private cluster: 2 CPUs, its dashboard (Ray's state API lives there) on loopback only. The GCS and the
    raylet still listen on every interface (Ray 2.60 rewrites 127.0.0.1 to the routable address): launch/README.md."""
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             object_store_memory=200 << 20)


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    start_local()
    yield
    ray.shutdown()


def ray_cfg(run, placement: str, **ray_kw) -> rl.RLStageConfig:
    ray_settings = RayConfig(enabled=True, cpus_per_actor=0.25, **ray_kw)
    return rl.RLStageConfig(run=run_cfg(run), rl=RLConfig(**TINY_RL), placement=placement, ray=ray_settings)


@pytest.fixture(scope="module")
def in_process(refitted, tmp_path_factory):
    run = fresh_copy(refitted, tmp_path_factory.mktemp("inproc") / "run")
    rl.run(rl.RLStageConfig(run=run_cfg(run), rl=RLConfig(**TINY_RL), placement="colocated"))
    return run


@pytest.mark.parametrize("placement", ["colocated", "per_role"])
def test_the_ray_run_equals_the_in_process_run_step_for_step(refitted, in_process, tmp_path, placement):
    run = fresh_copy(refitted, tmp_path / "run")
    rl.run(ray_cfg(run, placement))
    assert metric_lines(run) == metric_lines(in_process)
    a, b = trained_tensors(run), trained_tensors(in_process)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [a for a in ray.util.state.list_actors() if a.state == "ALIVE"], "the driver kills its actors"


def test_a_critic_killed_by_pid_mid_run_restarts_and_the_weights_are_unchanged(refitted, in_process, tmp_path,
                                                                                monkeypatch):
    run = fresh_copy(refitted, tmp_path / "run")
    real_checkpoint = RayRoles.checkpoint
    killed = []

    def checkpoint_then_kill_the_critic(self, root, step, keep):
        real_checkpoint(self, root, step, keep)
        if step == 2 and not killed:
            actor_id = self.hosts["critic"]._actor_id.hex()
            pid = ray.util.state.get_actor(actor_id).pid  # Ray's state API names the worker process
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    monkeypatch.setattr(RayRoles, "checkpoint", checkpoint_then_kill_the_critic)
    rl.run(ray_cfg(run, "per_role"))
    assert killed
    a, b = trained_tensors(run), trained_tensors(in_process)
    assert all(torch.equal(a[k], b[k]) for k in a), "the replayed steps must give the uninterrupted weights"
    assert [r["step"] for r in metric_lines(run)] == [1, 2, 3] and metric_lines(run) == metric_lines(in_process)


def test_bad_placements_are_refused_before_any_work(refitted, tmp_path):
    run = fresh_copy(refitted, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"GPU asked, 0 in the cluster.*nothing was started"):
        rl.run(ray_cfg(run, "per_role", gpus_per_actor=1.0))
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(rl.RLStageConfig, overrides=["placement=everywhere"])
    with pytest.raises(ServerError, match="127.0.0.1:9"):
        rl.run(ray_cfg(run, "per_role", rollout="vllm", rollout_url="http://127.0.0.1:9", served_model="smol"))
    with pytest.raises(ConfigError, match="per_role puts each role in its own Ray actor"):
        rl.run(rl.RLStageConfig(run=run_cfg(run), rl=RLConfig(**TINY_RL), placement="per_role"))
    assert not (run / "rl" / "checkpoints").exists()


def test_a_head_that_is_not_running_is_a_clear_error(refitted, tmp_path):
    from nla_universal.distributed.driver import connect

    ray.shutdown()
    try:
        with pytest.raises(NLAError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
            connect(RayConfig(enabled=True, address="127.0.0.1:1"))
    finally:
        ray.shutdown()
        start_local()
