"""The `nla-universal` command: one subcommand per stage, each with a typed config.

    nla-universal STAGE [-c FILE.yaml ...] [key=value ...]

Configs merge in order: the stage's defaults, each `-c` file, then `key=value` overrides. An unknown
key is an error that names the closest valid key. Errors in the user's input exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

from .config import describe, load_config
from .errors import NLAError


@dataclass(frozen=True)
class Stage:
    module: str  # nla_universal.pipeline.<module>
    schema: str  # config dataclass in that module
    run: str  # function(cfg) in that module
    summary: str


STAGES: dict[str, Stage] = {
    "corpus": Stage("corpus", "CorpusStageConfig", "run", "build passages.parquet (stable ids, train/val/test split)"),
    "pool": Stage("pool", "PoolStageConfig", "run", "show a pool: tags, sources, layers, dims"),
    "extract": Stage("extract", "ExtractConfig", "run", "activations of every pooled model at its layer"),
    "teach": Stage("teach", "TeachStageConfig", "run", "one teacher explanation z per passage"),
    "fit-adapters": Stage("fit_adapters", "FitAdaptersConfig", "run", "least-squares enc_M (vs the anchor) and linear-ceiling dec_M"),
    "sft-ar": Stage("sft_ar", "ARSFTConfig", "run", "AR SFT: teacher z → the shared vector (creates the bundle)"),
    "sft-av": Stage("sft_av", "AVSFTConfig", "run", "AV SFT: the injected shared vector → teacher z"),
    "refit-dec": Stage("refit_dec", "RefitConfig", "run", "dec_M by least squares on the AR's outputs"),
    "add-model": Stage("add_model", "AddModelConfig", "run", "add a held-out model to a trained bundle"),
    "rl": Stage("rl", "RLStageConfig", "run", "joint RL: GRPO on the AV with reward −mse_nrm, the AR trained alongside"),
    "eval": Stage("evaluate", "EvalConfig", "run", "score every tag on the test split with baselines and controls"),
    "verbalize": Stage("use", "VerbalizeConfig", "verbalize", "explain activations in words with a bundle"),
    "reconstruct": Stage("use", "ReconstructConfig", "reconstruct", "map explanations back to activations"),
    "quickstart": Stage("quickstart", "QuickstartConfig", "run", "the whole pipeline end to end on a preset"),
}


def _load_stage(name: str):
    stage = STAGES[name]
    module = importlib.import_module(f"nla_universal.pipeline.{stage.module}")
    return getattr(module, stage.schema), getattr(module, stage.run)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nla-universal",
        description="One shared natural-language autoencoder for a pool of LLM architectures.",
        epilog="Run `nla-universal STAGE --help` for a stage's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.summary, description=stage.summary, add_help=False)
        p.add_argument("-h", "--help", action="store_true", help="show this stage's options")
        p.add_argument("-c", "--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
        if name == "quickstart":
            p.add_argument("--preset", help="smoke | default | gpu (same as preset=NAME)")
            p.add_argument("--out", help="output folder (same as out=DIR)")
        p.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.stage:
        _parser().print_help()
        return 0
    schema, run = _load_stage(args.stage)
    if args.help:
        print(f"usage: nla-universal {args.stage} [-c FILE.yaml ...] [key=value ...]\n\n{STAGES[args.stage].summary}\n\noptions:")
        print("\n".join(describe(schema)))
        return 0
    overrides = list(args.overrides)
    for flag in ("preset", "out"):
        if getattr(args, flag, None):
            overrides.append(f"{flag}={getattr(args, flag)}")
    try:
        cfg = load_config(schema, args.config, overrides)
        run(cfg)
    except NLAError as exc:
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
