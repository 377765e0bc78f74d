"""The AV's own explanations of stored activations, cached per tag and resumable.

Generation is the slowest step on a CPU, and both the dec_M refit and the evaluation need it, so
each (AV weights, the tag's encoder, sampling) fingerprint keeps its explanations in
`run_dir/explanations/<tag>.jsonl`, appended batch by batch: a killed run loses one batch at most.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..nla.api import UniversalNLA
from ..rollout import SamplingParams


def av_fingerprint(nla: UniversalNLA, tag: str, sampling: SamplingParams) -> str:
    """Changes whenever the AV's LoRA, the tag's encoder, the prompt, the scale or the sampling change."""
    h = hashlib.sha256()
    for name, p in sorted(nla.av.model.named_parameters()):
        if "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    h.update(nla.adapters.state_bytes(tag))
    h.update(json.dumps([nla.av.template, nla.av.injection_scale, asdict(sampling)], sort_keys=True).encode())
    return h.hexdigest()[:16]


def _read(path: Path, key: str) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        if row.get("key") == key:
            done[row["passage_id"]] = row
    return done


def explain_rows(nla: UniversalNLA, run_dir: Path, tag: str, ids: list[str], H: np.ndarray,
                 sampling: SamplingParams, batch_size: int = 8) -> tuple[list[str], list[bool]]:
    """Explanations (and parse flags) of rows n(h_M) of `tag`, in `ids` order, from cache or the AV."""
    key = av_fingerprint(nla, tag, sampling)
    path = run_dir / "explanations" / f"{tag}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _read(path, key)
    todo = [i for i, p in enumerate(ids) if p not in done]
    if todo:
        with open(path, "a") as f, tqdm(total=len(todo), desc=f"explain {tag}", unit="passage", dynamic_ncols=True) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                for i, e in zip(chunk, nla.explain(H[chunk], tag, sampling)):
                    row = {"key": key, "passage_id": ids[i], "z": e.text, "parsed": e.parsed}
                    done[ids[i]] = row
                    f.write(json.dumps(row) + "\n")
                f.flush()
                bar.update(len(chunk))
    return [done[p]["z"] for p in ids], [bool(done[p]["parsed"]) for p in ids]
