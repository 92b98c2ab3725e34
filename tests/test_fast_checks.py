"""--eval-max-images: the stratified subset, the run key (unchanged when unset), config.json,
what a capped run evaluates, the one-line error."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO
from test_cdan import tiny_config, write_tiny_tree

from domadapt.config import RunConfig, make_config
from domadapt.data.subset import stratified_subset
from domadapt.errors import UserError
from domadapt.settings import build_data, resolve_config
from domadapt.train import run


def _items(per_class: dict[int, int]) -> list[tuple[Path, int]]:
    return [(Path(f"d/c{c}/{i:03d}.png"), c) for c, n in per_class.items() for i in range(n)]


def test_subset_is_stratified_seeded_and_order_free():
    items = _items({0: 50, 1: 30, 2: 20})
    sub = stratified_subset(items, 10, seed=0)
    assert Counter(label for _, label in sub) == {0: 5, 1: 3, 2: 2}
    assert sub == sorted(sub, key=lambda it: it[0].as_posix()) and set(sub) <= set(items)
    assert stratified_subset(list(reversed(items)), 10, seed=0) == sub
    assert stratified_subset(items, 10, seed=1) != sub
    assert stratified_subset(items, 100, seed=0) == items and stratified_subset(items, 500) == items


def test_subset_gives_the_remainders_to_the_largest_shares():
    sub = stratified_subset(_items({0: 4, 1: 3, 2: 3}), 5)  # quotas 2, 1.5, 1.5
    assert Counter(label for _, label in sub) == {0: 2, 1: 2, 2: 1}  # tie: the lower label
    assert len(stratified_subset(_items({0: 7, 1: 1}), 3)) == 3


def test_unset_cap_keeps_the_committed_run_keys():
    """Run directories recorded before the option existed are found by the same key."""
    runs = sorted((REPO / "results" / "styledigits-methods" / "runs").glob("*/config.json"))[:6]
    assert runs
    for path in runs:
        info = json.loads(path.read_text())
        cfg = RunConfig.from_dict(info["config"])
        assert cfg.eval_max_images is None and cfg.key() == info["key"], path


def test_a_set_cap_is_in_the_key_and_the_config():
    cfg = make_config("styledigits", source="color", target="gray")
    capped = cfg.replace(eval_max_images=64)
    assert capped.key() != cfg.key()
    assert capped.key() != cfg.replace(eval_max_images=65).key()
    assert RunConfig.from_dict(capped.to_dict()).key() == capped.key()


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    return write_tiny_tree(tmp_path_factory.mktemp("tiny") / "data", per_class=6)


def test_a_capped_run_evaluates_the_same_subset_and_records_it(tiny_tree, tmp_path):
    cfg = resolve_config(tiny_config(tiny_tree, "dann", eval_max_images=5))
    data = build_data(cfg)
    assert {k: len(ds) for k, ds in data.evals.items()} == {"source": 5, "target": 5}
    assert len(data.train["source"]) == 18  # training is not capped
    again = build_data(cfg)
    assert [ds.items for ds in again.evals.values()] == [ds.items for ds in data.evals.values()]
    run(cfg, tmp_path / "r", device="cpu", quiet=True)
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    assert info["config"]["eval_max_images"] == 5 and info["key"] == cfg.key()
    assert info["data"]["eval_images"] == {"source": 5, "target": 5}
    assert info["data"]["num_images"] == {"source": 18, "target": 18}
    # accuracies are fractions of the 5 images scored
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert round(metrics["target_acc"] * 5, 6) == round(metrics["target_acc"] * 5)


def test_bad_cap_is_one_line(run_cli, tmp_path):
    with pytest.raises(UserError, match="--eval-max-images must be positive"):
        make_config("styledigits", source="color", target="gray", eval_max_images=0)
    code, _, err = run_cli("train", "--preset", "styledigits", "--source", "color", "--target",
                           "gray", "--eval-max-images", "-3", "--out", tmp_path / "x")
    assert code == 2 and err.strip() == "error: --eval-max-images must be positive, got -3"
