import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from nla_universal.config import load_config
from nla_universal.errors import ConfigError, DataError
from nla_universal.train.loop import LoopConfig, batch_indices, lr_at, named_trainable, train


class Crash(Exception):
    pass


@dataclass
class Holder:
    loop: LoopConfig = field(default_factory=LoopConfig)


def run(tmp_path, steps=24, crash_at=None, grad_accum=2):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=g)
    Y = X @ torch.randn(8, 3, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    named = named_trainable([("m", model)])
    calls = {"n": 0}

    def loss_fn(idx):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise Crash
        loss = ((model(X[idx]) - Y[idx]) ** 2).mean()
        return loss, {}

    cfg = LoopConfig(steps=steps, batch_size=8, grad_accum=grad_accum, lr=1e-2, warmup_steps=3, checkpoint_every=5, eval_every=0, autocast="off")
    evals = train(out_dir=tmp_path, named_params=named, param_groups=[{"params": list(named.values())}], n_examples=64,
                  loss_fn=loss_fn, eval_fn=lambda s: {"mse": float(((model.eval()(X) - Y) ** 2).mean())}, cfg=cfg,
                  device=torch.device("cpu"), desc="test")
    model.train()
    return {k: v.detach().clone() for k, v in named.items()}, evals


def test_loss_decreases_and_metrics_are_logged(tmp_path):
    _, evals = run(tmp_path, steps=40)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert "val_mse" in rows[-1] and evals["mse"] == rows[-1]["val_mse"]


def test_kill_and_resume_gives_identical_weights(tmp_path):
    clean, _ = run(tmp_path / "clean")
    with pytest.raises(Crash):
        run(tmp_path / "killed", crash_at=27)  # micro-batch 27 = step 13, after the step-10 checkpoint
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-000005", "step-000010"]
    resumed, _ = run(tmp_path / "killed")
    for k in clean:
        assert torch.equal(clean[k], resumed[k]), k


def test_data_order_is_a_function_of_the_step_and_covers_each_epoch():
    a = [batch_indices(20, 4, 7, s, 0, 1) for s in range(5)]
    b = [batch_indices(20, 4, 7, s, 0, 1) for s in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(20))


def test_schedule_warms_up_then_decays():
    cfg = LoopConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=0.01) and lr_at(50, cfg) < lr_at(20, cfg)


def test_a_resumed_run_logs_each_step_once(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path, crash_at=27)  # steps 11..13 were logged, then rolled back to the step-10 checkpoint
    run(tmp_path)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 25))


def test_a_checkpoint_of_other_parameters_is_a_clear_error(tmp_path):
    run(tmp_path, steps=5)
    model = torch.nn.Linear(8, 2)
    named = named_trainable([("other", model)])
    with pytest.raises(DataError, match="holds other trainable parameters") as err:
        train(out_dir=tmp_path, named_params=named, param_groups=[{"params": list(named.values())}], n_examples=8,
              loss_fn=lambda idx: (model(torch.zeros(1, 8)).sum(), {}), eval_fn=None,
              cfg=LoopConfig(steps=6, batch_size=2), device=torch.device("cpu"), desc="test")
    assert "delete" in err.value.fix and str(tmp_path / "checkpoints") in err.value.fix


def test_a_misspelt_choice_is_refused_with_the_valid_values():
    with pytest.raises(ConfigError, match=r"loop.schedule.*'cosin', expected one of \[constant, cosine, linear\]"):
        load_config(Holder, overrides=["loop.schedule=cosin"])
    with pytest.raises(ConfigError, match=r"loop.autocast.*expected one of \[auto, bf16, off\]"):
        load_config(Holder, overrides=["loop.autocast=of"])
    assert load_config(Holder, overrides=["loop.schedule=linear"]).loop.schedule == "linear"
