"""The memory pre-flight (``lora_export.export.memory``): the limit read from cgroup files and /proc/meminfo, the peak
estimate against issue 18's measured peaks, and the refusal of the command line (exit 2, one line naming both
figures, what would fit and the override, nothing written) with ``--no-memory-check`` going ahead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import STARTED, invoke, make_lora_model, refused

from lora_export.errors import MemoryLimitError
from lora_export.export import memory
from lora_export.export.memory import Plan, check_memory, count_text, estimate_peak, memory_limit, stages_peak
from lora_export.export.onnx_files import size_text
from lora_export.layout import Form
from lora_export.model.checkpoint import CheckpointSummary, checkpoint_summary
from lora_export.pipeline import export_pipeline

ROOT = Path(__file__).resolve().parent.parent
GiB, KiB = 1 << 30, 1 << 10
RSS_KIB = 300_000  # this fake process's VmRSS


def fake_proc(tmp_path: Path, cgroup: str = "0::/\n", available_kib: int | None = 20 * GiB // KiB) -> Path:
    """A /proc with self/cgroup, self/status (VmRSS RSS_KIB) and meminfo (MemAvailable, or none)."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "status").write_text(f"Name:\tpython\nVmHWM:\t  999999 kB\nVmRSS:\t  {RSS_KIB} kB\n")
    meminfo = "MemTotal:       32000000 kB\nMemFree:         1000000 kB\n"
    if available_kib is not None:
        meminfo += f"MemAvailable:   {available_kib} kB\n"
    (proc / "meminfo").write_text(meminfo)
    return proc


