"""The docstring examples of cockpit/, instruments/ and app/ run, and the public API has them.

``test_doctests`` runs every ``>>>`` example in every module of the three packages (one test per
module, so ``pytest -q`` -- the README's ``make test`` -- fails on a broken example and names
its module). ``test_public_api_documented`` walks the public API and fails for any public
function or class without a docstring carrying an ``Example:`` section, and for any public
method without a docstring, or whose docstring has no example while its class's example neither
calls it nor (for hooks the library calls, like ``Instrument.compute``) implements it.

Public means: every name in a module's ``__all__`` (or, in a module without ``__all__``, every
function and class it defines without a leading underscore), every name exported from
``cockpit``, ``instruments`` and ``app``, and every public method or property defined by a
public class. Private modules (``instruments._numerics``) and ``__main__`` modules are left out;
importing a module never starts a server (``app.serve`` only runs when called).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
import types

import pytest
import torch

PACKAGES = ("cockpit", "instruments", "app")

# Modules whose public names do not all have examples yet (none at present). Their examples are
# still *run* by test_doctests; only the completeness check skips them. Add an entry only while a
# module's docstrings are being rewritten, and remove it once its public names all have examples.
INCOMPLETE: tuple[str, ...] = ()

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            if info.name.rsplit(".", 1)[-1] != "__main__":
                names.append(info.name)
    return sorted(names)


MODULES = _module_names()


def run_doctests(module: types.ModuleType) -> tuple[int, int, str]:
    """Run the examples of ``module``; return (failed, attempted, report of the failures)."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    lines: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # examples print tensors as a fresh session would
    try:
        for test in finder.find(module, module.__name__):
            if test.examples:
                runner.run(test, out=lines.append, clear_globs=True)
    finally:
        torch.set_default_dtype(dtype)
    failed, attempted = runner.summarize(verbose=False)
    return failed, attempted, "".join(lines)


def _registries() -> tuple[dict, ...]:
    import cockpit.layers
    import instruments

    return dict(instruments.INSTRUMENTS), dict(cockpit.layers._RULES)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    before = _registries()
    failed, attempted, report = run_doctests(importlib.import_module(name))
    assert failed == 0, f"{failed} of {attempted} examples in {name} failed:\n{report}"
    # Examples that register an instrument or a layer rule remove it again, so the rest of the
    # suite sees the registries as they were.
    assert _registries() == before


def test_a_failing_example_fails():
    mod = types.ModuleType("broken_example")
    exec(  # noqa: S102 - a throwaway module with one right and one wrong example
        'def f():\n    """Doc.\n\n    Example:\n        >>> 1 + 1\n        2\n'
        '        >>> 1 + 1\n        3\n    """\n',
        mod.__dict__,
    )
    failed, attempted, report = run_doctests(mod)
    assert (failed, attempted) == (1, 2) and "Expected:\n    3" in report


# ---------------------------------------------------------------------- completeness


def _has_example(doc: str | None) -> bool:
    return bool(doc) and re.search(r"^\s*Examples?:\s*$", doc, re.M) is not None and ">>>" in doc


def _example_code(doc: str | None) -> str:
    lines = (line.strip() for line in (doc or "").splitlines())
    return "\n".join(line[4:] for line in lines if line[:4] in (">>> ", "... "))


def _defined_here(obj, module: types.ModuleType) -> bool:
    return getattr(obj, "__module__", None) == module.__name__


def public_objects() -> dict[str, object]:
    """``{qualified name: function or class}`` of the public API (see the module docstring)."""
    out: dict[str, object] = {}
    for name in MODULES:
        if any(part.startswith("_") for part in name.split(".")):
            continue
        mod = importlib.import_module(name)
        if hasattr(mod, "__all__"):
            objs = [getattr(mod, n) for n in mod.__all__]
        else:
            objs = [v for k, v in vars(mod).items() if not k.startswith("_")]
            objs = [v for v in objs if _defined_here(v, mod)]
        for obj in objs:
            if inspect.isclass(obj) or inspect.isfunction(obj):
                out.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
    return out


def _skipped(qualname: str) -> bool:
    return any(qualname == m or qualname.startswith(m + ".") for m in INCOMPLETE)


def _methods(cls: type) -> dict[str, object]:
    out = {}
    for k, v in vars(cls).items():
        if k.startswith("_"):
            continue
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if inspect.isfunction(v) or isinstance(v, property):
            out[k] = v
    return out


def _class_doc(cls: type) -> str | None:
    doc = cls.__doc__
    if doc and re.fullmatch(rf"{cls.__name__}\(.*\)", doc.strip()):
        return None  # the signature a dataclass writes when it has no docstring
    return doc


def _method_problem(cls: type, name: str) -> str | None:
    """Why method ``name`` of ``cls`` is not documented (None when it is).

    A method is documented when its docstring has an example, or when the example of the class
    that documents it calls it or (for hooks such as ``Instrument.compute``, which the Cockpit
    calls) shows how a subclass implements it. An override without a docstring of its own
    inherits the documentation of the base method it overrides.
    """
    for owner in cls.__mro__:
        if name not in vars(owner):
            continue
        attr = vars(owner)[name]
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if isinstance(attr, property):
            return None if attr.__doc__ else "no docstring"
        if not getattr(attr, "__doc__", None):
            continue  # look for the documented base method
        if _has_example(attr.__doc__):
            return None
        code = _example_code(_class_doc(owner))
        if re.search(rf"\.{name}\b|\bdef {name}\(", code):
            return None
        return "neither its docstring nor its class's example uses it"
    return "no docstring"


def missing_docs() -> list[str]:
    """Public names without a docstring or an example, with the reason."""
    problems = []
    for qualname, obj in public_objects().items():
        if _skipped(qualname):
            continue
        doc = _class_doc(obj) if inspect.isclass(obj) else obj.__doc__
        if not doc:
            problems.append(f"{qualname}: no docstring")
            continue
        if not _has_example(doc):
            problems.append(f"{qualname}: no Example section")
        if inspect.isclass(obj):
            for name in _methods(obj):
                problem = _method_problem(obj, name)
                if problem:
                    problems.append(f"{qualname}.{name}: {problem}")
    return problems


def test_public_api_documented():
    problems = missing_docs()
    assert not problems, f"{len(problems)} public names lack docs:\n" + "\n".join(problems)


def test_completeness_check_can_fail():
    assert any(q.startswith("cockpit.factors.") for q in public_objects())
    assert not _has_example(None) and not _has_example("Doc without an example.")
    assert _has_example("Doc.\n\nExample:\n    >>> 1\n    1\n")

    class Base:
        """Doc.

        Example:
            >>> Base().run()
        """

        def run(self):
            """Run."""

        def stop(self):
            """Stop (no example, and the class's example does not use it)."""

    class Child(Base):
        """Doc."""

        def run(self):  # inherits Base.run's documentation
            pass

        def undocumented(self):
            pass

    assert _method_problem(Base, "run") is None and _method_problem(Child, "run") is None
    assert _method_problem(Base, "stop") and _method_problem(Child, "undocumented")
