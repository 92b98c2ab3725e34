"""The datasets: one module each, registering its `DatasetSpec` in `DATASETS` when imported
(every module of this package is). A new named dataset is one new file here; built in, in
this order: officehome, pacs, folder, styledigits."""

from domadapt.registry import import_submodules

import_submodules(__name__, __path__, first=("officehome", "pacs", "folder", "styledigits"))
