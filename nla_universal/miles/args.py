"""Our flags on Miles' parser, the Miles settings an NLA run needs, and the `RLConfig` both describe.

Why there is no custom loss (`--custom-loss-function-path`): with the settings `check_args` asks
for, Miles' own `policy_loss` computes what `train/rl_math.py` does in `nla-universal rl`:

- advantages: one number per sample, broadcast over its tokens; `reward.post_process` (our
  `--custom-reward-post-process-path`) makes it `rl_math.group_advantages` of the rewards. Miles'
  own GRPO normalisation divides by the unbiased std, √(G/(G−1)) more than ours, so it is replaced;
- the PPO-clipped policy term with `--eps-clip` on both sides, averaged over each sample's tokens and
  then over samples (Miles' `sum_of_sample_mean`, i.e. not `--calculate-per-token-loss`), as
  `rl_math.policy_loss`. One optimizer step per rollout (`--global-batch-size` = rollout batch ×
  samples per prompt) keeps the ratio at 1, as in `rl_step`;
- the KL to the frozen SFT AV as a loss term, `--use-kl-loss --kl-loss-type k3 --kl-loss-coef β`:
  Miles' k3 is exp(r) − r − 1 with r = ref − policy, `rl_math.kl_k3` (its default, k1, is not);
- no entropy bonus, and no reward-side KL (`--kl-coef 0`).

The AR's loss is not Miles' business at all: the AR trains in our own Ray actor (`critic.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import default_cache_dir
from ..errors import ConfigError
from ..models import model_folder
from ..nla.bundle import read_meta, spec_from_dict
from ..train.rl import RLConfig
from ..train.rl_math import RewardKind, check_rl_settings

# Miles flag (its dest) -> our object; the driver fills in the missing ones, check_args refuses others.
HOOKS = {
    "data_source_path": "nla_universal.miles.data_source.NLADataSource",
    "custom_generate_function_path": "nla_universal.miles.generate.generate",
    "custom_rm_path": "nla_universal.miles.reward.reward",
    "custom_reward_post_process_path": "nla_universal.miles.reward.post_process",
}
CRITIC_NAME = "nla-ar-critic"
_RL = RLConfig()


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(RLConfig) if f.name == name)


def add_nla_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our flags (all `--nla-*`), for `miles.utils.arguments.parse_args(add_custom_arguments=...)`."""
    g = parser.add_argument_group("nla-universal")
    g.add_argument("--nla-run-dir", required=True, help="run folder: its activations (train split) are the prompts, "
                   "its bundle (after refit-dec) the AV and AR; the trained bundle is written back there")
    g.add_argument("--nla-bundle", default=None, help="the bundle to start from (default: RUN_DIR/bundle)")
    g.add_argument("--nla-cache-dir", default=default_cache_dir(), help="where converted and random trunks are cached")
    g.add_argument("--nla-tags", nargs="*", default=None, help="train on these tags' vectors (default: every tag of "
                   "the bundle that is not held out)")
    g.add_argument("--nla-seed", type=int, default=_RL.seed, help="seed of the vector order (as rl.seed: with "
                   "--over-sampling-batch-size = rl.prompts_per_step the order is nla-universal rl's)")
    g.add_argument("--nla-ar-lr", type=float, default=_RL.ar_lr, help=_help("ar_lr"))
    g.add_argument("--nla-ar-warmup-steps", type=int, default=_RL.warmup_steps, help="the AR's " + _help("warmup_steps"))
    g.add_argument("--nla-clip-grad", type=float, default=_RL.clip_grad, help="the AR's gradient-norm clip (0 = off)")
    g.add_argument("--nla-reward", choices=[k.value for k in RewardKind], default=_RL.reward.value, help=_help("reward"))
    g.add_argument("--nla-failed-penalty", type=float, default=_RL.failed_penalty, help=_help("failed_penalty"))
    g.add_argument("--nla-penalise-failed", action=argparse.BooleanOptionalAction, default=_RL.penalise_failed,
                   help=_help("penalise_failed"))
    g.add_argument("--nla-critic-name", default=CRITIC_NAME, help="name of the AR critic's Ray actor (the reward "
                   "hook finds it by this name)")
    g.add_argument("--nla-critic-placement", choices=["actor", "own"], default="actor", help="actor: beside AV "
                   "rank 0, on a share of its GPU bundle; own: a placement group with a GPU of its own")
    g.add_argument("--nla-critic-num-gpus", type=float, default=0.2, help="share of the GPU the AR takes with "
                   "--nla-critic-placement actor (Miles' actor takes 0.4 of a bundle, a colocated engine 0.2)")
    g.add_argument("--nla-checkpoint-keep", type=int, default=_RL.keep_checkpoints, help="AR checkpoints kept")
    return parser


def bundle_dir(args) -> Path:
    return Path(args.nla_bundle or Path(args.nla_run_dir) / "bundle")


def trunk_folder(bundle: Path, cache_dir: str | None) -> str:
    """The AV trunk as a Hugging Face folder: what SGLang serves and Miles' FSDP actor loads."""
    return str(model_folder(spec_from_dict(read_meta(bundle).av.base, "av.base"), cache_dir))


