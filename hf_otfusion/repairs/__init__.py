"""The repairs: what runs on a fused model after averaging, one module per repair, each registered in
:data:`hf_otfusion.registry.REPAIRS` when it is imported.

- ``none``: the fused model as averaging left it;
- ``reset_bn`` (:func:`reset_norm_stats`): BatchNorm running statistics recomputed on calibration data;
- ``repair`` (:func:`repair_model`): REPAIR, each hidden channel's mean and std set to its parents';
- ``refit`` (:func:`refit_model`): every linear and conv layer re-solved in closed form onto its parents' outputs.

Each registered ``fn`` follows one contract: ``fn(fused, parents, calibration, *, weights, couplings, device, plan,
example_input, exported, params) -> nn.Module`` (``params``: an instance of the unit's parameters model). A new
repair is one module here that registers its unit, and one import below.
"""

# the imports below register the repairs in this order, the order the config, the card and --help list them
from .none import NONE

# isort: split
from .reset_bn import RESET_BN, reset_norm_stats

# isort: split
from .repair import REPAIR, repair_model

# isort: split
from .refit import REFIT, RefitParameters, refit_model

__all__ = ["NONE", "REFIT", "REPAIR", "RESET_BN", "RefitParameters", "refit_model", "repair_model",
           "reset_norm_stats"]