def write_files(directory: Path, files: dict[str, str]) -> None:
    """Files of one cgroup directory (made with its parents)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


# --------------------------------------------------------------------------- memory_limit


def test_cgroup_v2_limit_less_its_unreclaimable_usage_plus_own_rss(tmp_path):
    """memory.max 4 GiB, memory.current 3 GiB of which 1 GiB page cache (0.25 GiB of it shmem, not reclaimable):
    the cgroup may grow by 4 - (3 - 0.75) = 1.75 GiB, and this process holds its VmRSS already."""
    root = tmp_path / "cgroup"
    write_files(root, {"memory.max": f"{4 * GiB}\n", "memory.current": f"{3 * GiB}\n",
                       "memory.stat": f"anon {2 * GiB}\nfile {GiB}\nshmem {GiB // 4}\n"})
    assert memory_limit(fake_proc(tmp_path), root) == (int(1.75 * GiB) + RSS_KIB * KiB, "cgroup memory.max")


def test_cgroup_v2_max_means_no_limit_and_meminfo_decides(tmp_path):
    root = tmp_path / "cgroup"
    write_files(root, {"memory.max": "max\n", "memory.current": f"{3 * GiB}\n"})
    assert memory_limit(fake_proc(tmp_path, available_kib=5_000_000), root) == (
        (5_000_000 + RSS_KIB) * KiB, "MemAvailable")


def test_the_ancestor_cgroup_of_this_process_binds(tmp_path):
    """/proc/self/cgroup names /user.slice/job; only its parent has a limit (1 GiB, 0.5 GiB used)."""
    root = tmp_path / "cgroup"
    write_files(root / "user.slice", {"memory.max": f"{GiB}", "memory.current": f"{GiB // 2}"})
    write_files(root / "user.slice" / "job", {"memory.max": "max", "memory.current": f"{GiB // 4}"})
    proc = fake_proc(tmp_path, cgroup="0::/user.slice/job\n")
    assert memory_limit(proc, root) == (GiB // 2 + RSS_KIB * KiB, "cgroup memory.max")


def test_cgroup_v1_limit_and_v1_unlimited(tmp_path):
    """v1: memory.limit_in_bytes less usage, total_cache reclaimable; 'unlimited' (2^63 rounded to a page) is
    no limit."""
    root = tmp_path / "cgroup"
    write_files(root / "memory", {"memory.limit_in_bytes": "9223372036854771712\n",
                                  "memory.usage_in_bytes": f"{GiB}\n"})
    write_files(root / "memory" / "jobs" / "42", {"memory.limit_in_bytes": f"{6 * GiB}\n",
                                                  "memory.usage_in_bytes": f"{2 * GiB}\n",
                                                  "memory.stat": f"cache 5\ntotal_cache {GiB}\ntotal_shmem 0\n"})
    proc = fake_proc(tmp_path, cgroup="4:memory:/jobs/42\n0::/\n")
    assert memory_limit(proc, root) == (5 * GiB + RSS_KIB * KiB, "cgroup memory.limit_in_bytes")
    (root / "memory" / "jobs" / "42" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limit(proc, root)[1] == "MemAvailable"


def test_meminfo_tighter_than_the_cgroup_wins(tmp_path):
    root = tmp_path / "cgroup"
    write_files(root, {"memory.max": f"{16 * GiB}", "memory.current": "0"})
    assert memory_limit(fake_proc(tmp_path, available_kib=GiB // KiB), root) == (
        GiB + RSS_KIB * KiB, "MemAvailable")


@pytest.mark.parametrize("limit, current", [("lots", "0"), ("", "0"), (f"{GiB}", "garbage"), (f"{GiB}", None)])
def test_unreadable_cgroup_figures_are_ignored(tmp_path, limit, current):
    root = tmp_path / "cgroup"
    write_files(root, {"memory.max": limit, **({} if current is None else {"memory.current": current})})
    assert memory_limit(fake_proc(tmp_path, available_kib=7_000_000), root) == (
        (7_000_000 + RSS_KIB) * KiB, "MemAvailable")


def test_no_source_at_all_is_no_limit(tmp_path):
    """No cgroup files and no MemAvailable (not Linux): nothing to check against."""
    assert memory_limit(fake_proc(tmp_path, available_kib=None), tmp_path / "no-cgroup") is None
    assert memory_limit(tmp_path / "no-proc", tmp_path / "no-cgroup") is None


# --------------------------------------------------------------------------- estimate_peak

#: The figures tools/bench_scale.py measured (peak RSS of `lora-export CKPT` as a user runs it, 27M..1.23B
#: parameters, each form with and without validation), which STAGE_COSTS are fitted to.
BENCH_RESULTS = ROOT / "tools" / "results" / "bench_scale.json"
#: The Plan of each bench_scale form (onnxslim asked for by the CLI's default for scoring graphs; the file way and
#: genai skip it).
BENCH_PLANS = {"merged": {}, "adapters": {"form": Form.ADAPTERS}, "genai-merged": {"genai": True},
               "genai-adapters": {"form": Form.ADAPTERS, "genai": True}, "int8": {"builds": ("int8",)},
               "int4": {"builds": ("int4",)}, "fp16": {"builds": ("fp16",)}}


def measured_runs() -> list[dict]:
    records = json.loads(BENCH_RESULTS.read_text())["records"]
    return [record for record in records if record["exit_code"] == 0 and record["peak_rss_bytes"]]


@pytest.mark.parametrize("record", measured_runs(),
                         ids=lambda r: f"{r['label']}-{r['form']}-{'validated' if r['validate'] else 'export'}")
def test_estimate_within_25_percent_of_each_measured_peak(record):
    """Every run bench_scale measured, estimated the way it ran (the file way when its log says the model went
    above the threshold)."""
    file_way = any(stage.startswith("model above") for stage, _seconds in record["stages"])
    plan = Plan(**BENCH_PLANS[record["form"]], simplify="genai" not in record["form"], validate=record["validate"])
    estimate = stages_peak(record["parameters"], plan.stages(file_way))
    assert abs(estimate / record["peak_rss_bytes"] - 1) <= 0.25, (
        f"estimated {estimate / 1e9:.2f} GB, measured {record['peak_rss_bytes'] / 1e9:.2f} GB")


def test_the_measured_runs_cover_every_form_up_to_1_23b():
    covered = {(record["label"], record["form"]) for record in measured_runs()}
    assert {("1.23B", form) for form in ("merged", "adapters", "genai-merged", "int8", "int4", "fp16")} <= covered
    assert {("405M", "merged"), ("105M", "merged"), ("27M", "merged")} <= covered


def test_the_1_23b_export_once_killed_now_fits_24_gb():
    """Issue 18: the 1.23B merged export with --no-validate was killed by the kernel at 24 GB; now estimated (and
    measured) well under it, with its validation too."""
    assert estimate_peak(1_230_000_000, Plan(Form.MERGED)) < 16e9


@pytest.mark.parametrize("plan", [Plan(Form.MERGED), Plan(Form.ADAPTERS, builds=("int8",)),
                                  Plan(Form.MERGED, genai=True, validate=False), Plan(Form.ADAPTERS, export=False)])
def test_estimate_grows_with_the_parameters(plan):
    estimates = [estimate_peak(n, plan) for n in (10**6, 10**8, 10**9, 8 * 10**9)]
    assert estimates == sorted(estimates) and len(set(estimates)) == len(estimates)
    assert estimates[-1] > 8 * 10**9 * 4  # never below the fp32 weights themselves


@pytest.mark.parametrize("form, genai", [(Form.MERGED, False), (Form.ADAPTERS, False), (Form.ADAPTERS, True)])
def test_stages_add_memory_as_a_max_not_a_sum(form, genai):
    """Validation and builds never lower the estimate; stages run one after another, so all of them together
    cost what the costliest one costs."""
    n = 10**9
    bare = estimate_peak(n, Plan(form, genai=genai, validate=False))
    validated = estimate_peak(n, Plan(form, genai=genai))
    built = estimate_peak(n, Plan(form, genai=genai, builds=("int8",), validate=False))
    everything = estimate_peak(n, Plan(form, genai=genai, builds=("int8",)))
    assert validated > bare and built >= bare and validated >= bare
    assert everything == max(validated, built)


# --------------------------------------------------------------------------- check_memory


@pytest.fixture
def limit_of(monkeypatch):
    """Patch what this process may use: limit_of(bytes, source)."""
    def patch(limit: int, source: str = "cgroup memory.max") -> None:
        monkeypatch.setattr(memory, "memory_limit", lambda: (limit, source))
    return patch


@pytest.fixture
def parameters_of(monkeypatch):
    """Patch the parameter count the pre-flight reads from any checkpoint (the checkpoint is never loaded)."""
    def patch(parameters: int) -> None:
        monkeypatch.setattr(memory, "checkpoint_summary",
                            lambda _path: CheckpointSummary(parameters, "fp32", 4 * parameters))
    return patch


@pytest.mark.parametrize("plan", [
    Plan(Form.MERGED, simplify=True, builds=("int8", "int4", "fp16"), ort_format=True),
    Plan(Form.ADAPTERS, simplify=True, builds=("int8", "int4", "fp16"), ort_format=True),
    Plan(Form.MERGED, genai=True, builds=("fp16",)), Plan(Form.ADAPTERS, genai=True, builds=("int4",)),
    Plan(Form.ADAPTERS, export=False)])
@pytest.mark.parametrize("checkpoint", ["demo", "tiny"])
def test_demo_and_test_models_are_never_refused(limit_of, tiny_checkpoint, plan, checkpoint):
    """The 0.96M-parameter demo and the tiny test model in every form, build and validation, on a machine with
    1 GB for this process (0.35 GB of which the interpreter holds already)."""
    limit_of(10**9, "MemAvailable")
    check_memory(ROOT / "models" / "demo.pt" if checkpoint == "demo" else tiny_checkpoint, plan)


def test_the_refusal_names_both_figures_what_fits_and_the_override(limit_of, parameters_of):
    """1.23B parameters with a limit that --no-validate fits: one line with the checkpoint, its parameter count,
    both figures, --no-validate and --no-memory-check."""
    parameters_of(1_230_000_000)
    plan = Plan(Form.ADAPTERS)
    no_validation = estimate_peak(1_230_000_000, Plan(Form.ADAPTERS, validate=False))
    limit_of(no_validation + 10**8)
    with pytest.raises(MemoryLimitError) as refusal:
        check_memory("big.pt", plan)
    message = str(refusal.value)
    assert "\n" not in message and message.startswith("big.pt (1.23B parameters): this export needs about ")
    assert f"needs about {size_text(estimate_peak(1_230_000_000, plan))} of memory" in message
    assert f"this process may use {size_text(no_validation + 10**8)} (cgroup memory.max)" in message
    assert f"--no-validate (about {size_text(no_validation)}) would fit" in message
    assert "--no-simplify" not in message and message.endswith("pass --no-memory-check to go ahead anyway")


def test_when_nothing_fits_the_cheapest_is_named(limit_of, parameters_of):
    """8B parameters in 8 GiB: the fewest options that give the smallest estimate (the export itself stays)."""
    parameters_of(8_000_000_000)
    limit_of(8 * GiB, "MemAvailable")
    cheapest = size_text(estimate_peak(8_000_000_000, Plan(Form.MERGED, validate=False)))
    with pytest.raises(MemoryLimitError, match=rf"\(MemAvailable\); even leaving out --fp16 and --no-validate "
                                               rf"needs about {cheapest}; pass --no-memory-check"):
        check_memory("huge.safetensors", Plan(Form.MERGED, builds=("fp16",)))


def test_onnxslim_counts_only_below_the_external_data_threshold(limit_of, parameters_of):
    """export_onnx simplifies a model held in memory and never one above the threshold: --no-simplify is offered
    for the first, and the second (same limit, relative to its size) is not refused for it."""
    plan = Plan(Form.MERGED, simplify=True, validate=False)
    for parameters, threshold, refused_for_it in ((100_000_000, 2 * GiB, True), (100_000_000, 10**6, False)):
        parameters_of(parameters)
        bare = estimate_peak(parameters, Plan(Form.MERGED, validate=False), threshold)
        limit_of(bare + 1)
        if refused_for_it:
            with pytest.raises(MemoryLimitError, match=rf"--no-simplify \(about {size_text(bare)}\) would fit"):
                check_memory("model.pt", plan, external_data_threshold=threshold)
        else:
            check_memory("model.pt", plan, external_data_threshold=threshold)


def test_a_validation_alone_offers_no_cheaper_export(limit_of, parameters_of):
    parameters_of(1_230_000_000)
    limit_of(GiB)
    with pytest.raises(MemoryLimitError) as refusal:
        check_memory("big.pt", Plan(Form.ADAPTERS, export=False))
    assert "this validation needs about" in str(refusal.value)
    assert "would fit" not in str(refusal.value) and "even" not in str(refusal.value)


def test_an_unreadable_checkpoint_is_left_to_its_loader(limit_of, tmp_path):
    """The pre-flight does not refuse a checkpoint it cannot summarize: the export's loader names the problem."""
    limit_of(1)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    check_memory(bad, Plan())


