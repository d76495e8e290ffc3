"""Batched generation with mixed adapters (issue 20): the adapter-slots KV-cache decoder, each row of a batch with
its own adapter in one ONNX Runtime run per step (``genai.batch``), held row by row against the same row generated
alone (``generate_bytes`` on the adapters-as-inputs decoder with that .onnx_adapter, through onnxruntime-genai) and
against PyTorch's own ``generate``; the decoder's left padding against the model's forward per row; the slots
decoder through genai itself; the command line; the validator's mixed batch; one-line refusals before any run."""

from __future__ import annotations

from functools import partial

import onnx
import pytest
import torch
from conftest import TINY_CONFIG, assert_one_line_error, run_cli, same_base_other_rank

import lora_export.genai.batch as batch_module
import lora_export.parity.validate_decoder as validate_decoder_module
from lora_export.errors import AdapterError, GenerationError
from lora_export.export.adapters import ADAPTER_IDS, attach_adapter, read_adapter, write_adapter
from lora_export.export.convert import export_adapter
from lora_export.export.onnx_files import read_metadata
from lora_export.export.slots import pack_adapters
from lora_export.genai.batch import decode_batch, generate_batch
from lora_export.genai.decoder import DecoderWithPast, export_decoder
from lora_export.genai.generate import Sampling, generate_bytes
from lora_export.layout import ADAPTER_FILE, MODEL_FILE, Form
from lora_export.model.checkpoint import load_checkpoint, save_checkpoint
from lora_export.model.transformer import LoRATransformerLM, ModelConfig
from lora_export.parity.validate import validate

#: Lengths 1, 5, 12 and 20 (past the window of 8): rows are left-padded up to 15 bytes.
PROMPTS = [b"Hello, world", b"a", b"The quick brown fox!", b"Hi th", b"Hello, world", b"The quick brown fox!"]
NEW = TINY_CONFIG["max_seq_len"] - 20


@pytest.fixture(scope="module")
def slots_dir(tiny_checkpoint, tmp_path_factory):
    """tiny.pt as an adapter-slots decoder directory (its trained model.onnx_adapter beside it)."""
    return export_decoder(tiny_checkpoint, tmp_path_factory.mktemp("genai") / "slots", form=Form.SLOTS)


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, genai_adapters, tmp_path_factory):
    """{name: .onnx_adapter} on tiny.pt's base: its trained LoRA (r 4), another of rank 2, a partial one (block 0's
    attention left out)."""
    folder = tmp_path_factory.mktemp("adapters")
    save_checkpoint(folder / "other.pt", same_base_other_rank(tiny_checkpoint, r=2, seed=4))
    other = export_adapter(folder / "other.pt", genai_adapters / MODEL_FILE, folder / "other.onnx_adapter")
    tensors, version = read_adapter(genai_adapters / ADAPTER_FILE)
    write_adapter(folder / "partial.onnx_adapter", {k: v for k, v in tensors.items()
                                                    if not k.startswith("blocks.0.attn")}, version)
    return {"trained": genai_adapters / ADAPTER_FILE, "other": other, "partial": folder / "partial.onnx_adapter"}


def torch_greedy(checkpoint, adapter, prompt: bytes, new: int = NEW) -> list[int]:
    """PyTorch's greedy bytes: the checkpoint's base with ``adapter`` (a file; None: none) attached."""
    model = load_checkpoint(checkpoint)
    attach_adapter(model, None if adapter is None else read_adapter(adapter)[0])
    with torch.no_grad():
        return model.generate(torch.tensor([list(prompt)]), new, greedy=True)[0, len(prompt):].tolist()


def rows(adapters):
    """PROMPTS' adapters: every one of them and the base, next to each other, the same prompt under several."""
    return [adapters["trained"], None, adapters["other"], adapters["partial"], adapters["other"], adapters["trained"]]


def test_each_row_of_a_mixed_batch_is_that_row_alone(slots_dir, genai_adapters, adapters, tiny_checkpoint):
    files = rows(adapters)
    batched = generate_batch(slots_dir, PROMPTS, files, max_new_bytes=NEW)
    for prompt, adapter, got in zip(PROMPTS, files, batched, strict=True):
        alone = bytes(generate_bytes(genai_adapters, prompt, max_new_bytes=NEW, adapter=adapter))
        assert got == alone == bytes(torch_greedy(tiny_checkpoint, adapter, prompt)), (prompt, adapter)
    assert len({batched[0], batched[4]}) == 2 and len({batched[2], batched[5]}) == 2  # the adapters matter


