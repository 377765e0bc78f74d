"""The AV's input map: the ridge fit, one injected row for SFT, inference and rollout, and the bundle round trip."""

import math

import numpy as np
import pytest
import torch

from nla_universal.config import ModelSpec
from nla_universal.models import load_model
from nla_universal.nla import AV, AVConfig, rescale
from nla_universal.nla.injection import marker_positions
from nla_universal.nla.input_map import InputMap, bag_embedding, fit_input_map, words
from nla_universal.rollout import Completion, RolloutEngine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
TAG = "tiny-llama"


@pytest.fixture(scope="module")
def av() -> AV:
    torch.manual_seed(0)
    model = AV.create(load_model(ModelSpec(tag=TAG, source="random", name="llama", layer=1)), AVConfig(), canonical_tag=TAG)
    g = torch.Generator().manual_seed(3)
    model.input_map = InputMap(torch.randn(64, 64, generator=g), torch.randn(64, generator=g))
    return model


class Recording(RolloutEngine):
    """An engine that keeps the prompt embeddings it was handed (what any server would receive)."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def generate(self, prompt_embeds, sampling, attention_mask=None):
        self.seen.append(prompt_embeds.detach().clone())
        return [Completion([1], "x", None, "stop") for _ in range(len(prompt_embeds))]


def test_the_fit_recovers_a_linear_bag_map_and_beats_shuffled_vectors():
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((12, 20)), rng.standard_normal(12)
    V = rng.standard_normal((200, 20))
    Y = V @ W.T + b + 0.05 * rng.standard_normal((200, 12))
    input_map, report = fit_input_map(V[:160], Y[:160], V[160:], Y[160:])
    assert report["val_fve"] > 0.99 and report["val_fve_shuffled"] < 0.1
    pred = input_map(torch.as_tensor(V[160:], dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(pred, Y[160:], atol=0.3)


def test_the_bag_is_the_mean_embedding_of_the_words_tokens(av):
    text = "The json module: json.dumps writes, loads reads!"
    assert words(text) == ["dumps", "json", "loads", "module", "reads", "the", "writes"]
    ids = [i for w in words(text) for i in av.tokenizer(" " + w, add_special_tokens=False)["input_ids"]]
    expected = av.embedding(torch.tensor(ids)).mean(0)
    torch.testing.assert_close(bag_embedding(av.tokenizer, av.embedding, text), expected.detach())


def injected_row(embeds: torch.Tensor, av: AV, row: int) -> torch.Tensor:
    """The marker's row; every prompt here has the same tag, so prompts start at column 0, unpadded."""
    return embeds[row, int(marker_positions(torch.tensor([av.prompt_ids(TAG)]), av.marker)[0])]


def test_sft_inference_rollout_and_log_probs_inject_the_same_mapped_row(av):
    v = torch.randn(2, 64)
    expected = rescale(av.input_map(v), av.injection_scale).detach()
    assert not torch.allclose(expected, rescale(v, av.injection_scale), atol=1e-3), "the map must change the row"
    # inference / rollout: the prompt embeddings an engine (HF, vLLM, SGLang) is handed
    engine = Recording()
    av.engine, saved_engine = engine, av.engine
    try:
        av.generate(v, [TAG, TAG], SamplingParams(greedy=True, max_new_tokens=1))
    finally:
        av.engine = saved_engine
    for row in range(2):
        torch.testing.assert_close(injected_row(engine.seen[0], av, row), expected[row])
    # SFT and RL log-probs: the embedding output the trunk sees in a teacher-forced forward
    seen = []
    first_block = av.model.get_base_model().model.layers[0]
    handle = first_block.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)),
                                                   with_kwargs=True)
    try:
        batch = av.build_sft_batch(v, [TAG, TAG], ["a b", "c d"])
        av.sft_loss(batch)
        av.sequence_log_probs(v, [TAG, TAG], [[5, 6], [7]])
    finally:
        handle.remove()
    for hidden in seen:
        for row in range(2):
            torch.testing.assert_close(injected_row(hidden.detach(), av, row), expected[row])


def test_a_bundle_keeps_its_map(tmp_path):
    from nla_universal.adapters import PoolAdapters
    from nla_universal.nla import TagInfo, UniversalNLA

    torch.manual_seed(0)
    trunk = ModelSpec(tag=TAG, source="random", name="llama", layer=1)
    adapters = PoolAdapters(64, TAG)
    adapters.add(TAG, torch.eye(64), torch.eye(64))
    nla = UniversalNLA.create(trunk, adapters, {TAG: TagInfo(64, 1, "mean")})
    g = torch.Generator().manual_seed(4)
    nla.set_input_map(InputMap(torch.randn(64, 64, generator=g), torch.randn(64, generator=g)), {"kind": "bag", "val_fve": 0.5})
    nla.meta.stages = [{"stage": "sft-ar", "id": "a"}, {"stage": "sft-av", "id": "b"}]
    again = UniversalNLA.load(nla.save(tmp_path / "bundle"))
    assert again.meta.av.input_map == {"kind": "bag", "val_fve": 0.5}
    h = torch.randn(3, 64)
    a, _ = nla.av.prompt_embeds(nla.encode(h, TAG), [TAG] * 3)
    b, _ = again.av.prompt_embeds(again.encode(h, TAG), [TAG] * 3)
    assert torch.equal(a, b)
    (tmp_path / "bundle" / "av" / "input_map.safetensors").unlink()
    with pytest.raises(Exception, match="input_map.safetensors is missing"):
        UniversalNLA.load(tmp_path / "bundle")


def test_the_mapped_row_is_injected_at_the_injection_scale(av):
    embeds, _ = av.prompt_embeds(torch.randn(1, 64), [TAG])
    assert math.isclose(float(injected_row(embeds, av, 0).norm()), av.injection_scale, rel_tol=1e-5)


def test_a_ridge_chosen_at_the_top_of_the_grid_is_flagged(caplog):
    """Targets unrelated to the vectors: val prefers the strongest shrinkage, which may lie beyond the grid."""
    rng = np.random.default_rng(1)
    V, Y = rng.standard_normal((60, 40)), rng.standard_normal((60, 6))
    _, noise = fit_input_map(V[:40], Y[:40], V[40:], Y[40:])
    assert noise["at_top"] and noise["ridge"] == max(noise["ridge_grid"]) and "largest ridge" in caplog.text
    W = rng.standard_normal((6, 40))
    _, signal = fit_input_map(V[:40], V[:40] @ W.T, V[40:], V[40:] @ W.T)
    assert not signal["at_top"]


def test_the_head_mode_maps_onto_the_head_words_only():
    from nla_universal.pipeline.sft_av import InputMapMode, map_targets

    z = ['Keywords: pickle. It reads "objects with the pickle".', "A sentence without a head."]
    assert map_targets(z, InputMapMode.head) == ["pickle", "A sentence without a head."]
    assert map_targets(z, InputMapMode.bag) == z
