"""Hand-written CUDA C++ kernels: compiled at first use, cached on disk, launched through the driver.

Why this route: a user machine with only pip packages has no CUDA toolkit, but PyTorch's CUDA
wheels already bring NVRTC (``nvidia-cuda-nvrtc``) and the driver brings ``libcuda``. So the
``.cu`` sources beside this file (header-free: fp16/bf16 handled in PTX) are compiled by NVRTC
through ctypes (~0.5 s per source), or by ``nvcc`` when NVRTC is missing and a toolkit is on the
PATH. The cubin is cached under ``$SPARSEWISE_CACHE/kernels`` keyed by source hash, GPU
architecture and compiler version, loaded with ``cuModuleLoadData`` and launched with
``cuLaunchKernel`` on PyTorch's current stream, so launches are captured by CUDA graphs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).resolve().parent


class KernelBuildError(RuntimeError):
    """No compiler could build a kernel source (message says which were tried and why)."""


def cache_dir() -> Path:
    root = Path(os.environ.get("SPARSEWISE_CACHE", Path.home() / ".cache" / "sparsewise")).expanduser()
    return root / "kernels"


# ------------------------------------------------------------------------------------------- NVRTC
_nvrtc = None
_nvrtc_lock = threading.Lock()


def _nvrtc_candidates() -> list[str]:
    found = []
    for base in sys.path + [os.path.dirname(torch.__file__)]:
        found += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so*")))
        found += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libnvrtc.so*")))
    found += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libnvrtc*.so*")))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    name = ctypes.util.find_library("nvrtc")
    if name:
        found.append(name)
    return [path for path in dict.fromkeys(found) if "builtins" not in os.path.basename(path)]


def _load_nvrtc():
    global _nvrtc
    with _nvrtc_lock:
        if _nvrtc is None:
            errors = []
            for path in _nvrtc_candidates():
                try:
                    # NVRTC dlopens its builtins by soname: load them from the same folder first
                    for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                    _nvrtc = ctypes.CDLL(path)
                    break
                except OSError as exc:
                    errors.append(f"{path}: {exc}")
            if _nvrtc is None:
                _nvrtc = False
        return _nvrtc or None


def _nvrtc_version(lib) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"nvrtc{major.value}.{minor.value}"


def _compile_nvrtc(lib, source: str, name: str, arch: str) -> bytes:
    program = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None)
    if status:
        raise KernelBuildError(f"nvrtcCreateProgram failed with status {status}")
    options = [f"--gpu-architecture=sm_{arch}", "--std=c++17", "-default-device"]
    array = (ctypes.c_char_p * len(options))(*[option.encode() for option in options])
    try:
        status = lib.nvrtcCompileProgram(program, len(options), array)
        if status:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(program, log)
            raise KernelBuildError(f"NVRTC could not compile {name}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(program, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(program, cubin)
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _compile_nvcc(nvcc: str, source_path: Path, arch: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kernel.cubin"
        command = [nvcc, "-cubin", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-std=c++17",
                   str(source_path), "-o", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise KernelBuildError(f"nvcc could not compile {source_path.name}:\n{done.stderr}")
        return out.read_bytes()


def compile_source(filename: str, arch: str) -> bytes:
    """The cubin of ``filename`` (beside this module) for ``sm_<arch>``, from the disk cache or built."""
    source_path = SOURCE_DIR / filename
    source = source_path.read_text()
    lib = _load_nvrtc()
    nvcc = shutil.which("nvcc")
    if lib is not None:
        compiler = _nvrtc_version(lib)
    elif nvcc:
        compiler = "nvcc:" + subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
    else:
        raise KernelBuildError(
            "no CUDA compiler found: sparsewise's kernels need NVRTC (pip package nvidia-cuda-nvrtc, which "
            "PyTorch's CUDA wheels install) or nvcc on the PATH.")
    key = hashlib.sha256(f"{source}\0{arch}\0{compiler}".encode()).hexdigest()[:20]
    cached = cache_dir() / f"{source_path.stem}-sm{arch}-{key}.cubin"
    if cached.is_file():
        return cached.read_bytes()
    cubin = _compile_nvrtc(lib, source, filename, arch) if lib is not None else _compile_nvcc(nvcc, source_path, arch)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False, suffix=".tmp") as handle:
        handle.write(cubin)
    os.replace(handle.name, cached)
    return cubin


# ------------------------------------------------------------------------------------------ driver
_driver = None


def _load_driver():
    global _driver
    if _driver is None:
        _driver = ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so.1")
        _driver.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 6 + [
            ctypes.c_uint, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    return _driver


def _check(status: int, what: str) -> None:
    if status:
        text = ctypes.c_char_p()
        _load_driver().cuGetErrorString(status, ctypes.byref(text))
        raise RuntimeError(f"{what} failed: CUDA error {status} ({(text.value or b'?').decode()})")


class Kernel:
    """One ``extern "C"`` kernel of a loaded module; ``signature`` is "p" (pointer) / "i" (int32) per argument."""

    def __init__(self, function: ctypes.c_void_p, name: str, signature: str):
        self.function, self.name, self.signature = function, name, signature

    def __call__(self, grid: tuple[int, int, int], block: int, *args, stream: int | None = None) -> None:
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments, got {len(args)}")
        values = []
        for kind, arg in zip(self.signature, args, strict=True):
            if kind == "p":
                values.append(ctypes.c_void_p(0 if arg is None else arg.data_ptr()))
            else:
                values.append(ctypes.c_int(int(arg)))
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        if stream is None:
            stream = torch.cuda.current_stream().cuda_stream
        _check(_load_driver().cuLaunchKernel(self.function, grid[0], grid[1], grid[2], block, 1, 1, 0,
                                             ctypes.c_void_p(stream), params, None), f"launch of {self.name}")


class Module:
    """A compiled source loaded on one device; kernels are looked up by name and kept."""

    def __init__(self, filename: str, device: torch.device):
        major, minor = torch.cuda.get_device_capability(device)
        self.arch = f"{major}{minor}"
        image = compile_source(filename, self.arch)
        driver = _load_driver()
        with torch.cuda.device(device):
            torch.cuda.current_stream().synchronize()  # makes PyTorch's (primary) context current here
            self.handle = ctypes.c_void_p()
            _check(driver.cuModuleLoadData(ctypes.byref(self.handle), ctypes.c_char_p(image)),
                   f"loading {filename}")
        self.kernels: dict[str, Kernel] = {}

    def kernel(self, name: str, signature: str) -> Kernel:
        found = self.kernels.get(name)
        if found is None:
            function = ctypes.c_void_p()
            _check(_load_driver().cuModuleGetFunction(ctypes.byref(function), self.handle, name.encode()),
                   f"finding kernel {name}")
            found = self.kernels[name] = Kernel(function, name, signature)
        return found


_modules: dict[tuple[str, int], Module] = {}
_modules_lock = threading.Lock()


def module(filename: str, device: torch.device) -> Module:
    """The module of ``filename`` loaded on ``device`` (compiled and loaded once per process)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _modules_lock:
        key = (filename, index)
        if key not in _modules:
            _modules[key] = Module(filename, torch.device("cuda", index))
        return _modules[key]


def available() -> bool:
    """True when CUDA is up and a compiler (NVRTC or nvcc) is found."""
    return torch.cuda.is_available() and (_load_nvrtc() is not None or shutil.which("nvcc") is not None)
