"""RunConfig: every setting of one run, in one frozen dataclass, hashed into a run key.

The core fields below are what every run has; the chosen method's and norm's own
hyper-parameters (declared by the plug-ins, e.g. DANN's `adv_weight`, BIN's `gate_lr_mult`)
live in `method_options` / `norm_options`, resolved with their defaults. Only those of the
chosen plug-ins are stored, so options a run cannot use (DANN's in a source-only run, the
gates' in a BN run) never change its key. Every field's help text is in its metadata: the CLI
builds its options from it (`cli/options.py`), so a setting is declared once. A preset
(`domadapt.presets`, a registry) names a set of overrides of these defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from domadapt.backbones import check_backbone, check_image_size
from domadapt.data import DATASETS
from domadapt.data.transforms import INTERPOLATIONS, RESIZE_MODES, check_transform_options
from domadapt.errors import UserError
from domadapt.methods import METHODS, get_method
from domadapt.norms import NORMS, get_norm
from domadapt.presets import PRESETS, preset_overrides  # noqa: F401  (PRESETS: re-exported)
from domadapt.provenance import file_sha256
from domadapt.registry import (
    HparamSpec,
    check_finite,
    hparam_specs,
    hparams_dict,
    make_hparams,
    merged_specs,
)
from domadapt.schedules import SCHEDULE_FORMS, check_schedule_options

SETTINGS = ("transfer", "multidomain", "dg")
PLUGIN_FIELDS = ("method_options", "norm_options")

# Fields that do not change what a run computes: left out of the run key.
NON_KEY_FIELDS = frozenset({"root", "num_workers", "eval_every", "checkpoint_every"})
# Fields added after runs were recorded: in the run key only when they differ from the value
# every earlier run had (given here), so such a run keeps the key it had before they existed.
KEY_WHEN_SET: dict[str, Any] = {"eval_max_images": None, "hparams_seed": None,
                                "hparams_trial": None, "compile": False}

RUN, DATA, OPT, EVAL, SYS = "Run", "Data", "Optimization", "Evaluation", "System"


def config_field(default: Any, help: str, panel: str = RUN, *, cli: bool = True,
                 choices: tuple[str, ...] | None = None) -> Any:
    """A RunConfig field with its help text (`cli=False`: not a command-line option)."""
    return field(default=default,
                 metadata={"help": help, "panel": panel, "cli": cli, "choices": choices})


@dataclass(frozen=True)
class RunConfig:
    """Every hyper-parameter of one run. `key()` names its run directory."""

    dataset: str = config_field("officehome", " | ".join(DATASETS.names()), DATA)
    root: str | None = config_field(None, "dataset folder (optional for styledigits)", DATA)
    setting: str = config_field("transfer", "transfer (source -> target) | multidomain | dg "
                                "(every domain but the target -> the target, never seen)",
                                cli=False)
    source: str | None = config_field(None, "source domain (full or short name)", DATA)
    target: str | None = config_field(None, "target domain (full or short name; dg: the domain "
                                      "held out)", DATA)
    method: str = config_field("dann", "training method (`domadapt methods` lists them)")
    norm: str = config_field("bn", "normalization kind (`domadapt methods` lists them)")
    backbone: str = config_field("resnet50", "torchvision BN model name, digitnet or timm:<name>")
    pretrained: str = config_field("imagenet", "imagenet | none | PATH (state dict; in a "
                                   "sweep, {source} in PATH becomes each task's source domain)")
    pretrained_sha256: str | None = config_field(
        None, "sha256 of the --pretrained file (filled in by `with_weights_hash`); when set, "
        "the run key hashes the weights instead of the path that named them", cli=False)
    bottleneck_dim: int = config_field(256, "bottleneck feature dimension")
    iters: int = config_field(5000, "training iterations")
    batch_size: int = config_field(32, "images per domain per iteration (b source + b target)")
    image_size: int = config_field(224, "crop size (pixels)", DATA)
    resize_size: int = config_field(256, "resize before cropping (pixels)", DATA)
    resize_mode: str = config_field("shorter", "shorter: shorter side to resize-size (aspect "
                                    "kept); square: resize-size x resize-size", DATA,
                                    choices=RESIZE_MODES)
    interpolation: str = config_field("bilinear", "resize filter", DATA,
                                      choices=tuple(INTERPOLATIONS))
    crop_scale_min: float = config_field(0.5, "RandomResizedCrop scale range: min area share",
                                         DATA)
    crop_scale_max: float = config_field(1.0, "RandomResizedCrop scale range: max area share",
                                         DATA)
    lr: float = config_field(0.01, "head learning rate lr0", OPT)
    backbone_lr_mult: float = config_field(0.1, "backbone lr = this x lr0", OPT)
    momentum: float = config_field(0.9, "SGD momentum", OPT)
    nesterov: bool = config_field(True, "Nesterov SGD", OPT)
    weight_decay: float = config_field(1e-3, "SGD weight decay (not on special params)", OPT)
    lr_schedule: str = config_field(
        "progress", "lr0 (1 + gamma x)^-decay with x = p = iteration/iters (progress, Ganin et "
        "al.) or x = iteration (iteration, Transfer-Learning-Library)", OPT,
        choices=SCHEDULE_FORMS)
    lr_gamma: float = config_field(10.0, "lr schedule gamma", OPT)
    lr_decay: float = config_field(0.75, "lr schedule exponent", OPT)
    split_seed: int = config_field(0, "multi-domain train/test split seed", DATA)
    test_fraction: float = config_field(0.2, "multi-domain test share of each domain", DATA)
    source_val_fraction: float = config_field(
        0.0, "hold out this share of the source (stratified, --split-seed) for the val_source "
        "and val_dev validators; 0: train on all of it, as the references do. dg: of each "
        "training domain, default 0.2 (DomainBed's training-domain validation)", EVAL)
    eval_max_images: int | None = config_field(
        None, "evaluate on at most this many images of each evaluation set (a fixed, stratified "
        "subset drawn with --split-seed, the same at every evaluation): fast checks; default: "
        "every image. Part of the run key when set", EVAL)
    adabn: bool = config_field(False, "also log target_acc_adabn: the target accuracy with BN / "
                               "BIN batch statistics re-estimated on the target (AdaBN)", EVAL)
    eval_every: int = config_field(500, "evaluate every N iterations", EVAL)
    checkpoint_every: int = config_field(500, "checkpoint every N iterations", SYS)
    num_workers: int = config_field(2, "data-loading processes", SYS)
    amp: bool = config_field(True, "mixed precision (CUDA only)", SYS)
    channels_last: bool | None = config_field(
        None, "channels_last memory layout (--no-channels-last: NCHW); default auto: on CUDA, "
        "and on CPU for the backbones where it was measured faster", SYS)
    compile: bool = config_field(
        False, "torch.compile the model and the method's heads (inductor; on CPU it needs a C++ "
        "compiler). Pays on long runs: compiling costs about a minute per network and mode on a "
        "CPU, once per process. Part of the run key when set: compiled kernels fuse and reorder "
        "float operations, so a compiled run's numbers differ from the eager run's in rounding "
        "(each is still exactly resumable)", SYS)
    seed: int = config_field(0, "random seed")
    hparams_seed: int | None = config_field(
        None, "seed of the hyper-parameter search that drew this run's values (`sweep "
        "--hparams-seed`, `domadapt.hparam_search`); None: not drawn", cli=False)
    hparams_trial: int | None = config_field(
        None, "trial t >= 1 of that search (`sweep --n-hparams`); None: trial 0, the defaults",
        cli=False)
    method_options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    norm_options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self) -> None:
        check_choice("setting", self.setting, SETTINGS)
        check_choice("method", self.method, METHODS.names())
        check_choice("norm", self.norm, NORMS.names())
        check_backbone(self.backbone)
        for f in core_fields():
            if isinstance(getattr(self, f.name), float):
                check_finite(f"--{f.name.replace('_', '-')}", getattr(self, f.name))
        for name in ("iters", "batch_size", "image_size", "resize_size", "eval_every",
                     "checkpoint_every", "bottleneck_dim"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise UserError(f"--batch-size must be at least 2 (BatchNorm normalises by the "
                            f"batch's statistics), got {self.batch_size}")
        check_image_size(self.backbone, self.image_size)
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        for name in ("seed", "split_seed", "weight_decay", "backbone_lr_mult", "momentum"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.source_val_fraction < 1.0:
            raise UserError(f"--source-val-fraction must lie in [0, 1), got "
                            f"{self.source_val_fraction}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"test fraction must lie in (0, 1), got {self.test_fraction}")
        if self.eval_max_images is not None and self.eval_max_images <= 0:
            raise UserError(f"--eval-max-images must be positive, got {self.eval_max_images}")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        trial, hseed = self.hparams_trial, self.hparams_seed
        if (hseed is None) != (trial is None) or (trial is not None and (trial < 1 or hseed < 0)):
            raise UserError(f"hparams_seed {self.hparams_seed} / hparams_trial "
                            f"{self.hparams_trial}: both unset, or a seed >= 0 and a trial >= 1")
        check_schedule_options(lr_schedule=self.lr_schedule, lr_gamma=self.lr_gamma,
                               lr_decay=self.lr_decay)
        check_transform_options(self.resize_mode, self.interpolation,
                                (self.crop_scale_min, self.crop_scale_max))
        if self.setting == "transfer" and (self.source is None or self.target is None):
            raise UserError("a transfer run needs --source and --target")
        if self.setting == "transfer" and self.source == self.target:
            raise UserError(f"source and target are the same domain: {self.source}")
        if self.setting == "dg" and (self.target is None or self.source is not None):
            raise UserError("a dg run needs --target, the domain held out, and no --source "
                            "(it trains on every other domain)")
        # Resolve the plug-ins' options: defaults filled in, types and ranges checked.
        object.__setattr__(self, "method_options", hparams_dict(make_hparams(
            get_method(self.method).Hparams, dict(self.method_options))))
        object.__setattr__(self, "norm_options", hparams_dict(make_hparams(
            get_norm(self.norm).Hparams, dict(self.norm_options))))

    @property
    def method_hparams(self) -> Any:
        return make_hparams(get_method(self.method).Hparams, self.method_options)

    @property
    def norm_hparams(self) -> Any:
        return make_hparams(get_norm(self.norm).Hparams, self.norm_options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """From `to_dict()` output; also reads configs written before the plug-in options
        existed (their DANN / gate options were top-level fields, gates layer-relative)."""
        if all(k in d for k in PLUGIN_FIELDS):
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in known})
        legacy = dict(d)
        if legacy.get("norm") == "bin":
            legacy.setdefault("gate_lr_rule", "layer")
        return route_options({k: v for k, v in legacy.items() if k not in PLUGIN_FIELDS},
                             ignore_unknown=True)

    def replace(self, **changes: Any) -> RunConfig:
        if "method" in changes and "method_options" not in changes:
            changes["method_options"] = _shared(self.method_options, changes["method"], "method")
        if "norm" in changes and "norm_options" not in changes:
            changes["norm_options"] = _shared(self.norm_options, changes["norm"], "norm")
        return dataclasses.replace(self, **changes)

    def key(self) -> str:
        """Short stable hash of every field that changes the result (not paths or workers).

        Pretrained weights from a file count by their content (`pretrained_sha256`), not by
        the path that named them: the same file named by another path is the same run."""
        d = {k: v for k, v in self.to_dict().items() if k not in NON_KEY_FIELDS
             and not (k in KEY_WHEN_SET and v == KEY_WHEN_SET[k])}
        digest = d.pop("pretrained_sha256")
        if digest:
            d["pretrained"] = f"sha256:{digest}"
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]

    def legacy_key(self) -> str:
        """The key runs had before weights were hashed (the `--pretrained` string instead):
        how run directories made then are still found (`domadapt.rundir.cell_dir`)."""
        return dataclasses.replace(self, pretrained_sha256=None).key()

    def has_key(self, key: str | None) -> bool:
        """Whether `key` names this run: its key, or its legacy key."""
        return key in (self.key(), self.legacy_key())

    def name(self) -> str:
        """Readable run name, e.g. `Art-Clipart_dann_bin_s0`."""
        task = {"transfer": f"{self.source}-{self.target}", "dg": f"dg-{self.target}"}.get(
            self.setting, self.setting)
        method = self.method if self.setting == "transfer" else "erm"
        trial = f"_h{self.hparams_trial}" if self.hparams_trial else ""
        return f"{task}_{method}_{self.norm}_s{self.seed}{trial}"


def _shared(options: dict[str, Any], plugin: str, kind: str) -> dict[str, Any]:
    """The options of `options` that plug-in `plugin` also declares (kept across replace)."""
    cls = (get_method(plugin) if kind == "method" else get_norm(plugin)).Hparams
    names = {s.name for s in hparam_specs(cls)}
    return {k: v for k, v in options.items() if k in names}


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {option} {value!r}; choose from {', '.join(choices)}")


def core_fields() -> list[dataclasses.Field]:
    """RunConfig's own fields (not the plug-in option dicts)."""
    return [f for f in fields(RunConfig) if f.name not in PLUGIN_FIELDS]


