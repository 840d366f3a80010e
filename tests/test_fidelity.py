"""Fidelity options of issue 11 (METHODS §11): residual projections as a role of their own, BiDM's
1x1-conv shortcut, the recipes' [train] table (EBB switch, per-recipe lr), divergence detection,
the reference code's SPD/LRM forms, and the sampler's eta on the command line."""
from __future__ import annotations

import json

import pytest
import torch

from bqc import frontend, ir, transform as tf
from bqc.errors import BqcError
from bqc.pipeline import load_recipe
from bqc.report import cost_report


@pytest.fixture(scope="module")
def mnist16():
    return frontend.load_source("mnist16")


def _layers(gm, role):
    return [n for n in gm.graph.nodes if ir.info(n).get("role") == role and ir.info(n).get("kind") in ir.WEIGHTED_KINDS]


def test_residual_projections_found_by_structure(mnist16):
    """Every openaimodel ``skip_connection`` conv (and nothing else) gets role res-proj."""
    gm = tf.transform(mnist16, "fp").gm
    found = sorted(ir.info(n)["module"] for n in _layers(gm, "res-proj"))
    assert len(found) == 10 and all(m.endswith("skip_connection") for m in found)
    # attention proj_out and the main-path convs are not residual projections
    assert not any("proj_out" in m or "in_layers" in m or "out_layers" in m for m in found)
    assert all(ir.info(n)["place"] in ("head", "body", "tail") for n in _layers(gm, "res-proj"))


def test_residual_projections_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    m = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                              layers_per_block=1, norm_num_groups=4,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    m.save_pretrained(tmp_path / "unet")
    gm = tf.transform(frontend.load_source(str(tmp_path / "unet")), "fp").gm
    found = [ir.info(n)["module"] for n in _layers(gm, "res-proj")]
    assert found and all(x.endswith("conv_shortcut") for x in found)
    n_shortcuts = sum(1 for name, _ in m.named_modules() if name.endswith("conv_shortcut"))
    assert len(found) == n_shortcuts


def test_recipes_state_residual_precision(mnist16):
    """bidm keeps them FP (as its code), binarydm binarizes them (as its code); the report
    counts them as a role of their own; --bits still overrides."""
    bidm = tf.transform(mnist16, "bidm").gm
    bdm = tf.transform(mnist16, "binarydm").gm
    assert all(ir.info(n)["w_bits"] == 32 for n in _layers(bidm, "res-proj"))
    assert all(ir.info(n)["w_bits"] == 1 for n in _layers(bdm, "res-proj"))
    # EBB still reaches the head/tail residual projections of binarydm (their place decides)
    tail = [n for n in _layers(bdm, "res-proj") if ir.info(n)["place"] == "tail"]
    assert tail and all(ir.info(n)["plan"]["weight"] == "ebb" for n in tail)
    rep = cost_report(bidm)
    assert rep["by_role"]["res-proj"]["layers"] == 10
    forced = tf.transform(mnist16, "bidm", bits=("*skip_connection=1/1",)).gm
    assert all(ir.info(n)["w_bits"] == 1 for n in _layers(forced, "res-proj"))
    assert cost_report(forced)["size_mb"] < rep["size_mb"]


def test_shortcut_conv_form_costs_more_and_folds(tmp_path, mnist16):
    """BiDM's reference shortcut (a real 1x1 conv where channels change) next to pooling: the
    report shows both sizes, and the deploy graph folds it to the same outputs."""
    toml = tmp_path / "bidm-conv.toml"
    toml.write_text('extends = "bidm"\nname = "bidm-conv"\n[options.plan_quant]\n'
                    'body = { weight = "bidm", act = "bidm", kmap = "learned", shortcut = "scaled-conv" }\n')
    pool = tf.transform(mnist16, "bidm").gm
    conv = tf.transform(mnist16, str(toml)).gm
    projs = [m for m in conv.modules() if getattr(m, "kind", "") == "shortcut" and getattr(m, "proj", None) is not None]
    assert projs, "no channel-changing binary conv got a 1x1 projection"
    assert cost_report(conv)["size_mb"] > cost_report(pool)["size_mb"]
    from bqc.deploy import to_deploy
    from bqc.graph import BqcModel

    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    student = BqcModel(conv).eval()
    with torch.no_grad():
        ref = student(x, t)[0]
        dep = to_deploy(conv)
        got = BqcModel(dep).eval()(x, t)[0]
    assert torch.allclose(ref, got, atol=1e-3, rtol=1e-3)


