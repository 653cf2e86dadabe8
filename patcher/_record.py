"""``dataclass`` without the start-up cost: the same classes, with methods that are not compiled at import.

The standard decorator writes ``__init__``, ``__repr__``, ``__eq__``, ``__hash__`` and the frozen
``__setattr__`` / ``__delattr__`` of every class as source text and compiles each with ``exec`` while the module
is imported: about half a millisecond a class, and the patch path defines some thirty, which was the largest
single cost of starting ``nunchaku-patch`` (measured with ``python -X importtime``; see README, Performance).

Here the standard decorator still does the bookkeeping (``__dataclass_fields__``, so :func:`dataclasses.fields`,
:func:`dataclasses.replace`, :func:`dataclasses.asdict` and :func:`dataclasses.is_dataclass` work unchanged), with
code generation switched off; the methods are shared functions that read the field lists. Only what this project
uses is supported: ``frozen``, ``kw_only``, fields with ``default``, ``default_factory``, ``repr`` and ``compare``,
inheritance, and ``__post_init__``. Type checkers see :func:`dataclasses.dataclass` itself.
``tests/test_record.py`` holds the two side by side.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

__all__ = ["dataclass"]

if TYPE_CHECKING:
    from dataclasses import dataclass
else:

    def dataclass(cls: type | None = None, /, *, frozen: bool = False, kw_only: bool = False) -> Any:
        """Make ``cls`` a dataclass (``@dataclass``, ``@dataclass(frozen=True, kw_only=True)``)."""

        def wrap(cls: type) -> type:
            return _process(cls, frozen=frozen, kw_only=kw_only)

        return wrap if cls is None else wrap(cls)


_MISSING = dataclasses.MISSING


def _process(cls: type, *, frozen: bool, kw_only: bool) -> type:
    own = dict(cls.__dict__)
    # The standard decorator documents a class without a docstring with inspect.signature(cls); with no
    # generated __init__ that parses object.__init__'s text signature through tokenize (~4 ms at start-up).
    undocumented = not own.get("__doc__")
    if undocumented:
        cls.__doc__ = cls.__name__  # a placeholder, replaced below
    # Fields, defaults, __match_args__ and the rest of the bookkeeping; no method is generated.
    cls = dataclasses.dataclass(cls, init=False, repr=False, eq=False, kw_only=kw_only)
    fields = dataclasses.fields(cls)
    names = tuple(field.name for field in fields)
    if undocumented:
        cls.__doc__ = f"{cls.__name__}({', '.join(names)})"
    positional = tuple(field.name for field in fields if not field.kw_only)
    compared = tuple(field.name for field in fields if field.compare)
    shown = tuple(field.name for field in fields if field.repr)
    hashed = tuple(field.name for field in fields if (field.compare if field.hash is None else field.hash))
    required = frozenset(
        field.name for field in fields if field.default is _MISSING and field.default_factory is _MISSING
    )
    post_init = hasattr(cls, "__post_init__")
    qualname = cls.__qualname__
    assign = object.__setattr__ if frozen else setattr

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(positional):
            raise TypeError(
                f"{qualname}.__init__() takes {len(positional) + 1} positional arguments but {len(args) + 1} were given"
            )
        values = dict(zip(positional, args, strict=False))  # fewer args than fields is fine
        for name, value in kwargs.items():
            if name in values:
                raise TypeError(f"{qualname}.__init__() got multiple values for argument {name!r}")
            if name not in names:
                raise TypeError(f"{qualname}.__init__() got an unexpected keyword argument {name!r}")
            values[name] = value
        if len(values) < len(names):
            missing = [name for name in names if name in required and name not in values]
            if missing:
                listed = ", ".join(repr(name) for name in missing)
                raise TypeError(f"{qualname}.__init__() missing {len(missing)} required argument(s): {listed}")
            for field in fields:
                if field.name not in values:
                    factory = field.default_factory
                    values[field.name] = field.default if factory is _MISSING else factory()
        for name in names:
            assign(self, name, values[name])
        if post_init:
            self.__post_init__()

    def __repr__(self: Any) -> str:
        inside = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"{type(self).__qualname__}({inside})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return tuple(getattr(self, name) for name in compared) == tuple(getattr(other, name) for name in compared)

    def __hash__(self: Any) -> int:
        return hash(tuple(getattr(self, name) for name in hashed))

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    methods: dict[str, Any] = {"__init__": __init__, "__repr__": __repr__, "__eq__": __eq__}
    if frozen:
        methods.update(__setattr__=__setattr__, __delattr__=__delattr__)
    for name, method in methods.items():
        if name not in own:  # a method the class writes itself wins, as with the standard decorator
            method.__qualname__ = f"{qualname}.{name}"
            setattr(cls, name, method)
    # The standard rule for eq=True: frozen classes hash their compared fields, the others are unhashable
    # (unless the class defines __hash__ itself).
    if own.get("__hash__") is None:
        if frozen:
            __hash__.__qualname__ = f"{qualname}.__hash__"
        cls.__hash__ = __hash__ if frozen else None  # type: ignore[assignment]
    return cls
