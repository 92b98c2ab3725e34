"""Datasets for domain adaptation: registry, manifests, splits, transforms, loaders.

The datasets are registered in `DATASETS`, one module each in `domadapt.data.datasets`.

The trainer's whole interface::

    spec = get_dataset("officehome")                 # DatasetSpec (UserError if unknown)
    root = resolve_root(spec, cfg.root)              # styledigits: generated on demand if None
    src = spec.resolve_domain("Ar", root)            # -> "Art"
    items = domain_items(spec, root, src)            # [(path, label)], or split="train"/"test"
    ds = DomainDataset(items, build_transform(224, 256, train=True, flip=spec.hflip))
    loader = InfiniteLoader(ds, 32, seed=cfg.seed, num_workers=2)
    images, labels = next(loader); state = loader.state_dict()   # {"epoch", "position"}
    for images, labels in eval_loader(test_ds, 64, num_workers=2): ...
"""

from domadapt.data import datasets  # noqa: F401  (registers every dataset)
from domadapt.data.dataset import DomainDataset, load_image
from domadapt.data.loaders import InfiniteLoader, eval_loader
from domadapt.data.manifest import IMAGE_EXTENSIONS, domain_items, split_items
from domadapt.data.registry import (
    DATASETS,
    DatasetSpec,
    Domain,
    get_dataset,
    list_datasets,
    register_dataset,
    resolve_root,
)
from domadapt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DatasetSpec",
    "Domain",
    "DomainDataset",
    "InfiniteLoader",
    "build_transform",
    "domain_items",
    "eval_loader",
    "get_dataset",
    "list_datasets",
    "load_image",
    "register_dataset",
    "resolve_root",
    "split_items",
]