def plugin_options() -> dict[str, tuple[HparamSpec, list[str]]]:
    """Every option declared by a registered method or norm: name -> (spec, declared by).
    A plug-in option named like a RunConfig field, or declared by two plug-ins with another
    type or default, is a one-line UserError naming both."""
    owners = [(f"method {n}", cls.Hparams) for n, cls in METHODS.items()]
    owners += [(f"norm {n}", kind.Hparams) for n, kind in NORMS.items()]
    core = {f.name: "the core setting" for f in fields(RunConfig)}
    return merged_specs(owners, reserved=core)


def route_options(values: dict[str, Any], *, ignore_unknown: bool = False) -> RunConfig:
    """A RunConfig from flat `values` (core fields and plug-in options mixed): each plug-in
    option goes to the chosen method or norm that declares it; options of plug-ins the run does
    not use are dropped. An option nobody declares is a UserError (unless `ignore_unknown`)."""
    core = {f.name for f in core_fields()}
    chosen = {k: v for k, v in values.items() if k in core}
    method = chosen.get("method", RunConfig.method)
    norm = chosen.get("norm", RunConfig.norm)
    check_choice("method", method, METHODS.names())
    check_choice("norm", norm, NORMS.names())
    method_names = {s.name for s in hparam_specs(get_method(method).Hparams)}
    norm_names = {s.name for s in hparam_specs(get_norm(norm).Hparams)}
    rest = {k: v for k, v in values.items() if k not in core}
    declared = plugin_options()
    unknown = sorted(set(rest) - set(declared))
    if unknown and not ignore_unknown:
        raise UserError(f"unknown option(s): {', '.join(unknown)}")
    for name in set(rest) - method_names - norm_names - set(unknown):
        _check_unused(name, rest[name])
    return RunConfig(**chosen,
                     method_options={k: v for k, v in rest.items() if k in method_names},
                     norm_options={k: v for k, v in rest.items() if k in norm_names})


