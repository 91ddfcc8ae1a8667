"""The fixed evaluation protocol: RSSCN7 split, zoom views, scoring and aggregation (``pipeline.eval.protocol``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import needs_shared, require

from pipeline.eval.protocol import (
    SHIFTED_ZOOMS,
    SPLIT_COUNTS,
    Features,
    ZoomedFolder,
    aggregate,
    format_table,
    pool_check,
    protocol_settings,
    score,
    split_rsscn7,
    zoom_image,
)

needs_rsscn7 = needs_shared("rsscn7")


def _listing(root: Path) -> dict[str, list[str]]:
    return {str(p.relative_to(root)): sorted(c.name for c in p.iterdir()) for p in sorted(root.glob("*/*"))}


@needs_rsscn7
def test_split_is_deterministic_disjoint_and_contiguous(tmp_path: Path) -> None:
    src = require("rsscn7")
    a = split_rsscn7(src, tmp_path / "a")
    split_rsscn7(src, tmp_path / "b")
    assert _listing(tmp_path / "a") == _listing(tmp_path / "b")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    for c in classes:
        files = sorted(p.name for p in (src / c).iterdir())
        parts = {k: sorted(p.name for p in (a[k] / c).iterdir()) for k in SPLIT_COUNTS}
        assert [len(parts[k]) for k in SPLIT_COUNTS] == list(SPLIT_COUNTS.values())
        assert parts["pool"] + parts["val"] + parts["test"] == files[: sum(SPLIT_COUNTS.values())]  # blocks in order
        assert not (set(parts["pool"]) & set(parts["val"]) or set(parts["val"]) & set(parts["test"]))
    link = next((a["test"] / classes[0]).iterdir())
    assert link.is_symlink() and link.resolve() == (src / classes[0] / link.name).resolve()
    assert json.loads((tmp_path / "a" / "split.json").read_text())["counts"] == SPLIT_COUNTS


@needs_rsscn7
def test_split_rerun_leaves_an_identical_split_untouched_and_repairs_others(tmp_path: Path) -> None:
    src = require("rsscn7")
    parts = split_rsscn7(src, tmp_path)
    cls = sorted(p.name for p in parts["pool"].iterdir())[0]
    inode = os.stat(parts["pool"] / cls, follow_symlinks=False).st_ino
    split_rsscn7(src, tmp_path)
    assert os.stat(parts["pool"] / cls, follow_symlinks=False).st_ino == inode  # same folder: not rewritten
    stray = parts["val"] / cls / "stray.jpg"
    os.symlink(next((src / cls).iterdir()), stray)
    split_rsscn7(src, tmp_path)
    assert not stray.exists()


@needs_rsscn7
def test_split_refuses_classes_too_small(tmp_path: Path) -> None:
    src = require("rsscn7")
    small = tmp_path / "small" / "aGrass"
    small.mkdir(parents=True)
    for f in sorted((src / "aGrass").iterdir())[:5]:
        os.symlink(f, small / f.name)
    with pytest.raises(ValueError, match="the split needs"):
        split_rsscn7(tmp_path / "small", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        split_rsscn7(tmp_path / "missing", tmp_path / "out")


def test_zoom_views_crop_the_centre_or_shrink_the_whole_image() -> None:
    img = torch.zeros(1, 3, 400, 400)
    img[..., 100:300, 100:300] = 1.0  # the centre half of the side
    one, two, half, three_q = (zoom_image(img, z) for z in (1.0, 2.0, 0.5, 0.75))
    assert one.shape[-2:] == two.shape[-2:] == (128, 128)
    assert half.shape[-2:] == (64, 64) and three_q.shape[-2:] == (96, 96)  # whole cells of 16 px at 0.625 m
    assert torch.allclose(two, torch.ones_like(two))  # 2x: only the centre half is left, filling the view
    assert one[0, 0, 64, 64].item() == pytest.approx(1.0) and one[0, 0, 5, 5].item() == pytest.approx(0.0)
    frac = lambda x: float((x > 0.5).float().mean())  # noqa: E731
    assert frac(one) == pytest.approx(0.25, abs=0.02) and frac(half) == pytest.approx(0.25, abs=0.03)
    wide = zoom_image(torch.rand(1, 3, 300, 400), 2.0)  # non-square: centre crop of half the shorter side
    assert wide.shape[-2:] == (128, 128)


@needs_rsscn7
def test_zoomed_folder_keeps_the_declared_gsd(tmp_path: Path) -> None:
    parts = split_rsscn7(require("rsscn7"), tmp_path)
    for z, px in ((1.0, 128), (0.5, 64), (2.0, 128)):
        src = ZoomedFolder(parts["test"], z)
        s = src.get(0)
        assert s["hr"]["x"].shape == (1, 3, px, px) and float(s["hr"]["gsd"]) == 0.625
        assert int(s["label"]) == 0 and len(src) == 7 * SPLIT_COUNTS["test"]


def _features(rng: np.random.Generator, noise: float) -> Features:
    centres = rng.normal(0, 1, (3, 8))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(3), n)
        return (centres[y] + noise * rng.normal(0, 1, (len(y), 8))).astype(np.float32), y

    ben_y = np.eye(3)[np.arange(12) % 3]
    ben_x = (ben_y @ rng.normal(0, 1, (3, 8)) + 0.01 * rng.normal(0, 1, (12, 8))).astype(np.float32)
    zooms = {z: draw(6) for z in (1.0, *SHIFTED_ZOOMS)}
    return Features(draw(10), zooms, (ben_x[:6], ben_y[:6]), (ben_x[6:], ben_y[6:]), ["a", "b", "c"])


def test_score_reports_every_metric_and_separable_features_score_one() -> None:
    r = score(_features(np.random.default_rng(0), 0.01), seed=0)
    assert r["rsscn7/knn/plain"] == 1.0 and r["rsscn7/linear/shifted"] == 1.0 and r["bigearthnet/map"] == 1.0
    kinds = ("plain", "shifted", "0.5x", "0.75x", "1.5x", "2x")
    expected = {f"rsscn7/{m}/{k}" for m in ("knn", "linear") for k in kinds}
    assert set(r) == expected | {"bigearthnet/map"}
    noisy = score(_features(np.random.default_rng(0), 3.0), seed=0, linear=False)
    assert "rsscn7/linear/plain" not in noisy and noisy["rsscn7/knn/plain"] < 1.0
    per_zoom = [noisy[f"rsscn7/knn/{z:g}x"] for z in SHIFTED_ZOOMS]
    assert noisy["rsscn7/knn/shifted"] == pytest.approx(np.mean(per_zoom))


def test_aggregate_gives_mean_and_range_and_refuses_mismatched_runs() -> None:
    agg = aggregate([{"m": 0.5, "n": 1.0}, {"m": 0.7, "n": 1.0}, {"m": 0.6, "n": 1.0}])
    assert agg["m"] == {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7, "values": [0.5, 0.7, 0.6]}
    assert agg["n"]["min"] == agg["n"]["max"] == 1.0
    with pytest.raises(ValueError, match="different metrics"):
        aggregate([{"m": 0.5}, {"n": 0.5}])
    with pytest.raises(ValueError):
        aggregate([])


def test_format_table_shows_the_baseline_difference() -> None:
    def result(v: float, split: str = "test") -> dict:
        return {"split": split, "protocol": protocol_settings(), "metrics": aggregate([{"rsscn7/knn/plain": v}])}

    text = format_table(result(0.75), result(0.6))
    row = next(line for line in text.splitlines() if line.startswith("RSSCN7 kNN, zoom 1"))
    assert "75.00" in row and "60.00" in row and row.endswith("+15.00")
    with pytest.raises(ValueError, match="another split"):
        format_table(result(0.75), result(0.6, "val"))


def test_pool_check_flags_held_out_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rsscn7, ben = root / "rsscn7", root / "bigearthnet_v1"
    parts = {k: tmp_path / "split" / k for k in SPLIT_COUNTS}
    old = {"data": [f"images:{rsscn7}", f"bigearthnet:{ben}", "cube:/x/cube.zarr"]}
    assert pool_check(old, rsscn7, parts, ben) == {"rsscn7": "leak", "bigearthnet": "leak"}
    new = {"data_spec": [{"kind": "images", "path": str(parts["pool"])},
                         {"kind": "bigearthnet", "path": str(ben), "split": "train"}]}  # fmt: skip
    assert pool_check(new, rsscn7, parts, ben) == {"rsscn7": "clean", "bigearthnet": "clean"}
    parent = {"data": [f"images:{root}"]}  # a folder above RSSCN7 holds its val/test images too
    assert pool_check(parent, rsscn7, parts, ben)["rsscn7"] == "leak"
    assert pool_check({}, rsscn7, parts, ben) == {"rsscn7": "unknown", "bigearthnet": "unknown"}


MICRO = json.dumps({"dims": [32, 32, 64, 64], "depths": [1, 1, 1, 1], "moe_blocks": 1, "num_experts": 2,
                    "fusion_dim": 64, "fusion_heads": 2})  # fmt: skip


@pytest.mark.slow  # ~10 s on an idle 2-core CPU: a micro model over 35 images x 5 zooms and 30 BigEarthNet patches
@needs_shared("bigearthnet_v1")
@needs_rsscn7
def test_protocol_cli_end_to_end_on_a_small_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import pipeline.eval.protocol as protocol
    from pipeline.cli import main

    monkeypatch.setattr(protocol, "SPLIT_COUNTS", {"pool": 3, "val": 1, "test": 1})  # 35 images instead of 420
    out, split_dir = tmp_path / "r.json", tmp_path / "split"
    args = ["eval", "protocol", "--random-init", "skysense_v2_tiny", "--overrides", MICRO, "--split", "val",
            "--seeds", "0,1", "--split-dir", str(split_dir), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["split"] == "val" and r["seeds"] == [0, 1]
    assert r["n"] == {"pool": 21, "eval": 7, "ben_fit": 10, "ben_eval": 10}
    assert len(r["metrics"]["rsscn7/knn/shifted"]["values"]) == 2 and 0 <= r["metrics"]["bigearthnet/map"]["mean"] <= 1
    text = capsys.readouterr().out
    assert "RSSCN7 kNN, shifted (0.5-2x)" in text and "pre-training data vs held-out images" in text
    assert main(["eval", "protocol", "--split-only", "--split-dir", str(tmp_path / "only")]) == 0
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["pool", "split.json", "test", "val"]
