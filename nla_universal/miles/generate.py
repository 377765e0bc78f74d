"""`--custom-generate-function-path nla_universal.miles.generate.generate`: one AV rollout from the sample's
vector, through SGLang's `/generate` with `input_embeds`.

The prompt rows are built here, on the trainer side, by `AV.prompt_embeds` (the input map, the
marker row at `injection_scale`), exactly as `nla-universal rl` builds its rollouts, and sent by our
`SGLangRolloutEngine` (embeddings only, never `input_ids` beside them; only SGLang's sampling keys;
a server with the radix cache on is refused with the flag that fixes it). The sample leaves with
`tokens` = prompt ids + response ids (what the trainer re-reads, with the vector injected at the
marker again), `response`, `response_length`, `rollout_log_probs`, `loss_mask` and `status`
(COMPLETED when the AV stopped, TRUNCATED at the token limit); `reward` stays None for the reward
hook. Miles' `sampling_params` are mapped onto ours; a key we cannot honour is refused, not dropped.
"""

from __future__ import annotations

import asyncio

import torch
from miles.rollout.base_types import GenerateFnInput, GenerateFnOutput
from miles.utils.types import Sample

from ..errors import ConfigError
from ..nla.injection import marker_positions
from ..rollout import FINISH_STOP, Completion, SamplingParams
from . import context

# Miles' keys (inference_rollout_common.compute_sampling_params) that only shape the detokenised text:
# our client leaves them at SGLang's defaults.
TEXT_ONLY = ("skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens")


def sampling_from_miles(params: dict) -> SamplingParams:
    """Miles' per-request sampling parameters as ours (what SGLangRolloutEngine sends)."""
    unsupported = {k: v for k, v in params.items() if k in ("top_k", "stop", "stop_token_ids") and v not in (None, -1, 0, [], "")}
    unknown = sorted(set(params) - {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
                                    "sampling_seed", *TEXT_ONLY})
    if unsupported or unknown:
        raise ConfigError(f"the NLA generate hook cannot honour Miles' sampling parameters {unsupported or unknown}",
                          "drop --rollout-top-k / --rollout-stop / --rollout-stop-token-ids: the AV samples with "
                          "temperature and top-p until EOS or --rollout-max-response-len, as in nla-universal rl")
    temperature = float(params.get("temperature", 1.0))
    return SamplingParams(max_new_tokens=int(params["max_new_tokens"]), greedy=temperature == 0,
                          temperature=temperature or 1.0, top_p=float(params.get("top_p", 1.0)),
                          seed=params.get("sampling_seed"))


def fill(sample: Sample, prompt_ids: list[int], completion: Completion) -> Sample:
    """The fields Miles' trainer and reward read, from one completion."""
    n = len(completion.token_ids)
    sample.tokens = list(prompt_ids) + list(completion.token_ids)
    sample.response = completion.text
    sample.response_length = n
    sample.rollout_log_probs = [float(x) for x in completion.logprobs]
    sample.loss_mask = [1] * n
    sample.status = Sample.Status.COMPLETED if completion.finish_reason == FINISH_STOP else Sample.Status.TRUNCATED
    return sample


async def generate(input: GenerateFnInput) -> GenerateFnOutput:
    """One completion for `input.sample` (Miles' new-form generate function)."""
    args, sample = input.args, input.sample
    vector, tag = context.sample_vector(sample)
    av = context.nla(args).av
    sampling = sampling_from_miles(input.sampling_params)
    with torch.no_grad():
        embeds, mask = av.prompt_embeds(vector[None], [tag])
    engine = context.sglang(args, av.d_model)
    [completion] = await asyncio.to_thread(engine.generate, embeds, sampling, mask)
    ids = av.prompt_ids(tag)
    # Miles clears multimodal_train_inputs when it retries a sample; the vector in metadata survives
    position = int(marker_positions(torch.tensor([ids]), av.marker)[0])
    sample.multimodal_train_inputs = context.train_inputs(vector, position)
    return GenerateFnOutput(samples=fill(sample, ids, completion))
