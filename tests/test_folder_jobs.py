"""Folder jobs on many processes (issue 15, "many machines"): ``samkit amg`` and ``samkit embed`` under
torchrun with 2 gloo processes on the CPU write what one process writes, a rerun skips finished images
(a left-over temporary file does not count), the summary counts each image once, an error on one
process ends every process with the error printed once; ``samkit embed`` files load back into a
SamPredictor and into the server with the same masks as computing the embedding, and an embedding of
another model is refused with one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from samkit import build_model
from samkit.commands import folder_jobs
from samkit.predictor import SamPredictor
from samkit.utils.embeddings import EmbeddingError, load_embedding, set_embedding
from samkit.utils.image import load_image

ROOT = Path(__file__).resolve().parents[1]
# Bit-identical results need the same number of threads in every run (float sums depend on it).
ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
ENV.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
RELAXED = [
    "--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
    "--box-nms-thresh", "1",
]  # fmt: skip
NAMES = ["a", "b", "c", "d", "e"]


def samkit(*argv, processes: int = 1) -> subprocess.CompletedProcess:
    """``python -m samkit ...``, or the same under ``torchrun --standalone --nproc_per_node N``."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "samkit", *(str(a) for a in argv)]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory, tiny_checkpoint):
    """Five small pictures of different sizes (with shapes, so that masks differ), and the model flags."""
    folder = tmp_path_factory.mktemp("folder_job_images")
    rng = np.random.default_rng(15)
    for i, name in enumerate(NAMES):
        h, w = 48 + 8 * i, 64 + 4 * (4 - i)
        picture = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        picture[h // 4 : h // 2, w // 3 : 2 * w // 3] = (200, 40 + 30 * i, 90)
        Image.fromarray(picture).save(folder / f"{name}.png")
    model = ["--model-type", "vit_tiny", "--checkpoint", tiny_checkpoint]
    return SimpleNamespace(dir=folder, model=model, checkpoint=tiny_checkpoint)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_same_embeddings(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) == [f"{n}.pt" for n in NAMES]
    for name in names:
        x, y = (torch.load(d / name, weights_only=True) for d in (a, b))
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), (name, key)
            else:
                assert x[key] == y[key], (name, key)


# ------------------------------------------------------------------ sharing out the images


class FakeWorkers(folder_jobs.Workers):
    """Workers whose gather returns what every rank would pass (computed by the test)."""

    def __init__(self, rank, world_size, parts):
        super().__init__(rank=rank, world_size=world_size)
        self.parts = parts

    def all_gather(self, obj):
        return self.parts


def test_split_pending_agrees_on_every_rank_and_shares_each_image_once():
    items = [f"img{i:02d}" for i in range(11)]
    done = {"img01", "img04", "img05", "img09"}
    world = 3
    parts = [[i for i in range(r, len(items), world) if items[i] in done] for r in range(world)]
    results = [
        folder_jobs.split_pending(items, done.__contains__, FakeWorkers(r, world, parts))
        for r in range(world)
    ]
    pending = [i for i in items if i not in done]
    assert all(p == pending for p, _ in results)
    shares = [s for _, s in results]
    assert sorted(sum(shares, [])) == pending and max(map(len, shares)) - min(map(len, shares)) <= 1


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    import torch.distributed as dist

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    workers = folder_jobs.join()
    assert (workers.rank, workers.world_size, workers.distributed) == (0, 1, False)
    assert not dist.is_initialized()
    assert workers.all_gather("x") == ["x"]
    assert folder_jobs.process_device("cuda") == "cuda"


# ------------------------------------------------------------------ samkit embed


@pytest.fixture(scope="module")
def embedded(images, tmp_path_factory):
    """``samkit embed`` of the folder by one process, and by two under torchrun."""
    root = tmp_path_factory.mktemp("embed_runs")
    one = samkit("embed", "--input", images.dir, "--output", root / "one", *images.model)
    two = samkit("embed", "--input", images.dir, "--output", root / "two", *images.model, processes=2)
    return SimpleNamespace(one=one, two=two, dir_one=root / "one", dir_two=root / "two", root=root)


def test_embed_on_two_processes_equals_one_process(embedded):
    for run in (embedded.one, embedded.two):
        assert run.returncode == 0, run.stderr
        assert run.stdout.count("wrote the embeddings of 5 images") == 1, run.stdout
    assert_same_embeddings(embedded.dir_one, embedded.dir_two)
    assert [p.name for p in embedded.dir_two.glob(".*")] == []


def test_embed_rerun_skips_finished_images_and_redoes_a_partial_one(embedded, images):
    # An interrupted run leaves a hidden temporary file and no result: that image is done again.
    (embedded.dir_two / "c.pt").unlink()
    (embedded.dir_two / "e.pt").unlink()
    (embedded.dir_two / ".c.pt.tmp-0badf00d").write_bytes(b"half a file")
    again = samkit("embed", "--input", images.dir, "--output", embedded.dir_two, *images.model, processes=2)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipping 3 of 5 images") == 1
    assert again.stdout.count("wrote the embeddings of 2 images") == 1
    (embedded.dir_two / ".c.pt.tmp-0badf00d").unlink()
    assert_same_embeddings(embedded.dir_one, embedded.dir_two)


