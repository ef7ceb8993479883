"""Stochastic depth (--drop_path_rate): set on the config, under the name the architecture gives it, before
the model is built from it (from scratch or from a checkpoint)."""

from imgft.errors import UserError

# transformers' own configs all call it drop_path_rate; the others are the names that timm-style and
# torchvision-style remote-code models use.
DROP_PATH_FIELDS = ("drop_path_rate", "drop_path", "stochastic_depth_prob", "stochastic_depth_rate")


def set_drop_path_rate(config, rate):
    """Set `rate` on `config`'s stochastic-depth field; None leaves the config's own value."""
    if rate is None:
        return
    name = next((field for field in DROP_PATH_FIELDS if hasattr(config, field)), None)
    if name is None:
        raise UserError(
            f"--drop_path_rate: {type(config).__name__} has no stochastic depth setting "
            f"(none of {', '.join(DROP_PATH_FIELDS)}); leave --drop_path_rate unset"
        )
    if isinstance(getattr(config, name), (list, tuple)):
        raise UserError(
            f"--drop_path_rate: {type(config).__name__}'s {name} is a list, one rate per stage; "
            f"set it with --config_overrides {name}=[...] instead"
        )
    setattr(config, name, rate)
