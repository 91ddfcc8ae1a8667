"""Training data on real samples: chip folders, BigEarthNet band order, Zarr cube windows, the replayable order."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import needs_shared, shared_path

from pipeline.modalities import get_modality
from pipeline.train.data import (
    MixedDataset,
    StepBatchSampler,
    collate,
    make_loader,
    measure_loader,
    to_model_inputs,
)

DATA = shared_path()
needs_data = needs_shared("rsscn7")


def test_sampler_is_a_pure_function_of_position() -> None:
    a = StepBatchSampler([10, 50], [1.0, 3.0], batch_size=4, world_size=2, rank=0, seed=7, stop=20)
    b = StepBatchSampler([10, 50], [1.0, 3.0], batch_size=4, world_size=2, rank=0, seed=7, start=12, stop=20)
    assert list(a)[12:] == list(b)
    r1 = StepBatchSampler([10, 50], [1.0, 3.0], batch_size=4, world_size=2, rank=1, seed=7, stop=20)
    for p in range(20):
        k0, k1 = a.batch(p), r1.batch(p)
        assert len({k[0] for k in k0 + k1}) == 1  # one source per global micro-batch: same modules on every rank
        assert {k[2] for k in k0}.isdisjoint({k[2] for k in k1})  # ranks get different samples/augmentations
    assert len({k[0] for p in range(20) for k in a.batch(p)}) == 2
    assert StepBatchSampler([10], None, 2, repeat=True).batch(5) == StepBatchSampler([10], None, 2).batch(0)
    with pytest.raises(ValueError, match="weights"):
        StepBatchSampler([10, 5], [1.0], 2)


@needs_data
def test_image_folder_source_rsscn7() -> None:
    from pipeline.train.sources import ImageFolderSource

    src = ImageFolderSource(DATA / "rsscn7", size=64, labels=True)
    assert len(src) == 420 and src.classes[0] == "aGrass" and src.label(419) == 6
    s1, s2 = src.get(5, np.random.default_rng(1)), src.get(5, np.random.default_rng(1))
    torch.testing.assert_close(s1["hr"]["x"], s2["hr"]["x"])  # the key's seed fixes the crop
    hr = s1["hr"]
    assert hr["x"].shape == (1, 3, 64, 64) and hr["valid"].all() and float(hr["gsd"]) == 0.625
    assert -3 < float(hr["x"].mean()) < 3 and 0.1 < float(hr["x"].std()) < 3  # ImageNet-normalised DN
    full = src.get(5)  # no rng: the whole image resized, deterministic
    assert full["hr"]["x"].shape == (1, 3, 64, 64) and int(full["label"]) == 0


@needs_data
def test_change_pairs_are_two_co_registered_dates() -> None:
    from pipeline.train.sources import ChangePairSource

    src = ChangePairSource(DATA / "levir_cd", size=32)
    assert len(src) == 11
    x = src.get(0, np.random.default_rng(0))["hr"]["x"]
    assert x.shape == (2, 3, 32, 32) and not torch.equal(x[0], x[1])
    # un-augmented: date A equals the resized A image
    from pipeline.train.sources import crop_resize, read_rgb

    a = torch.from_numpy(read_rgb(src.pairs[0][0]))[None]
    want = get_modality("hr").normalize(crop_resize(a, None, 32).clamp(0, 255), band_axis=1)
    torch.testing.assert_close(src.get(0)["hr"]["x"][:1], want)


@needs_data
def test_bigearthnet_band_order_units_and_labels() -> None:
    import rasterio

    from pipeline.train.sources import BigEarthNetSource

    src = BigEarthNetSource(DATA / "bigearthnet_v1", split="train")
    assert len(src) == 10
    i = 0
    s = src.get(i)
    patch = src.patches[i]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b10 = rasterio.open(patch / "S2_10m.tif").read().astype("float32")  # B02, B03, B04, B08
        b20 = rasterio.open(patch / "S2_20m.tif").read().astype("float32")  # B05, B06, B07, B8A, B11, B12
        s1 = rasterio.open(patch / "S1.tif").read()
    spec2, spec1 = get_modality("s2"), get_modality("s1")
    raw = s["s2"]["x"][0] * torch.tensor(spec2.std)[:, None, None] + torch.tensor(spec2.mean)[:, None, None]
    assert raw.shape == (10, 120, 120)
    torch.testing.assert_close(raw[[0, 1, 2, 6]], torch.from_numpy(b10), rtol=1e-5, atol=1e-2)  # B02 B03 B04 B08
    # 20 m bands upsampled x2: block means stay close to the source pixels
    coarse = torch.nn.functional.avg_pool2d(raw[[3, 4, 5, 7, 8, 9]][None], 2)[0]
    assert float((coarse - torch.from_numpy(b20)).abs().mean()) < 0.05 * float(torch.from_numpy(b20).mean())
    raw1 = s["s1"]["x"][0] * torch.tensor(spec1.std)[:, None, None] + torch.tensor(spec1.mean)[:, None, None]
    torch.testing.assert_close(raw1, torch.from_numpy(s1), rtol=1e-5, atol=1e-4)
    assert s["label"].shape == (19,) and s["label"].sum() >= 1
    name_date = patch.name.split("_")[2][:8]
    import datetime as dt

    assert int(s["s2"]["doy"][0]) == dt.datetime.strptime(name_date, "%Y%m%d").timetuple().tm_yday
    assert int(s["s1"]["doy"][0]) == 0  # the S1 date is not stored
    crop = BigEarthNetSource(DATA / "bigearthnet_v1", size=16).get(0, np.random.default_rng(0))
    assert crop["s2"]["x"].shape[-2:] == crop["s1"]["x"].shape[-2:] == (16, 16)


@needs_data
def test_mixed_loader_batches_feed_the_model() -> None:
    from pipeline.model import create_model
    from pipeline.train.sources import BigEarthNetSource, ImageFolderSource

    sources = [ImageFolderSource(DATA / "rsscn7", size=32), BigEarthNetSource(DATA / "bigearthnet_v1", size=8)]
    sampler = StepBatchSampler([len(s) for s in sources], [1, 1], batch_size=4, seed=0, stop=6)
    loader = make_loader(MixedDataset(sources), sampler, num_workers=1, prefetch_factor=2)
    seen = set()
    model = create_model("skysense_v2_tiny", dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), moe_blocks=1,
                         fusion_dim=64, fusion_heads=2).eval()  # fmt: skip
    for batch in loader:
        inputs = to_model_inputs(batch)
        seen.add(tuple(sorted(inputs)))
        with torch.no_grad():
            fused = model(inputs)
        grid = 2 if "hr" in inputs else 8  # 32 px at 0.625 m = 20 m; 8 px at 10 m = 80 m
        assert fused.shape == (4, 64, grid, grid)
    assert seen == {("hr",), ("s1", "s2")}
    rate = measure_loader(make_loader(MixedDataset(sources), StepBatchSampler([420, 30], None, 4, stop=8), 0), 4)
    assert rate.samples == 16 and rate.samples_per_s > 0
    with pytest.raises(ValueError, match="different modalities"):
        collate([sources[0].get(0), sources[1].get(0)])


@needs_data
def test_sources_without_georeference_take_the_spec_region() -> None:
    from pipeline.train.data import batch_region, build_sources
    from pipeline.train.sources import ChangePairSource, ImageFolderSource

    default = ImageFolderSource(DATA / "rsscn7", size=32)
    s = default.get(0, np.random.default_rng(0))
    assert s["region"].dtype == torch.int64 and int(s["region"]) == 15  # 16 regions: 15 = unknown location
    assert int(ImageFolderSource(DATA / "rsscn7", size=32, region=3).get(0)["region"]) == 3
    texas = ChangePairSource(DATA / "levir_cd", size=32, region=(-97.74, 30.27), num_regions=4097)
    assert int(texas.get(0, np.random.default_rng(0))["region"]) == 24 * 128 + 29  # sin 30.27 = 0.504, 82.26 deg
    with pytest.raises(ValueError, match="out of range"):
        ImageFolderSource(DATA / "rsscn7", size=32, region=16)
    # The spec's entries reach the sources; collate stacks the ids.
    data = [{"kind": "images", "path": str(DATA / "rsscn7"), "size": 32, "gsd": 0.625, "scale": (0.2, 1.0),
             "region": [14.5575, 45.8705]},
            {"kind": "bigearthnet", "path": str(DATA / "bigearthnet_v1"), "size": 8, "region": None}]  # fmt: skip
    (images, ben), _ = build_sources(data, num_regions=4097)
    batch = collate([images.get(i, np.random.default_rng(i)) for i in range(3)])
    assert torch.equal(batch_region(batch), torch.tensor([3525] * 3))
    assert torch.equal(collate([ben.get(0), ben.get(1)])["region"], torch.tensor([4096, 4096]))
    with pytest.raises(ValueError, match="no 'region'"):
        batch_region({"hr": batch["hr"]})


@needs_data
def test_georeferenced_bigearthnet_patch_uses_its_own_location(tmp_path: Path) -> None:
    import shutil

    import rasterio
    from affine import Affine

    from pipeline.train.sources import BigEarthNetSource, read_georef

    root = tmp_path / "ben"
    shutil.copytree(DATA / "bigearthnet_v1", root)
    patch = sorted(p.parent for p in root.glob("*/labels.json"))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(patch / "S2_10m.tif", "r+") as f:  # as in the original BigEarthNet: UTM, 10 m
            f.crs, f.transform = "EPSG:32633", Affine(10, 0, 465000, 0, -10, 5080200)
    read_georef.cache_clear()
    src = BigEarthNetSource(root, region=7, num_regions=4097)
    i = src.patches.index(patch)
    # Patch centre (465600, 5079600) in UTM 33N = lon 14.555, lat 45.872: the Slovenia cell.
    assert int(src.get(i)["region"]) == 3525
    other = next(k for k in range(len(src)) if k != i)
    assert int(src.get(other)["region"]) == 7  # no CRS: the spec's region
    crops = BigEarthNetSource(root, size=8, num_regions=200_000_001)  # ~1 km cells: the crop's centre decides
    ids = {int(crops.get(i, np.random.default_rng(s))["region"]) for s in range(40)}
    assert len(ids) >= 2
