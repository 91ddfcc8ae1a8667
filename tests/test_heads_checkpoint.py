"""Task heads and self-describing checkpoints."""

from __future__ import annotations

import pytest
import torch

from pipeline.modalities import BandMismatchError
from pipeline.model import ModalityInput, create_model
from pipeline.model.checkpoint import checkpoint_sha256, load_checkpoint, read_checkpoint, save_checkpoint
from pipeline.model.heads import build_task

MICRO = {"dims": (32, 64, 96, 128), "depths": (1, 1, 1, 1), "moe_blocks": 1, "fusion_dim": 64, "fusion_heads": 2}


def _inputs(seed: int = 0) -> dict[str, ModalityInput]:
    g = torch.Generator().manual_seed(seed)
    return {
        "s2": ModalityInput(torch.randn(2, 2, 10, 16, 16, generator=g), doy=torch.tensor([[10, 40], [100, 200]])),
        "hr": ModalityInput(torch.randn(2, 1, 3, 256, 256, generator=g), gsd=0.625),
    }


def test_checkpoint_round_trip_carries_bands_and_normalisation(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("skysense_v2_tiny", **MICRO).eval()
    path = tmp_path / "m.pt"
    sha = save_checkpoint(model, path, provenance={"weights": "test"})
    assert sha == checkpoint_sha256(path)
    loaded, meta = load_checkpoint(path)
    assert meta["provenance"] == {"weights": "test"} and meta["code_version"].startswith("skypipe")
    s2 = loaded.config.modality("s2")
    assert s2.bands[0] == "B02" and s2.units.startswith("L2A") and len(s2.mean) == 10
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(_inputs()), model(_inputs()))


def test_checkpoint_with_rgbn_hr_rejects_rgb_input(tmp_path) -> None:
    from pipeline.modalities import HR_RGBN, S1, S2

    model = create_model("skysense_v2_tiny", modalities=(HR_RGBN, S2, S1), **MICRO)
    save_checkpoint(model, tmp_path / "rgbn.pt")
    loaded, _ = load_checkpoint(tmp_path / "rgbn.pt")
    with pytest.raises(BandMismatchError, match=r"\['R', 'G', 'B', 'N'\], got 3 band"):
        loaded({"hr": ModalityInput(torch.randn(1, 1, 3, 64, 64), gsd=0.625)})


def test_bad_checkpoints_fail_clearly(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable skypipe checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"not a skypipe\.checkpoint/1 checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")


def test_task_heads_produce_grid_maps() -> None:
    torch.manual_seed(0)
    model = create_model("skysense_v2_tiny", **MICRO).eval()
    inputs = _inputs()
    with torch.no_grad():
        emb = build_task("embeddings", model)(inputs)
        seg = build_task("segmentation", model, num_classes=5)
        seg_out = seg.eval()(inputs)
        change = build_task("change", model).eval()
        same = change(inputs, inputs)
        diff = change(inputs, _inputs(seed=1))
    assert emb.shape == (2, 64, 16, 16)
    assert seg_out.shape == (2, 5, 16, 16) and seg.channel_names[0] == "class_0"
    assert same.shape == diff.shape == (2, 2, 16, 16)
    assert (same - diff).abs().max() > 1e-4
    # seeded random heads: the same seed builds the same head (resumed jobs give identical outputs)
    again = build_task("segmentation", model, num_classes=5)
    for a, b in zip(seg.head.parameters(), again.head.parameters()):
        torch.testing.assert_close(a, b)
        # before/after periods with different numbers of dates
        three_dates = {"s2": ModalityInput(torch.randn(2, 3, 10, 16, 16)), "hr": inputs["hr"]}
        assert change(inputs, three_dates).shape == (2, 2, 16, 16)
    with pytest.raises(ValueError, match="needs two inputs"):
        change(inputs)
    with pytest.raises(ValueError, match="unknown output kind"):
        build_task("detection", model)


def test_model_info_cli(capsys) -> None:
    from pipeline.cli import main

    assert main(["model", "info", "skysense_v2_huge"]) == 0
    out = capsys.readouterr().out
    assert "backbone (dense)" in out and "1.99" in out
