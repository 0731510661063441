"""Box-prompt fine-tuning end to end on generated COCO-format data with the tiny model.

What is checked: training raises mIoU far above zero-shot; two gloo processes equal one process with
the same global batch; a run killed with SIGKILL (or stopped with SIGTERM) and resumed ends with
bit-identical weights; the embedding cache gives the same losses; evaluation is the same in one or
two processes and every run; user mistakes stop with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from samkit import sam_model_registry
from samkit.training.checkpointing import latest_checkpoint
from samkit.training.config import config_from_dict
from samkit.training.evaluate import run as run_eval
from samkit.training.train import train

from .conftest import SMALL_FRAME
from .datagen import make_coco_dataset, make_coco_splits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco_splits(tmp_path_factory.mktemp("coco"), train_images=8, val_images=4)


def make_config(coco, work_dir, checkpoint, **overrides) -> dict:
    cfg = {
        "model": {"type": "vit_tiny", "checkpoint": checkpoint},
        "train_data": {
            "type": "coco",
            "data_dir": coco["train"][0],
            "annotation_path": coco["train"][1],
            "max_objects": 4,
            "num_workers": 0,
        },
        "eval_data": {
            "type": "coco",
            "data_dir": coco["val"][0],
            "annotation_path": coco["val"][1],
            "max_objects": 8,
            "num_workers": 0,
        },
        "optimizer": {"lr": 1e-3, "weight_decay": 1e-4},
        "scheduler": {"warmup_steps": 2, "decay": "cosine"},
        "work_dir": str(work_dir),
        "epochs": 2,
        "batch_size": 4,
        "amp": "off",
        "eval_every": 0,
        "log_every": 1,
        "tensorboard": False,
        "progress": False,
        "seed": 7,
    }
    return set_keys(cfg, overrides)


def set_keys(cfg: dict, overrides: dict) -> dict:
    """``cfg`` with each dotted key of ``overrides`` (``"model.image_size"``) set to its value, in place."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def losses_of(work_dir) -> list[float]:
    lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def final_state(work_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(work_dir) / "sam_final.pth", weights_only=True)


# Tolerance for runs that sum gradients in another order (2 processes vs 1): a real difference moves
# weights by ~lr (1e-3 here); float noise in a gradient near zero moved one weight in 65536 by 1.6e-6
# (text mode, an Intel Xeon with AMX).
SUMMATION_ATOL = 1e-5


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# Bit-identical results need the same number of threads in every run (float sums depend on it).
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=CLI_ENV, capture_output=True, text=True, timeout=600, **kwargs)


