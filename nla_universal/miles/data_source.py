"""`--data-source-path nla_universal.miles.data_source.NLADataSource`: the run folder's activations as
Miles prompt groups.

Each draw is `train/rl.py::step_batch` (the train split of every trained tag, a seeded permutation per
epoch, `UniversalNLA.encode` for the shared vectors): with `--over-sampling-batch-size` = B and
`--nla-seed` = s, draw k holds the vectors `nla-universal rl` would use at step k with
prompts_per_step=B, seed=s. Each vector becomes a group of `--n-samples-per-prompt` deep copies of one
`Sample`: one `group_index` per group, a unique `index` per sample (the AR trains by it), the AV
prompt's ids in `tokens`, the vector and tag in `metadata`, and the trainer-side tensors in
`multimodal_train_inputs` (`context.train_inputs`).

The cursor (draws served, next group index, next sample index) is saved with Miles' checkpoints as
JSON under `--save`/rollout/ and restored from `--load`/rollout/, as Miles' own data source does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch
from miles.rollout.data_source import DataSource
from miles.utils.types import Sample

from .. import io
from ..errors import ConfigError, DataError
from ..nla.bundle import read_meta
from ..nla.injection import marker_positions
from ..pipeline.rl import train_rows
from ..pipeline.workspace import RunConfig, Workspace
from ..train.data import example_index
from ..train.rl import step_batch
from . import context
from .args import bundle_dir, rl_config

log = logging.getLogger(__name__)


class NLADataSource(DataSource):
    """Groups of samples over the run folder's train-split activations (see the module docstring)."""

    def __init__(self, args):
        self.args = args
        meta = read_meta(bundle_dir(args))
        tags = args.nla_tags or [t for t, info in meta.tags.items() if not info.held_out]
        ws = Workspace(RunConfig(run_dir=str(args.nla_run_dir), cache_dir=args.nla_cache_dir))
        self.rows = train_rows(ws, meta, tags)
        self.dataset = example_index(self.rows)  # Miles sizes an epoch by len(dataset)
        if not self.dataset:
            raise DataError(f"no train-split activations for tags {tags} in {args.nla_run_dir}",
                            "run `nla-universal extract` for them (and check the corpus has a train split)")
        self.nla = context.nla(args)
        self.draws = self.next_group = self.next_index = 0
        self.draw_size: int | None = None

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        if self.draw_size not in (None, num_samples):
            raise ConfigError(f"NLADataSource was asked for {num_samples} prompts after draws of {self.draw_size}",
                              "keep --over-sampling-batch-size fixed for a run (a resumed run too)")
        self.draw_size = num_samples
        cfg = dataclasses.replace(rl_config(self.args), prompts_per_step=num_samples)
        batch = step_batch(self.nla.encode, self.rows, self.dataset, cfg, self.draws)
        self.draws += 1
        groups = []
        for k in range(num_samples):
            row = k * cfg.group_size  # step_batch repeats each vector group_size times, prompt-major
            prototype = self._sample(batch.vectors[row], batch.tags[row])
            group = []
            for _ in range(cfg.group_size):
                sample = copy.deepcopy(prototype)
                sample.group_index, sample.index = self.next_group, self.next_index
                self.next_index += 1
                group.append(sample)
            self.next_group += 1
            groups.append(group)
        return groups

    def _sample(self, vector: torch.Tensor, tag: str) -> Sample:
        av = self.nla.av
        ids = av.prompt_ids(tag)
        position = int(marker_positions(torch.tensor([ids]), av.marker)[0])
        vector = vector.detach().float().cpu()
        return Sample(prompt=av.tokenizer.decode(ids), tokens=list(ids), metadata={context.VEC: vector, context.TAG: tag},
                      multimodal_train_inputs=context.train_inputs(vector, position))

    def add_samples(self, samples: list[list[Sample]]) -> None:
        """Miles hands back the groups an aborted rollout left unfinished: none without --partial-rollout."""
        if samples:
            raise ConfigError(f"Miles returned {len(samples)} unfinished groups to NLADataSource",
                              "drop --partial-rollout: the NLA generate hook always samples a whole answer")

    def _path(self, root: str, rollout_id) -> Path:
        return Path(root) / "rollout" / f"nla_data_source_{rollout_id}.json"

    def save(self, rollout_id) -> None:
        if self.args.save is None:
            return
        state = {"draws": self.draws, "next_group": self.next_group, "next_index": self.next_index,
                 "draw_size": self.draw_size}
        io.write_text(self._path(self.args.save, rollout_id), json.dumps(state))

    def load(self, rollout_id=None) -> None:
        if self.args.load is None:
            return
        path = self._path(self.args.load, rollout_id)
        if not path.is_file():
            log.info("NLADataSource: no cursor at %s, starting from the first draw", path)
            return
        state = json.loads(path.read_text())
        self.draws, self.next_group, self.next_index = state["draws"], state["next_group"], state["next_index"]
        self.draw_size = state["draw_size"]