def _check_unused(name: str, value: Any) -> None:
    """A plug-in option this run does not use is dropped, but a bad value is still an error."""
    for cls in _hparam_classes():
        if name in {s.name for s in hparam_specs(cls)}:
            make_hparams(cls, {name: value})


def _hparam_classes() -> list[type]:
    return [c.Hparams for _, c in METHODS.items()] + [k.Hparams for _, k in NORMS.items()]


# Defaults of one setting, under the preset and the explicit options (`dg --help` shows them):
# a DG run is source-only (ERM) and holds out 20 % of each training domain to select on
# (DomainBed's training-domain validation, its holdout_fraction); the other settings train on
# every source image.
SETTING_DEFAULTS: dict[str, dict[str, Any]] = {
    "dg": {"method": "source-only", "source_val_fraction": 0.2},
}


def make_config(preset: str | None = None, **options: Any) -> RunConfig:
    """Defaults <- the setting's defaults (SETTING_DEFAULTS) <- preset <- explicit options
    (None means 'not given'); `options` may mix core fields and plug-in options (see
    `route_options`); weights files hashed."""
    values = dict(SETTING_DEFAULTS.get(options.get("setting") or RunConfig.setting, {}))
    values.update(preset_overrides(preset))
    values.update({k: v for k, v in options.items() if v is not None})
    return with_weights_hash(route_options(values))


def with_weights_hash(cfg: RunConfig) -> RunConfig:
    """`cfg` with `pretrained_sha256` filled in when `pretrained` names a readable file (it
    stays None for imagenet / none, and for a missing file, which the model build reports)."""
    if cfg.pretrained_sha256 or cfg.pretrained in ("imagenet", "none"):
        return cfg
    path = Path(cfg.pretrained).expanduser()
    if not path.is_file():
        return cfg
    try:
        return cfg.replace(pretrained_sha256=file_sha256(path))
    except OSError as e:
        raise UserError(f"--pretrained {cfg.pretrained}: cannot read ({e.strerror})") from None
