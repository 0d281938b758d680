"""Bad-input cases of training runs: the experiment trackers of ``train.loggers`` (an unknown name, a missing
package), optimiser rules that name no parameter, and the work-dir lock file."""

from __future__ import annotations

from tests.conftest import tiny_run_config
from tests.reliability.bad_input import case, train_args

# The harness (test_bad_input.py) reports the wandb package as not installed for this case.
TRACKER_PACKAGE_MISSING = "tracker_package_missing"


@case
def unknown_logger(tmp):
    return train_args(tmp, tiny_run_config(train={"loggers": ["tensorbord"]})), \
        "train.loggers[0]: 'tensorbord' is not one of ['tensorboard', 'mlflow', 'wandb'] (did you mean 'tensorboard'?)"


@case
def loggers_not_a_list(tmp):
    return train_args(tmp, tiny_run_config(train={"loggers": "mlflow"})), "train.loggers: expected a list, got str"


@case
def tracker_package_missing(tmp):
    """Refused before the work dir is created, naming the extra that installs the package."""
    return train_args(tmp, tiny_run_config(train={"loggers": ["tensorboard", "wandb"]})), \
        "train.loggers: 'wandb' needs the wandb package: pip install 'segrank[wandb]'"


@case
def lr_mult_key_names_no_parameter(tmp):
    """A typo in a parameter-name rule is refused before the work dir exists, with the names it probably meant."""
    return train_args(tmp, tiny_run_config(train={"lr_mult": {"decode_head.mlfc": 3.0}})), \
        "train.lr_mult: key 'decode_head.mlfc' matches no parameter of this model; nearest names: decode_head.ml_fc."


@case
def lock_file_is_a_folder(tmp):
    (tmp / "run" / "train.lock").mkdir(parents=True)
    return train_args(tmp, tiny_run_config()), "run/train.lock: cannot lock the work dir (Is a directory)"