def test_a_pack_file_names_its_slots_and_equals_packing_on_the_fly(slots_dir, adapters, tmp_path):
    pack = pack_adapters([adapters["trained"], adapters["other"]], tmp_path / "pack.onnx_adapter", ["t", "o"],
                         model=slots_dir / MODEL_FILE)
    named = generate_batch(slots_dir, PROMPTS[:4], ["o", None, 1, "base"], pack=pack, max_new_bytes=NEW)
    files = [adapters["other"], None, adapters["trained"], None]
    assert named == generate_batch(slots_dir, PROMPTS[:4], files, max_new_bytes=NEW)
    assert named[3] == generate_batch(slots_dir, [PROMPTS[3]], max_new_bytes=NEW)[0]  # no pack: the defaults


def test_genai_runs_the_slots_decoder_one_adapter_at_a_time(slots_dir, genai_adapters, adapters):
    """generate_bytes on the slots decoder: the adapter as slot 1 of a pack, adapter_ids fed by set_model_input."""
    for adapter in (None, adapters["other"]):
        assert (list(generate_bytes(slots_dir, PROMPTS[0], max_new_bytes=NEW, adapter=adapter))
                == list(generate_bytes(genai_adapters, PROMPTS[0], max_new_bytes=NEW, adapter=adapter)))


def test_the_slots_graph_has_adapter_ids_and_one_empty_slot_by_default(slots_dir):
    proto = onnx.load(slots_dir / MODEL_FILE)
    inputs = {value.name: value for value in proto.graph.input}
    assert inputs[ADAPTER_IDS].type.tensor_type.elem_type == onnx.TensorProto.INT64
    defaults = {init.name: list(init.dims) for init in proto.graph.initializer if init.name.endswith("lora_A")}
    assert defaults["blocks.0.ff.fc1.lora_A"] == [1, TINY_CONFIG["dim"], 0]
    assert read_metadata(proto)["form"] == "slots"


