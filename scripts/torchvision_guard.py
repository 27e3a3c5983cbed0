"""Lets `import torchvision` (and so `import open_clip`, `clip_benchmark`) work when torchvision's C++ ops
cannot load beside the installed torch.

Why: PyPI's only x86_64 torchvision 0.28.0 wheel links libtorch_cuda.so, so its `_C` extension does not
load beside torch 2.13.0+cpu (PyPI has no CPU build and no source distribution of torchvision). Torchvision
itself handles a missing `_C` (`torchvision.extension._has_ops()` is then False and its ops raise a clear
error when called), except in `torchvision/_meta_registrations.py`, which registers fake kernels for
`torchvision::nms` unconditionally and so fails at import ("operator torchvision::nms does not exist").
The Python side that open_clip and CLIP_benchmark use (models, transforms, datasets) needs no C++ op.

What: scripts/setup.sh copies this file into .venv's site-packages and adds a `.pth` line that imports it
at interpreter start. It adds one finder to `sys.meta_path` that answers only for
`torchvision._meta_registrations`, and only when torchvision's own flag says its C++ ops did not load:
then that module is an empty one (there are no ops to register fake kernels for). With a torchvision
that matches torch (a CUDA node) the finder steps aside and the real module loads. Importing this module
imports nothing heavy (no torch): every Python start pays for it.
"""
from __future__ import annotations

import sys

GUARDED = "torchvision._meta_registrations"


class _EmptyModuleLoader:
    """Creates the guarded module with nothing in it but this docstring's explanation."""

    @staticmethod
    def create_module(spec):
        return None                                     # Python's default module object

    @staticmethod
    def exec_module(module):
        module.__doc__ = ("Left empty by torchvision_guard: torchvision's C++ ops did not load, so there are "
                          "no fake kernels to register.")


class TorchvisionOpsGuard:
    """A `sys.meta_path` finder for the one module that cannot import without torchvision's C++ ops."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname != GUARDED:
            return None
        extension = sys.modules.get("torchvision.extension")   # torchvision/__init__ imports it first
        if extension is None or extension._has_ops():
            return None                                     # ops loaded (or an unknown layout): the real one
        from importlib.machinery import ModuleSpec
        return ModuleSpec(fullname, _EmptyModuleLoader(), origin=__file__)


def install() -> None:
    if not any(type(f).__name__ == TorchvisionOpsGuard.__name__ for f in sys.meta_path):  # once, however imported
        sys.meta_path.insert(0, TorchvisionOpsGuard())


install()
