"""Declarative option specs: an optimizer states what its options must be, one checker enforces
it.

A :class:`Spec` says what one value must be and raises ``ValueError("Invalid <name>: <value>
(must be ...)")`` otherwise; an :class:`OptionSpecs` holds an optimizer's specs, which of them
may differ between param groups, and the relations between options.
"""
from __future__ import annotations

import math
import numbers
import operator
from numbers import Integral, Real
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["Bool", "Int", "Number", "OneOf", "OptionChecks", "OptionSpecs", "Spec"]


def _fmt(v: float) -> str:
    return f"{v:g}"


class Spec:
    """What one option must be: ``accepts(value)`` and the words of the requirement."""

    requirement = ""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def check(self, name: str, value: Any) -> None:
        if not self.accepts(value):
            raise ValueError(f"Invalid {name}: {value!r} (must be {self.requirement})")


class Number(Spec):
    """A real number (not a bool) between ``low`` and ``high``; NaN is always refused.

    ``none``: None is accepted too.  ``tensor``: a one-element Tensor is accepted (its value is
    checked).  ``note``: appended to the requirement.
    """

    def __init__(self, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False, none: bool = False, tensor: bool = False,
                 note: str = "") -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.none, self.tensor = none, tensor
        if high == math.inf and not (high_open and low == -math.inf):
            words = f"a number {'>' if low_open else '>='} {_fmt(low)}"
        else:
            words = (f"in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}"
                     f"{')' if high_open else ']'}")
        self.requirement = words + (" or None" if none else "") + (f" ({note})" if note else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        if self.tensor and isinstance(value, Tensor):
            value = float(value)
        elif not isinstance(value, Real) or isinstance(value, bool):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def check(self, name: str, value: Any) -> None:
        if self.tensor and isinstance(value, Tensor) and value.numel() != 1:
            raise ValueError(f"Invalid {name}: a Tensor {name} must have one element, "
                             f"got shape {tuple(value.shape)}")
        super().check(name, value)


class Int(Spec):
    """An int (not a bool) in ``[low, high]``; ``none``: None is accepted too."""

    def __init__(self, low: int = 1, high: int | None = None, *, none: bool = False) -> None:
        self.low, self.high, self.none = low, high, none
        self.requirement = (f"an int >= {low}" + (f" and <= {high}" if high is not None else "")
                            + (" or None" if none else ""))

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        return (isinstance(value, Integral) and not isinstance(value, bool) and value >= self.low
                and (self.high is None or value <= self.high))


class Bool(Spec):
    requirement = "a bool"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


class OneOf(Spec):
    """One of the given values (strings, None, dtypes, ...)."""

    def __init__(self, *values: Any) -> None:
        self.values = values
        words = [repr(v) for v in values]
        self.requirement = (words[0] if len(words) == 1
                            else f"{', '.join(words[:-1])} or {words[-1]}")

    def accepts(self, value: Any) -> bool:
        return any(value is v or (type(value) is type(v) and value == v) for v in self.values)


class OptionSpecs:
    """An optimizer's option specs.

    Args:
        specs: option name -> :class:`Spec`.
        per_group: the options that may differ between param groups; every other option is one
            setting for the run and must agree in all groups.
        relations: checks between options (each raises ValueError naming an option).
    """

    def __init__(self, specs: dict[str, Spec], per_group: Iterable[str] = (),
                 relations: Iterable[Callable[[dict], None]] = ()) -> None:
        self.specs = dict(specs)
        self.per_group = tuple(per_group)
        self.relations = tuple(relations)
        unknown = set(self.per_group) - set(self.specs)
        assert not unknown, unknown

    def extend(self, specs: dict[str, Spec], per_group: Iterable[str] = (),
               relations: Iterable[Callable[[dict], None]] = ()) -> "OptionSpecs":
        """These specs plus more (a subclass's options)."""
        return OptionSpecs({**self.specs, **specs}, self.per_group + tuple(per_group),
                           self.relations + tuple(relations))

    def check(self, options: dict) -> None:
        """ValueError naming the first option of ``options`` that its spec refuses."""
        for name, spec in self.specs.items():
            spec.check(name, options[name])
        for relation in self.relations:
            relation(options)

    def check_groups(self, groups: list[dict]) -> None:
        """Every group's options, and the options that must agree between groups."""
        first = groups[0]
        for i, group in enumerate(groups):
            self.check(group)
            for name in self.specs:
                if name not in self.per_group and group[name] != first[name]:
                    raise ValueError(f"Invalid {name} in param group {i}: {group[name]!r} differs "
                                     f"from group 0 ({first[name]!r}); only "
                                     f"{', '.join(self.per_group)} may differ")


# Option values that cannot change in place (a Tensor or a list can: those are checked every time)
_IMMUTABLE = (numbers.Number, str, type(None), torch.dtype)


def _immutable(x) -> bool:
    return isinstance(x, _IMMUTABLE) or (type(x) is tuple and all(map(_immutable, x)))


def _kind(x):
    """The type of ``x``, per element for a tuple (``False == 0``: types tell them apart)."""
    return tuple(map(_kind, x)) if type(x) is tuple else type(x)


class OptionChecks:
    """``specs.check_groups(groups)`` at every step, skipped while no option of any group has
    changed since the checks last passed.  They cost more than the ops of a small step, and
    options change rarely (an LR schedule changes ``lr``, which is then checked again).  The
    checks depend only on the options' types and values, so unchanged ones pass again."""

    def __init__(self, specs: OptionSpecs) -> None:
        self.specs = specs
        self._options = operator.itemgetter(*specs.specs)  # a group's option values, in C
        self._passed: tuple[list, list] | None = None  # their types and values at the last pass

    def __call__(self, groups: list[dict]) -> None:
        values = [self._options(g) for g in groups]
        types = [tuple(map(_kind, v)) for v in values]
        # types first: values are compared only when they are all of the immutable kinds passed
        if self._passed is None or types != self._passed[0] or values != self._passed[1]:
            self.specs.check_groups(groups)
            immutable = all(_immutable(x) for v in values for x in v)
            self._passed = (types, values) if immutable else None
