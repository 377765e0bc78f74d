"""User-facing errors: each names the problem and the fix; the CLI prints them and exits 2."""

from __future__ import annotations


class NLAError(Exception):
    """A problem with the user's input, config or files (not a bug in nla-universal)."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class ConfigError(NLAError):
    """A config key or value that cannot be used."""


class DataError(NLAError):
    """Input data (corpus, activations, bundle files) that is missing, corrupt or inconsistent."""
