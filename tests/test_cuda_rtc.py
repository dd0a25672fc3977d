"""cuda_rtc's search for NVRTC in the nvidia-* wheels pip's CUDA torch installs (their lib folders are
not on the loader's path): the layouts of nvidia-cuda-nvrtc-cu12 (nvidia/cuda_nvrtc/lib) and of the
CUDA 13 wheels (nvidia/cu13/lib), the library of the asked major version only, never its builtins or
`.alt` variants (other libraries, loaded by NVRTC itself)."""

from __future__ import annotations

from llmarch.runtime.cuda_rtc import nvrtc_in_packages


def _touch(root, rel):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return str(p)


def test_finds_the_major_versions_library_in_either_wheel_layout(tmp_path):
    a, b = tmp_path / "site-a", tmp_path / "site-b"
    cu12 = _touch(a, "nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
    _touch(a, "nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.9")
    _touch(a, "nvidia/cuda_nvrtc/lib/libnvrtc.alt.so.12")
    cu13 = _touch(b, "nvidia/cu13/lib/libnvrtc.so.13")
    _touch(b, "nvidia/cu13/lib/libnvrtc-builtins.so.13.0")
    _touch(b, "nvidia/cu13/lib/libcublas.so.13")
    roots = [str(a), str(b), str(tmp_path / "missing")]
    assert nvrtc_in_packages("12", roots) == [cu12]
    assert nvrtc_in_packages("13", roots) == [cu13]
    assert nvrtc_in_packages("11", roots) == []
