"""``patcher._record.dataclass`` against the standard ``dataclasses.dataclass``: the same classes behave the same."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import sys
from collections.abc import Callable
from typing import Any

import pytest

from patcher import _record

Decorator = Callable[..., Any]


def _define(decorate: Decorator) -> dict[str, Any]:
    """Define the kinds of class the project uses with ``decorate``, in a namespace of their own."""

    @decorate(frozen=True)
    class Point:
        """A frozen record with defaults."""

        x: int
        y: int = 0
        tags: tuple[str, ...] = ()
        raw: bytes = dataclasses.field(default=b"", repr=False)
        note: str | None = dataclasses.field(default=None, repr=False, compare=False)

        @property
        def total(self) -> int:
            return self.x + self.y

    @decorate
    class Bag:
        """A mutable record with factories."""

        name: str
        items: list[int] = dataclasses.field(default_factory=list)
        extra: dict[str, int] = dataclasses.field(default_factory=dict)

    @decorate(frozen=True, kw_only=True)
    class Base:
        """A keyword-only base."""

        a: int
        b: str = "b"

    @decorate(frozen=True, kw_only=True)
    class Child(Base):
        """A keyword-only subclass with fields of its own."""

        c: float = 1.5
        d: tuple[int, ...] = ()

    @decorate(frozen=True)
    class Checked:
        """A record whose __post_init__ validates."""

        n: int

        def __post_init__(self) -> None:
            if self.n < 0:
                raise ValueError("negative")

    @decorate(frozen=True)
    class OwnRepr:
        """A record that writes its own __repr__."""

        v: int

        def __repr__(self) -> str:
            return f"<{self.v}>"

    return {"Point": Point, "Bag": Bag, "Base": Base, "Child": Child, "Checked": Checked, "OwnRepr": OwnRepr}


STD = _define(dataclasses.dataclass)
OURS = _define(_record.dataclass)


def _outcome(make: Callable[[], Any]) -> tuple[str, str]:
    """Return ("ok", repr) or (exception type, message), for comparing the two."""
    try:
        value = make()
    except Exception as exc:  # the comparison is the test
        return type(exc).__name__, str(exc)
    return "ok", repr(value)


def _same(build: Callable[[dict[str, Any]], Any]) -> tuple[Any, Any]:
    std, ours = _outcome(lambda: build(STD)), _outcome(lambda: build(OURS))
    assert std[0] == ours[0], (std, ours)
    if std[0] == "ok":
        assert std[1] == ours[1]
    return std, ours


@pytest.mark.parametrize(
    "build",
    [
        lambda k: k["Point"](1),
        lambda k: k["Point"](1, 2, ("a",), b"x", "n"),
        lambda k: k["Point"](x=3, tags=("t",)),
        lambda k: k["Bag"]("n"),
        lambda k: k["Bag"]("n", [1], {"a": 1}),
        lambda k: k["Base"](a=1),
        lambda k: k["Child"](a=1, c=2.0, d=(1,)),
        lambda k: k["Checked"](2),
        lambda k: k["OwnRepr"](3),
    ],
)
def test_construction_and_repr_match(build: Callable[[dict[str, Any]], Any]) -> None:
    _same(build)


@pytest.mark.parametrize(
    "build",
    [
        lambda k: k["Point"](),
        lambda k: k["Point"](1, 2, (), b"", None, "too many"),
        lambda k: k["Point"](1, x=2),
        lambda k: k["Point"](1, z=2),
        lambda k: k["Base"](1),
        lambda k: k["Child"](b="x"),
        lambda k: k["Checked"](-1),
    ],
)
def test_bad_construction_fails_alike(build: Callable[[dict[str, Any]], Any]) -> None:
    std, _ = _same(build)
    assert std[0] in ("TypeError", "ValueError")


@pytest.mark.parametrize("kinds", [STD, OURS], ids=["std", "ours"])
def test_equality_hash_and_frozenness(kinds: dict[str, Any]) -> None:
    point = kinds["Point"]
    a, b = point(1, 2, note="x"), point(1, 2, note="y")
    assert a == b and hash(a) == hash(b)  # note is not compared
    assert a != point(1, 3) and a != (1, 2) and a.total == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.x = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        del a.y
    bag = kinds["Bag"]("n")
    bag.items.append(1)
    assert kinds["Bag"]("n").items == []  # a fresh list each time
    bag.name = "m"
    with pytest.raises(TypeError):
        hash(bag)
    assert kinds["Child"](a=1) != kinds["Base"](a=1)
    assert {kinds["Child"](a=1, d=(2,))} == {kinds["Child"](a=1, d=(2,))}


@pytest.mark.parametrize("kinds", [STD, OURS], ids=["std", "ours"])
def test_the_dataclasses_functions_work(kinds: dict[str, Any]) -> None:
    child = kinds["Child"](a=1, d=(2,))
    assert dataclasses.is_dataclass(child)
    assert [f.name for f in dataclasses.fields(child)] == ["a", "b", "c", "d"]
    assert dataclasses.asdict(child) == {"a": 1, "b": "b", "c": 1.5, "d": (2,)}
    changed = dataclasses.replace(child, c=3.0)
    assert changed.c == 3.0 and changed.a == 1 and child.c == 1.5
    with pytest.raises(ValueError):
        dataclasses.replace(kinds["Checked"](1), n=-1)
    assert copy.deepcopy(child) == child
    point = kinds["Point"](1, 2)
    assert point.__match_args__ == ("x", "y", "tags", "raw", "note")


def test_pickle_round_trip() -> None:
    # Pickle finds a class by its module and name: use module-level classes of the project.
    from patcher.header import Header

    header = Header(tensors={}, metadata=None, header_len=8, data_len=0, raw=b"{}      ")
    assert pickle.loads(pickle.dumps(header)) == header


def test_the_project_classes_use_it() -> None:
    """The records of the patch path are made by patcher._record (that is what keeps start-up cheap)."""
    from patcher import header, plan, splice

    for cls in (header.Header, plan.PatchPlan, splice.WriteResult):
        assert cls.__init__.__module__ == "patcher._record", cls
    assert sys.modules["patcher._record"].__name__ == "patcher._record"


def test_an_undocumented_class_costs_no_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard decorator documents a class without a docstring with ``inspect.signature(cls)``.

    With no generated ``__init__`` that is the signature of ``object.__init__``, parsed from its text with
    ``tokenize``, whose pattern alone takes ~1.6 ms to compile: on the patch path that was 4 ms of start-up.
    The class gets the same ``Name(field, ...)`` line without it; a docstring of its own is kept.
    """
    import inspect

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect.signature was called")

    monkeypatch.setattr(inspect, "signature", refuse)

    @_record.dataclass(frozen=True)
    class Plain:
        a: int
        b: str = "x"

    @_record.dataclass
    class Documented:
        """Its own words."""

        c: int

    assert Plain.__doc__ == "Plain(a, b)"
    assert Documented.__doc__ == "Its own words."
    assert Plain(1) == Plain(1, "x") and Documented(2).c == 2