def with_defaults(argv: list[str]) -> list[str]:
    """`argv` with our hook paths and the trunk folder (`--hf-checkpoint`, `--ref-load`) added where absent."""
    ours, _ = add_nla_arguments(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    out = list(argv)
    for dest, path in HOOKS.items():
        if _flag(dest) not in given:
            out += [_flag(dest), path]
    missing = [f for f in ("--hf-checkpoint", "--ref-load") if f not in given]
    if missing:
        trunk = trunk_folder(bundle_dir(ours), ours.nla_cache_dir)
        for flag in missing:
            out += [flag, trunk]
    return out


def check_args(args) -> None:
    """Refuse, all at once and before any work, the Miles settings an NLA run cannot use."""
    bad: list[tuple[str, str]] = []

    def need(ok: bool, problem: str, fix: str) -> None:
        if not ok:
            bad.append((problem, fix))

    for dest, path in HOOKS.items():
        need(getattr(args, dest) == path, f"{_flag(dest)} is {getattr(args, dest)!r}", f"{_flag(dest)} {path} (or leave it out)")
    need(args.train_backend == "fsdp", f"--train-backend {args.train_backend}", "--train-backend fsdp (the AV actor "
         "extends Miles' FSDP actor)")
    need(args.advantage_estimator == "grpo", f"--advantage-estimator {args.advantage_estimator}", "--advantage-estimator grpo")
    need(args.loss_type == "policy_loss", f"--loss-type {args.loss_type}", "--loss-type policy_loss (see "
         "nla_universal/miles/args.py: no custom loss is needed)")
    need(bool(args.use_kl_loss) and args.kl_loss_type == "k3", f"the KL to the SFT AV: use_kl_loss={args.use_kl_loss}, "
         f"kl_loss_type={args.kl_loss_type}", "--use-kl-loss --kl-loss-type k3 --kl-loss-coef β (rl_math.kl_k3)")
    need(args.kl_coef == 0, f"--kl-coef {args.kl_coef}", "--kl-coef 0 (the KL enters as a loss, --use-kl-loss)")
    need(args.entropy_coef == 0, f"--entropy-coef {args.entropy_coef}", "--entropy-coef 0 (nla-universal rl has no entropy bonus)")
    need(args.eps_clip_high in (None, args.eps_clip), f"--eps-clip-high {args.eps_clip_high}", "leave --eps-clip-high unset")
    need(not args.calculate_per_token_loss, "--calculate-per-token-loss", "drop it: every sample weighs the same")
    need(args.global_batch_size == args.rollout_batch_size * args.n_samples_per_prompt,
         f"--global-batch-size {args.global_batch_size} with {args.rollout_batch_size} prompts × "
         f"{args.n_samples_per_prompt} samples per rollout", "--global-batch-size = --rollout-batch-size × "
         "--n-samples-per-prompt (one update per rollout, whole groups)")
    need(getattr(args, "sglang_disable_radix_cache", False) is True, "SGLang's radix cache is on",
         "--sglang-disable-radix-cache (SGLang serves input_embeds only with it off)")
    need(args.qkv_format == "thd", f"--qkv-format {args.qkv_format}", "--qkv-format thd (the injection finds each "
         "sample's marker in the packed sequence)")
    need(not args.partial_rollout, "--partial-rollout", "drop it: the NLA generate hook always samples a whole answer")
    need(not getattr(args, "true_on_policy_mode", False), "--true-on-policy-mode", "drop it (its model patches do not "
         "know the AV's LoRA)")
    need(args.eval_interval is None, f"--eval-interval {args.eval_interval}", "drop it; evaluate the bundle with "
         "`nla-universal eval` afterwards")
    need(args.rollout_top_k in (-1, 0, None) and not args.rollout_stop and not args.rollout_stop_token_ids,
         "--rollout-top-k / --rollout-stop / --rollout-stop-token-ids", "drop them: the NLA rollout samples as "
         "nla-universal rl does (temperature, top-p, EOS)")
    need(args.num_rollout is not None, "no --num-rollout", "--num-rollout N (RL steps)")
    need(args.rollout_max_response_len is not None, "no --rollout-max-response-len", "--rollout-max-response-len N "
         "(the longest explanation sampled)")
    if bad:
        raise ConfigError("Miles settings that do not fit an nla-universal run: " + "; ".join(p for p, _ in bad),
                          "; ".join(f for _, f in bad))
    check_rl_settings(args.n_samples_per_prompt, args.kl_loss_coef, args.eps_clip)


def rl_config(args) -> RLConfig:
    """The nla-universal rl settings this Miles run amounts to (recorded with the stage; the hooks read theirs here)."""
    return RLConfig(steps=args.num_rollout or 0, prompts_per_step=args.rollout_batch_size,
                    group_size=args.n_samples_per_prompt, max_new_tokens=args.rollout_max_response_len or _RL.max_new_tokens,
                    temperature=args.rollout_temperature, av_lr=args.lr, ar_lr=args.nla_ar_lr,
                    warmup_steps=args.nla_ar_warmup_steps, kl_coef=args.kl_loss_coef, clip_eps=args.eps_clip,
                    reward=RewardKind(args.nla_reward), failed_penalty=args.nla_failed_penalty,
                    penalise_failed=args.nla_penalise_failed, scale_by_std=args.grpo_std_normalization,
                    clip_grad=args.nla_clip_grad, keep_checkpoints=args.nla_checkpoint_keep, seed=args.nla_seed)
