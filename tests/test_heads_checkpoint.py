"""Task heads and self-describing checkpoints."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.modalities import BandMismatchError
from pipeline.model import ModalityInput, create_model
from pipeline.model.checkpoint import (
    CheckpointError,
    checkpoint_sha256,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pipeline.model.heads import build_task

COMMITTED = Path(__file__).resolve().parents[1] / "checkpoints" / "skysense_v2_tiny_ssl.pt"
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


def _data_offset(data: bytes, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes start: after its local header (30 bytes + name + extra field)."""
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def test_corrupted_checkpoint_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    good = tmp_path / "good.pt"
    save_checkpoint(create_model("skysense_v2_tiny", **MICRO), good)
    data = good.read_bytes()
    with zipfile.ZipFile(good) as z:  # the largest tensor storage of the archive
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = _data_offset(data, info) + info.file_size // 2
    flipped = bytearray(data)
    flipped[start : start + 4] = bytes(b ^ 0xFF for b in flipped[start : start + 4])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(flipped))
    # torch.load alone takes it without complaint: one tensor is silently wrong
    silent = torch.load(bad, map_location="cpu", weights_only=True)["state_dict"]
    reference = torch.load(good, map_location="cpu", weights_only=True)["state_dict"]
    assert sum(not torch.equal(silent[k], reference[k]) for k in reference) == 1
    for read in (read_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match=r"corrupted \(CRC mismatch in '.*/data/\d+'\)") as err:
            read(bad)
        message = str(err.value)
        assert "\n" not in message and str(bad) in message and message.endswith("re-download or re-export it")
    assert isinstance(err.value, ValueError)
    read_checkpoint(good)  # the intact file still loads


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_checkpoint_is_refused(tmp_path, keep) -> None:
    torch.manual_seed(0)
    good = tmp_path / "good.pt"
    save_checkpoint(create_model("skysense_v2_tiny", **MICRO), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as err:
        read_checkpoint(cut)
    message = str(err.value)
    assert "\n" not in message and str(cut) in message and message.endswith("re-download or re-export it")


def test_committed_checkpoint_loads_strictly_with_unchanged_outputs() -> None:
    """The committed checkpoint still matches the architecture, and gives the outputs that the code before the stage
    blocks were injected (pipeline at 44adcd6, ``backbone.set_context_radius``) computes for it, in both attention
    contexts. A new committed checkpoint needs its values recorded with that code (``git worktree add`` 44adcd6)."""
    assert checkpoint_sha256(COMMITTED).startswith("d365469f383a"), "another committed checkpoint: re-record below"
    g = torch.Generator().manual_seed(0)
    inputs = {
        "s2": ModalityInput(torch.randn(1, 2, 10, 16, 16, generator=g), doy=torch.tensor([[30, 200]])),
        "s1": ModalityInput(torch.randn(1, 2, 2, 16, 16, generator=g), doy=torch.tensor([[31, 201]])),
        "hr": ModalityInput(torch.randn(1, 1, 3, 256, 256, generator=g), gsd=0.625),
    }
    recorded = {
        None: ([1.59263861, 0.80932236, 0.22848989, -1.73441422, -0.33071807, 0.05878937], 0.81068617),
        3: ([1.62392974, 0.65961903, 0.23114212, -1.6897409, -0.23750021, 0.07227901], 0.80754119),
    }
    for radius, (values, abs_mean) in recorded.items():
        model, _ = load_checkpoint(COMMITTED, strict=True, context_radius=radius)
        with torch.no_grad():
            fused = model(inputs)  # (1, 128, 16, 16)
        torch.testing.assert_close(fused[0, :6, 5, 7], torch.tensor(values), rtol=1e-4, atol=1e-5)
        assert abs(fused.abs().mean().item() - abs_mean) < 1e-5


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
    assert seg_out.shape == (2, 5, 256, 256) and seg.channel_names[0] == "class_0"  # at the HR input's resolution
    assert same.shape == diff.shape == (2, 2, 256, 256)
    assert (same - diff).abs().max() > 1e-4
    # seeded random heads: the same seed builds the same head (resumed jobs give identical outputs)
    again = build_task("segmentation", model, num_classes=5)
    for a, b in zip(seg.head.parameters(), again.head.parameters()):
        torch.testing.assert_close(a, b)
        # before/after periods with different numbers of dates
        three_dates = {"s2": ModalityInput(torch.randn(2, 3, 10, 16, 16)), "hr": inputs["hr"]}
        assert change(inputs, three_dates).shape == (2, 2, 256, 256)
    with pytest.raises(ValueError, match="needs two inputs"):
        change(inputs)
    with pytest.raises(ValueError, match="unknown output kind"):
        build_task("panoptic", model)  # (detection, once the example here, is a kind now)


def test_model_info_cli(capsys) -> None:
    from pipeline.cli import main

    assert main(["model", "info", "skysense_v2_huge"]) == 0
    out = capsys.readouterr().out
    assert "backbone (dense)" in out and "1.99" in out
