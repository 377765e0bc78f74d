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
    """What the training stages learned, read from their stage records, with a plain verdict on the AV."""
    ar = json.loads((run_dir / "stages" / "sft-ar.json").read_text())
    sft_av = json.loads((run_dir / "stages" / "sft-av.json").read_text())
    av, input_map = sft_av["final"], sft_av.get("input_map")
    lines = ["## Training diagnostics", "", "| stage | measure | value |", "|---|---|---|",
             f"| sft-ar | cos of the AR's prediction from the teacher's z (val), before → after | "
             f"{ar['before']['cos']:.3f} → {ar['final']['cos']:.3f} |"]
    if input_map:
        lines.append(f"| sft-av | input map: val FVE of the explanation's word bag from the vector (from another "
                     f"passage's vector) | {input_map['val_fve']:.3f} ({input_map['val_fve_shuffled']:.3f}) |")
    lines += [f"| sft-av | vector_gain: loss with another passage's vector − with the true one (val, nats/token) | "
              f"{av['vector_gain']:+.4f} |",
              f"| sft-av | distinct_z: share of distinct explanations in a val sample | {av['distinct_z']:.2f} |"]
    rl_metrics = run_dir / "rl" / "metrics.jsonl"
    if rl_metrics.is_file():
        rows = [json.loads(line) for line in rl_metrics.read_text().splitlines() if line.strip()]
        if rows:
            lines += [f"| rl | reward (−mse_nrm) first → last step | {rows[0]['reward_mean']:+.3f} → {rows[-1]['reward_mean']:+.3f} |",
                      f"| rl | k3 KL to the SFT AV, last step | {rows[-1]['kl']:.4f} |",
                      f"| rl | AR loss first → last step | {rows[0]['ar_loss']:.3f} → {rows[-1]['ar_loss']:.3f} |"]
    lines.append("")
    if av["vector_gain"] < VECTOR_GAIN_FLOOR:
        lines.append(f"**The AV does not read the injected vector** (vector_gain < {VECTOR_GAIN_FLOOR}): its loss on the "
                     "teacher's z is the same with another passage's vector, so the explanations carry at most the "
                     "vector's rough kind (a few distinct explanations), not its passage; read Δ vs shuffled_z with that.")
    else:
        lines.append("The AV's loss depends on the vector it reads (vector_gain ≥ "
                     f"{VECTOR_GAIN_FLOOR}): its explanations can carry passage-specific information.")
    return "\n".join(lines)


def before_after_markdown(before: dict, after: dict) -> str:
    """fve_centred and Δ vs shuffled_z per tag, after SFT (and refit) and after RL, side by side."""
    lines = ["## Before and after RL (test split)", "",
             "| tag | fve_centred after SFT [CI] | after RL [CI] | Δ vs shuffled_z after SFT [CI] | after RL [CI] | "
             "distinct_z SFT → RL |", "|---|---|---|---|---|---|"]
    for tag, a in after["tags"].items():
        b = before["tags"].get(tag)
        if b is None:
            continue
        cells = [tag]
        for r in (b, a):
            lo, hi = r["ci"]["fve_centred"]
            cells.append(f"{r['metrics']['fve_centred']:.3f} [{lo:.3f}, {hi:.3f}]")
        for r in (b, a):
            d = r["vs_controls"]["shuffled_z"]
            cells.append(f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
        cells.append(f"{b.get('distinct_z', float('nan')):.2f} → {a.get('distinct_z', float('nan')):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
