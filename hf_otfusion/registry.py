"""Registries of named units: merge methods, solvers and repairs, each one frozen record resolved by name.

A unit is registered once, where it is implemented; the YAML, ``fuse``, the card, the demo and ``--help`` all read
its name, description and parameters from here, so adding one is one file and no list elsewhere drifts.

Example:
    >>> from hf_otfusion.registry import REPAIRS
    >>> REPAIRS.names()[:2]
    ('none', 'reset_bn')
    >>> sorted(REPAIRS.get("refit").needs)
    ['calibration', 'couplings']
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from .errors import FusionError


class NoParameters(BaseModel):
    """The parameters model of a unit that takes none."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Unit:
    """One registered unit.

    Attributes:
        name: the name a config or ``fuse`` call uses.
        description: one sentence on what it does (the card, the demo and ``--help`` show it).
        reference: the paper or page it follows ("" for none).
        needs: what it needs besides the models: ``"calibration"`` (data), ``"couplings"`` (the transport maps of
            the fusion, for a repair), ``"example_input"``.
        parameters: a frozen pydantic model of its own options (``NoParameters`` when it has none).
        fn: the function that runs it (``None`` for a unit that does nothing, such as the repair ``none``).
        label: a short label for tables (default: the name).
    """

    name: str
    description: str
    fn: Callable[..., Any] | None = None
    reference: str = ""
    needs: frozenset[str] = frozenset()
    parameters: type[BaseModel] = NoParameters
    label: str = ""

    @property
    def needs_data(self) -> bool:
        return "calibration" in self.needs

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class MergeMethod(Unit):
    """A merge method.

    ``fn(models, options, *, target, weights, calibration, example_input, plan, device, progress) -> nn.Module``
    merges loaded models in memory; ``streamed(sources, plans, out, options, *, target, weights, dtype, device,
    max_shard_size, progress, out_names, costs) -> None`` merges checkpoints on disk tensor by tensor (``None``: in
    memory only). ``options`` is the config's ``parameters:`` section as the ``parameters`` model (None for a method
    that takes none, ``NoParameters``: then no calibration data either). A method whose ``needs`` hold ``"plan"``
    aligns the parents: the merge traces the target's alignment plan (``plan``, ``plans``) for it; the others get
    None and ``[]``. ``card_title`` and ``parent_role`` are the model card's words for its output and for a
    parent other than the target; ``tags`` the card's extra Hub tags."""

    streamed: Callable[..., Any] | None = None
    card_title: str = ""
    parent_role: str = ""
    tags: tuple[str, ...] = ()

    @property
    def takes_parameters(self) -> bool:
        return self.parameters is not NoParameters

    @property
    def aligns(self) -> bool:
        """Whether it aligns the parents (and needs the target's alignment plan)."""
        return "plan" in self.needs


U = TypeVar("U", bound=Unit)


@dataclass
class Registry(Generic[U]):
    """Units of one kind by name, in registration order.

    ``modules`` are imported on the first lookup, so the units defined there register themselves without this
    module importing them (no import cycle).
    """

    kind: str
    modules: tuple[str, ...] = ()
    _units: dict[str, U] = field(default_factory=dict)
    _loaded: bool = False

    def register(self, unit: U) -> U:
        """Add ``unit``; a second unit of the same name replaces the first, with a warning."""
        if unit.name in self._units and self._units[unit.name] is not unit:
            warnings.warn(f"{self.kind} {unit.name!r} registered twice: the new one replaces the old", stacklevel=2)
        self._units[unit.name] = unit
        return unit

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.modules:
                importlib.import_module(module)

    def unregister(self, name: str) -> U:
        """Remove the unit called ``name`` and return it (a test's throwaway unit)."""
        self._load()
        return self._units.pop(name)

    def get(self, name: str) -> U:
        """The unit called ``name``; a ``FusionError`` naming the choices when there is none."""
        self._load()
        try:
            return self._units[name]
        except (KeyError, TypeError):
            raise FusionError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self._units)}") from None

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        self._load()
        return tuple(self._units)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._units

    def __iter__(self) -> Iterator[U]:
        self._load()
        return iter(tuple(self._units.values()))

    def help(self) -> str:
        """``name: description`` for each unit, one per line (``--help`` and docs)."""
        return "\n".join(f"{u.name}: {u.description}" for u in self)


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", ("hf_otfusion.methods",))
SOLVERS: Registry[Unit] = Registry("solver", ("hf_otfusion.transport",))
REPAIRS: Registry[Unit] = Registry("repair", ("hf_otfusion.repairs",))
