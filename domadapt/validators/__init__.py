"""Unsupervised validators: scores of a model computed WITHOUT target labels, for model
selection. One module per validator, each registering itself in `VALIDATORS` when imported
(`base` holds the contract); a new validator is one new file here.

Built in, in this order (the order of their log.csv columns):

    source   accuracy on the held-out source split (--source-val-fraction > 0; higher is better)
    entropy  mean prediction entropy on the target (lower is better)
    snd      soft neighborhood density on the target (Saito et al., ICCV 2021; higher is better)
    dev      deep embedded validation risk (You et al., ICML 2019; lower is better)

then every other module of this package (a plug-in), in the order of its file name.
"""

from domadapt.registry import import_submodules

import_submodules(__name__, __path__, first=("source", "entropy", "snd", "dev"))

from domadapt.validators.base import (
    HOLDOUT_HINT,
    VALIDATORS,
    EvalOutputs,
    Holdout,
    Validator,
    accuracy,
    register_validator,
)
from domadapt.validators.dev import dev_importance_weights, dev_risk, dev_weighted_risk
from domadapt.validators.entropy import prediction_entropy
from domadapt.validators.snd import soft_neighborhood_density

__all__ = [
    "HOLDOUT_HINT", "VALIDATORS", "EvalOutputs", "Holdout", "Validator", "accuracy",
    "dev_importance_weights", "dev_risk", "dev_weighted_risk", "prediction_entropy",
    "register_validator", "soft_neighborhood_density",
]