@pytest.mark.parametrize(("local", "blindspot"), [(0, None), (2, 4), (4, None), (2, None)])
def test_a_left_padded_row_computes_what_it_computes_alone(local, blindspot):
    """DecoderWithPast on a batch of two rows, the shorter left-padded with junk at position 0: each row's logits
    (prefill, then two cached steps) equal the model's own forward over that row alone."""
    torch.manual_seed(1)
    config = ModelConfig(**{**TINY_CONFIG, "n_local_attn_heads": local, "blindspot_size": blindspot, "r": 0})
    model = LoRATransformerLM(config).eval()
    decoder = DecoderWithPast(model)
    long, short = torch.randint(0, 256, (13,)), torch.randint(0, 256, (5,))
    ids = torch.stack([long, torch.cat([torch.full((8,), 77), short])])
    positions = torch.stack([torch.arange(13), torch.cat([torch.zeros(8, dtype=torch.int64), torch.arange(5)])])
    heads = [slot.heads for slot in decoder.slots]
    past = [torch.zeros(2, h, 0, config.dim_head) for h in heads for _ in range(2)]
    steps = torch.randint(0, 256, (2, 2))
    with torch.no_grad():
        logits, *past = decoder(ids, torch.ones_like(ids), positions, *past)
        got = [logits[0], logits[1, 8:]]
        for step in range(2):
            logits, *past = decoder(steps[:, step:step + 1], None, positions[:, -1:] + 1 + step, *past)
            got = [torch.cat([got[0], logits[0]]), torch.cat([got[1], logits[1]])]
        for row, prompt in enumerate((long, short)):
            alone = model(torch.cat([prompt, steps[row]])[None])[0]
            torch.testing.assert_close(got[row], alone, atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_per_row_and_a_stop_byte_ends_only_its_row(slots_dir, adapters):
    prompts, files = PROMPTS[:3], rows(adapters)[:3]
    greedy = generate_batch(slots_dir, prompts, files, max_new_bytes=NEW)
    samplings = [Sampling(False, 1.5, 20, seed) for seed in (1, 2, 1)]
    sampled = [generate_batch(slots_dir, prompts, files, max_new_bytes=NEW, sampling=samplings) for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != greedy
    top1 = generate_batch(slots_dir, prompts, files, max_new_bytes=NEW, sampling=Sampling(False, 2.0, 1, 5))
    assert top1 == greedy
    stop = greedy[1][2]
    stopped = generate_batch(slots_dir, prompts, files, max_new_bytes=NEW, stop_byte=stop)
    for full, cut in zip(greedy, stopped, strict=True):
        assert cut == (full[: full.index(stop) + 1] if stop in full else full)


def test_the_command_line_decodes_its_prompt_adapter_pairs_as_one_batch(slots_dir, genai_adapters, adapters):
    pairs = [(PROMPTS[0], adapters["trained"]), (PROMPTS[1], "base"), (PROMPTS[2], adapters["other"])]
    args = [arg for prompt, adapter in pairs for arg in ("--prompt", prompt.decode(), "--adapter", adapter)]
    expected = [prompt + bytes(generate_bytes(genai_adapters, prompt, max_new_bytes=NEW,
                                              adapter=None if adapter == "base" else adapter))
                for prompt, adapter in pairs]
    for directory in (slots_dir, genai_adapters):  # one batch; one genai run per pair
        result = run_cli("generate", directory, *args, "--max-new-bytes", NEW)
        assert result.exit_code == 0, result.stderr
        assert result.stdout_bytes == b"".join(row + b"\n" for row in expected)
        assert result.stderr.count("adapter ") == 3


@pytest.mark.parametrize(("args", "needle"), [
    (["--prompt", "a", "--prompt", "b", "--prompt", "c", "--adapter", "base", "--adapter", "base"],
     "3 prompts and 2 adapters"),
    (["--prompt", "a", "--pack", "PACK", "--adapter", "nope"], "no slot named 'nope'"),
    (["--prompt", "a", "--adapter", "ALIEN"], "another base"),
])
def test_the_command_line_refuses_in_one_line(slots_dir, adapters, tmp_path, args, needle):
    pack = pack_adapters([adapters["other"]], tmp_path / "pack.onnx_adapter", model=slots_dir / MODEL_FILE)
    tensors, version = read_adapter(adapters["trained"])
    write_adapter(tmp_path / "alien.onnx_adapter", tensors, version + 1)
    args = [str(pack) if a == "PACK" else str(tmp_path / "alien.onnx_adapter") if a == "ALIEN" else a for a in args]
    result = run_cli("generate", slots_dir, *args, "--max-new-bytes", 4)
    assert_one_line_error(result.exit_code, result.stderr, needle, progress_allowed=False)
    assert result.stdout_bytes == b""


def test_bad_input_is_refused_in_one_line_before_any_run(slots_dir, genai_adapters, adapters, tmp_path, monkeypatch):
    def no_run(*_args, **_kwargs):
        raise AssertionError("a session was opened")

    monkeypatch.setattr(batch_module, "quiet_session", no_run)
    pack = pack_adapters([adapters["other"]], tmp_path / "pack.onnx_adapter", model=slots_dir / MODEL_FILE)
    tensors, version = read_adapter(adapters["trained"])
    alien = tmp_path / "alien.onnx_adapter"
    write_adapter(alien, tensors, version + 1)
    batch, rows_of = partial(generate_batch, max_new_bytes=4), partial(decode_batch, max_new_bytes=4)
    cases = [
        (partial(batch, slots_dir, PROMPTS[:2], [alien, None]), AdapterError, "another base"),
        (partial(batch, slots_dir, PROMPTS[:2], ["other", "missing"], pack=pack), AdapterError,
         "no slot named 'missing'"),
        (partial(batch, slots_dir, PROMPTS[:3], [None, None]), GenerationError, "3 prompts and 2 adapters"),
        (partial(batch, slots_dir, PROMPTS[:2], [0, 7], pack=pack), AdapterError, "7 is out of range"),
        (partial(rows_of, slots_dir, PROMPTS[:2], [0, -1]), AdapterError, "-1 is out of range"),
        (partial(rows_of, slots_dir, PROMPTS[:2], [0]), AdapterError, "1 adapter ids for a batch of 2"),
        (partial(batch, slots_dir, [b"x" * 30, b"y"]), GenerationError, "row 0: prompt"),
        (partial(batch, genai_adapters, PROMPTS[:2]), GenerationError, "adapter-slots decoder"),
    ]
    for call, error, needle in cases:
        with pytest.raises(error) as raised:
            call()
        assert needle in str(raised.value) and "\n" not in str(raised.value), str(raised.value)


def test_the_validator_decodes_a_mixed_batch_row_by_row_against_pytorch(slots_dir, tiny_checkpoint, monkeypatch):
    result = validate(slots_dir, tiny_checkpoint, providers=["cpu"])
    assert result.passed, result.summary
    mixed = [run for run in result.decode if run.variant.startswith("mixed batch")]
    assert [run.variant for run in mixed] == ["mixed batch row 0 (base)", "mixed batch row 1 (adapter trained)",
                                              "mixed batch row 2 (base)", "mixed batch row 3 (adapter trained)"]
    assert len({run.prompt_bytes for run in mixed}) == 2 and all(run.identical for run in mixed)
    assert mixed[0].generated == result.decode[0].generated and mixed[1].generated == result.decode[1].generated

    real = validate_decoder_module.decode_batch

    def swapped(model_dir, prompts, slots, *args, **kwargs):  # every row decoded with its neighbour's adapter
        return real(model_dir, prompts, [1 - slot for slot in slots], *args, **kwargs)

    monkeypatch.setattr(validate_decoder_module, "decode_batch", swapped)
    result = validate(slots_dir, tiny_checkpoint, providers=["cpu"])
    assert result.status == "failed"
    assert any(failure.startswith("decode (mixed batch row 0 (base), ONNX Runtime cpu): greedy bytes differ")
               for failure in result.failures), result.failures
    assert not any("genai" in failure for failure in result.failures)
