"""Stands in for a torchvision that cannot load, so that timm can be imported for parity tests.

timm imports torchvision at import time (transforms, `FrozenBatchNorm2d`), but building and
running an EfficientNet never uses it. PyPI's torchvision wheels are linked against CUDA
torch; next to the CPU-only torch build (what `pip install torch==2.13.0` gives on CI and dev
machines here) their extension fails to load and `import torchvision` raises RuntimeError
("operator torchvision::nms does not exist"). `install_if_broken` then replaces every
`torchvision.*` module with placeholders (any attribute is an empty nn.Module subclass), which
is enough for `import timm` and `timm.create_model`; the model's forward is timm's own, so
parity tests still compare against the real reference implementation.
"""

import enum
import importlib.abc
import importlib.machinery
import sys
import types


def _placeholder_module(torch):
    class Placeholder(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            if name == "InterpolationMode":
                return enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC BOX HAMMING "
                                 "LANCZOS NEAREST_EXACT")
            return type(name, (torch.nn.Module,), {})
    return Placeholder


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, module_type):
        self._module_type = module_type

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return self._module_type(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def install_if_broken() -> str | None:
    """Installs the placeholders if torchvision is missing or unloadable; returns why, or None."""
    import torch  # pylint: disable=import-outside-toplevel
    try:
        import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        return None
    except Exception as error:  # pylint: disable=broad-except  # RuntimeError for a bad build
        reason = f"{type(error).__name__}: {error}"
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _Finder(_placeholder_module(torch)))
    return reason
