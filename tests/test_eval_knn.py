"""kNN / linear-probe maths and the ``skypipe eval`` commands end to end on real RSSCN7 and BigEarthNet samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shared_data import needs_shared, shared_path

from pipeline.eval.knn import knn_accuracy, knn_predict
from pipeline.eval.linear import linear_probe, multilabel_probe

DATA = shared_path()
needs_data = needs_shared("rsscn7")
MICRO = json.dumps({"dims": [32, 32, 64, 64], "depths": [1, 1, 1, 1], "moe_blocks": 1, "num_experts": 2,
                    "fusion_dim": 64, "fusion_heads": 2})  # fmt: skip


def test_weighted_knn_follows_similarity_not_counts() -> None:
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    y = np.array([0, 0, 1, 1, 1])
    q = np.array([[1.0, 0.05]])
    assert knn_predict(train, y, q, k=5, temperature=None)[0] == 1  # majority of 5: three votes for class 1
    assert knn_predict(train, y, q, k=5, temperature=0.07)[0] == 0  # exp(sim / T): two very close neighbours win
    assert knn_predict(train, y, q, k=1)[0] == 0
    r = knn_accuracy(train, y, train, y, k=1)
    assert r.accuracy == 1.0 and r.per_class == {"0": 1.0, "1": 1.0}


def test_linear_and_multilabel_probes_separate_separable_data() -> None:
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (30, 5)), rng.normal(4, 1, (30, 5))]
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    assert linear_probe(x[::2], y[::2], x[1::2], y[1::2]).accuracy == 1.0
    yy = np.c_[y, 1 - y, np.zeros(60)]  # third class never positive: left out of the mean
    r = multilabel_probe(x[::2], yy[::2], x[1::2], yy[1::2], ["a", "b", "c"])
    assert r.classes_scored == 2 and r.mAP == pytest.approx(1.0)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pipeline.eval.features import split_class_folders

    return split_class_folders(DATA / "rsscn7", tmp_path_factory.mktemp("rsscn7"), n_train=4, n_test=2)


@needs_data
def test_split_class_folders_by_name_order(split: dict) -> None:
    train, test = Path(split["train"]), Path(split["test"])
    assert sorted(p.name for p in train.iterdir()) == sorted(p.name for p in (DATA / "rsscn7").iterdir() if p.is_dir())
    names = sorted(p.name for p in (train / "aGrass").iterdir())
    assert names == ["a001.jpg", "a002.jpg", "a003.jpg", "a004.jpg"]
    assert sorted(p.name for p in (test / "aGrass").iterdir()) == ["a005.jpg", "a006.jpg"]
    assert (train / "aGrass" / "a001.jpg").is_symlink()


@needs_data
@pytest.mark.parametrize("command", ["knn", "linear"])
def test_eval_cli_prints_accuracy_last(split: dict, command: str, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    args = ["eval", command, "--random-init", "skysense_v2_tiny", "--overrides", MICRO, "--modality", "hr",
            "--train", split["train"], "--test", split["test"], "--size", "32"]  # fmt: skip
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("accuracy ") and 0.0 <= float(last.split()[-1]) <= 1.0


@needs_data
def test_eval_cli_checkpoint_and_errors(split: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    ckpt = tmp_path / "m.pt"
    assert main(["model", "init", "skysense_v2_tiny", "--out", str(ckpt), "--overrides", MICRO]) == 0
    base = ["eval", "knn", "--train", split["train"], "--test", split["test"], "--size", "32"]
    assert main([*base, "--checkpoint", str(ckpt), "--feature", "both"]) == 0
    with_ckpt = float(capsys.readouterr().out.strip().splitlines()[-1].split()[-1])
    assert main([*base, "--random-init", "skysense_v2_tiny", "--overrides", MICRO, "--feature", "both"]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split()[-1]) == with_ckpt  # same seed-0 weights
    assert main([*base, "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err


@needs_data
def test_bigearthnet_multilabel_eval(capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    args = ["eval", "bigearthnet", "--random-init", "skysense_v2_tiny", "--overrides", MICRO,
            "--data", str(DATA / "bigearthnet_v1"), "--size", "8"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "train+val 20 / test 10" in out[-4] and out[-1].startswith("mAP ")
    assert 0.0 < float(out[-1].split()[-1]) <= 1.0
