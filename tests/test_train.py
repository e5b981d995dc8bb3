"""Transformer training (PyTorch): the array-API forward pass equals torch's; a short run learns.

Runs where torch imports: ``make test`` runs this file in .venv-train (Python 3.11 with the CPU
build of torch that this project's machines carry), and skips it in the main venv.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs PyTorch: make train-venv (make test runs it there)")

from nbdask.kernels import transformer as T  # noqa: E402
from nbdask.train import prior  # noqa: E402
from nbdask.train.loop import train  # noqa: E402
from nbdask.train.model import PairSetTransformer  # noqa: E402


def _random_inputs(rng, n, n_c, n_t):
    """Random token values and ragged masks (not prior draws): every path of the network."""
    def side(width):
        tokens = rng.normal(0, 1.5, (n, width, T.TOKEN_FEATURES)).astype(np.float32)
        k = rng.integers(1, width + 1, n)
        return tokens, np.arange(width)[None, :] < k[:, None]
    tc, mc = side(n_c)
    tt, mt = side(n_t)
    return tc, mc, tt, mt, rng.normal(0, 1, (n, T.SUMMARY_FEATURES)).astype(np.float32)


def _torch(model, inputs):
    with torch.no_grad():
        return model(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs)).numpy()


@pytest.mark.parametrize("shape", [dict(), dict(d_model=48, heads=6, self_layers=1, cross_layers=2,
                                                head_layers=2)])
def test_array_forward_equals_torch_forward(shape):
    torch.manual_seed(3)
    model = PairSetTransformer(**shape).eval()
    with torch.no_grad():  # move LayerNorm affine parameters off their 1/0 initialisation
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = _random_inputs(np.random.default_rng(0), 500, 8, 10)
    ref = _torch(model, inputs)
    got = T.forward(np, model.numpy_params(), model.config, *inputs)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_shipped_weights_load_into_the_torch_model():
    params, meta = T.load_weights()
    cfg = meta["config"]
    model = PairSetTransformer(**{k: cfg[k] for k in ("d_model", "heads", "self_layers",
                                                      "cross_layers", "head_layers", "ff_mult")})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
    model.eval()
    enc = prior.encode(prior.draw(np.random.default_rng(4), 300))
    inputs = [enc[k] for k in ("tokens_c", "mask_c", "tokens_t", "mask_t", "summary")]
    np.testing.assert_allclose(T.forward(np, params, cfg, *inputs), _torch(model, inputs), atol=1e-5, rtol=0)


def test_a_short_run_learns_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "w.npz"
    lines = []
    meta = train(out, seed=1, steps=120, batch=128, validate_every=40, validation_size=2048,
                 threads=1, log=lines.append)
    curve = [c["validation"] for c in meta["training"]["curve"]]
    assert len(curve) == 3 and curve[-1] < curve[0]
    assert any("steps/s" in line for line in lines)
    params, loaded = T.load_weights(out)
    assert loaded["training"]["steps"] == 120 and loaded["config"]["target_scale"]["mu"] > 0
    assert (tmp_path / "w.npz.ckpt").exists() and (tmp_path / "w.json").exists()
    # resume: continue the same run to more steps from its checkpoint
    more = train(out, seed=1, steps=160, batch=128, validate_every=40, validation_size=2048,
                 threads=1, resume=True, log=lines.append)
    assert any("resumed" in line for line in lines)
    assert [c["step"] for c in more["training"]["curve"]] == [40, 80, 120, 160]


def test_the_train_command_records_how_to_reproduce_it(tmp_path, capsys):
    from nbdask.train.cli import main

    out = tmp_path / "cmd.npz"
    assert main(["--out", str(out), "--seed", "7", "--steps", "20", "--batch", "64",
                 "--validate-every", "10", "--validation-size", "512", "--threads", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    _, meta = T.load_weights(out)
    assert meta["training"]["command"].startswith(f"nbdask train --out {out} --seed 7 --steps 20")
