"""writesae-plugin: WriteSAE (rank-1 matrix-atom SAEs) for the cache writes of recurrent and hybrid LMs.

Importing the package registers the ``"write_sae"`` architecture and the plugin's offline releases with
SAELens (idempotent). The registration needs SAELens (and torch), so it is done as soon as SAELens is
imported: at once if it already is, otherwise right after SAELens' own import finishes (a post-import hook).
Importing the package alone, or its light modules (``writesae_plugin.cli`` parses arguments without torch),
stays fast; the public classes below load on first access.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading

__version__ = "0.1.0"

__all__ = ["WriteSAE", "WriteSAEConfig", "TrainingWriteSAE", "WriteSAETrainingConfig", "register_local_release",
           "__version__"]

_LAZY = {"WriteSAE": ".sae", "WriteSAEConfig": ".sae", "TrainingWriteSAE": ".sae", "WriteSAETrainingConfig": ".sae",
         "register_local_release": ".registry"}
_registered = False
_lock = threading.RLock()


def _register() -> None:
    """Register the architecture and the packaged releases with SAELens (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
        try:
            from .registry import register_packaged_releases
            from .sae import register

            register()
            register_packaged_releases()
        except BaseException:
            _registered = False
            raise


def __getattr__(name: str):
    if name in _LAZY:
        _register()
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _maybe_register(just_loaded: str) -> None:
    """Register once SAELens is imported and no other module of this package is half-way through its own
    import (the registration imports ``.sae``, which may be the module whose import pulled SAELens in)."""
    if _registered or "sae_lens" not in sys.modules or (just_loaded != "sae_lens" and _initializing("sae_lens")):
        return
    if any(n.startswith(__name__ + ".") and n != just_loaded and _initializing(n) for n in list(sys.modules)):
        return
    _remove_hook()
    _register()


class _LoaderAfter:
    """Wraps a module's loader: runs :func:`_maybe_register` after the module executes; everything else is
    the wrapped loader's."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _maybe_register(self._name)

    def __getattr__(self, attr):
        return getattr(self._loader, attr)


class _RegisterAfterSAELens(importlib.abc.MetaPathFinder):
    """Post-import hook: once ``sae_lens`` has been imported (by anyone) the registration runs, then this
    finder removes itself. It wraps the loaders of ``sae_lens`` and of this package's submodules only."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "sae_lens" and not fullname.startswith(__name__ + "."):
            return None
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderAfter(spec.loader, fullname)
        return spec


_HOOK = _RegisterAfterSAELens()


def _remove_hook() -> None:
    for finder in [f for f in sys.meta_path if isinstance(f, _RegisterAfterSAELens)]:
        try:
            sys.meta_path.remove(finder)
        except ValueError:
            pass


if "sae_lens" in sys.modules and not _initializing("sae_lens"):
    _register()
elif not any(isinstance(f, _RegisterAfterSAELens) for f in sys.meta_path):
    sys.meta_path.insert(0, _HOOK)
