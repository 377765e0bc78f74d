"""The AR: truncated trunk = the full model's residual stream, last-token read, a trainable value head that survives saving."""

import pytest
import torch

from nla_universal.config import ModelSpec
from nla_universal.errors import DataError, NLAError
from nla_universal.models import decoder_layers, load_model
from nla_universal.nla import AR, ARConfig
from nla_universal.nla.ar import VALUE_HEAD_FILE, last_real_index

TEXTS = ["Cats sleep.", "The Roman aqueducts carried water across valleys on arches of stone.", "Tea"]


pytestmark = pytest.mark.usefixtures("one_thread")


def spec(model_type: str) -> ModelSpec:
    return ModelSpec(tag=f"tiny-{model_type.replace('_', '-')}", source="random", name=model_type, layer=1)


def fresh_ar(model_type: str = "llama") -> AR:
    return AR.create(load_model(spec(model_type), num_blocks="to_layer"), ARConfig())


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_untrained_ar_reads_the_full_models_hidden_state_at_the_last_real_token(model_type):
    ar = fresh_ar(model_type)
    full = load_model(spec(model_type))
    assert len(decoder_layers(ar.model)) == full.layer + 1 < full.num_layers  # really truncated
    out = ar.reconstruct(TEXTS)
    ids, mask = ar.encode_texts(TEXTS)
    assert mask[0].sum() < mask.shape[1]  # right padding really happened
    with torch.no_grad():
        hidden = full.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[full.layer + 1]
    for b in range(len(TEXTS)):
        last = int(mask[b].sum()) - 1
        assert torch.allclose(out[b], hidden[b, last].float(), atol=1e-5)
    assert not torch.allclose(out[0], hidden[0, -1].float(), atol=1e-3)  # the pad position would be wrong


def test_last_real_index_under_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert last_real_index(right).tolist() == [2, 4]
    assert last_real_index(left).tolist() == [4, 4]


def test_template_without_placeholder_is_refused():
    with pytest.raises(NLAError, match="explanation"):
        AR.create(load_model(spec("llama"), num_blocks="to_layer"), ARConfig(template="Summary: <summary>"))


def test_a_full_trunk_is_refused():
    with pytest.raises(NLAError, match="K\\+1"):
        AR.create(load_model(spec("llama")), ARConfig())


def test_reconstruct_is_batch_invariant_and_equals_forward():
    ar = fresh_ar()
    batched = ar.reconstruct(TEXTS)
    singles = torch.cat([ar.reconstruct([t]) for t in TEXTS])
    assert torch.allclose(batched, singles, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(ar(TEXTS), batched, atol=1e-6)


def test_value_head_and_lora_train_while_the_trunk_stays_frozen():
    ar = fresh_ar()
    ar.train()
    assert torch.equal(ar.value_head.weight, torch.eye(ar.d_model))
    trainable = {n for n, p in ar.named_parameters() if p.requires_grad}
    assert "value_head.weight" in trainable
    assert all("lora_" in n or n == "value_head.weight" for n in trainable)
    before = ar.reconstruct(TEXTS)
    optimiser = torch.optim.SGD([p for p in ar.parameters() if p.requires_grad], lr=0.1)
    loss = (ar(TEXTS) - torch.randn(len(TEXTS), ar.d_model)).pow(2).mean()
    loss.backward()
    assert ar.value_head.weight.grad.abs().sum() > 0
    optimiser.step()
    assert not torch.equal(ar.value_head.weight, torch.eye(ar.d_model))
    assert not torch.allclose(ar.reconstruct(TEXTS), before)


def test_a_trained_value_head_survives_save_and_load(tmp_path):
    ar = fresh_ar()
    with torch.no_grad():
        ar.value_head.weight.add_(torch.randn_like(ar.value_head.weight) * 0.1)
        for name, p in ar.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    expected = ar.reconstruct(TEXTS)
    ar.save(tmp_path / "ar")
    again = AR.load(tmp_path / "ar", load_model(spec("llama"), num_blocks="to_layer"), ARConfig().template)
    assert torch.equal(again.value_head.weight, ar.value_head.weight)
    assert torch.allclose(again.reconstruct(TEXTS), expected, atol=1e-6)
    (tmp_path / "ar" / VALUE_HEAD_FILE).unlink()
    with pytest.raises(DataError, match="value_head.safetensors is missing"):
        AR.load(tmp_path / "ar", load_model(spec("llama"), num_blocks="to_layer"), ARConfig().template)
