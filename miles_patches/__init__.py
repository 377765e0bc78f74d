"""Runtime patches applied to Miles by an explicit `import miles_patches; miles_patches.apply()`.

Miles' files are never edited, and nothing here runs at import time (no sitecustomize, no .pth
hook): only the nla-universal Miles driver (`python -m nla_universal.miles.train`) calls `apply()`,
in its own process, before Miles builds any actor. What `apply()` does:

1. checks the installed Miles against the call sites and signatures the extension relies on
   (`contract.py`: `inspect` on Miles' own objects, never a version string) and stops with a
   message naming the symbol and the fix when one differs;
2. rebinds `miles.backends.fsdp_utils.FSDPTrainRayActor` (the package attribute: Miles' actor
   factory imports it from there at call time, miles/ray/train/actor_factory.py:68) to
   `nla_universal.miles.actor.NLAPolicyActor`, so `--train-backend fsdp` builds our AV actor.
   Rebinding the defining module `miles.backends.fsdp_utils.actor` would have no effect.

The Miles commit this was written and verified against is pinned here, in one place.
"""

from __future__ import annotations

MILES_COMMIT = "31f1ca961a94cb860cec3b2dea34ec332bfa8f76"


def check(driver: bool = False) -> None:
    """Refuse a Miles whose hook call sites or signatures differ from the pinned commit's.

    `driver=True` also checks the driver-side symbols (placement groups, train groups, the parser),
    which import only where SGLang is installed."""
    from . import contract

    groups = [contract.HOOKS, contract.ACTOR] + ([contract.DRIVER] if driver else [])
    contract.check_all([e for group in groups for e in group])


def apply(driver: bool = False) -> None:
    """Check the installed Miles, then make Miles' FSDP backend build the NLA policy actor (idempotent)."""
    check(driver)
    import miles.backends.fsdp_utils as fsdp_package

    from nla_universal.miles.actor import NLAPolicyActor

    fsdp_package.FSDPTrainRayActor = NLAPolicyActor
