"""What `pip install .` puts into site-packages: `domadapt` and `domadapt_cli` only, the BIN
kernel's C source as package data, a working `domadapt` entry point; and every third-party
package the code imports is declared."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_bin import KERNEL_SOURCE_SHA256

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a clean copy of the sources (an in-tree build would reuse build/)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("domadapt", "cli"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [REPO / "pyproject.toml", REPO / "setup.py", REPO / "README.md",
                 *REPO.glob("LICEN[CS]E*")]:
        shutil.copy2(path, src / path.name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(out)],
                           capture_output=True, text=True, timeout=300, check=False)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-300:]}")
    (path,) = out.glob("domadapt-*.whl")
    return path


def test_wheel_holds_only_domadapt_packages(wheel: Path) -> None:
    z = zipfile.ZipFile(wheel)
    top = {name.split("/")[0] for name in z.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"domadapt", "domadapt_cli"}
    source = z.read("domadapt/nn/bin_kernels.c")
    assert hashlib.sha256(source).hexdigest() == KERNEL_SOURCE_SHA256
    (entry,) = [n for n in z.namelist() if n.endswith("entry_points.txt")]
    assert "domadapt = domadapt_cli.main:main" in z.read(entry).decode()


def test_installed_package_runs_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    """Installed (no repository on the path): the CLI answers, no `cli` was installed, the
    kernel source is found."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    env = os.environ | {"PYTHONPATH": str(site)}
    code = ("import importlib.util, domadapt, domadapt_cli\n"
            f"assert domadapt.__file__.startswith({str(site)!r}), domadapt.__file__\n"
            "spec = importlib.util.find_spec('cli')  # a dev install may map it to a checkout\n"
            f"assert spec is None or not str(spec.origin).startswith({str(site)!r})\n"
            "from domadapt.nn.bin_kernel import kernel_source\n"
            "print(len(kernel_source()))")
    check = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stderr[-2000:]
    assert int(check.stdout) > 1000
    cli = subprocess.run([sys.executable, "-m", "domadapt_cli", "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert cli.returncode == 0 and "train" in cli.stdout, cli.stderr[-2000:]


def _third_party_imports() -> set[str]:
    names = set()
    for path in [*REPO.glob("domadapt/**/*.py"), *REPO.glob("cli/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names
            and n not in ("domadapt", "cli", "__future__")}


def test_every_imported_package_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"],
                *(d for extra in project["optional-dependencies"].values() for d in extra)]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower()
             for d in declared}
    imported = {DISTRIBUTIONS.get(n, n).lower() for n in _third_party_imports()}
    assert {"numpy", "scipy", "torch", "filelock"} <= imported  # the scan sees them
    assert imported - names == set()
