"""CDAN / CDAN+E: the multilinear maps, entropy conditioning, the reversed gradient, training,
resume, the listing."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from domadapt import engine
from domadapt.config import make_config
from domadapt.errors import UserError
from domadapt.methods import Step, build_method
from domadapt.methods.cdan import (
    MultilinearMap,
    RandomizedMultilinearMap,
    multilinear_map,
    weighted_domain_loss,
)
from domadapt.models import DomainAdaptModel
from domadapt.nn import domain_adversarial_loss
from domadapt.nn.losses import certainty_weights, entropy
from domadapt.rundir import RunDir
from domadapt.schedules import grl_coefficient
from domadapt.train import run

TIMING_KEYS = {"wall_seconds", "train_seconds", "images_per_second"}
ADVERSARIAL_STATS = ["cls_loss", "domain_loss", "disc_acc", "train_acc", "grl_coeff"]


# -- the maps ------------------------------------------------------------------------------------

def test_multilinear_map_is_the_flattened_outer_product():
    f = torch.tensor([[1.0, 2.0, 3.0]])
    g = torch.tensor([[0.25, 0.75]])
    out = MultilinearMap(3, 2)(f, g)
    assert torch.equal(out, torch.tensor([[0.25, 0.5, 0.75, 0.75, 1.5, 2.25]]))
    f, g = torch.randn(4, 5), torch.softmax(torch.randn(4, 3), 1)
    out = MultilinearMap(5, 3)(f, g)
    assert out.shape == (4, 15) and MultilinearMap(5, 3).out_features == 15
    for i in range(4):
        torch.testing.assert_close(out[i], torch.outer(g[i], f[i]).flatten())


def test_randomized_map_form_and_its_matrices_are_state():
    torch.manual_seed(0)
    m = RandomizedMultilinearMap(5, 3, dim=7)
    assert m.r_f.shape == (7, 5) and m.r_g.shape == (7, 3) and m.out_features == 7
    f, g = torch.randn(4, 5), torch.softmax(torch.randn(4, 3), 1)
    out = m(f, g)
    for i in range(4):
        for k in range(7):
            expect = float(m.r_f[k] @ f[i]) * float(m.r_g[k] @ g[i]) / math.sqrt(7)
            assert float(out[i, k]) == pytest.approx(expect, rel=1e-5, abs=1e-6)
    # drawn from torch's generator: same seed -> same matrices, other seed -> others
    torch.manual_seed(0)
    assert torch.equal(RandomizedMultilinearMap(5, 3, dim=7).r_f, m.r_f)
    other = RandomizedMultilinearMap(5, 3, dim=7)
    assert not torch.equal(other.r_f, m.r_f)
    assert set(m.state_dict()) == {"r_f", "r_g"}
    other.load_state_dict(m.state_dict())
    assert torch.equal(other(f, g), out)


def test_map_choice_follows_the_threshold():
    assert isinstance(multilinear_map(64, 64), MultilinearMap)  # 4096 = the paper's limit
    big = multilinear_map(65, 64)
    assert isinstance(big, RandomizedMultilinearMap) and big.out_features == 1024
    assert multilinear_map(8, 4, max_dim=31, random_dim=16).out_features == 16


# -- entropy conditioning ------------------------------------------------------------------------

def test_entropy_weights_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]])
    h3 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy(p), torch.tensor([0.0, math.log(2), h3]))
    torch.testing.assert_close(certainty_weights(p),
                               torch.tensor([2.0, 1.5, 1 + math.exp(-h3)]))
    assert float(certainty_weights(torch.full((1, 4), 0.25))) == pytest.approx(1.25)  # 1 + 1/K


def _bce(z: float, label: int) -> float:
    s = 1 / (1 + math.exp(-z))
    return -math.log(s if label else 1 - s)


def test_weighted_domain_loss_by_hand():
    d_s, d_t = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.0])
    b = [_bce(0.5, 1), _bce(-1.0, 1), _bce(2.0, 0), _bce(0.0, 0)]
    # weights normalized to mean 1 within each domain: source (2, 1) -> (4/3, 2/3)
    got = weighted_domain_loss(d_s, d_t, torch.tensor([2.0, 1.0]), torch.tensor([3.0, 3.0]))
    assert float(got) == pytest.approx((4 / 3 * b[0] + 2 / 3 * b[1] + b[2] + b[3]) / 4, rel=1e-6)
    plain = weighted_domain_loss(d_s, d_t)
    assert float(plain) == pytest.approx(sum(b) / 4, rel=1e-6)
    torch.testing.assert_close(plain, domain_adversarial_loss(d_s, d_t))


# -- the method's loss and gradients -------------------------------------------------------------

def _tiny(method: str, **options) -> nn.Module:
    torch.manual_seed(0)
    model = DomainAdaptModel(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), feature_dim=6,
                             bottleneck_dim=4, num_classes=3)
    return build_method(method, model, {"disc_hidden": 8, **options}, num_classes=3)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(5, 3, 2, 2, generator=g), torch.tensor([0, 1, 2, 0, 1]),
            torch.randn(5, 3, 2, 2, generator=g) + 1)


def _grads(module: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["cdan", "cdan-e"])
def test_loss_reverses_the_discriminator_gradient_into_the_features(name):
    """loss = CE + w L_d: D descends L_d, the bottleneck receives -lambda dL_d, the classifier
    none of it (g is detached before the map)."""
    method = _tiny(name, adv_weight=1.0)
    x_s, y_s, x_t = _batch()
    step = Step(5, 10)
    coeff = grl_coefficient(5, 10)  # the progress form at p = 0.5

    out = method(x_s, y_s, x_t, step)
    assert list(out.stats) == ADVERSARIAL_STATS
    assert float(out.stats["grl_coeff"]) == pytest.approx(coeff)
    with_adv = _grads(method, out.loss)
    without = _grads(method, _cls_only(method, x_s, y_s, x_t))

    # the domain loss by hand, without the GRL (train-mode BN: same batch, same outputs)
    logits, f = method.model(torch.cat([x_s, x_t]))
    g = torch.softmax(logits, 1).detach()
    d = method.discriminator(method.map(f, g))
    v = certainty_weights(g) if name == "cdan-e" else None
    l_d = (weighted_domain_loss(d[:5], d[5:], v[:5], v[5:]) if v is not None
           else weighted_domain_loss(d[:5], d[5:]))
    assert float(out.stats["domain_loss"]) == pytest.approx(float(l_d.detach()), rel=1e-6)
    plain = _grads(method, l_d)

    for n, grad in with_adv.items():
        if n.startswith("discriminator."):
            torch.testing.assert_close(grad, plain[n])               # D: descends L_d
        elif n.startswith("model.bottleneck."):
            torch.testing.assert_close(grad - without[n], -coeff * plain[n])  # reversed
            assert plain[n].abs().sum() > 0
        elif n.startswith("model.classifier."):
            torch.testing.assert_close(grad, without[n])              # no adversarial signal


def _cls_only(method, x_s, y_s, x_t) -> torch.Tensor:
    logits, _ = method.model(torch.cat([x_s, x_t]))
    return F.cross_entropy(logits[:5], y_s)


def test_entropy_conditioning_changes_the_domain_loss():
    x_s, y_s, x_t = _batch()
    plain, cond = _tiny("cdan"), _tiny("cdan-e")
    cond.load_state_dict(plain.state_dict())
    a = plain(x_s, y_s, x_t, Step(0, 10)).stats
    b = cond(x_s, y_s, x_t, Step(0, 10)).stats
    assert float(a["cls_loss"]) == float(b["cls_loss"])
    assert float(a["domain_loss"]) != pytest.approx(float(b["domain_loss"]), rel=1e-6)


def test_randomized_map_is_checkpointed_with_the_method():
    method = _tiny("cdan", cdan_map_max_dim=8, cdan_random_dim=16)  # 4 x 3 = 12 > 8
    assert isinstance(method.map, RandomizedMultilinearMap)
    assert method.discriminator[0].in_features == 16
    state = method.state_dict()
    assert {"map.r_f", "map.r_g"} <= set(state)
    torch.manual_seed(99)
    other = build_method("cdan", copy.deepcopy(method.model),
                         {"disc_hidden": 8, "cdan_map_max_dim": 8, "cdan_random_dim": 16},
                         num_classes=3)
    assert not torch.equal(other.map.r_f, method.map.r_f)
    other.load_state_dict(state)
    assert torch.equal(other.map.r_f, method.map.r_f) and torch.equal(other.map.r_g, method.map.r_g)
    full = _tiny("cdan")
    assert isinstance(full.map, MultilinearMap) and full.discriminator[0].in_features == 12


@pytest.mark.parametrize("change,expect", [
    ({"cdan_random_dim": 0}, "--cdan-random-dim must be positive"),
    ({"cdan_map_max_dim": -1}, "--cdan-map-max-dim must be >= 0"),
    ({"adv_weight": -1.0}, "--adv-weight must be >= 0"),
])
def test_bad_options_are_one_line_errors(change, expect):
    with pytest.raises(UserError, match=expect):
        make_config(method="cdan-e", source="a", target="b", **change)


# -- training end to end -------------------------------------------------------------------------

def write_colour_tree(root: Path, domains, per_class: int) -> Path:
    """One folder per `(domain, scale, noise, rng)` x 3 classes of 20 px images: uniform noise in
    [0, noise) plus `scale * 0.7` on the class's colour channel (class = dominant channel)."""
    for domain, scale, noise, rng in domains:
        for label in range(3):
            d = root / domain / f"c{label}"
            d.mkdir(parents=True)
            for i in range(per_class):
                img = rng.uniform(0, noise, (20, 20, 3))
                img[..., label] += scale * 0.7
                Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def write_tiny_tree(root: Path, per_class: int = 4) -> Path:
    """Two domains (alpha, beta), the target beta darker and noisier; one random stream."""
    rng = np.random.default_rng(0)
    return write_colour_tree(root, [("alpha", 1.0, 0.1, rng), ("beta", 0.6, 0.3, rng)], per_class)


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    return write_tiny_tree(tmp_path_factory.mktemp("tiny") / "data")


