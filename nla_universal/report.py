"""fve_report.json, fve_report.md and fve_centred.png from per-tag `evaluate.score_tag` results.

Trained and held-out models are always reported in separate sections (held-out text is the test
split every score is computed on); random-weight models are labelled, since their numbers say
nothing about real representations.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Mapping

from . import io
from .errors import DataError

CONTROLS = ("mean_predictor", "shuffled_z", "teacher_z", "map_alone", "linear_ceiling")
NOTES = (
    "All scores on the test split (held-out text), rows rescaled to norm √d. fve_centred = "
    "1 − Σ‖g − p‖² / Σ‖g − μ‖² with μ the train rows' mean (the headline); fve_meannorm is the seed's "
    "number (≈ 2·cos − 1). Control columns give the control's fve_centred (fve_meannorm in brackets). "
    "mean_predictor always predicts μ; rescaled like every prediction, it scores −(√d − ‖μ‖)/(√d + ‖μ‖) "
    "≤ 0 on fve_centred, not 0. Δ is prediction − control on fve_centred, paired bootstrap 95% interval. "
    "map_alone: the AV's input map read without the AV (the nearest explanation words to the mapped row, "
    "read back by the AR). vector_gain: the AV's loss on the teacher's z with another passage's vector minus "
    "with its own, nats per token (> 0 only when the AV reads the vector), on the first eval.vector_gain_passages "
    "test passages of the tag."
)


def _groups(results: Mapping[str, dict], held_out: Mapping[str, bool]) -> dict[str, list[str]]:
    missing = sorted(set(results) - set(held_out))
    if missing:
        raise DataError(f"no held_out flag for tags {missing}", "pass held_out={tag: bool} for every scored tag")
    return {
        "trained": [t for t in results if not held_out[t]],
        "held_out": [t for t in results if held_out[t]],
    }


def _summary(results: Mapping[str, dict], tags: list[str]) -> dict:
    if not tags:
        return {"n_tags": 0}
    mean = lambda key: sum(results[t]["metrics"][key] for t in tags) / len(tags)  # noqa: E731
    return {"n_tags": len(tags), "mean_fve_centred": mean("fve_centred"), "mean_fve_meannorm": mean("fve_meannorm"),
            "mean_cos": mean("cos")}


def report_data(results: Mapping[str, dict], *, title: str, held_out: Mapping[str, bool],
                random_weights: Mapping[str, bool] | None = None) -> dict:
    """The content of fve_report.json."""
    random_weights = random_weights or {}
    groups = _groups(results, held_out)
    return {
        "title": title,
        "schema_version": 1,
        "notes": NOTES,
        "tags": {t: {"held_out": bool(held_out[t]), "random_weights": bool(random_weights.get(t, False)), **r}
                 for t, r in results.items()},
        "summary": {name: _summary(results, tags) for name, tags in groups.items()},
    }


def _control_cell(r: dict, name: str) -> str:
    c = r["controls"].get(name)
    return "—" if c is None else f"{c['fve_centred']:.3f} ({c['fve_meannorm']:.3f})"


def _row(tag: str, r: dict, random: bool) -> str:
    m, (lo, hi) = r["metrics"], r["ci"]["fve_centred"]
    label = f"{tag} (random weights)" if random else tag
    shuffled = r["vs_controls"].get("shuffled_z")
    delta = "—" if shuffled is None else f"{shuffled['diff']:+.3f} [{shuffled['lo']:+.3f}, {shuffled['hi']:+.3f}]"
    distinct = f"{r['distinct_z']:.2f}" if "distinct_z" in r else "—"
    gain = f"{r['vector_gain']:+.3f}" if "vector_gain" in r else "—"
    cells = [label, str(r["N"]), f"**{m['fve_centred']:.3f}** [{lo:.3f}, {hi:.3f}]", f"{m['fve_meannorm']:.3f}",
             f"{m['cos']:.3f}", *(_control_cell(r, c) for c in CONTROLS), delta, distinct, gain]
    return "| " + " | ".join(cells) + " |"


def markdown(data: dict, extra_md: str = "") -> str:
    header = ("| tag | N | fve_centred [95% CI] | fve_meannorm | cos | " + " | ".join(CONTROLS)
              + " | Δ vs shuffled_z [CI] | distinct_z | vector_gain |\n|" + "---|" * (8 + len(CONTROLS)))
    lines = [f"# {data['title']}", "", data["notes"], ""]
    for group, heading in (("trained", "Trained models"), ("held_out", "Held-out models (never trained the AV/AR)")):
        tags = [t for t, r in data["tags"].items() if r["held_out"] == (group == "held_out")]
        lines += [f"## {heading}", ""]
        if not tags:
            lines += ["(none)", ""]
            continue
        lines += [header] + [_row(t, data["tags"][t], data["tags"][t]["random_weights"]) for t in tags]
        s = data["summary"][group]
        lines += ["", f"Mean over {s['n_tags']} tags: fve_centred {s['mean_fve_centred']:.3f}, "
                      f"fve_meannorm {s['mean_fve_meannorm']:.3f}, cos {s['mean_cos']:.3f}.", ""]
    heads = {t: r["head_words_in_passage"] for t, r in data["tags"].items() if "head_words_in_passage" in r}
    if heads:
        lines += ["## Keyword heads", "", "Share of the head words the AV wrote that occur in their own passage, and "
                  "in another passage of the same tag (the control).", "", "| tag | own passage | another passage |",
                  "|---|---|---|", *(f"| {t} | {h['own']:.2f} | {h['other']:.2f} |" for t, h in heads.items()), ""]
    if extra_md:
        lines += [extra_md.strip(), ""]
    return "\n".join(lines)


def _plot(data: dict, path: Path) -> bool:
    """Bars of fve_centred per tag with each control beside it; CI error bars on the prediction."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: fve_report plots skipped (pip install matplotlib)", stacklevel=3)
        return False
    panels = [(name, [t for t, r in data["tags"].items() if r["held_out"] == (name == "held-out")])
              for name in ("trained", "held-out")]
    panels = [(name, tags) for name, tags in panels if tags]
    series = ["prediction"] + [c for c in CONTROLS if any(c in r["controls"] for r in data["tags"].values())]
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, len(panels), sharey=True, squeeze=False,
                             gridspec_kw={"width_ratios": [len(tags) for _, tags in panels]},
                             figsize=(max(6.0, 1.2 * len(data["tags"]) + 2), 5.0))
    for ax, (name, tags) in zip(axes[0], panels):
        for k, s in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(tags))]
            if s == "prediction":
                ys = [data["tags"][t]["metrics"]["fve_centred"] for t in tags]
                ci = [data["tags"][t]["ci"]["fve_centred"] for t in tags]
                err = [[y - c[0] for y, c in zip(ys, ci)], [c[1] - y for y, c in zip(ys, ci)]]
                ax.bar(xs, ys, width, yerr=err, capsize=3, label="prediction (95% CI)")
            else:
                ys = [data["tags"][t]["controls"].get(s, {}).get("fve_centred", float("nan")) for t in tags]
                ax.bar(xs, ys, width, label=s)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(tags)))
        ax.set_xticklabels([t + ("*" if data["tags"][t]["random_weights"] else "") for t in tags], rotation=30, ha="right")
        ax.set_title(f"{name} models")
    axes[0][0].set_ylabel("fve_centred (test split)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(series)), fontsize="small")
    random_note = "\n* random weights" if any(r["random_weights"] for r in data["tags"].values()) else ""
    fig.suptitle(data["title"] + random_note, fontsize="medium")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    with io.atomic_path(path) as tmp:  # tight: a long title or legend is never cut off
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(results: Mapping[str, dict], out_dir: str | Path, *, title: str, held_out: Mapping[str, bool],
                 random_weights: Mapping[str, bool] | None = None, extra_md: str = "") -> dict[str, Path]:
    """Write fve_report.json, fve_report.md and (with matplotlib) fve_centred.png; returns their paths."""
    if not results:
        raise DataError("no tags were scored", "check the pool and the test split")
    out = Path(out_dir)
    data = report_data(results, title=title, held_out=held_out, random_weights=random_weights)
    paths = {"json": out / "fve_report.json", "markdown": out / "fve_report.md"}
    io.write_text(paths["json"], json.dumps(data, indent=2, allow_nan=False))
    io.write_text(paths["markdown"], markdown(data, extra_md))
    if _plot(data, out / "fve_centred.png"):
        paths["plot"] = out / "fve_centred.png"
    return paths
