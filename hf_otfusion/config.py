"""The merge configuration: a mergekit-style YAML validated by frozen pydantic models.

Example:
    >>> from hf_otfusion.config import MergeConfig
    >>> cfg = MergeConfig.model_validate({
    ...     "merge_method": "otfusion",
    ...     "models": [{"model": "timm/resnet18.a1_in1k"}, {"model": "you/resnet18-seed1@main"}],
    ... })
    >>> cfg.target_index
    0
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import ConfigError, FusionError
from .registry import MERGE_METHODS, REPAIRS, SOLVERS, NoParameters, Registry

DType = Literal["float32", "float16", "bfloat16"]


def _expected(names: tuple[str, ...]) -> str:
    """``'a', 'b' or 'c'``: the choices as pydantic words a Literal's."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def registered(registry: Registry, value: Any) -> str:
    """``value`` if ``registry`` holds a unit of that name, else a validation error listing the choices (worded as
    for a Literal field, so a config's message reads as before the registries)."""
    if not isinstance(value, str) or value not in registry:
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": _expected(registry.names()), "kind": registry.kind})
    return value


def _choices(registry: Registry) -> Callable[[dict[str, Any]], None]:
    """A field's JSON schema from the registry when the schema is made: its names and their descriptions."""

    def extra(schema: dict[str, Any]) -> None:
        schema["enum"] = list(registry.names())
        schema["description"] = f"{schema.get('description', '')}: " + "; ".join(
            f"{unit.name}: {unit.description}" for unit in registry)

    return extra


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelParameters(_Frozen):
    """Per-model parameters."""

    weight: float = Field(1.0, ge=0.0, description="relative weight in the average (normalised over models)")


class ModelEntry(_Frozen):
    """One parent: a model reference (Hub id with optional @revision, hf-hub:/timm/ name, or local folder)."""

    model: str = Field(min_length=1)
    parameters: ModelParameters = ModelParameters()

    @field_validator("model")
    @classmethod
    def _no_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a model reference cannot be blank")
        return value.strip()


