"""launch/common.sh and configs/*.sh against a real Ray: a stage submitted with `ray job submit` to a
local head that the config starts and stops, and the errors that must come before any work.

Every run gets its own HOME (so the real ~/.ray is never read or written) holding a Ray auth token,
as a machine where any earlier local `ray.init()` ran has one. Heads start on loopback with 1 CPU
and free ports; every subprocess has a deadline, and teardown stops the recorded head by its
processes only (launch/head.sh stop), so a failing test leaves no Ray behind.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from nla_universal import activations, io
from nla_universal.config import ModelSpec, PoolConfig, load_config
from nla_universal.corpus import write_passages

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
HEAD_SH = REPO / "launch" / "head.sh"
RAY_BIN = Path(sys.executable).parent / "ray"

pytestmark = [
    pytest.mark.ray,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="launch/common.sh finds its head's processes in /proc"),
    pytest.mark.skipif(
        not RAY_BIN.exists() or not all(importlib.util.find_spec(m) for m in ("ray", "aiohttp", "grpc")),
        reason="ray job submit needs ray[default] beside this Python: pip install 'ray[default]'",
    ),
]


def make_run(root: Path, n: int = 120) -> Path:
    """A run folder fit-adapters can use without any model: passages, two activation stores, a pool."""
    rng = np.random.default_rng(0)
    ids = [f"p{i:04d}" for i in range(n)]
    splits = ["train"] * (n - 40) + ["val"] * 20 + ["test"] * 20
    root.mkdir(parents=True)
    write_passages(pa.table({"passage_id": ids, "text": [f"text {i}" for i in ids], "split": splits}), root / "passages.parquet")
    latent = rng.standard_normal((n, 4))
    for tag, d in {"anc": 8, "lin": 12}.items():
        X = (latent @ rng.standard_normal((4, d)) + 0.05 * rng.standard_normal((n, d))).astype(np.float32)
        folder = activations.tag_dir(root / "activations", tag)
        folder.mkdir(parents=True)
        activations.write_shard(folder, 0, activations.shard_table(ids, X, np.full(n, 7), None))
        io.write_yaml(folder / "meta.yaml", {"tag": tag, "d_model": d, "pool": "mean", "layer": 1, "shards": activations.shard_rows(folder)})
        io.mark_success(folder)
    pool = PoolConfig(anchor="anc", models=[ModelSpec(tag="anc", name="a"), ModelSpec(tag="lin", name="b")])
    io.write_yaml(root / "pool.yaml", dataclasses.asdict(pool))
    return root


def read_state(run_dir: Path) -> dict[str, str]:
    """launch/common.sh's record of the head it started (KEY=value lines)."""
    return {k: v.strip('"') for k, v in (line.split("=", 1) for line in (run_dir / "ray-head.env").read_text().splitlines())}


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def marked(head_id: str) -> list[int]:
    """Processes that still carry the head's marker variable."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"NLA_RAY_HEAD={head_id}".encode() in env.read_bytes().split(b"\0"):
                found.append(int(env.parent.name))
        except OSError:
            pass
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(script: Path, env: dict, *args: str, timeout: float = 150) -> tuple[int, str, float]:
    """Run a launcher script; past its deadline it gets SIGTERM (its trap stops its head), then SIGKILL."""
    start = time.monotonic()
    proc = subprocess.Popen(["bash", str(script), *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"{script.name} ran past {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out, time.monotonic() - start


@pytest.fixture
def launch_env(tmp_path):
    """The environment of a launch: a private HOME with a Ray token, this Python, 1 CPU, no GPU.
    Teardown stops whatever head was recorded under tmp_path/run and removes its Ray folder."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in ("VIRTUAL_ENV", "NLA_RAY_HEAD")}
    env.update(HOME=str(home), NLA_PYTHON=sys.executable, RUN_DIR=str(tmp_path / "run"), HEAD_NUM_CPUS="1",
               HEAD_NUM_GPUS="0", NUM_CPUS="1", NUM_GPUS="0", RAY_CHECK_TIMEOUT_S="30", HEAD_START_TIMEOUT_S="90")
    yield env
    run_dir = tmp_path / "run"
    if (run_dir / "ray-head.env").exists():
        subprocess.run(["bash", str(HEAD_SH), "stop"], env=env, cwd=REPO, timeout=60, capture_output=True)
        temp = read_state(run_dir).get("RAY_TEMP_DIR", "")
        if temp.startswith("/tmp/nla-ray-"):
            shutil.rmtree(temp, ignore_errors=True)