def test_train_table_is_validated(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "binarydm"\n[train]\nebb_swtich = 0.5\n')
    with pytest.raises(BqcError, match="ebb_switch"):
        load_recipe(str(bad))
    bad.write_text('extends = "bidm"\n[train]\ntbs_gap = "sometimes"\n')
    with pytest.raises(BqcError, match="tbs_gap"):
        load_recipe(str(bad))
    assert load_recipe("binarydm").train["ebb_switch"] == 0.5  # half of training, as the paper


def test_recipe_hyperparameters_resolve(tmp_path):
    from bqc.train.qat import QATOptions, resolved_hparams, tbs_gap
    from bqc.diffusion.schedule import NoiseSchedule

    train = {"lr": 2e-4, "weight_decay": 0.01}
    assert resolved_hparams(train, QATOptions(steps=1)) == {"lr": 2e-4, "weight_decay": 0.01, "grad_clip": 1.0}
    assert resolved_hparams(train, QATOptions(steps=1, lr=5e-5))["lr"] == 5e-5  # the command line wins
    assert resolved_hparams({}, QATOptions(steps=1))["lr"] == 1e-4
    # the lr schedule: the recipe's, overridden by the command line; absent when constant (old runs resume)
    cos = {"lr": 1e-4, "lr_schedule": "cosine", "min_lr_ratio": 0.1}
    assert resolved_hparams(cos, QATOptions(steps=1)) == {**cos, "weight_decay": 0.0, "grad_clip": 1.0}
    assert "lr_schedule" not in resolved_hparams(cos, QATOptions(steps=1, lr_schedule="constant"))
    assert resolved_hparams({}, QATOptions(steps=1, lr_schedule="cosine"))["min_lr_ratio"] == 0.0
    with pytest.raises(BqcError, match="lr schedule"):
        resolved_hparams({}, QATOptions(steps=1, lr_schedule="step"))
    with pytest.raises(BqcError, match="min lr ratio"):
        resolved_hparams(cos, QATOptions(steps=1, min_lr_ratio=2.0))
    with pytest.raises(BqcError, match="min lr ratio"):  # out of range whatever the schedule
        resolved_hparams({}, QATOptions(steps=1, min_lr_ratio=-0.5))
    with pytest.raises(BqcError, match="schedule is constant"):  # given, but a constant schedule would ignore it
        resolved_hparams({}, QATOptions(steps=1, min_lr_ratio=0.1))
    s = NoiseSchedule()
    assert tbs_gap({"tbs_gap": "sampler"}, QATOptions(steps=1, sample_steps=100), s) == 10
    assert tbs_gap({"tbs_gap": 1}, QATOptions(steps=1, sample_steps=100), s) == 1


def test_divergence_detection(tmp_path):
    from bqc.train.qat import divergence

    def write(vals):
        p = tmp_path / "metrics.csv"
        p.write_text("step,loss,simple\n" + "".join(f"{i},{v},{v}\n" for i, v in enumerate(vals)))
        return p

    healthy = [0.3, 0.2, 0.1] + [0.06 + 0.005 * ((i * 7) % 3) for i in range(40)]
    assert not divergence(write(healthy))["diverged"]
    blown = [0.3, 0.2, 0.1] + [0.05] * 20 + [0.05 + 0.02 * i for i in range(20)]
    d = divergence(write(blown))
    assert d["diverged"] and d["ratio"] > 2
    assert not divergence(tmp_path / "missing.csv")["diverged"]


def test_reference_forms_of_spd_and_lrm():
    from bqc.train.losses import LRMProjections, spd_code_distances, spd_loss

    torch.manual_seed(0)
    fs, ft = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    # the code form by hand: patch (0, 0) is rows 0..1, cols 0..1 (p = 4 on 8x8)
    d = spd_code_distances(fs, ft, 4)
    def g(f):
        p = f[:, :, 0:2, 0:2]
        m = p @ p.transpose(-1, -2)
        return m / m.norm()
    assert torch.allclose(d[0], (g(fs) - g(ft)).norm(), atol=1e-5)
    assert float(spd_loss([fs], [fs], form="code")) == 0.0
    assert not torch.isclose(spd_loss([fs], [ft], form="code"), spd_loss([fs], [ft]))
    with pytest.raises(ValueError):
        spd_loss([fs], [ft], form="other")
    lrm = LRMProjections([8], k=4, axis="width")
    assert lrm.proj_0.shape == (8, 2)
    assert float(lrm.loss([ft], [ft])) == 0.0 and float(lrm.loss([fs], [ft])) > 0


def test_distill_form_is_recorded(mnist16, tmp_path):
    toml = tmp_path / "bdm-code.toml"
    toml.write_text('extends = "binarydm"\nname = "bdm-code"\n[options.distill_taps]\nform = "code"\n')
    gm = tf.transform(mnist16, str(toml)).gm
    assert ir.graph_meta(gm)["distill"]["form"] == "code"
    toml.write_text('extends = "binarydm"\n[options.distill_taps]\nform = "codes"\n')
    with pytest.raises(BqcError, match="form"):
        tf.transform(mnist16, str(toml))


def test_ebb_terms_logged(mnist16, tmp_path):
    """L_EBB and mean|s2| are logged while EBB is in stage 1."""
    from bqc.train.qat import QATOptions, train_artifact

    art = tf.save(tf.transform(mnist16, "binarydm"), tmp_path / "art")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((16, 16)) * 255).astype("uint8"), "L").save(imgs / f"{i}.png")
    out = train_artifact(art, str(imgs), tmp_path / "run",
                         QATOptions(steps=3, batch=4, warmup=1, checkpoint_every=0, progress=False,
                                    lr_schedule="cosine", min_lr_ratio=0.25))
    rows = (out / "train" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "s2" in header and "ebb" in header
    info = json.loads((out / "train.json").read_text())
    from bqc.pipeline import load_recipe

    peak = load_recipe("binarydm").train["lr"]
    assert info["hparams"]["lr"] == peak and "divergence" in info
    assert info["hparams"]["lr_schedule"] == "cosine"
    # the loop decays it: the last of 3 steps (1 warm-up) is halfway down the cosine to 0.25 x peak
    assert float(rows[-1].split(",")[header.index("lr")]) == pytest.approx((0.25 + 0.75 * 0.5) * peak, rel=1e-3)


def test_eta_on_the_command_line(tmp_path, capsys):
    """`bqc sample --eta 1` draws other samples than the deterministic sampler."""
    import numpy as np
    from clirun import run_cli

    outs = []
    for eta in ("0", "1"):
        npz = tmp_path / f"s{eta}.npz"
        code, _, err = run_cli(["sample", "mnist16", "-n", "2", "--steps", "3", "--eta", eta, "--threads", "1",
                                "-o", tmp_path / f"g{eta}.png", "--npz", npz], capsys)
        assert code == 0, err
        outs.append(np.load(npz)["samples"])
    assert not (outs[0] == outs[1]).all()


@pytest.mark.parametrize("recipe", ["fp", "baseline", "binarydm"])
def test_teacher_target_regresses_the_teachers_output(tiny_source, recipe):
    """``[train] target = "teacher"`` / ``--target teacher``: L_simple is the MSE to the FP
    teacher's prediction at the same (x_t, t), with or without distillation taps; the fp
    recipe's student *is* its teacher, so that loss is exactly 0 while the true-noise loss is not."""
    from bqc.diffusion.schedule import NoiseSchedule, q_sample
    from bqc.train.qat import QATModel, QATOptions, _tap_views, make_loss

    student = tf.transform(tiny_source, recipe).gm.train()
    teacher = tf.transform(tiny_source, "fp").gm.eval()
    s_view, _, taps = _tap_views(student, teacher)
    lrm = None
    if ir.graph_meta(student).get("distill", {}).get("loss") == "lrm":
        from bqc.train.losses import LRMProjections

        nodes = {n.name: n for n in student.graph.nodes}
        lrm = LRMProjections([int(nodes[tp["node"]].meta["val"].shape[1]) for tp in taps])
    model = QATModel(student, lrm, s_view)
    train = dict(load_recipe(recipe).train)
    train.pop("ebb_tau", None)  # L_simple alone is compared
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sched = NoiseSchedule()
    simple = {}
    for target in ("true", "teacher"):
        loss_fn = make_loss(student, teacher, train, QATOptions(steps=1, progress=False, target=target), sched, 1)
        torch.manual_seed(3)
        _, terms = loss_fn(model, (x0, None), 0)
        simple[target] = terms["simple"]
    torch.manual_seed(3)  # the same draws by hand
    t = torch.randint(0, sched.T, (4,))
    noise = torch.randn_like(x0)
    x_t = q_sample(sched, x0, t, noise)
    with torch.no_grad():
        s_out, t_out = student(x_t, t)[0], teacher(x_t, t)
        t_out = t_out[0] if isinstance(t_out, (tuple, list)) else t_out
    assert simple["teacher"] == pytest.approx(torch.mean((s_out - t_out) ** 2).item(), rel=1e-5, abs=1e-12)
    assert simple["true"] == pytest.approx(torch.mean((s_out - noise) ** 2).item(), rel=1e-5)
    if recipe == "fp":
        assert simple["teacher"] == 0.0 and simple["true"] > 0.1
    with pytest.raises(BqcError, match="target"):
        make_loss(student, teacher, {"target": "noise"}, QATOptions(steps=1), sched, 1)


def test_t_range_trains_on_those_timesteps_only(tiny_source, capsys, tmp_path):
    """``--t-range LO HI`` (a timestep expert): every training timestep the student sees is in
    [LO, HI); out-of-range values are refused before any work (exit 2)."""
    from bqc.diffusion.schedule import NoiseSchedule
    from bqc.train.qat import QATModel, QATOptions, make_loss
    from clirun import run_cli

    student = tf.transform(tiny_source, "baseline").gm.train()
    teacher = tf.transform(tiny_source, "fp").gm.eval()
    seen = []
    hook = student.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    x0 = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for rng in ((0, 300), (990, 1000)):
        seen.clear()
        loss_fn = make_loss(student, teacher, {}, QATOptions(steps=1, progress=False, t_range=rng), NoiseSchedule(), 1)
        for step in range(3):
            loss_fn(QATModel(student, None), (x0, None), step)
        t = torch.cat(seen)
        assert len(t) == 48 and int(t.min()) >= rng[0] and int(t.max()) < rng[1], rng
    hook.remove()
    with pytest.raises(BqcError, match="t-range"):
        make_loss(student, teacher, {}, QATOptions(steps=1, t_range=(0, 2000)), NoiseSchedule(), 1)
    code, _, err = run_cli(["train", "mnist16", "--steps", "1", "--t-range", "300", "0", "-o", tmp_path / "r"], capsys)
    assert code == 2 and "t-range" in err and not (tmp_path / "r").exists()


def test_float_lr_scale_zero_freezes_the_float_layers(tiny_source, tmp_path):
    """``--float-lr-scale 0`` keeps the layers the recipe left in full precision (bidm: the
    residual projections and the time embedding) at the teacher's weights while the binary
    layers train; the selection is exactly the plain Conv/Linear modules."""
    from PIL import Image
    import numpy as np
    from bqc import artifact
    from bqc.train.qat import QATOptions, float_layer_params, param_groups, train_artifact

    def float_layer_params_all(gm, names):
        return [p for n, p in gm.named_parameters() if n in names]

    art = tf.save(tf.transform(tiny_source, "bidm"), tmp_path / "art")
    student = artifact.load_artifact(art).gm
    names = {n for n, p in student.named_parameters() if any(p is q for q in float_layer_params(student))}
    assert names and any("skip_connection" in n for n in names) and any("time_embed" in n for n in names)
    assert not any(n.startswith("quant.") for n in names)  # no quantized layer, quantizer or K map
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((8, 8)) * 255).astype("uint8"), "L").save(imgs / f"{i}.png")
    out = train_artifact(art, str(imgs), tmp_path / "run", QATOptions(steps=2, batch=4, warmup=1, checkpoint_every=0,
                                                                     progress=False, ema_decay=None, float_lr_scale=0.0))
    before = dict(student.named_parameters())
    after = dict(artifact.load_artifact(out).gm.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in names)
    frozen = artifact.load_artifact(art).gm  # frozen means no gradient work for them either
    groups = param_groups(frozen, frozen, 0.0, 1e-4)
    assert len(groups) == 1 and all(not p.requires_grad for p in float_layer_params_all(frozen, names))
    assert not any(any(p is q for q in groups[0]["params"]) for p in float_layer_params_all(frozen, names))
    moved = [n for n in before if n not in names and not torch.equal(before[n], after[n])]
    assert any(n.startswith("quant.") for n in moved)
    assert json.loads((out / "train.json").read_text())["hparams"]["float_lr_scale"] == 0.0