class FusionParameters(_Frozen):
    """Options of the OT fusion (see ``hf_otfusion.fuse``)."""

    alignment: Literal["weights", "activations", "learned"] = Field(
        "weights", description="how the maps are found: from the weights, from activations on calibration data, or "
        "learned (weights alignment, then the maps beyond permutations trained on calibration data against the "
        "parents' ensemble, every weight frozen)")
    solver: str = Field("emd", description="the optimal transport solver (hf_otfusion.registry.SOLVERS)",
                        json_schema_extra=_choices(SOLVERS))
    reg: float = Field(0.05, gt=0.0, description="Sinkhorn regularisation, relative to the largest cost")
    marginals: Literal["uniform", "importance"] = "uniform"
    repair: str = Field("none", description="what corrects the fused model after fusion, on the calibration data "
                        "(hf_otfusion.registry.REPAIRS)", json_schema_extra=_choices(REPAIRS))
    repair_parameters: SerializeAsAny[BaseModel] | None = Field(
        None, description="the repair's own options, validated by its parameters model (e.g. refit's alpha, prior, "
        "target); unset: its defaults")
    match_heads: bool = Field(True, description="match attention heads to heads before the channels inside them")
    residual: Literal["shared", "mean", "orthogonal"] = Field(
        "shared", description="cost of a residual stream: solved once (shared), or the mean of its writers' costs; "
        "orthogonal: any orthogonal map where the stream allows it (norm gains folded into their readers), found by "
        "weight matching (needs sweeps >= 1; in activations mode the stream's activations count too)"
    )
    head_maps: Literal["permutation", "orthogonal"] = Field(
        "permutation", description="inside attention heads: permutations, or any orthogonal map (a rotation per "
        "channel pair where rotary embeddings allow only that) where a check on the model allows it, fitted to the "
        "target after the alignment")
    hidden_maps: Literal["permutation", "signed"] = Field(
        "permutation", description="hidden units: permutations, or a permutation and a sign per unit where a check "
        "on the model allows it (a gated MLP's up row and down column), found by weight matching (needs sweeps >= 1)")
    standardize: bool = Field(False, description="activations mode: compare channels by correlation")
    learn_steps: int = Field(200, ge=1, description="alignment 'learned': Adam steps on the maps")
    learn_lr: float = Field(0.01, gt=0.0, description="alignment 'learned': Adam's learning rate")
    learn_from: Literal["weights", "activations"] = Field(
        "weights", description="alignment 'learned': the matching its maps start from (weight matching on the weights, "
        "or on the weights and the calibration data's activations, as alignment 'activations' with sweeps)")
    sweeps: int = Field(0, ge=0, description="weight matching by coordinate descent (Git Re-Basin) after the single "
                        "pass: at most this many sweeps over every space (0: none); emd, equal widths; in activations "
                        "mode each space without heads scores a map by its activations' similarity too")
    strict: bool = Field(False, description="refuse a plan that leaves hidden channels fixed that a permutation "
                         "could move (an op without a tracer rule, a structure the plan cannot express)")

    @field_validator("solver")
    @classmethod
    def _solver(cls, value: Any) -> str:
        return registered(SOLVERS, value)

    @field_validator("repair")
    @classmethod
    def _repair(cls, value: Any) -> str:
        return registered(REPAIRS, value)

    @field_validator("sweeps", mode="before")
    @classmethod
    def _sweeps(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"sweeps must be an integer >= 0, got {value!r}")
        return value

    @field_validator("repair_parameters", mode="before")
    @classmethod
    def _repair_parameters(cls, value: Any, info: ValidationInfo) -> BaseModel | None:
        """Validated by the repair's own parameters model (the repair is validated first)."""
        repair = info.data.get("repair")
        if value is None or repair is None:  # no options, or an unknown repair (reported on its own field)
            return None
        model = REPAIRS.get(repair).parameters
        if model is NoParameters:
            raise PydanticCustomError("no_parameters", "repair '{repair}' takes no parameters", {"repair": repair})
        if isinstance(value, model):
            return value
        if isinstance(value, BaseModel):  # another repair's options
            value = value.model_dump(exclude_unset=True)
        if not isinstance(value, Mapping):
            raise PydanticCustomError("mapping_type", "should be a mapping of the options of repair '{repair}': "
                                      "{names}", {"repair": repair, "names": ", ".join(model.model_fields)})
        try:
            return model.model_validate(dict(value))
        except ValidationError as err:  # one error, its field named below this one (see format_validation_error)
            problem = err.errors()[0]
            msg = problem["msg"]
            if problem["type"] == "extra_forbidden":
                msg = f"unknown field: repair {repair!r} takes {', '.join(model.model_fields)}"
            raise PydanticCustomError("nested_field", "{field}: {message}",
                                      {"field": _field_path(problem["loc"]), "message": msg}) from None

    @model_validator(mode="after")
    def _orthogonal(self) -> FusionParameters:
        unused = {"learn_steps", "learn_lr", "learn_from"} & self.model_fields_set
        if self.alignment != "learned" and unused:
            raise ValueError(f"{sorted(unused)[0]}: only alignment='learned' trains maps")
        if self.alignment == "learned" and self.residual != "orthogonal" and self.head_maps != "orthogonal":
            raise ValueError("alignment='learned' trains the maps beyond permutations: set residual='orthogonal' "
                             "and/or head_maps='orthogonal'")
        for name, value in (("residual", self.residual), ("hidden_maps", self.hidden_maps)):
            if value not in ("orthogonal", "signed"):
                continue
            if self.sweeps < 1:
                raise ValueError(f"{name}={value!r} is solved by weight matching: set sweeps >= 1 (e.g. 15)")
        return self

    @property
    def on_activations(self) -> bool:
        """Whether the alignment reads the calibration data's activations: activations mode, or learned maps started
        from it (``learn_from="activations"``)."""
        return self.alignment == "activations" or self.alignment == "learned" and self.learn_from == "activations"

    @property
    def repair_params(self) -> BaseModel:
        """The repair's options: ``repair_parameters``, else its parameters model's defaults."""
        if self.repair_parameters is not None:
            return self.repair_parameters
        return REPAIRS.get(self.repair).parameters()


class DatasetConfig(_Frozen):
    """A dataset to calibrate or evaluate on: a Hub dataset name or a local folder / data file."""

    dataset: str = Field(min_length=1)
    name: str | None = Field(None, description="the dataset's configuration (subset) name")
    split: str = "train"
    num_samples: int | None = Field(None, gt=0, description="use the first N samples after a seeded shuffle")
    batch_size: int = Field(32, gt=0)
    seed: int = 0
    image_column: str | None = None
    text_column: str | None = None
    label_column: str | None = None


