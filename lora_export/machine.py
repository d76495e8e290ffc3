"""The machine record written beside every figure: CPU, SIMD features, load, threads, versions."""

from __future__ import annotations

import contextlib
import os

import onnxruntime as ort
import torch

#: The CPU features ONNX Runtime's and PyTorch's fast kernels depend on (fp32 FMA, int8 dot products, bf16).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def machine_record() -> dict:
    """What the figures of a report were measured on: CPU model, cores and SIMD features (from /proc/cpuinfo where
    there is one), load, threads, library versions."""
    import platform

    import onnx

    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": ort.__version__}
    with contextlib.suppress(ImportError):
        import onnxruntime_genai

        versions["onnxruntime_genai"] = onnxruntime_genai.__version__
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": {flag: flag in flags for flag in SIMD_FLAGS},
            "platform": platform.platform(), "load_average": load,
            "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": "default (one per core)",
            "versions": versions,
            "latency_caveat": "latency is this machine's, under the load above; compare ratios measured in one "
                              "run, not absolute figures across machines"}
