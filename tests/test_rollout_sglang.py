"""The SGLang client against a stand-in `/generate` server (tests/sglang_standin.py: SGLang's protocol
on our HF engine), and the lifecycle of local servers (nla_universal.rollout.servers).

The stand-in computes exactly what the reference HF engine computes when it receives the same
batch, so equality here checks the client's wire format, batching, order and error handling; the
numerics of a real SGLang are checked by tools/gpu/sglang_check.py on a GPU machine.
"""

import os
import sys
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model

from nla_universal import http
from nla_universal.config import ModelSpec
from nla_universal.models import load_model
from nla_universal.rollout import HFRolloutEngine, SamplingParams
from nla_universal.rollout.servers import (
    BASE, ClientSettings, LocalServer, ServerFailed, ServerRefused, ServerStartError, ServerUnreachable,
    attach, free_port,
)
from nla_universal.rollout.sglang import SAMPLING_KEYS, SGLangRolloutEngine, sampling_params
from sglang_standin import RADIX_MESSAGE, SAMPLING_KEYS as SCHEMA_KEYS, SGLangStandIn

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(greedy=True, max_new_tokens=8, return_logprobs=True)
FAST = dict(retries=0, deadline_s=60.0)


def tiny():
    return load_model(ModelSpec(tag="tiny-llama", source="random", name="llama", layer=1))


def prompts_for(model, lengths=(5, 9, 7, 12), seed=0):
    """Token-embedding rows of random ids with one row replaced by a random vector (as the injection does)."""
    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings()
    out = []
    with torch.no_grad():
        for n in lengths:
            rows = emb(torch.randint(0, emb.weight.shape[0], (n,), generator=g)).clone()
            rows[n // 2] = torch.randn(rows.shape[1], generator=g) * rows.norm(dim=-1).mean()
            out.append(rows)
    return out


@pytest.fixture(scope="module")
def trunk():
    return tiny()


@pytest.fixture
def standin(trunk):
    with SGLangStandIn(trunk.model, trunk.tokenizer) as server:
        yield server


def client(server, **settings) -> SGLangRolloutEngine:
    return SGLangRolloutEngine(server.url, "tiny-llama", ClientSettings(**{**FAST, **settings}))


def assert_same(got, want):
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    for g, w in zip(got, want):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-6)


# ---------------------------------------------------------------------- protocol


def test_greedy_batch_equals_the_hf_engine_and_sends_only_embeddings(trunk, standin):
    prompts = prompts_for(trunk.model)
    want = HFRolloutEngine(trunk.model, trunk.tokenizer).generate(prompts, GREEDY)
    got = client(standin).generate(prompts, GREEDY)
    assert_same(got, want)
    assert [c.text for c in got] == [c.text for c in want]
    (body,) = standin.requests  # one request for the whole batch
    assert "text" not in body and "input_ids" not in body
    assert len(body["input_embeds"]) == 4 and isinstance(body["input_embeds"][0][0][0], float)
    assert body["sampling_params"] == {"max_new_tokens": 8, "temperature": 0.0} and body["return_logprob"] is True
    assert "lora_path" not in body


def test_one_prompt_goes_as_one_matrix_of_floats(trunk, standin):
    prompt = prompts_for(trunk.model, lengths=(6,))
    prompt[0][0] = 0.0  # an integer-looking first cell must still go out as a float
    want = HFRolloutEngine(trunk.model, trunk.tokenizer).generate(prompt, GREEDY)
    assert_same(client(standin).generate(prompt, GREEDY), want)
    cell = standin.requests[0]["input_embeds"][0][0]
    assert isinstance(cell, float) and cell == 0.0


def test_a_large_batch_goes_in_bounded_requests_and_comes_back_in_order(trunk, standin):
    prompts = prompts_for(trunk.model, lengths=(5, 9, 7, 12, 4, 8, 6, 10, 3, 11))
    engine = HFRolloutEngine(trunk.model, trunk.tokenizer)
    want = [c for i in range(0, 10, 3) for c in engine.generate(prompts[i:i + 3], GREEDY)]  # the same batches
    got = client(standin, prompts_per_request=3, concurrency=2).generate(prompts, GREEDY)
    assert_same(got, want)
    sizes = [len(e) if isinstance(e[0][0], list) else 1 for e in (b["input_embeds"] for b in standin.requests)]
    assert sorted(sizes) == [1, 3, 3, 3]


