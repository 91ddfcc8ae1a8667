"""Training checkpoints: self-describing student + resumable state, pruning, teacher export, fsspec storage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shared_data import needs_shared, shared_path

from pipeline.model import create_model
from pipeline.model.checkpoint import load_checkpoint

MICRO = {"dims": (32, 32, 64, 64), "depths": (1, 1, 1, 1), "moe_blocks": 1, "num_experts": 2, "fusion_dim": 64,
         "fusion_heads": 2}  # fmt: skip


def _meta():
    from pipeline.model import ModalityInput
    from pipeline.ssl import SSLMetaArch, param_groups

    torch.manual_seed(0)
    student = create_model("skysense_v2_tiny", **MICRO)
    meta = SSLMetaArch(student, proj_dim=16, head_hidden_dim=32, num_queries=2, max_pixels=32)
    opt = torch.optim.AdamW(param_groups(meta, lr=1e-3, weight_decay=0.04), lr=1e-3)
    out = meta({"hr": ModalityInput(torch.randn(2, 1, 3, 64, 64), gsd=0.625)})
    out["loss"].backward()
    opt.step()
    meta.update_teacher(0.5)
    return meta, student, opt


@pytest.mark.parametrize("storage", ["local", "memory://ckpt-test"])
def test_save_load_restore_prune_export(tmp_path: Path, storage: str) -> None:
    from pipeline.train.state import (
        export_model,
        gather_state,
        latest_checkpoint,
        list_checkpoints,
        load_training_checkpoint,
        module_prefix,
        restore,
        save_training_checkpoint,
    )

    root = str(tmp_path / "run") if storage == "local" else storage
    meta, student, opt = _meta()
    prefix = module_prefix(meta, student)
    assert prefix == "student_modules.model"
    msd, osd = gather_state(meta, opt)
    for step in (10, 20, 30):
        save_training_checkpoint(root, step, student.config, msd, osd, prefix, {"data_position": step}, keep=2)
    assert [s for s, _ in list_checkpoints(root)] == [20, 30]
    path = latest_checkpoint(root)
    assert path is not None and path.endswith("step_0000030.pt")

    state, optim, extra = load_training_checkpoint(path)
    assert extra["step"] == 30 and extra["data_position"] == 30 and set(state) == set(msd)
    torch.manual_seed(1)
    from pipeline.ssl import SSLMetaArch, param_groups

    fresh = SSLMetaArch(create_model("skysense_v2_tiny", **MICRO), proj_dim=16, head_hidden_dim=32, num_queries=2)
    fopt = torch.optim.AdamW(param_groups(fresh, lr=1e-3, weight_decay=0.04), lr=1e-3)
    restore(fresh, fopt, state, optim)
    for k, v in meta.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    a, b = opt.state_dict()["state"], fopt.state_dict()["state"]
    assert len(a) == len(b) and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)

    if storage == "local":  # the student part opens as a plain model; the teacher exports as one
        model, payload = load_checkpoint(path)
        torch.testing.assert_close(model.state_dict(), student.state_dict())
        assert payload["extra"]["step"] == 30
        out = str(tmp_path / "teacher.pt")
        export_model(path, out, which="teacher")
        teacher, info = load_checkpoint(out)
        torch.testing.assert_close(teacher.state_dict(), meta.teacher_modules.model.state_dict())
        assert info["provenance"]["weights"] == "teacher" and "extra" in info
        w = "backbone.tokenizers.hr.proj.weight"
        assert not torch.equal(teacher.state_dict()[w], student.state_dict()[w])
        with pytest.raises(ValueError, match="teacher"):
            export_model(path, out, which="ema")


DATA = shared_path()


@pytest.mark.slow
@needs_shared("rsscn7")
def test_run_loop_resume_is_exact_with_a_modality_first_seen_after_resume(tmp_path: Path) -> None:
    """Single process: HR batches until the checkpoint, then S1+S2 batches whose tokenizers have no AdamW state."""
    from pipeline.train.loop import run_loop
    from pipeline.train.monitor import read_metrics
    from pipeline.train.spec import PretrainSpec
    from pipeline.train.state import list_checkpoints

    def spec(storage: Path) -> PretrainSpec:
        return PretrainSpec.model_validate({
            "model": {"name": "skysense_v2_tiny", "overrides": MICRO},
            "data": [{"kind": "images", "path": str(DATA / "rsscn7"), "size": 64},
                     {"kind": "bigearthnet", "path": str(DATA / "bigearthnet_v1"), "size": 8, "weight": 0.5}],
            "ssl": {"options": {"proj_dim": 16, "head_hidden_dim": 32, "num_queries": 2, "max_pixels": 32},
                    "augment": {"num_local": 1}},
            "steps": 6, "batch_size": 4, "loader_workers": 0, "storage": str(storage), "checkpoint_every": 2,
            "keep_checkpoints": 3, "seed": 3, "optim": {"lr": 1e-3, "warmup_steps": 1},
        })  # fmt: skip

    run_loop(spec(tmp_path / "ref"), progress=False)
    interrupted = spec(tmp_path / "int")
    run_loop(interrupted, progress=False)
    for step, path in list_checkpoints(interrupted.storage):
        if step > 4:
            Path(path).unlink()  # as if killed after the step-4 checkpoint
    result = run_loop(interrupted, progress=False)
    assert result["resumed_from"] == 4
    ref = {m["step"]: m["loss"] for m in read_metrics(str(tmp_path / "ref"))}
    got = {m["step"]: m["loss"] for m in read_metrics(interrupted.storage)}
    assert ref == got  # bit-identical, including the S1+S2 step 5 (first use of their tokenizers)
    assert got[5] > 2 * got[4]  # step 5 is indeed the cross-modal S1+S2 batch (larger MGCL terms)