class FinetuneConfig(DatasetConfig):
    """A short fine-tune of the merged model on labelled data (the dataset fields as for calibration/evaluation).

    ``num_samples`` rows of ``split`` are loaded in memory and drawn in seeded random mini-batches of
    ``batch_size`` for ``steps`` gradient steps of cross-entropy.
    """

    steps: int = Field(gt=0, description="number of gradient steps")
    lr: float = Field(gt=0.0, description="learning rate")
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _momentum_for_sgd(self) -> FinetuneConfig:
        if "momentum" in self.model_fields_set and self.optimizer != "sgd":
            raise ValueError("finetune.momentum: only the 'sgd' optimizer uses momentum")
        return self


class MergeConfig(_Frozen):
    """A whole merge: parents, the target (``base_model``), method, options, data and output dtype."""

    merge_method: str = Field("otfusion", description="how the parents are merged (hf_otfusion.registry."
                              "MERGE_METHODS)", json_schema_extra=_choices(MERGE_METHODS))
    base_model: str | None = Field(None, description="the target; default: the first model")
    models: list[ModelEntry] = Field(min_length=2)
    parameters: FusionParameters | None = None
    calibration: DatasetConfig | None = None
    evaluation: DatasetConfig | None = None
    finetune: FinetuneConfig | None = Field(None, description="a short fine-tune after fusion (and repair)")
    dtype: DType = Field("float32", description="dtype of the saved model (fusion itself runs in float32)")
    tokenizer_source: Literal["base"] | None = Field(
        None, description="which tokenizer the output keeps: 'base' (the target's) merges parents whose tokenizers "
        "differ; unset, such parents are refused")

    @model_validator(mode="before")
    @classmethod
    def _best_with_data(cls, data: Any) -> Any:
        """With calibration data and no word on how to use it, the best measured combination: activations
        alignment and the closed-form refit (docs/results/refit.md). Written into the config, so the saved config
        and the card's fusion options show it."""
        if not isinstance(data, dict) or data.get("calibration") is None:
            return data
        if not _takes_parameters(data.get("merge_method")):
            return data
        params = data.get("parameters")
        if params is not None and not isinstance(params, dict):
            return data
        params = dict(params or {})
        params.setdefault("alignment", "activations")
        params.setdefault("repair", "refit")
        return {**data, "parameters": params}

    @field_validator("merge_method")
    @classmethod
    def _merge_method(cls, value: Any) -> str:
        return registered(MERGE_METHODS, value)

    @model_validator(mode="after")
    def _consistent(self) -> MergeConfig:
        refs = [m.model for m in self.models]
        if self.base_model is not None and self.base_model not in refs:
            raise ValueError(f"base_model: {self.base_model!r} is not one of the models; list it under models too")
        if all(m.parameters.weight == 0 for m in self.models):
            raise ValueError("models: at least one model needs a weight > 0")
        method = MERGE_METHODS.get(self.merge_method)
        if not method.takes_parameters:
            if self.parameters is not None:
                raise ValueError(f"parameters: merge_method {method.name!r} ({method.description}) takes no fusion "
                                 "parameters")
            if self.calibration is not None:
                raise ValueError(f"calibration: merge_method {method.name!r} uses no calibration data")
            return self
        params = self.fusion_parameters
        needs_data = params.alignment != "weights" or REPAIRS.get(params.repair).needs_data
        if needs_data and self.calibration is None:
            what = f"parameters.alignment '{params.alignment}'" if params.alignment != "weights" else \
                f"parameters.repair '{params.repair}'"
            raise ValueError(f"calibration: {what} needs a calibration dataset")
        if not needs_data and self.calibration is not None:
            raise ValueError("calibration: is only used with parameters.alignment 'activations' or 'learned', or a "
                             "repair")
        if "reg" in params.model_fields_set and params.solver != "sinkhorn":
            raise ValueError("parameters.reg: only the 'sinkhorn' solver is regularised")
        return self

    @property
    def fusion_parameters(self) -> FusionParameters:
        return self.parameters if self.parameters is not None else FusionParameters()

    @property
    def target_index(self) -> int:
        """Index of the target (``base_model``, else the first model) in ``models``."""
        if self.base_model is None:
            return 0
        return [m.model for m in self.models].index(self.base_model)

    @property
    def weights(self) -> list[float]:
        return [m.parameters.weight for m in self.models]

    def to_yaml(self) -> str:
        """The config as YAML (fields left at their defaults are omitted)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_unset=True), sort_keys=False)


def _takes_parameters(merge_method: Any) -> bool:
    """Whether a (raw) merge_method takes fusion parameters: the default does, an unknown name does not."""
    name = "otfusion" if merge_method is None else merge_method
    return isinstance(name, str) and name in MERGE_METHODS and MERGE_METHODS.get(name).takes_parameters


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming its field, e.g. ``models.1.parameters.weight: ...``."""
    lines = []
    for problem in err.errors():
        msg = problem["msg"].removeprefix("Value error, ")
        loc = _field_path(problem["loc"])
        if problem["type"] == "extra_forbidden":
            msg = "unknown field"
        if problem["type"] == "nested_field":  # a field of a nested options model (repair_parameters)
            loc, msg = f"{loc}.{problem['ctx']['field']}", problem["ctx"]["message"]
        if problem["type"] == "value_error" and ":" in msg.split(" ", 1)[0]:
            lines.append(msg)  # our own checks name their field already
        else:
            lines.append(f"{loc}: {msg}")
    return "\n".join(lines)