def test_sampling_params_use_only_sglang_keys():
    sampled = sampling_params(SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_new_tokens=12))
    assert sampled == {"max_new_tokens": 12, "temperature": 0.7, "top_p": 0.9, "sampling_seed": 5}
    assert SAMPLING_KEYS <= set(SCHEMA_KEYS)


def test_seeded_sampling_reaches_the_server(trunk, standin):
    prompts = prompts_for(trunk.model)
    sampled = SamplingParams(max_new_tokens=8, seed=11, temperature=1.5)
    first, again = (client(standin).generate(prompts, sampled) for _ in range(2))
    other = client(standin).generate(prompts, SamplingParams(max_new_tokens=8, seed=12, temperature=1.5))
    assert [c.token_ids for c in first] == [c.token_ids for c in again] != [c.token_ids for c in other]


def random_adapter(folder, seed: int):
    """A LoRA on the tiny trunk with random non-zero B, saved with peft; and HF + peft with it."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    peft = get_peft_model(tiny().model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=g)
    peft.save_pretrained(str(folder))
    return folder, peft


def test_runtime_adapters_change_outputs_and_equal_hf_peft(tmp_path):
    served, reference = tiny(), tiny()  # the stand-in wraps its model with the adapters: give it its own copy
    prompts = prompts_for(reference.model)
    base_want = HFRolloutEngine(reference.model, reference.tokenizer).generate(prompts, GREEDY)
    (first, first_model), (second, second_model) = random_adapter(tmp_path / "a", 3), random_adapter(tmp_path / "b", 4)
    want = [HFRolloutEngine(m, reference.tokenizer).generate(prompts, GREEDY) for m in (first_model, second_model)]
    with SGLangStandIn(served.model, served.tokenizer) as server:
        engine = client(server)
        name = engine.push_policy(first)
        got = engine.generate(prompts, GREEDY)
        base = engine.generate(prompts, GREEDY, adapter=BASE)
        assert server.requests[0]["lora_path"] == [name] * 4 and "lora_path" not in server.requests[1]
        newer = engine.push_policy(second)  # a new version under a new name; the old one is unloaded
        got_second = engine.generate(prompts, GREEDY)
        assert server.adapters == {newer} and set(engine.loaded) == {newer}
    assert_same(got, want[0])
    assert_same(got_second, want[1])
    assert_same(base, base_want)
    assert [c.token_ids for c in got] != [c.token_ids for c in base]


# ---------------------------------------------------------------------- refusals and failures


def test_unknown_sampling_key_refusal_names_the_key(trunk):
    older = tuple(k for k in SCHEMA_KEYS if k != "sampling_seed")  # an SGLang that does not know one of our keys
    with SGLangStandIn(trunk.model, trunk.tokenizer) as server:
        server.sampling_keys = older
        with pytest.raises(ServerRefused, match="unknown field `sampling_seed`") as err:
            client(server).generate(prompts_for(trunk.model), SamplingParams(seed=1, max_new_tokens=4))
    assert server.url in str(err.value) and "SAMPLING_KEYS" in err.value.fix


def test_radix_cache_refusal_quotes_sglang_and_names_the_flag(trunk):
    with SGLangStandIn(trunk.model, trunk.tokenizer, radix_cache=True) as server:
        with pytest.raises(ServerRefused) as err:
            client(server).generate(prompts_for(trunk.model), GREEDY)
    assert RADIX_MESSAGE in err.value.problem and "--disable-radix-cache" in err.value.fix
    assert len(server.requests) == 1  # a refusal is not retried


def test_fewer_completions_than_prompts_fail_the_batch(trunk, standin):
    standin.fault = "drop_one"
    with pytest.raises(ServerFailed, match="3 completions for 4 prompts") as err:
        client(standin, retries=1, backoff_s=0.01).generate(prompts_for(trunk.model), GREEDY)
    assert standin.url in str(err.value) and len(standin.requests) == 2


def test_http_500_fails_the_batch_after_retries(trunk, standin):
    standin.fault = "http500"
    with pytest.raises(ServerFailed, match="HTTP 500") as err:
        client(standin, retries=2, backoff_s=0.01).generate(prompts_for(trunk.model), GREEDY)
    assert "log" in err.value.fix and len(standin.requests) == 3


def test_server_dying_mid_batch_fails_the_whole_batch(trunk, standin):
    standin.fault, standin.fault_after = "die", 1  # the first request is served, the second kills it
    engine = client(standin, prompts_per_request=2, concurrency=1, retries=1, backoff_s=0.01)
    with pytest.raises((ServerFailed, ServerUnreachable)) as err:
        engine.generate(prompts_for(trunk.model), GREEDY)
    assert standin.url in str(err.value) and len(standin.requests) == 2


def test_wrong_hidden_size_is_refused_before_sending(trunk, standin):
    with pytest.raises(ServerRefused, match="width 32.*hidden size is 64") as err:
        client(standin, hidden_size=64).generate([torch.randn(5, 32)], GREEDY)
    assert "embedding table" in err.value.fix and standin.requests == []


def test_wrong_hidden_size_unknown_to_the_client_passes_the_servers_message(standin):
    with pytest.raises(ServerRefused, match="rows must have 64 values"):
        client(standin).generate([torch.randn(5, 32)], GREEDY)


def test_no_server_is_unreachable_naming_the_url_and_the_fix():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable) as err:
        SGLangRolloutEngine(url, "m", ClientSettings(**FAST)).generate([torch.randn(3, 64)], GREEDY)
    assert url in str(err.value) and "--disable-radix-cache" in err.value.fix


# ---------------------------------------------------------------------- attach and lifecycle


def test_attach_identifies_a_running_server_and_refuses_a_down_one(standin):
    identity = attach(standin.url + "/", "sglang", "tiny-llama", paths=("/health",))
    assert identity.to_dict() == {"engine": "sglang", "endpoint": http.endpoint_id(standin.url), "model": "tiny-llama"}
    assert client(standin).identity == identity
    down = f"http://user:secret@127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable, match="no sglang server answers at http://\\*\\*\\*@127.0.0.1") as err:
        attach(down, "sglang", "m")
    assert "secret" not in str(err.value)


def http_server(host, port):
    return [sys.executable, "-m", "http.server", str(port), "--bind", host]


def test_local_server_binds_loopback_logs_and_stops_its_process_group(tmp_path):
    with LocalServer.start(http_server, engine="test", model="-", log_dir=tmp_path, ready_paths=("/",),
                           ready_timeout_s=60) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.started_s > 0
        assert attach(server.url, "test", "-", paths=("/",)).endpoint == server.url
        pid = server.pid
    assert server.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert "GET / HTTP" in server.log_path.read_text()


def test_local_server_that_exits_reports_its_log(tmp_path):
    def failing(host, port):
        return [sys.executable, "-c", "import sys; print('no such model: /nowhere'); sys.exit(3)"]

    with pytest.raises(ServerStartError, match="(?s)exited with code 3.*no such model: /nowhere"):
        LocalServer.start(failing, engine="test", model="-", log_dir=tmp_path, ready_timeout_s=30)


def test_local_server_not_ready_in_time_is_stopped(tmp_path):
    def silent(host, port):
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    begin = time.monotonic()
    with pytest.raises(ServerStartError, match="not ready after 2s"):
        LocalServer.start(silent, engine="test", model="-", log_dir=tmp_path, ready_timeout_s=2)
    assert time.monotonic() - begin < 30  # stopped by SIGTERM, not waited for


# ---------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
def test_real_smollm2_av_prompts_through_the_standin_equal_the_hf_engine(smollm2_spec):
    from nla_universal.nla import AV, AVConfig

    torch.manual_seed(0)
    served = load_model(smollm2_spec)
    av = AV.create(load_model(smollm2_spec), AVConfig(), canonical_tag=smollm2_spec.tag)
    with torch.no_grad():
        embeds, mask = av.prompt_embeds(torch.randn(4, av.d_model), ["smollm2-135m", "gpt2-medium", "qwen3-1p7b", "x"])
    prompts = [e[m.bool()] for e, m in zip(embeds, mask)]
    want = HFRolloutEngine(served.model, served.tokenizer).generate(prompts, GREEDY)
    with SGLangStandIn(served.model, served.tokenizer) as server:
        got = SGLangRolloutEngine(server.url, "smol", ClientSettings(hidden_size=576, **FAST)).generate(prompts, GREEDY)
    assert_same(got, want)
    assert all(len(c.token_ids) == 8 or c.finish_reason == "stop" for c in got)