# --------------------------------------------------------------------------- the command line and the pipeline


@pytest.fixture
def workdir(tiny_checkpoint, tmp_path, monkeypatch) -> Path:
    """The tiny checkpoint copied into an empty working directory, which is the current directory."""
    shutil.copy(tiny_checkpoint, tmp_path / "tiny.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tiny_estimates(**plan: object) -> tuple[int, int]:
    """(estimate with validation, without it) of the tiny checkpoint exported with ``plan``."""
    parameters = checkpoint_summary("tiny.pt").parameters
    return (estimate_peak(parameters, Plan(**plan)), estimate_peak(parameters, Plan(**plan, validate=False)))


def test_cli_refuses_before_any_work_and_writes_nothing(workdir, limit_of):
    """Over the limit: exit 2, one line with both figures, --no-validate (which fits) and the override; no file
    or directory made (not even -o's missing directory), the export never started."""
    validated, bare = tiny_estimates(form=Form.MERGED, simplify=True)
    limit_of((validated + bare) // 2)
    for needle in (f"needs about {size_text(validated)} of memory", f"may use {size_text((validated + bare) // 2)} "
                   "(cgroup memory.max)", "--no-validate (about", "pass --no-memory-check"):
        refused("lora-export", ["tiny.pt", "-o", "out/tiny.onnx"], needle=needle, no_work=True)
    refused("lora-export", ["tiny.pt", "--genai", "--quantize", "int8"], needle="this export needs", no_work=True)


def test_cli_genai_never_counts_onnxslim(workdir, limit_of):
    """Where nothing fits, the cheapest way is named: for the scoring graph without validation and onnxslim; a
    genai decoder is never simplified, so only without validation."""
    limit_of(memory.BASE_BYTES)
    refused("lora-export", ["tiny.pt"], needle="; even --no-simplify and --no-validate needs about", no_work=True)
    for args in (["--genai"], ["--genai", "--quantize", "int8"]):
        refused("lora-export", ["tiny.pt", *args], needle="; even --no-validate needs about", no_work=True)
    refused("lora-export", ["tiny.pt", "--genai", "--no-validate"], needle="GB (cgroup memory.max); pass --no-memory",
            no_work=True)


def test_no_memory_check_goes_ahead_and_validate_is_checked_too(workdir, limit_of):
    """Over the limit, --no-memory-check exports; `lora-export validate` of that model is refused before the model
    is read or its report directory made, and not with --no-memory-check (which then fails on the report path)."""
    limit_of(10**6)
    code, out, err = invoke("tiny.pt", "--no-validate", "--no-memory-check", "-o", "tiny.onnx")
    assert code == 0, err
    assert STARTED in err and (workdir / "tiny.onnx").is_file() and "tiny.onnx" in out
    validate = ["validate", "tiny.onnx", "--checkpoint", "tiny.pt", "--report"]
    parameters = sum(p.numel() for p in make_lora_model().parameters())  # what tiny.pt holds, counted on the model
    refused("lora-export", [*validate, "rep"],
            needle=f"tiny.pt ({count_text(parameters)} parameters): this validation needs about")
    (workdir / "file").write_text("")
    refused("lora-export", [*validate, "file", "--no-memory-check"], needle="error: file: ")


def test_pipeline_refuses_before_writing(workdir, limit_of):
    limit_of(10**6)
    with pytest.raises(MemoryLimitError, match="pass --no-memory-check"):
        export_pipeline("tiny.pt", "out/tiny.onnx", validation=None)
    with pytest.raises(MemoryLimitError, match="this export needs"):
        export_pipeline("tiny.pt", "genai", genai=True, validation=None)
    assert sorted(p.name for p in workdir.iterdir()) == ["tiny.pt"]