def torchrun(script: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N script args`` (a free port; gloo on this CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return run_cli([*command, script, *args])


# ---------------------------------------------------------------------------------------------------


def test_fine_tuning_raises_miou(shapes_model, build_threads, tmp_path):
    """Box fine-tuning of the shapes-trained tiny model (its decoder knows point prompts, never saw a
    box) for ~1 CPU minute in bf16 with the embedding cache, evaluated on held-out images.

    Measured: zero-shot mIoU ~0.3, after 24 epochs (96 steps) ~40 (lr 1e-3; 37 with lr 3e-4).
    """
    start = tmp_path / "shapes.pth"
    torch.save(shapes_model[0].state_dict(), start)
    train_dir, train_json = make_coco_dataset(tmp_path / "train", num_images=10, seed=1, size=(192, 256))
    val_dir, val_json = make_coco_dataset(
        tmp_path / "val", num_images=5, seed=2, size=(192, 256), split="val"
    )
    data = {"train": (str(train_dir), str(train_json)), "val": (str(val_dir), str(val_json))}
    cfg = make_config(
        data,
        tmp_path / "run",
        str(start),
        epochs=24,
        batch_size=2,
        amp="bf16",
        cache_embeddings=True,
        eval_every=12,
        log_every=4,
        **{"train_data.max_objects": 2, "scheduler.warmup_steps": 3},
    )
    zero = run_eval(config_from_dict({**cfg, "work_dir": str(tmp_path / "zero")}))
    result = train(config_from_dict(cfg))
    final = str(tmp_path / "run" / "sam_final.pth")
    tuned = run_eval(config_from_dict({**cfg, "model": {**cfg["model"], "checkpoint": final}}))
    print("zero-shot", zero, "fine-tuned", tuned)
    assert zero["objects_1024"] == tuned["objects_1024"] > 10
    assert tuned["miou_1024"] > zero["miou_1024"] + 25
    assert tuned["miou_original"] > zero["miou_original"] + 25
    for key in ("miou_1024", "miou_original", "dice_1024", "dice_original"):  # eval during training agrees
        assert result["eval"][key] == pytest.approx(tuned[key], abs=1e-6)
    losses = losses_of(tmp_path / "run")
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    assert result["cache"]["hits"] > 0


def test_embedding_cache_gives_the_same_losses(coco, small_frame_checkpoint, tmp_path):
    small = {"batch_size": 2, "model.image_size": SMALL_FRAME}
    plain = train(config_from_dict(make_config(coco, tmp_path / "plain", small_frame_checkpoint, **small)))
    cached_cfg = make_config(
        coco, tmp_path / "cached", small_frame_checkpoint, cache_embeddings=True, **small
    )
    cached = train(config_from_dict(cached_cfg))
    assert losses_of(tmp_path / "plain") == losses_of(tmp_path / "cached")
    assert cached["cache"] == {"hits": 6, "misses": 6}  # 6 usable images: epoch 2 reads epoch 1's
    assert plain["step"] == cached["step"] == 6
    assert_same_weights(final_state(tmp_path / "plain"), final_state(tmp_path / "cached"))


def test_outputs_load_with_the_registry(coco, tiny_checkpoint, tmp_path):
    train(config_from_dict(make_config(coco, tmp_path / "run", tiny_checkpoint, epochs=1)))
    final = tmp_path / "run" / "sam_final.pth"
    full = latest_checkpoint(str(tmp_path / "run"))
    for path in (final, full):
        model = sam_model_registry["vit_tiny"](checkpoint=str(path))
        assert_same_weights(model.state_dict(), final_state(tmp_path / "run"))
    # Only the decoder trained: the encoders are exactly the starting weights.
    start = torch.load(tiny_checkpoint, weights_only=True)
    end = final_state(tmp_path / "run")
    assert all(torch.equal(start[k], end[k]) for k in start if not k.startswith("mask_decoder."))
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("mask_decoder."))


@pytest.fixture(scope="module")
def uninterrupted(coco, small_frame_checkpoint, tmp_path_factory):
    """(config, work_dir) of a 3-epoch, 9-step command-line run that nothing interrupts (256 frame)."""
    tmp = tmp_path_factory.mktemp("whole")
    base = make_config(coco, tmp / "whole", small_frame_checkpoint, save_every_steps=1, batch_size=2, epochs=3,
                       **{"model.image_size": SMALL_FRAME})  # fmt: skip
    whole = run_cli([sys.executable, "train.py", "-c", write_config(tmp, base, "whole.yaml")])
    assert whole.returncode == 0, whole.stderr
    return base, tmp / "whole"


def test_kill_and_resume_is_bit_identical(uninterrupted, tmp_path):
    """SIGKILL mid-epoch, resume=auto: the same final weights as an uninterrupted run."""
    base, whole_dir = uninterrupted

    cfg = write_config(tmp_path, {**base, "work_dir": str(tmp_path / "killed")}, "killed.yaml")
    proc = subprocess.Popen(
        [sys.executable, "train.py", "-c", cfg],
        cwd=ROOT,
        env=CLI_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    target = tmp_path / "killed" / "checkpoints" / "step_00000002.pt"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists()
    state = torch.load(latest_checkpoint(str(tmp_path / "killed")), weights_only=True)
    killed_at = state["step"]
    assert 0 < killed_at < 9 and not (tmp_path / "killed" / "sam_final.pth").exists()
    resumed = run_cli([sys.executable, "train.py", "-c", cfg, "-o", "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_same_weights(final_state(whole_dir), final_state(tmp_path / "killed"))
    # The loss curve continues exactly where the killed run stopped.
    assert losses_of(tmp_path / "killed")[-9 + killed_at :] == losses_of(whole_dir)[killed_at:]


def test_sigterm_saves_then_resume_finishes_the_same(uninterrupted, tmp_path):
    base, whole_dir = uninterrupted
    cfg = write_config(tmp_path, {**base, "work_dir": str(tmp_path / "term"), "save_every_steps": 0})
    proc = subprocess.Popen(
        [sys.executable, "train.py", "-c", cfg],
        cwd=ROOT,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while (
        (not metrics.exists() or not metrics.read_text().strip())
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "SIGTERM: saved" in out and "resume=auto" in out
    assert latest_checkpoint(str(tmp_path / "term")) is not None
    assert not (tmp_path / "term" / "sam_final.pth").exists()
    resumed = run_cli([sys.executable, "train.py", "-c", cfg, "-o", "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(final_state(whole_dir), final_state(tmp_path / "term"))


def test_two_processes_equal_one(coco, small_frame_checkpoint, tmp_path):
    """torchrun with 2 gloo processes, batch 4 (2 each) == one process with batch 4 (256 frame)."""
    # Adam's first step moves every weight by ~lr * sign(gradient). Some gradients are zero in exact
    # arithmetic (a key bias under softmax) and float noise in practice, whose sign differs with the
    # summation order; a larger eps makes such updates vanish so the comparison measures real ones.
    base = make_config(coco, tmp_path / "one", small_frame_checkpoint, epochs=1,
                       **{"optimizer.eps": 1e-3, "model.image_size": SMALL_FRAME})  # fmt: skip
    train(config_from_dict(base))
    cfg = write_config(tmp_path, {**base, "work_dir": str(tmp_path / "two")})
    two = torchrun("train.py", "-c", cfg)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_weights(final_state(tmp_path / "one"), final_state(tmp_path / "two"), atol=SUMMATION_ATOL)
    one_losses, two_losses = losses_of(tmp_path / "one"), losses_of(tmp_path / "two")
    assert len(one_losses) == len(two_losses) == 1
    assert two_losses == pytest.approx(one_losses, rel=1e-5)

    # Evaluation: two processes, the same numbers as one; and the same every run.
    out1, out2 = tmp_path / "eval1.json", tmp_path / "eval2.json"
    one = run_cli([sys.executable, "eval.py", "-c", cfg, "-o", f"eval_output={out1}"])
    assert one.returncode == 0, one.stderr
    two = torchrun("eval.py", "-c", cfg, "-o", f"eval_output={out2}")
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert r1["processes"] == 1 and r2["processes"] == 2
    for key in ("miou_1024", "dice_1024", "miou_original", "dice_original"):
        assert r1[key] == pytest.approx(r2[key], abs=1e-9), key
    assert "miou_1024" in one.stdout


def test_command_line_mistakes(coco, tiny_checkpoint, tmp_path, capsys):
    from samkit.commands.train import main

    good = make_config(coco, tmp_path / "run", tiny_checkpoint, epochs=1)
    cfg = write_config(tmp_path, good)
    cases = [
        (["-o", "optimizer.lrr=1"], "optimizer.lrr"),
        (["-o", "epochs=two"], "epochs"),
        (["-o", "train_data.data_dir=/no/such/dir"], "/no/such/dir"),
        (["-o", "model.checkpoint=/no/such.pth"], "/no/such.pth"),
        (["-o", "batch_size=64"], "batch_size"),
        (["-o", "model.freeze=[image_encodr]"], "image_encodr"),
        (["--bogus"], "--bogus"),
    ]
    for extra, needle in cases:
        assert main(["-c", cfg, *extra]) == 2, extra
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), (extra, err)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # From the command line: one line, no traceback.
    missing = run_cli([sys.executable, "train.py", "-c", str(tmp_path / "nope.yaml")])
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr and "Traceback" not in missing.stderr
    # A finished run's folder is not overwritten by accident.
    train(config_from_dict(good))
    assert main(["-c", cfg]) == 2
    assert "resume=auto" in capsys.readouterr().err


def test_shipped_flare_recipe_runs_on_preprocessed_nifti(small_frame_checkpoint, tmp_path):
    """The seed's FLARE path end to end: NIfTI volumes -> scripts/preprocess_CT_MR_dataset.py ->
    configs/flare_box_finetune.yaml with the paths and a small model (vit_tiny, 256 frame) given by
    -o -> eval.py."""
    from .nifti_gen import make_flare_nifti

    raw = make_flare_nifti(tmp_path / "FLARE22Train", num_cases=5, shape=(48, 48, 11))
    out = tmp_path / "processed"
    prep = run_cli(
        [
            sys.executable,
            "scripts/preprocess_CT_MR_dataset.py",
            "--input-dir",
            str(raw),
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert prep.returncode == 0, prep.stderr
    overrides = [
        "model.type=vit_tiny",
        f"model.checkpoint={small_frame_checkpoint}",
        f"model.image_size={SMALL_FRAME}",
        f"train_data.data_dir={out / 'train'}",
        f"eval_data.data_dir={out / 'val'}",
        f"work_dir={tmp_path / 'run'}",
        "train_data.num_workers=1",
        "eval_data.num_workers=0",
        "train_data.max_images=4",
        "eval_data.max_images=2",
        "epochs=1",
        "batch_size=2",
        "amp=off",
        "progress=false",
    ]
    result = run_cli([sys.executable, "train.py", "-c", "configs/flare_box_finetune.yaml", "-o", *overrides])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eval after epoch 1" in result.stdout
    assert (tmp_path / "run" / "sam_final.pth").exists() and (tmp_path / "run" / "tensorboard").is_dir()
    final = str(tmp_path / "run" / "sam_final.pth")
    scores = []
    for _ in range(2):  # the jittered boxes are seeded: the same checkpoint gets the same mIoU
        ev = run_cli(
            [
                sys.executable,
                "eval.py",
                "-c",
                "configs/flare_box_finetune.yaml",
                "-o",
                *overrides,
                f"model.checkpoint={final}",
            ]
        )
        assert ev.returncode == 0, ev.stderr[-2000:]
        scores.append(json.loads((tmp_path / "run" / "eval_sam_final.json").read_text()))
    assert scores[0]["miou_1024"] == scores[1]["miou_1024"] and scores[0]["objects_1024"] > 0


def test_shipped_sa1b_recipe_runs(tiny_checkpoint, tmp_path):
    from .datagen import make_sa1b_dataset

    data = make_sa1b_dataset(tmp_path, num_images=4)
    result = run_cli(
        [
            sys.executable,
            "train.py",
            "-c",
            "configs/sa1b_box_finetune.yaml",
            "-o",
            "model.type=vit_tiny",
            f"model.checkpoint={tiny_checkpoint}",
            f"train_data.data_dir={data}",
            "train_data.min_area=100",
            "train_data.num_workers=0",
            f"work_dir={tmp_path / 'run'}",
            "epochs=1",
            "batch_size=2",
            "amp=bf16",
            "log_every=1",
            "progress=false",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "amp bf16" in result.stdout and "step 1: loss" in result.stdout
    assert sam_model_registry["vit_tiny"](checkpoint=str(tmp_path / "run" / "sam_final.pth")) is not None
