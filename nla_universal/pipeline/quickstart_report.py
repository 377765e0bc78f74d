"""What the quickstart reports besides the evaluation: stage timings and a plain verdict on the SFT stages."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Callable

from .. import io

log = logging.getLogger(__name__)


class StageTimer:
    """Wall time and peak RSS of each stage (the kernel's high-water mark, reset between stages).

    Kept in `timings.json`, written after every stage and summed over reruns: a run killed part-way
    keeps the time of the stages it finished, and rerunning a finished run adds only each stage's check.
    """

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.is_file():
            try:
                self.rows = {r["stage"]: {"runs": 1, **r} for r in json.loads(path.read_text())}
            except (ValueError, KeyError, TypeError):
                log.warning("quickstart: %s is unreadable; stage timings start again from this run", path)

    @staticmethod
    def _reset_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _peak_mib() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def run(self, name: str, fn: Callable[[], object]):
        per_stage = self._reset_peak()
        start = time.time()
        result = fn()
        seconds = time.time() - start
        row = self.rows.setdefault(name, {"stage": name, "seconds": 0.0, "peak_rss_mib": 0, "runs": 0})
        row.update(seconds=round(row["seconds"] + seconds, 1), runs=row["runs"] + 1, peak_is_per_stage=per_stage,
                   peak_rss_mib=max(row["peak_rss_mib"], round(self._peak_mib())))
        io.write_text(self.path, json.dumps(list(self.rows.values()), indent=2))
        log.info("quickstart: %s done in %.1fs", name, seconds)
        return result


def timings_markdown(rows: list[dict]) -> str:
    lines = ["## Stage timings", "",
             "Wall time summed over every run of this folder (a rerun of a finished stage adds only its check); "
             "peak RSS is the highest seen.", "", "| stage | wall s | peak RSS MiB |", "|---|---:|---:|"]
    lines += [f"| {r['stage']} | {r['seconds']} | {r['peak_rss_mib']} |" for r in rows]
    lines.append(f"| **total** | {round(sum(r['seconds'] for r in rows), 1)} | |")
    return "\n".join(lines)


# Below this many nats/token of val loss gained from the true vector (vs another passage's), the AV's
# text cannot depend on the passage: the round trip is then bounded by the AV, whatever the AR does.
VECTOR_GAIN_FLOOR = 0.01


def diagnostics_markdown(run_dir: Path) -> str:
    """What the SFT stages learned, read from their stage records, with a plain verdict on the AV."""
    ar = json.loads((run_dir / "stages" / "sft-ar.json").read_text())
    av = json.loads((run_dir / "stages" / "sft-av.json").read_text())["final"]
    lines = ["## Training diagnostics", "", "| stage | measure (val split) | value |", "|---|---|---|",
             f"| sft-ar | cos of the AR's prediction from the teacher's z, before → after | "
             f"{ar['before']['cos']:.3f} → {ar['final']['cos']:.3f} |",
             f"| sft-av | vector_gain: loss with another passage's vector − with the true one (nats/token) | "
             f"{av['vector_gain']:+.4f} |",
             f"| sft-av | distinct_z: share of distinct explanations in a sample | {av['distinct_z']:.2f} |", ""]
    if av["vector_gain"] < VECTOR_GAIN_FLOOR:
        lines.append(f"**The AV does not read the injected vector yet** (vector_gain < {VECTOR_GAIN_FLOOR}): its "
                     "explanations cannot carry passage-specific information, so Δ vs shuffled_z stays near 0 whatever "
                     "the AR learns. Reading the vector comes only after many more AV SFT steps on many more "
                     "passages than a CPU run affords (`--preset gpu` on a GPU; `tools/probes/av_steps.py` measures "
                     "vector_gain along a long run).")
    else:
        lines.append("The AV's loss depends on the vector it reads (vector_gain ≥ "
                     f"{VECTOR_GAIN_FLOOR}): its explanations can carry passage-specific information.")
    return "\n".join(lines)
