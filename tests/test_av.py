"""The AV: LoRA targets per family, SFT batches, log-probs that match the rollout's, sampling, the real SmolLM2."""

import math

import pytest
import torch

from nla_universal.config import ModelSpec
from nla_universal.errors import ConfigError, NLAError
from nla_universal.models import load_model
from nla_universal.nla import AV, AVConfig, LoraSettings
from nla_universal.nla.av import IGNORE_INDEX, default_injection_scale, round_up_nice
from nla_universal.nla.lora import block_linear_names
from nla_universal.nla.prompts import av_target, check_av_template
from nla_universal.rollout import SamplingParams

TAGS = ["x", "a-much-longer-model-tag-7"]
LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_trunk(model_type: str):
    return load_model(ModelSpec(tag=f"tiny-{model_type.replace('_', '-')}", source="random", name=model_type, layer=1))


@pytest.fixture(scope="module")
def av():
    torch.manual_seed(0)
    model = AV.create(tiny_trunk("llama"), AVConfig(), canonical_tag="tiny-llama")
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def lora_config(av_: AV):
    return av_.model.peft_config["default"]


def test_default_lora_targets_every_block_linear_per_family(av):
    cfg = lora_config(av)
    assert sorted(cfg.target_modules) == LLAMA_TARGETS
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    gpt2 = AV.create(tiny_trunk("gpt2"), AVConfig(), canonical_tag="tiny-gpt2")
    assert sorted(lora_config(gpt2).target_modules) == ["c_attn", "c_fc", "c_proj"]
    adapted = {n.split(".lora_A")[0].rpartition(".")[2] for n, _ in gpt2.model.named_parameters() if "lora_A" in n}
    assert adapted == {"c_attn", "c_fc", "c_proj"}
    trainable = [n for n, p in gpt2.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_explicit_lora_targets_are_checked():
    trunk = tiny_trunk("llama")
    assert block_linear_names(trunk.model) == LLAMA_TARGETS
    with pytest.raises(ConfigError, match="c_attn"):
        AV.create(trunk, AVConfig(lora=LoraSettings(target_modules=["c_attn"])), canonical_tag="tiny-llama")


def test_template_needs_tag_and_marker():
    with pytest.raises(NLAError, match="marker"):
        check_av_template("Explain the model {tag}.")
    with pytest.raises(NLAError, match="tag"):
        check_av_template("<concept>{marker}</concept> and {tag} and {tag}")


def test_default_injection_scale_is_a_round_number_just_above_the_embedding_norm(av):
    norms = av.embedding(torch.arange(av.model.config.vocab_size)).float().norm(dim=-1)
    scale = default_injection_scale(av.embedding, av.model.config.vocab_size)
    assert norms.mean() < scale <= 4 / 3 * norms.mean()  # the widest gap of the round-number ladder
    assert av.injection_scale == scale
    assert [round_up_nice(x) for x in (0.159, 3.2, 4.0, 95.0)] == [0.2, 4.0, 5.0, 100.0]


def test_sft_batch_masks_the_prompt_and_ends_with_eos(av):
    texts = ["Cats sleep a lot.", "A long passage about the Roman aqueducts and their engineering."]
    batch = av.build_sft_batch(torch.randn(2, av.d_model), TAGS, texts)
    for b, (tag, text) in enumerate(zip(TAGS, texts)):
        labels = batch["labels"][b]
        target = labels[labels != IGNORE_INDEX].tolist()
        assert target[-1] == av.tokenizer.eos_token_id
        assert av.tokenizer.decode(target[:-1]) == av_target(text)
        real = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
        assert real == av.prompt_ids(tag) + target


def test_sft_loss_trains_the_lora_and_the_vectors(av):
    vectors = torch.randn(2, av.d_model, requires_grad=True)
    batch = av.build_sft_batch(vectors, TAGS, ["one", "two"])
    loss = av.sft_loss(batch)
    loss.backward()
    assert math.isfinite(loss.item())
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0  # enc_M is trained through the injection
    lora_grads = [p.grad for n, p in av.model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    base = [p for n, p in av.model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base)
    av.model.zero_grad()


def test_sequence_log_probs_match_the_rollout_logprobs(av):
    vectors = torch.randn(2, av.d_model)
    completions = av.generate(vectors, TAGS, SamplingParams(max_new_tokens=6, seed=3, return_logprobs=True))
    with torch.no_grad():
        scored = av.sequence_log_probs(vectors, TAGS, [c.token_ids for c in completions])
    for b, c in enumerate(completions):
        n = len(c.token_ids)
        assert torch.allclose(scored.per_token[b, :n], torch.tensor(c.logprobs), atol=1e-4)
        assert torch.allclose(scored.total[b], torch.tensor(c.logprobs).sum(), atol=1e-4)
        assert scored.mask[b].sum() == n


def test_engine_takes_a_list_of_prompts_or_a_padded_batch(av):
    vectors = torch.randn(2, av.d_model)
    embeds, mask = av.prompt_embeds(vectors, TAGS)
    rows = [embeds[b][mask[b].bool()] for b in range(2)]
    greedy = SamplingParams(greedy=True, max_new_tokens=5)
    from_list = av.engine.generate(rows, greedy)
    from_batch = av.engine.generate(embeds, greedy, attention_mask=mask)
    assert [c.token_ids for c in from_list] == [c.token_ids for c in from_batch]
    assert [c.text for c in from_list] == [av.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in from_list]


def test_seeded_sampling_is_reproducible(av):
    vectors = torch.randn(2, av.d_model)
    first = av.generate(vectors, TAGS, SamplingParams(max_new_tokens=8, seed=7))
    again = av.generate(vectors, TAGS, SamplingParams(max_new_tokens=8, seed=7))
    other = av.generate(vectors, TAGS, SamplingParams(max_new_tokens=8, seed=8))
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert all(c.finish_reason in ("stop", "length") and len(c.token_ids) <= 8 for c in first)


def test_the_injected_vector_steers_generation(av):
    a, b = torch.randn(2, av.d_model)
    out = av.generate(torch.stack([a, b]), ["x", "x"], SamplingParams(greedy=True, max_new_tokens=6))
    assert out[0].token_ids != out[1].token_ids


@pytest.mark.slow
def test_sft_through_the_injection_learns_an_answer_that_depends_on_the_vector():
    """Two vectors, two answers, one prompt: only reading the marker's row tells them apart. The real
    SmolLM2 (a tiny random trunk's logits are too flat to learn any answer in a few steps). It first
    learns the two answers as a 50/50 guess and reads the vector only later (not yet at 20 steps)."""
    torch.manual_seed(0)
    trunk = load_model(ModelSpec(tag="smollm2-135m", source="packaged", name="smollm2-135m-instruct", dtype="float32"))
    av_ = AV.create(trunk, AVConfig(), canonical_tag="smollm2-135m")
    vectors, answers = torch.randn(2, av_.d_model), ["alpha", "beta"]
    batch = av_.build_sft_batch(vectors, ["x", "x"], answers)
    opt = torch.optim.AdamW([p for p in av_.model.parameters() if p.requires_grad], lr=1e-3)
    av_.model.train()
    for _ in range(30):
        opt.zero_grad()
        av_.sft_loss(batch).backward()
        opt.step()
    av_.model.eval()
    ids = [av_.response_ids(a) for a in answers]
    with torch.no_grad():
        own = av_.sequence_log_probs(vectors, ["x", "x"], ids).total
        swapped = av_.sequence_log_probs(vectors.flip(0), ["x", "x"], ids).total
    assert (own - swapped > 2.0).all()  # each answer is far likelier under its own vector
    texts = [e.text for e in av_.explain(vectors, ["x", "x"], SamplingParams(greedy=True, max_new_tokens=16))]
    assert texts == answers


def test_sampling_params_are_checked():
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=1.5)


@pytest.mark.slow
def test_real_smollm2_av_uses_its_chat_template_and_generates():
    trunk = load_model(ModelSpec(tag="smollm2-135m", source="packaged", name="smollm2-135m-instruct", depth=0.5))
    model = AV.create(trunk, AVConfig(), canonical_tag="smollm2-135m")
    assert sorted(lora_config(model).target_modules) == LLAMA_TARGETS
    ids = model.prompt_ids("gpt2-medium")
    tok = model.tokenizer
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "gpt2-medium" in text and ids.count(model.marker.token_id) == 1
    assert ids[0] != ids[1]
    out = model.explain(torch.randn(2, model.d_model), ["gpt2-medium", "smollm2-135m"], SamplingParams(greedy=True, max_new_tokens=6))
    assert len(out) == 2 and all(len(e.completion.token_ids) >= 1 for e in out)
