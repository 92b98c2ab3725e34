"""Packages to install (the rest of the metadata is in pyproject.toml): `domadapt` and its
subpackages, and the repository's `cli/` folder under the name `domadapt_cli`, so that no
generic top-level name (`cli`) lands in site-packages."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["domadapt", "domadapt.*"]), "domadapt_cli"],
      package_dir={"domadapt_cli": "cli"})
