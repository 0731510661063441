"""Shared fixtures: samkit and Meta's segment_anything with the same random weights, and the trained
test models (tests/trained_models.py), built once collection is done so that no test's timeout includes
training."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch

from samkit import build_model
from samkit.build import ENCODER_CONFIGS

from . import trained_models


def pytest_collection_finish(session: pytest.Session) -> None:
    """Train the models the selected tests need now, so that no test's timeout includes training."""
    trained_models.build_needed(session.config, session.items)


def perturbed_state(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Add noise to EVERY tensor: Meta zero-initialises pos_embed and rel_pos_*, and zeros hide bugs."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}


def meta_model(name: str):
    from segment_anything.build_sam import _build_sam

    dim, depth, heads, global_idx = ENCODER_CONFIGS[name]
    return _build_sam(
        encoder_embed_dim=dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        encoder_global_attn_indexes=global_idx,
    ).eval()


def model_pair(name: str, seed: int, scale: float = 0.1):
    """(samkit model, Meta model) holding identical random weights."""
    torch.manual_seed(seed)
    meta = meta_model(name)
    state = perturbed_state(meta.state_dict(), seed, scale)
    meta.load_state_dict(state)
    ours = build_model(name)
    ours.load_state_dict(state)
    return ours, meta


@pytest.fixture(scope="session")
def tiny_pair():
    return model_pair("vit_tiny", seed=3)


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    model = build_model("vit_tiny")
    model.load_state_dict(perturbed_state(model.state_dict(), seed=0))
    return model


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_tiny.pth"
    torch.save(tiny_model.state_dict(), path)
    return str(path)


SMALL_FRAME = 256


@pytest.fixture(scope="session")
def small_frame_checkpoint(tmp_path_factory) -> str:
    """A random vit_tiny built for 256x256 inputs (configs add ``model.image_size: SMALL_FRAME``).

    For tests of training mechanics (resume, several processes), which need no learned behaviour:
    16x fewer pixels than SAM's 1024 frame per image, per mask and per loss (a 3-step point-mode run
    15 -> 5 s on 2 cores). The learning tests keep the 1024 frame.
    """
    torch.manual_seed(0)
    model = build_model("vit_tiny", image_size=SMALL_FRAME)
    model.load_state_dict(perturbed_state(model.state_dict(), seed=0))
    path = tmp_path_factory.mktemp("ckpt256") / "sam_vit_tiny_256.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def shapes_model(request):
    """(samkit model, Meta model) holding a vit_tiny trained on generated shapes (tests/shapes.py).

    Trained before the first test runs (about 80 s on 2 CPU cores) and cached, keyed by the code it
    depends on (tests/trained_models.py); this only loads it.
    """
    folder = trained_models.model_dir(request.config, "shapes_model")
    ours = build_model("vit_tiny")
    ours.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    ours.eval()
    meta = meta_model("vit_tiny")
    meta.load_state_dict(ours.state_dict())
    return ours, meta


@pytest.fixture(scope="session")
def volume_box_model(request):
    """A vit_tiny trained with box prompts on generated CT-like slices (tests/volume_model.py), for
    slice propagation; built before the first test runs and cached."""
    folder = trained_models.model_dir(request.config, "volume_box_model")
    model = build_model("vit_tiny")
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture
def build_threads():
    """Runs the test with ``trained_models.BUILD_THREADS`` torch threads, as the trained models are
    built. For tests that fine-tune and assert what was learnt: float reductions depend on the thread
    count, and their margins were measured on 2 threads (with one thread, point fine-tuning left
    NoC@85 where it started while every mIoU still rose by 30+ points)."""
    before = torch.get_num_threads()
    torch.set_num_threads(trained_models.BUILD_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shapes_image() -> tuple[np.ndarray, np.ndarray]:
    """A generated shapes picture that training never saw: (HxWx3 uint8 image, KxHxW bool masks)."""
    from .shapes import make_shapes_image

    return make_shapes_image(np.random.default_rng(12345))


@pytest.fixture(scope="session")
def text_clip_model(request):
    """The save_pretrained folder of a tiny CLIP trained on the names and colours of generated shapes
    ("a red circle", ...; tests/text_models.py). Built before the first test runs and cached."""
    return trained_models.model_dir(request.config, "text_clip_model")


@pytest.fixture(scope="session")
def text_sam_model(request):
    """A folder with ``model.pt``, a vit_tiny text-prompt SAM (256 frame) trained by samkit's loop in
    text mode on generated named-shape images, and ``clip``, the tiny CLIP it was trained with
    (tests/text_models.py). Built before the first test runs and cached."""
    return trained_models.model_dir(request.config, "text_sam_model")


# ---------------------------------------------------------------------------------------------------
# A real browser for the web page tests (tests/test_serve_browser.py, tests/test_serve_webdecode.py).

CHROMIUM = "/usr/bin/chromium"
# Playwright adds --headless and a fresh temporary profile (--user-data-dir) itself.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt when missing; a failed install fails loudly."""
    if not os.path.exists(CHROMIUM):
        started = time.time()
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        steps = [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]]
        for step in steps:
            if shutil.which(step[0]) is None:
                pytest.fail(f"{CHROMIUM} is missing and {step[0]} is not available to install it")
            done = subprocess.run(step, capture_output=True, text=True, env=env, timeout=900)
            if done.returncode != 0:
                pytest.fail(f"installing chromium failed ({' '.join(step)}):\n{done.stderr[-2000:]}")
        print(f"installed chromium in {time.time() - started:.0f} s")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is still missing after apt-get install chromium")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        yield instance
        instance.close()
