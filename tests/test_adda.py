"""ADDA (Tzeng et al., CVPR 2017): the phases, what each step trains, the inverted-label loss,
the frozen source encoder, resume across the phase switch, the listing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_cdan import _sections, kill_and_resume_matches, tiny_config, write_tiny_tree
from test_mcd import Recorder, _batch
from torch import nn

from domadapt.config import make_config
from domadapt.errors import UserError
from domadapt.methods import build_method
from domadapt.methods.adda import ADDAHparams, pretrain_iterations
from domadapt.models import DomainAdaptModel
from domadapt.train import load_trained


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = DomainAdaptModel(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), feature_dim=6,
                             bottleneck_dim=4, num_classes=3)
    return build_method("adda", model, {"disc_hidden": 8}, num_classes=3)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("share,total,expect", [(0.5, 10, 5), (0.3, 10, 3), (0.01, 10, 1),
                                                (0.99, 10, 9), (0.5, 2, 1), (0.5, 1, 1)])
def test_pretraining_share(share, total, expect):
    assert pretrain_iterations(ADDAHparams(adda_pretrain_share=share), total) == expect


def test_pretraining_trains_encoder_and_classifier_on_the_source_only():
    method = _tiny()
    x_s, y_s, x_t = _batch()
    opt = Recorder(method)
    disc, src = _state(method.discriminator), _state(method.source_encoder)
    clf = _state(method.model.classifier)
    stats = method.update(x_s, y_s, x_t, _step(0, 4), opt)
    assert opt.calls == [(("source",), pytest.approx(float(stats["cls_loss"])))]
    assert not _same(clf, method.model.classifier.state_dict())
    assert _same(disc, method.discriminator.state_dict())
    assert _same(src, method.source_encoder.state_dict())


def _step(i: int, total: int):
    from domadapt.methods import Step

    return Step(i, total)


def test_adaptation_trains_d_then_the_target_encoder_with_inverted_labels():
    method = _tiny()
    x_s, y_s, x_t = _batch()
    opt = Recorder(method)
    method.update(x_s, y_s, x_t, _step(0, 4), opt)  # pre-training
    method.update(x_s, y_s, x_t, _step(1, 4), opt)
    enc = _state(method.encoder())
    # the switch copies the pre-trained encoder into the frozen source encoder
    method.start_adaptation()
    assert _same(enc, method.source_encoder.state_dict())
    assert not any(p.requires_grad for p in method.source_encoder.parameters())
    src, clf = _state(method.source_encoder), _state(method.model.classifier)
    disc = _state(method.discriminator)
    opt.calls.clear()

    stats = method.update(x_s, y_s, x_t, _step(2, 4), opt)
    assert [c[0] for c in opt.calls] == [("discriminator",), ("target_encoder",)]
    assert opt.calls[0][1] == pytest.approx(float(stats["domain_loss"]))
    assert opt.calls[1][1] == pytest.approx(float(stats["adv_loss"]))

    assert _same(src, method.source_encoder.state_dict())       # M_s frozen, buffers too
    assert _same(clf, method.model.classifier.state_dict())      # C frozen
    assert not _same(disc, method.discriminator.state_dict())    # D trained
    assert not _same(enc, method.encoder().state_dict())         # M_t trained
    for _ in range(3):
        method.update(x_s, y_s, x_t, _step(3, 4), opt)
    assert _same(src, method.source_encoder.state_dict())
    assert _same(clf, method.model.classifier.state_dict())


def test_target_encoder_loss_is_the_inverted_label_gan_loss():
    """The M_t step's loss is BCE(D(M_t(x_t)), 1) = mean softplus(-D(M_t(x_t))) (label 1 =
    source, for target features), with D's weights after the D step."""
    method = _tiny()
    x_s, _, x_t = _batch()
    method.start_adaptation()
    recorder = Recorder(method)
    seen: list[tuple[float, float]] = []

    def opt(name, loss):
        if name == "target_encoder":  # D has stepped: recompute D(M_t(x_t)) by hand
            with torch.no_grad():
                d = method.discriminator(torch.cat([method.source_encoder(x_s),
                                                    method.encoder()(x_t)]))[x_s.shape[0]:]
            seen.append((float(loss.detach()), float(F.softplus(-d).mean())))
        recorder(name, loss)

    method.adapt_step(x_s, x_t, opt)
    (got, hand), = seen
    assert got == pytest.approx(hand, rel=1e-5)
    after = method.adapt_step(x_s, x_t, recorder)
    assert recorder.calls[-1][0] == ("target_encoder",) and float(after["adv_loss"]) > 0


def test_source_encoder_stays_in_eval_mode():
    method = _tiny().train()
    assert method.model.training and not method.source_encoder.training


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    return write_tiny_tree(tmp_path_factory.mktemp("tiny") / "data")


def test_resume_across_the_phase_switch_and_test_with_the_target_encoder(tiny_tree, tmp_path,
                                                                         monkeypatch):
    """4 iterations, 2 pre-training: killed at 2, the resumed run switches phase itself."""
    cfg = tiny_config(tiny_tree, "adda", adda_pretrain_share=0.5)
    ckpt = kill_and_resume_matches(cfg, tmp_path, monkeypatch)
    assert set(ckpt["optimizers"]) == {"source", "discriminator", "target_encoder"}
    final = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    src = {k[len("source_encoder.0."):]: v for k, v in final["method"].items()
           if k.startswith("source_encoder.0.")}
    _, model = load_trained(tmp_path / "straight")
    # the evaluated model's encoder is M_t, trained away from the frozen M_s
    assert any(not torch.equal(v, model.backbone.state_dict()[k]) for k, v in src.items()
               if v.is_floating_point())
    rows = (tmp_path / "straight" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"cls_loss", "domain_loss", "adv_loss", "disc_acc"} <= set(header)
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert "cls_loss" not in metrics and metrics["adv_loss"] > 0  # last window: adaptation


def test_adaptation_lr_multiplier_scales_only_the_adaptation_optimizers():
    model = _tiny().model
    method = build_method("adda", model, {"disc_hidden": 8, "adda_lr_mult": 0.1},
                          num_classes=3)

    def sgd(*, backbone=(), heads=()):
        groups = [{"params": [p for m in backbone for p in m.parameters()], "lr_mult": 0.5},
                  {"params": [p for m in heads for p in m.parameters()], "lr_mult": 1.0}]
        return torch.optim.SGD([g for g in groups if g["params"]], lr=1.0)

    mults = {k: [g["lr_mult"] for g in o.param_groups]
             for k, o in method.build_optimizers(sgd).items()}
    assert mults == {"source": [0.5, 1.0], "discriminator": [pytest.approx(0.1)],
                     "target_encoder": [pytest.approx(0.05), pytest.approx(0.1)]}


@pytest.mark.parametrize("share", [0.0, 1.0, -0.5])
def test_bad_share_is_a_one_line_error(share):
    with pytest.raises(UserError, match="--adda-pretrain-share must lie in"):
        make_config(method="adda", source="a", target="b", adda_pretrain_share=share)


def test_methods_listing_names_adda(run_cli):
    code, out, err = run_cli("methods")
    assert code == 0, err
    assert _sections(out)["adda"] == {"--adda-pretrain-share", "--adda-lr-mult", "--disc-hidden"}