def tiny_config(tree: Path, method: str, **options):
    """`domadapt train --preset styledigits --method M --norm bin --iters 4 --eval-every 2
    --checkpoint-every 2` on the tiny tree (dataset folder) with batches of 6."""
    return make_config("styledigits", dataset="folder", root=str(tree), source="alpha",
                       target="beta", method=method, norm="bin", iters=4, eval_every=2,
                       checkpoint_every=2, batch_size=6, **options)


def log_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "log.csv") as f:
        return [{k: v for k, v in r.items() if k != "images_per_second"}
                for r in csv.DictReader(f)]


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


class _Killed(Exception):
    pass


class _KillAt(engine.Hook):
    """Dies after iteration `at`'s hooks (its checkpoint written), like a SIGKILL."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self, trainer: engine.Trainer) -> None:
        if trainer.state.iteration == self.at:
            raise _Killed


def kill_and_resume_matches(cfg, tmp_path: Path, monkeypatch) -> dict:
    """Train 4 iterations straight and 2 + (kill) + resume 2; assert the same numbers."""
    straight = run(cfg, tmp_path / "straight", device="cpu", quiet=True)
    hooks = engine.default_hooks
    with monkeypatch.context() as m:
        m.setattr(engine, "default_hooks", lambda: [*hooks(), _KillAt(2)])
        with pytest.raises(_Killed):
            run(cfg, tmp_path / "resumed", device="cpu", quiet=True)
    ckpt = RunDir(tmp_path / "resumed").read_checkpoint()
    assert ckpt["state"]["iteration"] == 2 and not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = run(cfg, tmp_path / "resumed", device="cpu", quiet=True)
    assert _numbers(resumed) == _numbers(straight)
    assert log_rows(tmp_path / "resumed") == log_rows(tmp_path / "straight")
    return ckpt


@pytest.mark.parametrize("method,options,map_keys", [
    ("cdan", {}, set()),
    ("cdan-e", {"cdan_map_max_dim": 0, "cdan_random_dim": 64}, {"map.r_f", "map.r_g"}),
])
def test_train_logs_the_stats_and_resumes_bit_identically(tiny_tree, tmp_path, monkeypatch,
                                                          method, options, map_keys):
    cfg = tiny_config(tiny_tree, method, **options)
    ckpt = kill_and_resume_matches(cfg, tmp_path, monkeypatch)
    with open(tmp_path / "straight" / "log.csv") as f:
        header = next(csv.reader(f))
    assert header[:6] == ["iter", *ADVERSARIAL_STATS]
    assert [int(r["iter"]) for r in log_rows(tmp_path / "straight")] == [2, 4]
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["domain_loss"] > 0 and 0 <= metrics["disc_acc"] <= 1
    # the discriminator (and the random matrices) are part of the checkpoint
    keys = set(ckpt["method"])
    assert any(k.startswith("discriminator.") for k in keys) and map_keys <= keys
    info = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert info["config"]["method_options"]["adv_weight"] == 0.3  # the preset's, inherited


def test_methods_listing_names_cdan_and_its_options(run_cli):
    code, out, err = run_cli("methods")
    assert code == 0, err
    sections = _sections(out)
    for name in ("cdan", "cdan-e"):
        assert {"--adv-weight", "--disc-hidden", "--cdan-map-max-dim",
                "--cdan-random-dim"} <= sections[name], name
    assert "--cdan-random-dim" not in sections["dann"]


def _sections(listing: str) -> dict[str, set[str]]:
    """method name -> the option flags listed under it in `domadapt methods`."""
    out: dict[str, set[str]] = {}
    current = None
    for line in listing.splitlines():
        if line.startswith("norms"):
            break
        if line.startswith("  ") and not line.startswith("    "):
            current = line.split(":")[0].strip()
            out[current] = set()
        elif line.startswith("    --") and current:
            out[current].add(line.split()[0])
    return out
