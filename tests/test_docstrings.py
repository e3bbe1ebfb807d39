"""Every public function and class has a docstring, and so does every public method and property
defined on a public class (a docstring inherited from a base class counts)."""

import importlib
import inspect

MODULES = ["nngeo_ops", "nngeo_ops.ops", "nngeo_ops.linalg", "nngeo_ops.nn", "nngeo_ops.apps"]


def _public_names(module):
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    # A module without __all__ (nngeo_ops.errors): its public names are those it defines itself.
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__
    ]


def _member_function(value):
    """The function behind a class attribute (method, classmethod, staticmethod, property)."""
    if isinstance(value, property):
        return value.fget
    func = getattr(value, "__func__", value)
    return func if inspect.isfunction(func) else None


def _member_doc(cls, name):
    for klass in cls.__mro__:
        if name in vars(klass):
            value = vars(klass)[name]
            doc = value.__doc__ if isinstance(value, property) else getattr(value, "__doc__", None)
            if doc and doc.strip():
                return doc
    return None


def _missing_docstrings():
    missing, seen = [], set()
    for module_name in [*MODULES, "nngeo_ops.errors"]:
        module = importlib.import_module(module_name)
        for name in _public_names(module):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            key = (obj.__module__, obj.__qualname__)
            if key in seen:
                continue
            seen.add(key)
            if not inspect.getdoc(obj):
                missing.append(f"{obj.__module__}.{obj.__qualname__}")
            if not inspect.isclass(obj):
                continue
            for attr, value in vars(obj).items():
                if attr.startswith("_") or _member_function(value) is None:
                    continue
                if not _member_doc(obj, attr):
                    missing.append(f"{obj.__module__}.{obj.__qualname__}.{attr}")
    return seen, missing


def test_public_names_are_found():
    seen, _ = _missing_docstrings()
    # The check must actually see the library's public classes and functions.
    assert len(seen) > 100
    qualnames = {q for _, q in seen}
    assert {"LinearOperator", "cg", "FIM", "Laplace", "ShapeError"} <= qualnames


def test_every_public_name_has_a_docstring():
    _, missing = _missing_docstrings()
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(missing)
