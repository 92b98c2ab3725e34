"""The registries of validators (selection rules), datasets and presets, and the plot styles
derived from the norm registry: built-ins keep their names, order, texts and looks; an entry
registered at run time is used everywhere its registry is read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from domadapt import plots
from domadapt.config import make_config
from domadapt.data import DATASETS, DatasetSpec, Domain, get_dataset, register_dataset
from domadapt.errors import UserError
from domadapt.evaluation import validators
from domadapt.norms import NORMS
from domadapt.norms.base import NormKind
from domadapt.presets import PRESETS, register_preset
from domadapt.selection import RULES, get_rule, select, validator_rule
from domadapt.validators import VALIDATORS, EvalOutputs, register_validator

LOGITS, FEATURES = torch.randn(12, 3, generator=torch.Generator().manual_seed(0)), torch.ones(12, 4)


@pytest.fixture
def zz_validator(monkeypatch):
    """A validator registered for one test: the mean top-class probability on the target."""
    monkeypatch.setattr(VALIDATORS, "_items", dict(VALIDATORS._items))

    @register_validator("zz_confidence", higher_is_better=True,
                        help="mean top-class probability on the target")
    def zz(ev: EvalOutputs) -> float:
        return float(ev.target_logits.softmax(1).max(1).values.mean())

    return VALIDATORS.get("zz_confidence")


# -- validators and selection rules -----------------------------------------------------------

def test_built_in_validators_keep_their_columns_order_and_rules():
    assert [v.column for _, v in VALIDATORS.items()][:4] == [
        "val_source", "val_entropy", "val_snd", "val_dev"]
    assert list(validators(LOGITS, FEATURES)) == [v.column for _, v in VALIDATORS.items()]
    assert list(RULES)[:5] == ["last", "source", "entropy", "snd", "dev"]
    assert list(RULES)[-1] == "oracle"
    # the tables' notes, as committed under results/
    assert get_rule("source").text == ("the evaluation with the highest accuracy on the "
                                       "held-out source split")
    assert get_rule("dev").text == "the evaluation with the lowest deep-embedded-validation (DEV) risk"
    assert get_rule("source").hint == get_rule("dev").hint == "train with --source-val-fraction > 0"


def test_a_registered_validator_is_logged_and_selects(zz_validator):
    scores = validators(LOGITS, FEATURES)
    assert list(scores)[-1] == "val_zz_confidence"
    assert scores["val_zz_confidence"] == pytest.approx(LOGITS.softmax(1).max(1).values.mean())
    rule = validator_rule(zz_validator)
    assert (rule.column, rule.higher_is_better, rule.uses_target_labels) == (
        "val_zz_confidence", True, False)
    assert rule.text == "the evaluation with the highest mean top-class probability on the target"
    assert get_rule("zz_confidence") == rule and list(RULES)[-2:] == ["zz_confidence", "oracle"]
    rows = [{"iter": 1, "target_acc": 0.1, "val_zz_confidence": 0.5},
            {"iter": 2, "target_acc": 0.2, "val_zz_confidence": 0.9},
            {"iter": 3, "target_acc": 0.3, "val_zz_confidence": 0.7}]
    assert rule.select(rows)["iter"] == 2


def test_validator_declarations_are_checked():
    with pytest.raises(ValueError, match="registered twice"):
        register_validator("entropy", higher_is_better=False, help="x")(lambda ev: 0.0)
    with pytest.raises(ValueError, match="lower-case"):
        register_validator("Bad Name", higher_is_better=False, help="x")
    with pytest.raises(ValueError, match="is the selection rule 'oracle'"):
        register_validator("oracle", higher_is_better=True, help="x")


def test_unknown_rule_names_the_registered_ones():
    with pytest.raises(UserError, match="unknown --select rule 'no-such-rule'; choose from last, "
                                        "source, entropy, snd, dev"):
        select([{"iter": 1, "target_acc": 0.5}], "no-such-rule")


def test_select_help_and_completion_come_from_the_registry(run_cli, monkeypatch):
    code, out, _ = run_cli("tables", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0
    for rule in RULES.values():
        assert f"{rule.name} ({rule.help.split()[0]}" in text
    monkeypatch.setenv("_DOMADAPT_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "domadapt tables x --select s")
    monkeypatch.setenv("COMP_CWORD", "4")
    code, out, _ = run_cli()
    assert (code, out.split()) == (0, ["source", "snd"])


# -- datasets ---------------------------------------------------------------------------------

def test_a_registered_dataset_is_found_by_any_case(monkeypatch):
    monkeypatch.setattr(DATASETS, "_items", dict(DATASETS._items))
    spec = register_dataset(DatasetSpec("zz-set", "a test set", (Domain("one", "O"),
                                                                 Domain("two", "T")), ("a", "b")))
    assert get_dataset(" ZZ-Set ") is spec and spec.resolve_domain("t", None) == "two"
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset(DatasetSpec("zz-set", "again"))
    with pytest.raises(ValueError, match="lower case"):
        register_dataset(DatasetSpec("ZZ", "upper"))
    with pytest.raises(UserError, match="unknown dataset 'no-such-set'; choose from officehome, "
                                        "pacs, folder, styledigits, zz-set"):
        get_dataset("no-such-set")


def test_dataset_help_lists_the_registry(run_cli):
    for command in (("train", "--help"), ("sweep", "--help"), ("data", "check", "--help")):
        code, out, _ = run_cli(*command)
        text = " ".join(out.replace("│", " ").split())
        assert code == 0 and " | ".join(DATASETS.names()) in text, command


# -- presets ----------------------------------------------------------------------------------

def test_built_in_presets_are_registered_in_order_and_read_only():
    assert list(PRESETS) == ["officehome", "officehome-ganin", "pacs-cpu", "styledigits"]
    with pytest.raises(TypeError):
        PRESETS["styledigits"]["iters"] = 1  # type: ignore[index]


def test_a_registered_preset_applies_and_is_checked(monkeypatch):
    monkeypatch.setattr(PRESETS, "_items", dict(PRESETS._items))
    register_preset("zz-short", {"dataset": "styledigits", "iters": 7, "adv_weight": 0.5})
    cfg = make_config("zz-short", source="color", target="gray", iters=9)
    assert (cfg.dataset, cfg.iters, cfg.method_options["adv_weight"]) == ("styledigits", 9, 0.5)
    with pytest.raises(ValueError, match="registered twice"):
        register_preset("zz-short", {})
    register_preset("zz-typo", {"itres": 7})
    with pytest.raises(UserError, match="unknown option"):
        make_config("zz-typo", source="color", target="gray")
    with pytest.raises(UserError, match="unknown preset 'zz-none'; choose from officehome"):
        make_config("zz-none", source="color", target="gray")


# -- plot styles ------------------------------------------------------------------------------

def test_norm_styles_keep_the_built_in_looks_and_cover_every_norm(monkeypatch):
    styles = plots.norm_styles()
    assert (styles["bn"], styles["in"], styles["bin"]) == (("o", 0.5), ("^", 0.7), ("s", 0.9))
    assert set(styles) == set(NORMS.names())

    class ZzNorm(NormKind):
        name = "zz-norm"
        layer_type = nn.BatchNorm2d

    monkeypatch.setitem(NORMS._items, "zz-norm", ZzNorm())
    more = plots.norm_styles()
    assert {k: v for k, v in more.items() if k != "zz-norm"} == styles  # nothing else moves
    markers = [m for m, _ in more.values()]
    assert len(set(markers)) == len(markers)  # every registered norm has its own marker
    assert plots._column_styles(["dann/zz-norm"])["dann/zz-norm"][1] == more["zz-norm"][0]