def test_embedding_file_gives_the_same_masks_as_computing_it(embedded, images, tiny_model):
    path = embedded.dir_one / "b.pt"
    record = load_embedding(path, tiny_model)
    image = load_image(images.dir / "b.png")
    assert record.original_size == image.shape[:2] and record.model_type == "vit_tiny"
    assert record.dtype == "float32" and record.image == "b.png"
    computed, loaded = SamPredictor(tiny_model), SamPredictor(tiny_model)
    computed.set_image(image)
    set_embedding(loaded, path)
    assert torch.equal(computed.features, loaded.features)
    assert (computed.original_size, computed.input_size) == (loaded.original_size, loaded.input_size)
    prompt = dict(point_coords=np.array([[30.0, 20.0]]), point_labels=np.array([1]), multimask_output=True)
    for a, b in zip(
        computed.predict(**prompt, return_logits=True), loaded.predict(**prompt, return_logits=True)
    ):
        np.testing.assert_array_equal(a, b)
    masks, _, _ = loaded.predict(box=np.array([5, 5, 40, 30]), multimask_output=False)
    assert masks.shape == (1, *image.shape[:2])


def test_embedding_of_another_model_is_refused_with_one_line(embedded):
    other = build_model("vit_tiny")  # other (random) weights
    with pytest.raises(EmbeddingError) as err:
        set_embedding(SamPredictor(other), embedded.dir_one / "a.pt")
    message = str(err.value)
    assert "\n" not in message and "another image encoder" in message and "samkit embed" in message
    with pytest.raises(EmbeddingError, match="not a samkit embedding file"):
        torch.save({"x": torch.zeros(1)}, embedded.root / "junk.pt")
        load_embedding(embedded.root / "junk.pt")


def test_server_opens_an_embedded_image_without_the_encoder(embedded, images, tiny_model):
    from samkit.serve.state import ModelService

    data = (images.dir / "d.png").read_bytes()
    plain = ModelService(tiny_model)
    fast = ModelService(tiny_model, embeddings=str(embedded.dir_one))
    assert len(fast.embeddings) == 5
    a, _ = plain.open_image(data, "d.png")
    b, _ = fast.open_image(data, "d.png")
    assert not a.precomputed and b.precomputed
    assert torch.equal(a.features, b.features) and a.input_size == b.input_size
    points, labels = np.array([[20.0, 30.0]]), np.array([1])
    ra = plain.predict(a, points, labels, None, None, True)
    rb = fast.predict(b, points, labels, None, None, True)
    assert ra["masks"] == rb["masks"] and ra["scores"] == rb["scores"]
    # Files of another model are left out of the index, not used.
    other = ModelService(build_model("vit_tiny"), embeddings=str(embedded.dir_one))
    assert len(other.embeddings) == 0 and other.embeddings.other_encoder == 5


# ------------------------------------------------------------------ samkit amg


@pytest.fixture(scope="module")
def amg_runs(images, tmp_path_factory):
    root = tmp_path_factory.mktemp("amg_runs")
    flags = [*images.model, *RELAXED, "--convert-to-rle"]
    one = samkit("amg", "--input", images.dir, "--output", root / "one", *flags)
    two = samkit("amg", "--input", images.dir, "--output", root / "two", *flags, processes=2)
    return SimpleNamespace(one=one, two=two, dir_one=root / "one", dir_two=root / "two", flags=flags)


def test_amg_on_two_processes_writes_the_same_files_as_one(amg_runs):
    for run in (amg_runs.one, amg_runs.two):
        assert run.returncode == 0, run.stderr
        assert run.stdout.count("wrote the results of 5 images") == 1, run.stdout
    one, two = files_of(amg_runs.dir_one), files_of(amg_runs.dir_two)
    assert sorted(one) == [f"{n}.json" for n in NAMES]
    assert one == two  # byte-identical, image ids included


def test_amg_rerun_on_two_processes_skips_finished_and_redoes_partial(amg_runs, images):
    out = amg_runs.dir_two
    (out / "a.json").unlink()
    (out / "d.json").unlink()
    (out / ".d.json.tmp-deadbeef").write_text('{"image": ')  # what a kill mid-write leaves
    again = samkit("amg", "--input", images.dir, "--output", out, *amg_runs.flags, processes=2)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipping 3 of 5 images") == 1
    assert again.stdout.count("wrote the results of 2 images") == 1
    (out / ".d.json.tmp-deadbeef").unlink()
    assert files_of(out) == files_of(amg_runs.dir_one)


def test_an_error_on_one_process_ends_every_process_and_is_printed_once(amg_runs, images, tmp_path):
    """The results of c.png cannot be written (a folder holds their name): the process that has c.png
    stops, the other finishes its images, both meet at the summary and end with status 1."""
    out = tmp_path / "out"
    (out / "c.json").mkdir(parents=True)
    (out / "c.json" / "keep").write_text("x")
    run = samkit("amg", "--input", images.dir, "--output", out, *amg_runs.flags, "--overwrite", processes=2)
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("cannot write the results of") == 1 and "c.png" in run.stderr
    assert "error: rank " in run.stderr
    # Shares: rank 0 a, c, e; rank 1 b, d. Rank 0 stops at c; rank 1 does all of its share.
    assert sorted(p.name for p in out.glob("*.json") if p.is_file()) == ["a.json", "b.json", "d.json"]


def test_unreadable_image_is_counted_once(images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.png").write_bytes((images.dir / f"{name}.png").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    run = samkit("embed", "--input", folder, "--output", tmp_path / "out", *images.model, processes=2)
    assert run.returncode == 1, run.stderr
    assert run.stdout.count("wrote the embeddings of 3 images") == 1
    assert run.stderr.count("1 of 4 images could not be read") == 1
    assert run.stderr.count("broken.png") == 1
