"""The memory pre-flight: before an export or a validation starts, its peak memory is estimated from the
checkpoint's parameter count and the stages asked for, and held against what this process may use. Over it, the
command is refused with one line (exit 2, nothing written) instead of being killed by the kernel (signal 9, no
message) minutes into the work.

* ``memory_limit``: the bytes this process may hold at its peak, and where that figure comes from: the tightest
  of its cgroups' limits (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; its own cgroup and every ancestor) less
  what each cgroup holds beyond reclaimable page cache, and ``MemAvailable`` of /proc/meminfo; plus what this
  process holds already (the estimate is the whole process's peak, interpreter included).
* ``estimate_peak``: ``BASE_BYTES`` + the cost of the costliest stage of a ``Plan`` (``STAGE_COSTS``: fixed bytes
  + a multiple of the fp32 weight bytes, parameters x 4), the export and builds costed the way they will run (in
  memory, or the file way above the external-data threshold). Stages run one after another and free their memory
  in between, so the peak of a command is the largest stage's, not the sum.
* ``check_memory``: both for a checkpoint (its parameter count read without loading it) and a plan; refuses with
  ``MemoryLimitError`` naming both figures, the cheaper options that would fit and the override.

Part of ``export/``: it reads checkpoints (``model/``) and knows when ``export_onnx`` skips onnxslim; the
pipeline and ``lora-export validate`` call it.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, MemoryLimitError
from ..layout import Form
from ..model.checkpoint import checkpoint_summary
from .onnx_files import EXTERNAL_DATA_THRESHOLD, size_text, weights_too_big_for_memory

#: Bytes of one fp32 weight: every stage's memory is counted in multiples of the model's fp32 weights.
FP32_BYTES = 4
#: Resident memory of the interpreter with torch, onnx and ONNX Runtime loaded, before any model: 0.33 GB measured
#: after ``import lora_export.cli``.
BASE_BYTES = 350_000_000
GB = 1e9
#: Peak resident memory of each stage above BASE_BYTES: (fixed bytes, multiple of the model's fp32 weight bytes),
#: fitted to the peaks tools/bench_scale.py measured (tools/results/bench_scale.json, 27M..1.23B parameters;
#: tests/test_memory_preflight.py holds every measured run within 25 %). "in memory": a model at or below the
#: external-data threshold, its proto, onnxslim and checks in memory; "file way": above it, the weights streamed
#: to external data (export_onnx) and the builds made from the file (quantize.write_precision).
STAGE_COSTS: dict[str, tuple[float, float]] = {
    "export merged in memory": (0.2 * GB, 4.5),
    "export adapters in memory": (0.2 * GB, 4.5),
    "genai merged in memory": (0.2 * GB, 4.5),
    "genai adapters in memory": (0.2 * GB, 4.5),
    "export merged file way": (0.2 * GB, 1.08),  # 1.23B: 5.53 GB measured; 405M: 2.25 GB
    "export adapters file way": (0.2 * GB, 1.12),  # 1.23B: 5.71 GB; 405M: 2.38 GB
    "export slots in memory": (0.2 * GB, 4.5),  # not measured: as the adapters form, whose graph it stacks
    "export slots file way": (0.2 * GB, 1.12),
    "genai merged file way": (0.2 * GB, 1.08),  # 1.23B: 5.56 GB; 405M: 2.24 GB
    "genai adapters file way": (0.2 * GB, 1.12),
    "genai slots in memory": (0.2 * GB, 4.5),  # not measured: as the adapters form
    "genai slots file way": (0.2 * GB, 1.12),
    "simplify": (0.2 * GB, 10.0),  # onnxslim and its ORT comparison, in memory only: 105M 4.21 GB, 27M 1.48 GB
    "int8 in memory": (0.2 * GB, 4.0),
    "int4 in memory": (0.2 * GB, 3.0),
    "fp16 in memory": (0.2 * GB, 4.5),
    "int8 file way": (0.2 * GB, 4.0),  # 1.23B: 20.1 GB (ORT's quantizer deep-copies and reloads the model)
    "int4 file way": (0.2 * GB, 2.18),  # 1.23B: 11.2 GB
    "fp16 file way": (0.2 * GB, 2.55),  # 1.23B: 13.0 GB
    "ort format in memory": (0.2 * GB, 3.0),
    "ort format file way": (0.2 * GB, 3.0),
    "validate merged": (0.5 * GB, 2.1),  # 1.23B: 10.7 GB; 405M: 4.40 GB
    "validate adapters": (0.6 * GB, 2.75),  # 1.23B: 13.9 GB; 405M: 5.57 GB
    "validate slots": (0.6 * GB, 2.75),  # not measured: as the adapters form
    "validate genai": (0.5 * GB, 2.05),  # 1.23B: 10.6 GB; 105M: 1.48 GB
}
#: The way an export or build stage runs, as STAGE_COSTS names it: by whether the model goes the file way.
WAYS = {False: " in memory", True: " file way"}
#: How a user leaves each optional stage out of an export (the export stage itself is never optional).
DROP_OPTIONS = {
    "simplify": "--no-simplify",
    "int8": "leaving out --quantize int8",
    "int4": "leaving out --quantize int4",
    "fp16": "leaving out --fp16",
    "ort format": "leaving out --ort-format",
    "validate merged": "--no-validate",
    "validate adapters": "--no-validate",
    "validate slots": "--no-validate",
    "validate genai": "--no-validate",
}
#: The command-line option that skips the check (``export_pipeline(memory_check=False)`` in Python).
OVERRIDE_OPTION = "--no-memory-check"
#: A cgroup limit at or above this is no limit (cgroup v1 writes "unlimited" as 2^63 rounded down to a page).
UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupFiles:
    """The names one cgroup version gives its memory figures: the limit and usage files (bytes), and the
    ``memory.stat`` keys of its page cache and of the shared memory within it (which cannot be reclaimed)."""

    limit: str
    usage: str
    cache: str
    shmem: str


CGROUP_V2 = CgroupFiles("memory.max", "memory.current", "file", "shmem")
CGROUP_V1 = CgroupFiles("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem")


@dataclass(frozen=True)
class Plan:
    """What one command does, stage by stage (``stages``).

    export: the checkpoint is exported (False: ``lora-export validate`` of a model written before); form, genai:
    what is exported or validated; simplify: onnxslim runs; builds: 'int8' / 'int4' / 'fp16' models built from the
    export (with genai: the decoder's precision, when not fp32); ort_format: each model converted to ORT format;
    validate: the model is validated.
    """

    form: Form = Form.MERGED
    genai: bool = False
    export: bool = True
    simplify: bool = False
    builds: tuple[str, ...] = ()
    ort_format: bool = False
    validate: bool = True

    def stages(self, file_way: bool = False) -> list[str]:
        """The keys of STAGE_COSTS this plan runs, in the order they run; ``file_way``: the model goes the file way
        (above the external-data threshold: no onnxslim, the builds made from the file)."""
        way = WAYS[file_way]
        stages = [f"{'genai' if self.genai else 'export'} {self.form}{way}"] if self.export else []
        stages += ["simplify"] * (self.simplify and not file_way) + [build + way for build in self.builds]
        stages += [f"ort format{way}"] * self.ort_format
        if self.validate:
            stages.append("validate genai" if self.genai else f"validate {self.form}")
        return stages

    def cheaper(self, file_way: bool = False) -> list[tuple[tuple[str, ...], list[str]]]:
        """Every way to leave optional stages out of an export, fewest left out first: (the options, as
        DROP_OPTIONS words, the stages that remain). None for a validation alone."""
        stages = self.stages(file_way)
        optional = [stage for stage in stages if _drop_option(stage)] if self.export else []
        return [(tuple(_drop_option(stage) for stage in dropped), [s for s in stages if s not in dropped])
                for size in range(1, len(optional) + 1) for dropped in itertools.combinations(optional, size)]


def _drop_option(stage: str) -> str | None:
    """How a user leaves ``stage`` out (DROP_OPTIONS), or None for the export itself."""
    return DROP_OPTIONS.get(stage.removesuffix(WAYS[False]).removesuffix(WAYS[True]))


def stages_peak(parameters: int, stages: list[str]) -> int:
    """Estimated peak resident bytes of a process running ``stages`` one after another on a model of
    ``parameters`` parameters: BASE_BYTES + the largest stage cost (STAGE_COSTS: fixed + factor x fp32 bytes)."""
    costs = [STAGE_COSTS[stage] for stage in stages]
    return BASE_BYTES + round(max((fixed + factor * FP32_BYTES * parameters for fixed, factor in costs), default=0))


def goes_file_way(parameters: int, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> bool:
    """Whether the export of a model of ``parameters`` (fp32) goes the file way (``weights_too_big_for_memory``)."""
    return weights_too_big_for_memory(FP32_BYTES * parameters, external_data_threshold)


def estimate_peak(parameters: int, plan: Plan, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> int:
    """Estimated peak resident bytes of the whole process running ``plan`` on a model of ``parameters``
    parameters (``stages_peak`` of its stages, run the way ``external_data_threshold`` makes them run)."""
    return stages_peak(parameters, plan.stages(goes_file_way(parameters, external_data_threshold)))


def _fields(path: Path) -> dict[str, int]:
    """The integer fields of a ``key value`` or ``key: value kB`` file (memory.stat, /proc/meminfo,
    /proc/self/status), in bytes; {} when it cannot be read. Lines that hold no integer are skipped."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            fields[parts[0].rstrip(":")] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return fields


def _read_bytes(path: Path) -> int | None:
    """A cgroup file holding one byte count; None when missing, unreadable, 'max' or not a count."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_dirs(proc: Path, root: Path) -> dict[Path, CgroupFiles]:
    """The cgroup directories whose memory limits bind this process: the mounted roots (a container's own cgroup
    in a cgroup namespace) and, from ``/proc/self/cgroup``, this process's cgroup and all its ancestors."""
    dirs = {root: CGROUP_V2, root / "memory": CGROUP_V1}
    try:
        lines = (proc / "self" / "cgroup").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        _hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base, files = root, CGROUP_V2
        elif "memory" in controllers.split(","):
            base, files = root / "memory", CGROUP_V1
        else:
            continue
        parts = [part for part in path.split("/") if part not in ("", ".", "..")]
        dirs.update({base.joinpath(*parts[:depth]): files for depth in range(1, len(parts) + 1)})
    return dirs


def _cgroup_headroom(directory: Path, files: CgroupFiles) -> int | None:
    """Bytes the cgroup in ``directory`` may still grow by: its limit less its usage, page cache not counted
    (the kernel reclaims it before it kills); None when it has no limit or its files cannot be read."""
    limit, usage = _read_bytes(directory / files.limit), _read_bytes(directory / files.usage)
    if limit is None or usage is None or limit >= UNLIMITED:
        return None
    stat = _fields(directory / "memory.stat")
    reclaimable = max(stat.get(files.cache, 0) - stat.get(files.shmem, 0), 0)
    return max(limit - max(usage - reclaimable, 0), 0)


def memory_limit(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str] | None:
    """(bytes, source): how much memory this process may hold at its peak, and where that figure comes from
    ('cgroup memory.max', 'cgroup memory.limit_in_bytes' or 'MemAvailable').

    The tightest headroom of the cgroups that bind it (``_cgroup_dirs``: limit less usage, page cache not
    counted) and of /proc/meminfo's MemAvailable, plus this process's own resident memory (VmRSS, counted in
    the cgroup's usage and not in MemAvailable). A source that is missing, unlimited ('max') or unreadable is
    ignored; None when there is none (no /proc: not Linux). ``proc`` and ``cgroup_root`` are for tests.
    """
    found = [(headroom, f"cgroup {files.limit}") for directory, files in _cgroup_dirs(proc, cgroup_root).items()
             if (headroom := _cgroup_headroom(directory, files)) is not None]
    available = _fields(proc / "meminfo").get("MemAvailable")
    if available is not None:
        found.append((available, "MemAvailable"))
    if not found:
        return None
    headroom, source = min(found)
    return headroom + _fields(proc / "self" / "status").get("VmRSS", 0), source


def count_text(count: int) -> str:
    """A parameter count for a person: '1.23B', '105M', '964K' or '512'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def what_fits(parameters: int, plan: Plan, limit: int, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> str:
    """The cheaper ways to run ``plan`` that fit in ``limit`` bytes, fewest options first ('--no-validate (about
    7.1 GB) would fit'); when none does, what the cheapest needs; '' when nothing can be left out."""
    file_way = goes_file_way(parameters, external_data_threshold)
    cheaper = [(options, stages_peak(parameters, stages)) for options, stages in plan.cheaper(file_way)]
    for size in sorted({len(options) for options, _peak in cheaper}):
        fits = [f"{' and '.join(options)} (about {size_text(peak)})" for options, peak in cheaper
                if len(options) == size and peak <= limit]
        if fits:
            return f"{' or '.join(fits)} would fit"
    if not cheaper:
        return ""
    options, peak = min(cheaper, key=lambda option: option[1])
    return f"even {' and '.join(options)} needs about {size_text(peak)}"


def check_memory(checkpoint_path: str | os.PathLike, plan: Plan, *,
                 external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """Refuse ``plan`` on a checkpoint, before any work, when its estimated peak (``estimate_peak``) is above what
    this process may use (``memory_limit``): MemoryLimitError, one line naming both figures, what would fit
    (``what_fits``) and ``OVERRIDE_OPTION``.

    The parameter count comes from ``checkpoint_summary`` (the checkpoint is not loaded). onnxslim is not counted
    for a model above ``external_data_threshold``, which ``export_onnx`` never simplifies. Nothing is checked
    where no limit can be read, nor for a checkpoint that cannot be summarized: its loader refuses it with its
    own line.
    """
    limit = memory_limit()
    if limit is None:
        return
    try:
        parameters = checkpoint_summary(checkpoint_path).parameters
    except CheckpointError:
        return
    need, (have, source) = estimate_peak(parameters, plan, external_data_threshold), limit
    if need <= have:
        return
    fits = what_fits(parameters, plan, have, external_data_threshold)
    raise MemoryLimitError(
        f"{checkpoint_path} ({count_text(parameters)} parameters): this {'export' if plan.export else 'validation'} "
        f"needs about {size_text(need)} of memory, this process may use {size_text(have)} ({source}); "
        + (f"{fits}; " if fits else "") + f"pass {OVERRIDE_OPTION} to go ahead anyway")
