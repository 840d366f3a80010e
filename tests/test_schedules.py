"""The model's own diffusion process: schedules equal diffusers'/LDM's, the prediction type
(eps / v / x0) reaches the artifact, the QAT loss and the samplers, unknown values are refused."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from bqc import artifact, frontend
from bqc.diffusion import ddim_sample, ddpm_sample
from bqc.diffusion.schedule import NoiseSchedule, parse_schedule_spec, q_sample
from bqc.errors import BqcError
from clirun import run_cli

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="linear", beta_start=2e-4, beta_end=3e-2, num_train_timesteps=500),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=4000),
]


# -- betas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", DIFFUSERS_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_alphas_cumprod_equal_diffusers(cfg):
    ref = diffusers.DDPMScheduler(**cfg)
    s = NoiseSchedule.from_diffusers(dict(ref.config))
    assert s.T == ref.config.num_train_timesteps
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(s.betas, ref.betas.numpy(), atol=1e-6, rtol=0)
    # the same process through the manifest and back
    assert NoiseSchedule.from_manifest({"diffusion": s.manifest_entry("test")}) == s


def test_trained_betas_equal_diffusers():
    betas = np.linspace(1e-4, 3e-2, 50) ** 1.5
    ref = diffusers.DDPMScheduler(num_train_timesteps=50, trained_betas=betas.tolist())
    s = NoiseSchedule.from_diffusers(dict(ref.config))
    assert s.kind == "trained" and s.T == 50
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-6, rtol=0)


def test_ldm_linear_is_linear_in_sqrt_beta():
    params = {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "parameterization": "v"}
    s = NoiseSchedule.from_ldm(params)
    want = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2  # LDM make_beta_schedule
    np.testing.assert_allclose(s.betas, want.numpy(), atol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - want.numpy()), atol=1e-6)
    assert s.kind == "scaled_linear" and s.prediction == "v"
    # LDM's defaults are linear_start 1e-4 / linear_end 2e-2 *in sqrt space*: not DDPM's linear
    d = NoiseSchedule.from_ldm({})
    assert d.kind == "scaled_linear" and d.prediction == "eps" and d != NoiseSchedule()
    assert NoiseSchedule.from_ldm({"beta_schedule": "sqrt_linear"}).kind == "linear"
    assert NoiseSchedule.from_ldm({"parameterization": "x0"}).prediction == "x0"
    np.testing.assert_allclose(NoiseSchedule.from_ldm({"beta_schedule": "cosine"}).alphas_cumprod,
                               NoiseSchedule(kind="cosine").alphas_cumprod)
    with pytest.raises(BqcError, match="beta_schedule"):
        NoiseSchedule.from_ldm({"beta_schedule": "quadratic"})
    with pytest.raises(BqcError, match="prediction"):
        NoiseSchedule.from_ldm({"parameterization": "score"})


def test_default_is_unchanged():
    """Fingerprints of eps/linear runs (pretrain, QAT resume) keep their exact keys."""
    s = NoiseSchedule()
    assert s.to_dict() == {"T": 1000, "beta_start": 1e-4, "beta_end": 2e-2, "kind": "linear"}
    assert NoiseSchedule.from_manifest({}) == s  # artifacts written before bqc recorded a process
    assert s.timesteps(50) == list(range(980, -1, -20))


@pytest.mark.parametrize("cfg,steps", [
    (dict(steps_offset=1), 50), (dict(), 30), (dict(timestep_spacing="trailing"), 50),
    (dict(timestep_spacing="trailing"), 30), (dict(timestep_spacing="linspace"), 30),
])
def test_ddim_timesteps_equal_diffusers(cfg, steps):
    ref = diffusers.DDIMScheduler(**cfg)
    ref.set_timesteps(steps)
    s = NoiseSchedule.from_diffusers(dict(ref.config))
    assert s.timesteps(steps) == ref.timesteps.tolist()


@pytest.mark.parametrize("bad,match", [
    (dict(beta_schedule="sigmoid"), "beta_schedule"),
    (dict(prediction_type="flow"), "prediction"),
    (dict(rescale_betas_zero_snr=True), "zero-terminal"),
    (dict(timestep_spacing="karras"), "timestep_spacing"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}, "not a discrete"),
])
def test_unknown_scheduler_settings_are_refused(bad, match):
    cfg = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", **bad}
    with pytest.raises(BqcError, match=match):
        NoiseSchedule.from_diffusers(cfg)


def test_schedule_spec():
    base = NoiseSchedule(prediction="v")
    s = parse_schedule_spec("scaled_linear:0.00085:0.012:1000", base)
    assert (s.kind, s.beta_start, s.beta_end, s.T, s.prediction) == ("scaled_linear", 0.00085, 0.012, 1000, "v")
    assert parse_schedule_spec("cosine:500").kind == "cosine" and parse_schedule_spec("cosine:500").T == 500
    assert parse_schedule_spec("squaredcos_cap_v2") == NoiseSchedule(kind="cosine")
    assert parse_schedule_spec("linear:1e-4:2e-2:1000") == NoiseSchedule()
    for bad in ("sigmoid:1:2", "linear:a:b", "cosine:1:2:3", "linear:0.5:0.1"):
        with pytest.raises(BqcError):
            parse_schedule_spec(bad)


# -- the parameterisation ------------------------------------------------------------------
@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
def test_target_and_split_invert(pred):
    s = NoiseSchedule(kind="cosine", prediction=pred)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 900])
    x_t = q_sample(s, x0, t, noise)
    eps, x0_hat = s.split(s.target(x0, noise, t), x_t, t)
    assert torch.allclose(eps, noise, atol=1e-4) and torch.allclose(x0_hat, x0, atol=1e-4)
    if pred == "v":
        a = torch.as_tensor(s.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
        assert torch.allclose(s.target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)


def _oracle(s: NoiseSchedule, x0: torch.Tensor):
    """A step model that returns the exact prediction (in ``s.prediction``) for a known x0."""
    def step(x, t, y, state):
        a = torch.as_tensor(s.alphas_cumprod[t.numpy()], dtype=x.dtype).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return s.target(x0, eps, t), None
    return step


@pytest.mark.parametrize("pred", ["v", "x0"])
def test_ddim_converts_the_prediction(pred):
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64).clamp(-1, 1)
    for spacing in ("uniform", "trailing"):  # one step from t = 0 / from t = T - 1 (pure noise)
        s = NoiseSchedule(kind="cosine", prediction=pred, spacing=spacing)
        for steps in (1, 5):  # float64: the oracle's own eps at t = 0 divides by sqrt(1 - abar_0) ~ 0.006
            out = ddim_sample(_oracle(s, x0), x0.shape, schedule=s, steps=steps, seed=0, dtype=torch.float64)
            assert torch.allclose(out, x0, atol=1e-6), (pred, spacing, steps)
    # read as eps (the old behaviour) the same outputs do not give x0
    wrong = ddim_sample(_oracle(s, x0), x0.shape, schedule=s.replace(prediction="eps"), steps=1, seed=0, dtype=torch.float64)
    assert not torch.allclose(wrong, x0, atol=1e-2)


def test_ddpm_converts_v():
    s = NoiseSchedule(T=20, beta_start=1e-3, beta_end=0.2, prediction="v")
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).clamp(-1, 1)
    out = ddpm_sample(_oracle(s, x0), x0.shape, schedule=s, seed=0, dtype=torch.float64)
    assert torch.allclose(out, x0, atol=1e-6)


# -- sources and artifacts -----------------------------------------------------------------
def _tiny_diffusers(folder):
    torch.manual_seed(0)
    m = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()
    m.save_pretrained(folder)
    return m


COSINE_V = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


@pytest.fixture(scope="module")
def cosine_v_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cosv")
    _tiny_diffusers(root / "pipe" / "unet")  # pipeline layout: unet/ + scheduler/
    diffusers.DDPMScheduler(**COSINE_V).save_config(root / "pipe" / "scheduler")
    (root / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    from bqc import transform as tf

    src = frontend.load_source(str(root / "pipe"))
    return tf.save(tf.transform(src, "fp"), root / "art")


def test_scheduler_config_beside_the_model(tmp_path):
    _tiny_diffusers(tmp_path / "m")
    src = frontend.load_source(str(tmp_path / "m"))
    assert src.schedule is None  # nothing recorded: the default is assumed (and said so)
    sched, where = frontend.diffusion_of(src)
    assert sched == NoiseSchedule() and where.startswith("assumed")
    diffusers.DDPMScheduler(**COSINE_V).save_config(tmp_path / "m")  # scheduler_config.json beside it
    src = frontend.load_source(str(tmp_path / "m"))
    assert (src.schedule.kind, src.schedule.prediction) == ("cosine", "v")


def test_ldm_yaml_source(tmp_path):
    import yaml

    from conftest import TINY_CONFIG

    cfg = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                     "params": {"linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "parameterization": "v",
                                "unet_config": {"target": "bqc.models.unet.UNetModel",
                                                "params": dict(TINY_CONFIG, attention_resolutions=[2], channel_mult=[1, 1])}}}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    src = frontend.load_source(config=str(tmp_path / "m.yaml"))
    s = src.schedule
    assert (s.kind, s.beta_start, s.beta_end, s.prediction, s.steps_offset) == ("scaled_linear", 0.0015, 0.0155, "v", 1)
    np.testing.assert_allclose(s.betas, (torch.linspace(0.0015 ** 0.5, 0.0155 ** 0.5, 1000, dtype=torch.float64) ** 2).numpy())
    assert s.timesteps(50)[-1] == 1 and s.timesteps(50)[0] == 981  # LDM's DDIM: range(0, T, T // steps) + 1


def test_artifact_records_the_models_process(cosine_v_artifact):
    man = artifact.read_manifest(cosine_v_artifact)
    d = man["diffusion"]
    assert d["schedule"]["kind"] == "cosine" and d["prediction"] == "v"
    assert d["from"].endswith("scheduler_config.json")
    ref = diffusers.DDPMScheduler(**COSINE_V)
    np.testing.assert_allclose(artifact.read_schedule(cosine_v_artifact).alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-6)
    assert artifact.load_artifact(cosine_v_artifact).schedule.prediction == "v"


def test_qat_loss_regresses_v(cosine_v_artifact):
    from bqc.train.qat import QATModel, QATOptions, make_loss

    art = artifact.load_artifact(cosine_v_artifact)
    s = art.schedule
    student = art.gm.train()
    loss_fn = make_loss(student, art.teacher().gm.eval(), {}, QATOptions(steps=1, distill=False, progress=False), s, 1)
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    loss, terms = loss_fn(QATModel(student, None), (x0, None), 0)
    torch.manual_seed(7)  # the same draws by hand
    t = torch.randint(0, s.T, (4,))
    noise = torch.randn_like(x0)
    a = torch.as_tensor(s.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    with torch.no_grad():
        out = student(x_t, t)[0]
    want = torch.mean((out - v) ** 2).item()
    assert terms["simple"] == pytest.approx(want, rel=1e-5)
    assert terms["simple"] != pytest.approx(torch.mean((out - noise) ** 2).item(), rel=1e-3)


def test_trained_artifact_keeps_the_process(cosine_v_artifact, tmp_path):
    from PIL import Image

    from bqc.train.qat import QATOptions, train_artifact

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(8):
        Image.fromarray((np.random.default_rng(i).random((8, 8)) * 255).astype(np.uint8), mode="L").save(d / f"{i}.png")
    out = train_artifact(cosine_v_artifact, str(d), tmp_path / "run",
                         QATOptions(steps=1, batch=4, warmup=0, checkpoint_every=0, progress=False))
    assert artifact.read_manifest(out)["diffusion"] == artifact.read_manifest(cosine_v_artifact)["diffusion"]


# -- command line --------------------------------------------------------------------------
_cli = run_cli


def test_cli_refuses_unknown_beta_schedule(tmp_path, capsys):
    _tiny_diffusers(tmp_path / "m")
    (tmp_path / "m" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid", "num_train_timesteps": 1000}))
    code, _, err = _cli(["transform", str(tmp_path / "m"), "--recipe", "fp", "-o", str(tmp_path / "a")], capsys)
    assert code == 2 and "sigmoid" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()
    code, _, err = _cli(["transform", "mnist16", "--recipe", "fp", "-o", str(tmp_path / "b"),
                         "--schedule", "quadratic:1:2"], capsys)
    assert code == 2 and "quadratic" in err
    code, _, err = _cli(["transform", "mnist16", "--recipe", "fp", "-o", str(tmp_path / "b"), "--prediction", "score"], capsys)
    assert code == 2 and "score" in err


def test_cli_overrides_are_recorded(tmp_path, capsys):
    _tiny_diffusers(tmp_path / "m")
    code, out, _ = _cli(["transform", str(tmp_path / "m"), "--recipe", "fp", "-o", str(tmp_path / "a")], capsys)
    assert code == 0 and "assumed" in out  # no scheduler config: said so
    code, _, err = _cli(["transform", str(tmp_path / "m"), "--recipe", "fp", "-o", str(tmp_path / "b"),
                         "--schedule", "scaled_linear:0.00085:0.012:1000", "--prediction", "v"], capsys)
    assert code == 0, err
    d = artifact.read_manifest(tmp_path / "b")["diffusion"]
    assert d["schedule"]["kind"] == "scaled_linear" and d["schedule"]["beta_end"] == 0.012 and d["prediction"] == "v"
    assert "--schedule" in d["from"]
