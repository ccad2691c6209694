"""Builds the optional native extension ``kdlib._C`` with torch's extension tooling.

C++ (CPU, OpenMP) sources in ``csrc/`` are always compiled; the CUDA sources in ``csrc/cuda/``
are added when torch is a CUDA build and nvcc is found. Set ``KDLIB_NO_EXTENSION=1`` to skip the
extension entirely: kdlib imports and runs without it (``kdlib info`` says what is missing).
Everything else (metadata, dependencies, the console script) lives in pyproject.toml.
"""

import glob
import os
import sys

from setuptools import setup


def _extension_modules():
    if os.environ.get("KDLIB_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("kdlib: torch is not installed, building without kdlib._C", file=sys.stderr)
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources:
        return [], {}
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    extra = {"cxx": ["-O3", "-std=c++17", *openmp]}
    macros = []
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("KDLIB_NO_CUDA") != "1"
        and bool(cuda_sources)
    )
    if with_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        macros.append(("KDLIB_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        sources = cpp_sources + cuda_sources
    else:
        ext_cls = cpp_extension.CppExtension
        sources = cpp_sources
    ext = ext_cls(
        name="kdlib._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=openmp,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
