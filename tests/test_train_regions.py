"""GCPL regions end to end: the training loop hands every batch's region ids to the meta-architecture.

Three real sources in one run: a Zarr cube of the Slovenia scenes (its windows get their own cell), LEVIR-CD pairs
placed in Texas by the spec, and RSSCN7 scenes without any location (the unknown-location id). After a few steps
exactly the prototypes of the regions of the batches that ran have moved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shared_data import shared_path
from test_train_cube import SCENES, write_cube

DATA = shared_path()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SCENES.is_dir() and (DATA / "rsscn7").is_dir()), reason="needs ../shared/data"),
]

MICRO = {"dims": [32, 32, 64, 64], "depths": [1, 1, 1, 1], "moe_blocks": 1, "num_experts": 4, "fusion_dim": 64,
         "fusion_heads": 2}  # fmt: skip
# 8 regions: 7 longitude sectors of 51.4 degrees (one band) + unknown. Slovenia (14.56 E) is sector
# floor(194.56 / 51.43) = 3, Texas (97.74 W) sector floor(82.26 / 51.43) = 1, unknown 7.
REGION_OF_SOURCE = [3, 1, 7]


def test_loop_feeds_each_batch_region_to_gcpl(tmp_path: Path) -> None:
    from pipeline.train.data import StepBatchSampler, build_sources
    from pipeline.train.loop import build_meta_arch, run_loop
    from pipeline.train.spec import PretrainSpec
    from pipeline.train.state import latest_checkpoint, load_training_checkpoint

    write_cube(tmp_path / "slovenia.zarr")
    spec = PretrainSpec.model_validate({
        "model": {"name": "skysense_v2_tiny", "overrides": MICRO},
        "data": [{"kind": "cube", "path": str(tmp_path / "slovenia.zarr"), "size": 8, "num_dates": 2},
                 {"kind": "change_pairs", "path": str(DATA / "levir_cd"), "size": 32, "region": [-97.74, 30.27]},
                 {"kind": "images", "path": str(DATA / "rsscn7"), "size": 32}],
        "ssl": {"options": {"proj_dim": 16, "head_hidden_dim": 32, "num_queries": 2, "max_pixels": 32,
                            "num_regions": 8},
                "augment": {"num_local": 1}},
        "steps": 4, "batch_size": 2, "loader_workers": 0, "storage": str(tmp_path / "run"), "checkpoint_every": 4,
        "seed": 0,
    })  # fmt: skip
    sources, weights = build_sources([d.model_dump() for d in spec.data], num_regions=8)
    assert [int(s.get(0)["region"]) for s in sources] == REGION_OF_SOURCE
    sampler = StepBatchSampler([len(s) for s in sources], weights, spec.micro_batch, seed=spec.seed)
    drawn = {REGION_OF_SOURCE[sampler.batch(p)[0][0]] for p in range(spec.steps)}
    assert drawn == {1, 3, 7}, drawn  # the seed is picked so that batches of every region run

    before = build_meta_arch(spec)[0].gcpl.prototypes.clone()  # the run builds its meta-architecture alike
    run_loop(spec, progress=False)
    after = load_training_checkpoint(latest_checkpoint(spec.storage))[0]["gcpl.prototypes"]
    moved = {r for r in range(8) if not torch.equal(before[r], after[r])}
    assert moved == drawn
