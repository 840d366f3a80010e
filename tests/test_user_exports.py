"""Issue 12 part 5: user exports and checkpoints behave like the zoo's.

* structure analysis does not depend on the wrapper's attribute names;
* a static-batch export is refused up front, saying how to re-export;
* files are recognised by content and named for what they are.
"""
from __future__ import annotations

import pytest
import torch

from bqc import frontend, ir
from bqc.errors import BqcError

diffusers = pytest.importorskip("diffusers")


def _tiny_unet2d():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    ).eval()


class _Wrapper(torch.nn.Module):
    """What users write to export a diffusers UNet: hold it under some name, return a tensor."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        *outer, last = path.split(".")
        holder = self
        for name in outer:  # e.g. model.diffusion_model: nested wrappers
            setattr(holder, name, torch.nn.Module())
            holder = getattr(holder, name)
        setattr(holder, last, _tiny_unet2d())

    def forward(self, x, t):
        m = self
        for name in self.path.split("."):
            m = getattr(m, name)
        return m(x, t).sample


def _export(module, *, dynamic=True):
    x, t = torch.randn(2, 3, 8, 8), torch.randint(0, 1000, (2,))
    b = torch.export.Dim("batch", max=63)
    dyn = {"x": {0: b}, "t": {0: b}} if dynamic else None
    with torch.no_grad():
        return torch.export.export(module, (x, t), dynamic_shapes=dyn)


def _binarydm(src):
    from bqc import report, transform as tf

    res = tf.transform(src, "binarydm")
    return res, report.cost_report(res.gm)


@pytest.fixture(scope="module")
def diffusers_reference(tmp_path_factory):
    """The same UNet loaded from its diffusers folder: what every export must match."""
    d = tmp_path_factory.mktemp("diffusers") / "unet"
    _tiny_unet2d().save_pretrained(d)
    res, rep = _binarydm(frontend.load_source(str(d)))
    return res, rep


@pytest.mark.parametrize("wrapper", ["unet", "net", "model.diffusion_model"])
def test_wrapper_name_does_not_change_structure(tmp_path, wrapper, diffusers_reference):
    path = tmp_path / "u.pt2"
    torch.export.save(_export(_Wrapper(wrapper).eval()), str(path))
    res, rep = _binarydm(frontend.load_source(str(path)))
    ref, ref_rep = diffusers_reference
    blocks = ir.graph_meta(res.gm)["blocks"]
    assert len(blocks) > 0
    assert [b["name"] for b in blocks] == [b["name"] for b in ir.graph_meta(ref.gm)["blocks"]]
    assert ir.graph_meta(res.gm)["skips"] == ir.graph_meta(ref.gm)["skips"]
    assert rep["size_mb"] == pytest.approx(ref_rep["size_mb"])
    assert rep["size_saving"] == pytest.approx(ref_rep["size_saving"])
    # module names are the user's model's own, without the wrapper's prefix
    mods = {r["module"] for r in ir.layers(res.gm)}
    assert "conv_in" in mods and not any(m.startswith(wrapper + ".") for m in mods)


def test_bidm_accepts_a_user_export(tmp_path):
    from bqc import transform as tf

    path = tmp_path / "u.pt2"
    torch.export.save(_export(_Wrapper("net").eval()), str(path))
    res = tf.transform(frontend.load_source(str(path)), "bidm")
    assert any(r["w_bits"] == 1 for r in res.layers)


def test_static_batch_export_is_refused_up_front(tmp_path):
    from bqc import transform as tf

    path = tmp_path / "static.pt2"
    torch.export.save(_export(_Wrapper("net").eval(), dynamic=False), str(path))
    src = frontend.load_source(str(path))  # loading/inspecting the file itself is fine
    with pytest.raises(BqcError, match="static batch size") as e:
        tf.transform(src, "binarydm")
    assert "Dim('batch')" in e.value.hint and "dynamic_shapes" in e.value.hint


# files recognised by content -----------------------------------------------------------------
def test_torchscript_file_is_named(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 1)), str(path))
    assert frontend.sniff_file(path) == "torchscript"
    with pytest.raises(BqcError, match="TorchScript") as e:
        frontend.load_source(str(path))
    assert "pickled Python object" not in str(e.value)


def test_pt2_named_pt_is_loaded_as_pt2(tmp_path):
    path = tmp_path / "model.pt"
    torch.export.save(_export(_Wrapper("net").eval()), str(path))
    assert frontend.sniff_file(path) == "pt2"
    src = frontend.load_source(str(path))
    assert src.kind == "pt2" and src.in_channels == 3


def test_safetensors_named_pt_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.pt"
    save_file({"w": torch.ones(2)}, str(path))
    assert frontend.sniff_file(path) == "safetensors"
    with pytest.raises(BqcError, match="safetensors weights file"):
        frontend.load_source(str(path))


def test_torch_save_module_is_named(tmp_path):
    path = tmp_path / "model.bin"
    torch.save(torch.nn.Conv2d(3, 3, 1), str(path))
    assert frontend.sniff_file(path) == "torch-save"
    with pytest.raises(BqcError, match="torch.save zip archive") as e:
        frontend.load_source(str(path))
    assert "--trust-pickle" in e.value.hint
