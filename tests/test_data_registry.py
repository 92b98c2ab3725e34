"""Dataset registry: names, short names, domain resolution, task order, root resolution."""

from __future__ import annotations

import pytest

from domadapt.data import get_dataset, list_datasets, resolve_root
from domadapt.data.registry import derive_short_names
from domadapt.data.testing import write_image_tree
from domadapt.errors import UserError


def test_registry_descriptors():
    assert [s.name for s in list_datasets()] == ["officehome", "pacs", "folder", "styledigits"]
    oh = get_dataset("officehome")
    assert oh.domain_names(None) == ["Art", "Clipart", "Product", "Real_World"]
    assert [d.short for d in oh.domain_list(None)] == ["Ar", "Cl", "Pr", "Rw"]
    assert [d.expected for d in oh.domain_list(None)] == [2427, 4365, 4439, 4357]
    classes = oh.class_names(None)
    assert len(classes) == len(set(classes)) == 65 and classes == sorted(classes)
    assert classes[0] == "Alarm_Clock" and classes.index("TV") == classes.index("Table") - 1
    pacs = get_dataset("PACS")
    assert [d.expected for d in pacs.domain_list(None)] == [2048, 2344, 1670, 3929]
    assert pacs.class_names(None) == [
        "dog",
        "elephant",
        "giraffe",
        "guitar",
        "horse",
        "house",
        "person",
    ]
    assert oh.hflip and pacs.hflip and not get_dataset("styledigits").hflip
    for spec in list_datasets():
        if spec.domains:  # short names unique case-insensitively, and never another's full name
            keys = [d.name.lower() for d in spec.domains] + [d.short.lower() for d in spec.domains]
            assert len(set(keys)) == len(keys)


def test_resolve_domain_full_or_short_any_case():
    oh = get_dataset("officehome")
    for name in ("Ar", "ar", "ART", "art"):
        assert oh.resolve_domain(name, None) == "Art"
    assert oh.resolve_domain("rw", None) == "Real_World"
    assert oh.short_name("real_world", None) == "Rw"
    with pytest.raises(UserError, match="unknown domain 'Photo'.*Art \\(Ar\\)"):
        oh.resolve_domain("Photo", None)
    with pytest.raises(UserError, match="unknown dataset 'no-such-dataset'"):
        get_dataset("no-such-dataset")


def test_canonical_task_order():
    tasks = get_dataset("officehome").tasks(None)
    assert len(tasks) == 12
    assert tasks[:4] == [
        ("Art", "Clipart"),
        ("Art", "Product"),
        ("Art", "Real_World"),
        ("Clipart", "Art"),
    ]
    assert all(s != t for s, t in tasks)


def test_derive_short_names():
    assert derive_short_names(["art", "clipart", "photo"]) == ["A", "C", "P"]
    assert derive_short_names(["art", "arch", "photo", "photos"]) == [
        "Art",
        "Arc",
        "Photo",
        "Photos",
    ]
    assert derive_short_names(["a", "apple"]) == ["A", "Ap"]


def test_folder_dataset_discovers_domains_and_classes(tmp_path):
    write_image_tree(tmp_path, ["winter", "summer", "spring"], ["b", "a"])
    (tmp_path / "manifests").mkdir()  # reserved, never a domain
    (tmp_path / ".hidden").mkdir()
    spec = get_dataset("folder")
    assert spec.domain_names(tmp_path) == ["spring", "summer", "winter"]
    assert [spec.short_name(d, tmp_path) for d in spec.domain_names(tmp_path)] == ["Sp", "Su", "W"]
    assert spec.resolve_domain("SU", tmp_path) == "summer"
    assert spec.class_names(tmp_path) == ["a", "b"]
    assert spec.tasks(tmp_path)[0] == ("spring", "summer")


def test_resolve_root(tmp_path):
    pacs = get_dataset("pacs")
    assert resolve_root(pacs, tmp_path) == tmp_path.absolute()
    with pytest.raises(UserError, match="dataset root not found: .*nowhere"):
        resolve_root(pacs, tmp_path / "nowhere")
    with pytest.raises(UserError, match="pacs needs --root"):
        resolve_root(pacs, None)


def test_root_is_absolute_without_dotdot(tmp_path, monkeypatch):
    """Run records and sweep.json store the root: `../data` is stored as a plain absolute path."""
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_root(get_dataset("folder"), "../data") == tmp_path / "data"


def macos_leftovers(root, domains, classes) -> list[str]:
    """Add what unpacking a macOS zip in a notebook leaves; return the paths `data check` lists."""
    first, cls = domains[0], classes[0]
    for domain in domains:  # __MACOSX/ mirrors the tree with `._<name>` resource forks
        (root / "__MACOSX" / domain / cls).mkdir(parents=True)
        (root / "__MACOSX" / domain / cls / "._img0.png").write_bytes(b"\x00\x05\x16\x07")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / first / ".ipynb_checkpoints" / cls).mkdir(parents=True)
    (root / first / "__MACOSX").mkdir()
    (root / first / cls / ".DS_Store").write_bytes(b"Bud1")
    (root / first / cls / "._img0.png").write_bytes(b"not an image")
    (root / first / cls / ".ipynb_checkpoints").mkdir()
    return [".DS_Store", "__MACOSX/", f"{first}/.ipynb_checkpoints/", f"{first}/__MACOSX/",
            f"{first}/{cls}/.DS_Store", f"{first}/{cls}/._img0.png",
            f"{first}/{cls}/.ipynb_checkpoints/"]


@pytest.mark.parametrize("dataset", ["folder", "pacs"])
def test_archive_and_notebook_leftovers_are_skipped_and_listed(tmp_path, run_cli, dataset):
    from domadapt.data import domain_items
    from domadapt.data.registry import skipped_entries

    spec = get_dataset(dataset)
    domains = spec.domain_names(None) if dataset == "pacs" else ["eight", "nine"]
    classes = spec.class_names(None) if dataset == "pacs" else ["eight", "one"]
    root = write_image_tree(tmp_path / "data", domains, classes, 2)
    clean = {d: domain_items(spec, root, d) for d in domains}
    listed = macos_leftovers(root, domains, classes)

    assert spec.domain_names(root) == domains and spec.class_names(root) == classes
    assert {d: domain_items(spec, root, d) for d in domains} == clean  # no `._img0.png`
    assert [p.relative_to(root).as_posix() + "/" * p.is_dir()
            for p in skipped_entries(spec, root)] == sorted(listed)
    code, out, err = run_cli("data", "check", "-D", dataset, "-r", root, "-q")
    if dataset == "pacs":  # 2 images per class, not PACS's counts: only that mismatch fails
        assert code != 0 and err.startswith("error: check failed: art_painting has 14 images")
    else:
        assert code == 0, err
    assert f"skipped {len(listed)} entries" in out
    assert all(f"  {entry}\n" in out for entry in listed)
