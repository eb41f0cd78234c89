"""Build script: metadata lives in pyproject.toml; this adds the native extension ``untangle_ext._C``.

Always install with ``pip install --no-build-isolation -e .`` (see Makefile) so the
extension compiles against the torch already installed. The CPU kernels are always
built; the CUDA kernels too when torch has CUDA and nvcc exists (no GPU needed).
Environment switches: ``UNTANGLE_EXT_NO_NATIVE=1`` builds no extension (the package
then JIT-builds it or falls back to PyTorch), ``UNTANGLE_EXT_NO_CUDA=1`` builds CPU only.
CUDA architectures: ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``), always with PTX for the
newest entry so that newer GPU generations can JIT-compile the kernels.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_namespace_packages, setup

PACKAGES = find_namespace_packages(include=["untangle_ext", "untangle_ext.*"], exclude=["*.__pycache__"])


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_include_dirs() -> list:
    """The pip CUDA toolkit headers (nvidia/cu13/include): the system toolkit may lack cusparse.h."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def _native_build():
    """untangle_ext/_native_build.py loaded by path (importing the package would load the extension)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "untangle_ext", "_native_build.py")
    spec = importlib.util.spec_from_file_location("_native_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    """The ``_C`` extension (CPU, plus CUDA where possible) and the build command, or nothing."""
    if _flag("UNTANGLE_EXT_NO_NATIVE"):
        return [], {}
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # else torch guesses it from nvcc's path
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("untangle_ext: torch is not importable at build time; no native extension built "
              "(install with --no-build-isolation)", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    args = {"cxx": ["-O3", "-g0", "-fopenmp"]}  # torch picks the C++ standard
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = (cuda_home and shutil.which(os.path.join(cuda_home, "bin", "nvcc"))) or shutil.which("nvcc")
    use_cuda = torch.version.cuda is not None and bool(nvcc) and not _flag("UNTANGLE_EXT_NO_CUDA")
    kwargs = dict(extra_compile_args=args, extra_link_args=["-fopenmp"])
    if use_cuda:
        archs = _native_build()
        # Required when no GPU is visible; PTX of the newest arch runs on later GPU generations.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs.with_ptx(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        args["nvcc"] = ["-O3", f"-DUNTANGLE_EXT_PTX_ARCH={archs.ptx_arch(os.environ['TORCH_CUDA_ARCH_LIST'])}"]
        ext = cpp_extension.CUDAExtension(
            "untangle_ext._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=_cuda_include_dirs(), **kwargs)
    else:
        ext = cpp_extension.CppExtension("untangle_ext._C", sources, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


EXT_MODULES, CMDCLASS = _extensions()
setup(packages=PACKAGES, ext_modules=EXT_MODULES, cmdclass=CMDCLASS)