def test_stage_runs_as_a_ray_job_on_a_head_it_starts_and_stops(tmp_path, launch_env):
    run_dir = make_run(tmp_path / "run")
    token_before = (tmp_path / "home" / ".ray" / "auth_token").read_text()
    rc, out, seconds = sh(CONFIGS / "fit-adapters.sh", {**launch_env, "POOL": str(run_dir / "pool.yaml")})
    print(f"configs/fit-adapters.sh: {seconds:.1f} s\n{out}")
    assert rc == 0, out

    # the job: submitted to the head the script started, with the auth mode the token file implies
    state = read_state(run_dir)
    assert state["RAY_AUTH_MODE"] == "token" and state["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    job = re.search(r"job (\S+) SUCCEEDED", out)  # the jobs API's status, read by the script
    assert job, out
    driver_log = Path(state["RAY_TEMP_DIR"]) / "session_latest" / "logs" / f"job-driver-{job.group(1)}.log"
    assert str(run_dir / "adapters") in driver_log.read_text()  # what fit-adapters prints last

    # its artifact: the adapters folder, whole, with its manifest, and the stage's record
    manifest = json.loads((run_dir / "adapters" / "manifest.json").read_text())
    assert "adapters.safetensors" in manifest["files"]
    summary = json.loads((run_dir / "adapters" / "fit_summary.json").read_text())
    assert set(summary["tags"]) == {"anc", "lin"}
    assert (run_dir / "stages" / "fit-adapters.json").is_file()

    # nothing of the head is left, and the token file is as it was
    pids = [int(p) for p in state["PIDS"].split()]
    assert len(pids) >= 5 and "STOPPED_AT" in state
    assert [p for p in pids if alive(p)] == []
    assert marked(state["HEAD_ID"]) == []
    assert (tmp_path / "home" / ".ray" / "auth_token").read_text() == token_before


def test_a_terminated_launcher_stops_its_head_and_the_job_in_it(tmp_path, launch_env):
    """SIGTERM while the job runs (a deadline, Ctrl-C in a pipeline): the trap stops the head and the job.
    Here without a token file: the local head then runs with auth disabled, and writes no token."""
    (tmp_path / "home" / ".ray" / "auth_token").unlink()
    sleeper = tmp_path / "job.sh"  # stands in for the job's Python: records its PID, then hangs
    sleeper.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'job.pid'}\nexec sleep 300\n")
    sleeper.chmod(0o755)
    env = {**launch_env, "JOB_PYTHON": str(sleeper)}
    proc = subprocess.Popen(["bash", str(CONFIGS / "fit-adapters.sh")], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "job.pid").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "job.pid").exists(), "the job never started"
        job_pid = int((tmp_path / "job.pid").read_text())
        assert alive(job_pid)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        print(f"stopped {time.monotonic() - start:.1f} s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, out
    state = read_state(tmp_path / "run")
    assert state["RAY_AUTH_MODE"] == "disabled" and not (tmp_path / "home" / ".ray" / "auth_token").exists()
    assert "STOPPED_AT" in state and not alive(job_pid)
    assert [p for p in state["PIDS"].split() if alive(int(p))] == [] and marked(state["HEAD_ID"]) == []


def test_errors_come_before_any_work(tmp_path, launch_env):
    # more GPUs than a local head would have: refused before the head starts
    rc, out, seconds = sh(CONFIGS / "fit-adapters.sh", {**launch_env, "NUM_GPUS": "1"}, timeout=60)
    assert rc == 2 and "asks for NUM_GPUS=1 but this machine offers 0 GPU(s)" in out and "fix:" in out, out
    assert not (tmp_path / "run" / "ray-head.env").exists() and seconds < 20

    # a RAY_ADDRESS with nothing behind it
    address = f"http://127.0.0.1:{free_port()}"
    rc, out, seconds = sh(CONFIGS / "fit-adapters.sh", {**launch_env, "RAY_ADDRESS": address}, timeout=60)
    assert rc == 2 and f"no Ray cluster reachable at RAY_ADDRESS={address}" in out and "fix:" in out, out
    assert seconds < 40

    # the GCS address instead of the dashboard URL, and a cluster with no token here
    rc, out, _ = sh(CONFIGS / "fit-adapters.sh", {**launch_env, "RAY_ADDRESS": "127.0.0.1:6379"}, timeout=60)
    assert rc == 2 and "not the dashboard URL" in out, out
    (tmp_path / "home" / ".ray" / "auth_token").unlink()
    rc, out, _ = sh(CONFIGS / "fit-adapters.sh", {**launch_env, "RAY_ADDRESS": address}, timeout=60)
    assert rc == 2 and "no Ray auth token here" in out, out


def test_attached_cluster_too_small_is_refused_and_head_sh_stops_its_head(tmp_path, launch_env):
    rc, out, seconds = sh(HEAD_SH, launch_env, "start", timeout=120)
    print(f"launch/head.sh start: {seconds:.1f} s")
    assert rc == 0, out
    state = read_state(tmp_path / "run")
    exports = dict(kv.split("=", 1) for kv in re.search(r"^export (.*)$", out, re.M).group(1).split())
    assert exports == {"RAY_ADDRESS": state["RAY_ADDRESS"], "RAY_AUTH_MODE": "token"}
    assert all(alive(int(p)) for p in state["PIDS"].split())

    rc, out, _ = sh(CONFIGS / "fit-adapters.sh", {**launch_env, **exports, "NUM_GPUS": "1"}, timeout=60)
    assert rc == 2 and f"the cluster at {state['RAY_ADDRESS']} has 0 GPU(s)" in out, out
    assert all(alive(int(p)) for p in state["PIDS"].split())  # attaching never stops a head it did not start

    rc, out, seconds = sh(HEAD_SH, launch_env, "stop", timeout=60)
    print(f"launch/head.sh stop: {seconds:.1f} s")
    assert rc == 0, out
    assert [p for p in state["PIDS"].split() if alive(int(p))] == [] and marked(state["HEAD_ID"]) == []


def dry_run(config: str, env: dict, *args: str) -> list[str]:
    rc, out, _ = sh(CONFIGS / config, {**env, "DRY_RUN": "1"}, *args, timeout=60)
    assert rc == 0, out
    return shlex.split(out.strip().splitlines()[-1])


STAGE_CONFIGS = {"extract.sh": "extract", "teach.sh": "teach", "fit-adapters.sh": "fit-adapters", "sft-ar.sh": "sft-ar",
                 "sft-av.sh": "sft-av", "refit-dec.sh": "refit-dec", "eval.sh": "eval"}
RL_CONFIGS = {"rl-1gpu-colocated.sh": ("colocated", "0", "1"), "rl-3gpu-per-role.sh": ("per_role", "0", "3"),
              "rl-ngpu.sh": ("per_role", "5", "8")}


def test_every_config_submits_keys_its_stage_accepts(tmp_path, launch_env):
    """DRY_RUN=1 prints the `ray job submit` line; its stage arguments must load in the stage's schema."""
    from nla_universal.cli import _load_stage

    env = {k: v for k, v in launch_env.items() if k not in ("NUM_GPUS", "NUM_CPUS")}  # the configs' own defaults
    miles_configs = ["miles-1gpu.sh", "miles-ngpu.sh"]  # their Miles flags are checked in test_miles.py
    assert sorted(p.name for p in CONFIGS.glob("*.sh")) == sorted([*STAGE_CONFIGS, *RL_CONFIGS, *miles_configs])
    for config, stage in STAGE_CONFIGS.items():
        cmd = dry_run(config, env, "run.cache_dir=/x")
        entry = cmd[cmd.index("--") + 1:]
        assert entry[:4] == [sys.executable, "-m", "nla_universal.cli", stage] and entry[-1] == "run.cache_dir=/x"
        gpus = cmd[cmd.index("--entrypoint-num-gpus") + 1]
        assert gpus == ("0" if stage == "fit-adapters" else "1")
        assert f"run.device={'cpu' if gpus == '0' else 'cuda'}" in entry and f"run.run_dir={tmp_path / 'run'}" in entry
        schema, _ = _load_stage(stage)
        load_config(schema, [], entry[4:])  # an unknown key or a bad value raises
    for config, (placement, engines, gpus) in RL_CONFIGS.items():
        cmd = dry_run(config, env)
        entry = cmd[cmd.index("--") + 1:]
        assert entry[3] == "rl" and f"placement={placement}" in entry and f"ray.rollout_engines={engines}" in entry
        assert "ray.enabled=true" in entry
        assert cmd[cmd.index("--entrypoint-num-gpus") + 1] == "0"  # the actors take the GPUs, not the driver
        load_config(_load_stage("rl")[0], [], entry[4:])
        # the GPUs it asks the cluster for: a head without GPUs refuses it before starting
        rc, out, _ = sh(CONFIGS / config, {**env, "NUM_CPUS": "1"}, timeout=60)
        assert rc == 2 and f"asks for NUM_GPUS={gpus} but this machine offers 0" in out, out