def fusion_error(err: ValidationError) -> str:
    """The problems of ``FusionParameters`` as keyword arguments: one line per problem, each naming its option, e.g.
    ``solver: unknown solver 'x': choose one of emd, sinkhorn``."""
    lines = []
    for problem in err.errors():
        loc = _field_path(problem["loc"])
        msg = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "literal_error":
            kind = problem.get("ctx", {}).get("kind", loc.replace("_", " "))
            choices = re.findall(r"'([^']*)'", problem.get("ctx", {}).get("expected", ""))
            msg = f"unknown {kind} {problem['input']!r}: choose one of {', '.join(choices)}"
        elif problem["type"] == "nested_field":
            loc, msg = f"{loc}.{problem['ctx']['field']}", problem["ctx"]["message"]
        lines.append(msg if msg.startswith(f"{loc} ") else f"{loc}: {msg}")
    return "\n".join(lines)


def resolve_options(options: FusionParameters | None = None, overrides: Mapping[str, Any] | None = None, *,
                    caller: str = "fuse") -> FusionParameters:
    """``options`` (default: every default) with ``overrides`` (``FusionParameters`` field names) applied, validated
    once; a ``FusionError`` names an unknown option or each bad field.

    Example:
        >>> resolve_options(FusionParameters(solver="sinkhorn"), {"reg": 0.1}).reg
        0.1
        >>> resolve_options(None, {"solver": "exact"})
        Traceback (most recent call last):
        ...
        hf_otfusion.errors.FusionError: solver: unknown solver 'exact': choose one of emd, sinkhorn
    """
    overrides = dict(overrides or {})
    unknown = [name for name in overrides if name not in FusionParameters.model_fields]
    if unknown:
        raise FusionError(f"{caller}() got an unknown option {unknown[0]!r}: the options are "
                          f"{', '.join(FusionParameters.model_fields)}")
    if options is not None and not isinstance(options, FusionParameters):
        raise FusionError(f"options must be a FusionParameters, got {type(options).__name__}")
    if not overrides:
        return options if options is not None else FusionParameters()
    data = {name: getattr(options, name) for name in options.model_fields_set} if options is not None else {}
    try:
        return FusionParameters.model_validate({**data, **overrides})
    except ValidationError as err:
        raise FusionError(fusion_error(err)) from None


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    """Validate a mapping (parsed YAML) as a ``MergeConfig``; a ``ConfigError`` names each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source} is not a valid merge config:\n{format_validation_error(err)}") from None


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file.

    Example:
        >>> cfg = load_config("examples/mnist-otfusion.yml")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a text file in UTF-8 (byte {err.start}): save the config as UTF-8 "
                          "YAML") from None
    except OSError as err:
        raise ConfigError(f"cannot read the config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_config(data, source=str(path))
