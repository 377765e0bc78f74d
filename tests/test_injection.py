"""The one injection path: exact norms, untouched rows, marker checks, padding invariance, Gemma scaling."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nla_universal.config import ModelSpec
from nla_universal.errors import NLAError
from nla_universal.models import embed_scale, input_embedding, load_model
from nla_universal.nla import AV, AVConfig, InjectionError, embed_and_inject, inject, rescale
from nla_universal.nla.injection import position_ids
from nla_universal.nla.markers import MARKER_RANGES, MarkerSpec, check_marker, choose_marker, single_token_id
from nla_universal.nla.prompts import DEFAULT_AV_TEMPLATE, parse_explanation, render_av_prompt
from nla_universal.rollout import SamplingParams

TAGS = ["x", "a-much-longer-model-tag-7"]  # prompts of different lengths → real left padding


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_av(model_type: str, seed: int = 0) -> AV:
    """A tiny random trunk whose LoRA B matrices are random, so its outputs are far from degenerate."""
    lm = load_model(ModelSpec(tag=f"tiny-{model_type.replace('_', '-')}", source="random", name=model_type, layer=1))
    torch.manual_seed(seed)
    av = AV.create(lm, AVConfig(), canonical_tag=lm.spec.tag)
    with torch.no_grad():
        for name, p in av.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return av


@pytest.fixture(scope="module")
def llama_av():
    return tiny_av("llama")


def test_rescale_gives_the_exact_norm_in_fp32_and_keeps_zero_rows_finite():
    v = torch.tensor([[3.0, 4.0, 0.0], [1e-3, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    out = rescale(v, 7.5)
    assert out.dtype == torch.float32
    assert torch.allclose(out[:2].norm(dim=-1), torch.tensor([7.5, 7.5]), rtol=1e-6, atol=0)
    assert torch.equal(out[2], torch.zeros(3))


def test_inject_replaces_only_the_marker_row(llama_av):
    ids, mask, _ = llama_av.layout(TAGS)
    embeds = llama_av.embedding(ids)
    vectors = torch.randn(2, llama_av.d_model) * 100
    out = inject(embeds, ids, vectors, llama_av.marker, 3.0)
    pos = (ids == llama_av.marker.token_id).int().argmax(1)
    for b in range(2):
        injected = out[b, pos[b]]
        assert abs(injected.float().norm().item() - 3.0) < 3e-6
        # replaced, not added: the row is the rescaled vector itself
        assert torch.equal(injected, rescale(vectors[b:b + 1], 3.0)[0])
        others = torch.ones(ids.shape[1], dtype=torch.bool)
        others[pos[b]] = False
        assert torch.equal(out[b, others], embeds[b, others])
    assert not torch.equal(out, embeds)  # worked on a clone: the input is untouched
    assert torch.equal(embeds, llama_av.embedding(ids))


def test_missing_doubled_or_misplaced_marker_raises(llama_av):
    marker = llama_av.marker
    good = llama_av.prompt_ids("x")
    v = torch.randn(1, llama_av.d_model)
    emb = llama_av.embedding
    without = [t for t in good if t != marker.token_id]
    with pytest.raises(InjectionError, match="other than once"):
        embed_and_inject(emb, torch.tensor([without]), v, marker, 1.0)
    p = good.index(marker.token_id)
    doubled = good[:p + 1] + [marker.token_id] + good[p + 1:]
    with pytest.raises(InjectionError, match="other than once"):
        embed_and_inject(emb, torch.tensor([doubled]), v, marker, 1.0)
    moved = good[:p - 1] + [marker.token_id, good[p - 1]] + good[p + 1:]
    with pytest.raises(InjectionError, match="expected"):
        embed_and_inject(emb, torch.tensor([moved]), v, marker, 1.0)
    with pytest.raises(InjectionError, match="NaN"):
        embed_and_inject(emb, torch.tensor([good]), torch.full((1, llama_av.d_model), float("nan")), marker, 1.0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # rotary and absolute positions
def test_left_padded_batch_equals_one_by_one(model_type, llama_av):
    av = llama_av if model_type == "llama" else tiny_av(model_type)
    vectors = torch.randn(2, av.d_model)
    batch_embeds, batch_mask = av.prompt_embeds(vectors, TAGS)
    assert batch_mask[0].sum() < batch_mask[1].sum()  # the short prompt really is padded
    responses = [[11, 12, 13], [21, 22]]
    with torch.no_grad():
        batch_lp = av.sequence_log_probs(vectors, TAGS, responses)
        ids, mask, _ = av.layout(TAGS, responses)
        batch_logits = av.logits(ids, mask, vectors)
    batch_gen = av.generate(vectors, TAGS, SamplingParams(greedy=True, max_new_tokens=8))
    for b in range(2):
        single_embeds, _ = av.prompt_embeds(vectors[b:b + 1], TAGS[b:b + 1])
        assert torch.equal(batch_embeds[b][batch_mask[b].bool()], single_embeds[0])
        with torch.no_grad():
            s_ids, s_mask, _ = av.layout(TAGS[b:b + 1], responses[b:b + 1])
            single_logits = av.logits(s_ids, s_mask, vectors[b:b + 1])[0]
            single_lp = av.sequence_log_probs(vectors[b:b + 1], TAGS[b:b + 1], responses[b:b + 1])
        assert torch.allclose(batch_logits[b][mask[b].bool()], single_logits, atol=1e-4)
        assert torch.allclose(batch_lp.total[b], single_lp.total[0], atol=1e-4)
        single_gen = av.generate(vectors[b:b + 1], TAGS[b:b + 1], SamplingParams(greedy=True, max_new_tokens=8))
        assert batch_gen[b].token_ids == single_gen[0].token_ids
    assert batch_gen[0].token_ids != batch_gen[1].token_ids  # a non-degenerate model, so equality means something


def test_hook_path_equals_inputs_embeds_path(llama_av):
    """SFT/log-probs (forward hook) and rollouts (inputs_embeds) see the same rows."""
    vectors = torch.randn(2, llama_av.d_model)
    ids, mask, _ = llama_av.layout(TAGS, [[5, 6], [7]])
    with torch.no_grad():
        hooked = llama_av.logits(ids, mask, vectors)
        embeds = embed_and_inject(llama_av.embedding, ids, vectors, llama_av.marker, llama_av.injection_scale)
        direct = llama_av.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
        plain = llama_av.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
    assert torch.equal(hooked, direct)
    assert not torch.allclose(hooked, plain)  # the hook is gone after the block, and it did change the output


def test_gemma_scaled_embeddings_keep_token_rows_and_never_scale_the_injected_row():
    av = tiny_av("gemma3_text")
    assert embed_scale(av.model) > 1.0  # the module really scales (√64 = 8)
    ids, _, _ = av.layout(TAGS)
    module_rows = input_embedding(av.model)(ids)
    raw_rows = input_embedding(av.model).weight[ids]
    assert not torch.allclose(module_rows, raw_rows)
    out = embed_and_inject(av.embedding, ids, torch.randn(2, av.d_model), av.marker, 5.0)
    pos = (ids == av.marker.token_id).int().argmax(1)
    for b in range(2):
        assert abs(out[b, pos[b]].float().norm().item() - 5.0) < 5e-6
        keep = torch.arange(ids.shape[1]) != pos[b]
        assert torch.equal(out[b, keep], module_rows[b, keep])


def test_marker_is_one_rare_token_between_its_recorded_neighbours(llama_av):
    tok, marker = llama_av.tokenizer, llama_av.marker
    assert any(lo <= ord(marker.char) <= hi for lo, hi, _ in MARKER_RANGES)
    assert single_token_id(tok, marker.char) == marker.token_id
    ids = render_av_prompt(tok, DEFAULT_AV_TEMPLATE, "x", marker.char)
    p = ids.index(marker.token_id)
    assert (ids[p - 1], ids[p + 1]) == (marker.left_id, marker.right_id)
    # rendered and tokenised once: the same ids as the one-step chat template, no doubled BOS
    one_step = tok.apply_chat_template(
        [{"role": "user", "content": DEFAULT_AV_TEMPLATE.replace("{tag}", "x").replace("{marker}", marker.char)}],
        add_generation_prompt=True, tokenize=True, return_dict=True,
    )["input_ids"]
    assert ids == list(one_step)
    assert ids[0] != ids[1]


def test_check_marker_names_the_id_that_differs(llama_av):
    tok, m = llama_av.tokenizer, llama_av.marker

    def render(c):
        return render_av_prompt(tok, DEFAULT_AV_TEMPLATE, "x", c)

    check_marker(tok, m, render)
    with pytest.raises(NLAError, match=f"(?s)token id {m.token_id + 1}.*another tokenizer"):
        check_marker(tok, MarkerSpec(m.char, m.token_id + 1, m.left_id, m.right_id), render)
    with pytest.raises(NLAError, match="(?s)right neighbour id differs.*another tokenizer"):
        check_marker(tok, MarkerSpec(m.char, m.token_id, m.left_id, m.right_id + 1), render)


def test_a_tokenizer_without_rare_single_tokens_cannot_host_a_marker():
    vocab = {"[UNK]": 0, "<": 1, ">": 2, "hello": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(NLAError, match="cannot host a single-token marker"):
        choose_marker(tok, lambda c: render_av_prompt(tok, DEFAULT_AV_TEMPLATE, "x", c))


def test_parse_explanation():
    assert parse_explanation("junk <explanation>\n About cats. \n</explanation> tail") == ("About cats.", True)
    assert parse_explanation("  no tags here \n") == ("no tags here", False)
    assert parse_explanation("<explanation>\ncut off mid") == ("cut off mid", False)


@pytest.mark.slow
def test_real_gemma3_tokenizer_gets_the_nla_librarys_marker_and_a_raw_prompt_with_one_bos():
    from nla_universal.models import load_tokenizer

    tok = load_tokenizer(ModelSpec(tag="gemma3-270m", source="packaged", name="gemma3-270m"))
    marker = choose_marker(tok, lambda c: render_av_prompt(tok, DEFAULT_AV_TEMPLATE, "gemma3-270m", c))
    assert (marker.char, marker.token_id) == ("㈜", 246566)  # the NLA library's recorded Gemma-3 marker (nla-facts A1)
    ids = render_av_prompt(tok, DEFAULT_AV_TEMPLATE, "gemma3-270m", marker.char)
    assert not tok.chat_template and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
