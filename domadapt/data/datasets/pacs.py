"""PACS (Li et al., "Deeper, Broader and Artier Domain Generalization", ICCV 2017): 7 classes
in 4 styles."""

from __future__ import annotations

from domadapt.data.registry import DatasetSpec, Domain, register_dataset

PACS = register_dataset(DatasetSpec(
    name="pacs",
    description="PACS (Li et al., ICCV 2017): 7 classes in photo/art/cartoon/sketch style",
    domains=(
        Domain("art_painting", "A", 2048),
        Domain("cartoon", "C", 2344),
        Domain("photo", "P", 1670),
        Domain("sketch", "S", 3929),
    ),
    classes=("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"),
))
