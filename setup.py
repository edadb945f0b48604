"""Build script for sae_sparse.

Native code (csrc/) is optional:
  * the C++ CPU extension ``sae_sparse._C`` is always built, unless SAE_SPARSE_NO_NATIVE=1;
  * CUDA sources (csrc/cuda/*.cu) are built into ``sae_sparse._C_cuda`` only when nvcc is found
    and the installed torch was built with CUDA (SAE_SPARSE_NO_CUDA=1 skips them).
Without native code the package runs on its ``torch`` (and ``triton``) backends and says so in
``sae_sparse.available_backends()``.

Install with ``pip install -e . --no-build-isolation`` so the build uses the torch you already
have (build isolation would download a different torch).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("SAE_SPARSE_NO_NATIVE"):
        print("sae_sparse: SAE_SPARSE_NO_NATIVE=1, building no native extensions")
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    import torch

    cxx = ["-O3", "-fopenmp"]
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    exts = [
        CppExtension(
            "sae_sparse._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if cuda_sources and not _flag("SAE_SPARSE_NO_CUDA"):
        if CUDA_HOME is not None and torch.version.cuda is not None:
            exts.append(
                CUDAExtension(
                    "sae_sparse._C_cuda",
                    cuda_sources + sorted(glob.glob("csrc/cuda/*.cpp")),
                    include_dirs=[os.path.join(ROOT, "csrc")],
                    extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
                )
            )
        else:
            print("sae_sparse: no nvcc or CPU-only torch, skipping CUDA sources")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="sae_sparse",
    version="0.1.0",
    description="Fused kernels for trainable sparse latent edits in SAE bases",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sae_sparse", "sae_sparse.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm"],
    package_data={"sae_sparse": ["demo_assets/*.json", "demo_assets/*/*"]},
    entry_points={"console_scripts": ["sae-sparse=sae_sparse.cli:main"]},
    extras_require={
        "train": ["transformers>=4.40", "tokenizers", "matplotlib"],
        "triton": ["triton>=3.4"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.4", "transformers>=4.40", "matplotlib",
                 "eai-sparsify==1.3.3"],
        "sparsify": ["eai-sparsify>=1.3"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
