"""The "mixed batch" variant of a slots-form graph's parity check (``lora-export --adapter-slots``): one pack of
adapters fed once, each row of every case in its own slot, each row held against that row run alone through
PyTorch with its slot's adapter.

The pack: the one given to validate (``--adapter PACK``: its slots), or built in memory from the checkpoint's
trained adapter (or the ordinary adapter file given, which must hold it) in slot 1 and two seeded adapters of
other ranks: slot 2 on every LoRA layer of the graph at rank r + 1, slot 3 on every other layer at rank 1, so the
check covers zero-padding to r_max, layers an adapter leaves out, and the base (slot 0). Row i of a batch of B
rows uses slot (i + B) mod S: a one-row case and the greedy generation use slot 1, bigger batches mix slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from ..export.adapters import ADAPTER_IDS, adapter_input_specs, adapter_tensors, attach_adapter
from ..export.slots import BASE_SLOT, Pack, SlotFeeds, slot_feeds, stack_adapters
from ..model.transformer import LoRATransformerLM

MIXED = "mixed batch"
#: Slot names of the pack a check builds itself.
TRAINED, WIDER, SPARSE = "trained", "seeded rank r+1", "seeded rank 1, every other layer"


def seeded_adapter(model: onnx.ModelProto, layers: list[str], rank: int, seed: int) -> dict[str, np.ndarray]:
    """A random adapter in graph layout on ``layers`` of ``model`` (A [in, rank] ~ N(0, 1/in), B [rank, out] ~
    N(0, 0.25/rank)): big enough to move every logit, small enough to keep them finite."""
    rng = np.random.default_rng(seed)
    specs = adapter_input_specs(model)
    tensors = {}
    for layer in layers:
        size_in, size_out = specs[f"{layer}.lora_A"][1][0], specs[f"{layer}.lora_B"][1][1]
        tensors[f"{layer}.lora_A"] = rng.normal(0, size_in ** -0.5, (size_in, rank)).astype(np.float32)
        tensors[f"{layer}.lora_B"] = rng.normal(0, 0.5 * rank ** -0.5, (rank, size_out)).astype(np.float32)
    return tensors


@dataclass
class MixedBatch:
    """The mixed-batch variant of the slots-form graph ``model``: the ``pack`` given to validate (None: built by
    ``prepare`` from ``trained``, the adapter file given, or the checkpoint's trained adapter), the model version
    of its base and the seed of the seeded adapters; once prepared, the graph's feeds (``slot_feeds``) and each
    slot's adapter as PyTorch attaches it (graph layout, zero-padded as stacked: the same update)."""

    model: onnx.ModelProto
    pack: Pack | None
    trained: dict[str, np.ndarray] | None
    model_version: int
    seed: int
    feeds: SlotFeeds | None = None
    adapters: list[dict[str, np.ndarray]] = field(default_factory=list)

    def prepare(self, reference: LoRATransformerLM) -> None:
        """Fill the slots, once the PyTorch ``reference`` model is built: slot 1 its trained adapter (unless an
        adapter or pack was given), slots 2 and 3 the seeded ones. Raises AdapterError for a pack that does not fit
        the graph."""
        pack = self.pack
        if pack is None:
            layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in adapter_input_specs(self.model)))
            trained = self.trained if self.trained is not None else adapter_tensors(reference)
            rank = 1 + max((a.shape[1] for name, a in trained.items() if name.endswith(".lora_A")), default=1)
            adapters = [trained, seeded_adapter(self.model, layers, rank, self.seed + 7),
                        seeded_adapter(self.model, layers[::2], 1, self.seed + 8)]
            pack = Pack(stack_adapters(adapters), [BASE_SLOT, TRAINED, WIDER, SPARSE], self.model_version)
        self.feeds = slot_feeds(self.model, pack)
        self.adapters = [{name: stack[slot] for name, stack in pack.tensors.items()} for slot in range(pack.size)]

    @property
    def size(self) -> int:
        """The slots S (the base included) once prepared."""
        return len(self.adapters)

    def note(self) -> str:
        """The mixed batch in words, for the reports."""
        names = ", ".join(f"{slot} {name}" for slot, name in enumerate(self.feeds.pack.names))
        return (f"variant '{MIXED}': {self.size} slots ({names}) of "
                + ("the pack given" if self.pack is not None else "a pack built for the check")
                + "; row i of a batch of B rows runs in slot (i + B) mod S, each row held against that row run alone "
                "through PyTorch with its slot's adapter")

    def rows(self, batch: int) -> list[int]:
        """The slot of each row of a batch of ``batch`` rows: row i in slot (i + batch) mod S."""
        return [(row + batch) % self.size for row in range(batch)]

    def ort_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """adapter_ids [batch] (``rows``) and the pack's stacks."""
        return self.feeds.feeds(self.rows(batch), batch)

    def reference(self, model: LoRATransformerLM, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """logits [B, N, 256]: each row run alone through ``model`` with its slot's adapter attached."""
        logits = []
        with torch.no_grad():
            for row, slot in enumerate(self.rows(len(input_ids))):
                attach_adapter(model, self.adapters[slot])
                logits.append(model(torch.from_numpy(input_ids[row:row + 1]),
                                    torch.from_numpy(attention_mask[row:row + 1])).numpy())
        return np.concatenate(logits)

    def attach_single_row(self, model: LoRATransformerLM) -> None:
        """Attach the adapter a one-row run uses (greedy generation, latency): slot ``rows(1)[0]``."""
        attach_adapter(model, self.adapters[self.rows(1)[0]])


def base_feeds(batch: int) -> dict[str, np.ndarray]:
    """A slots-form graph's feeds for a batch of base rows, no pack fed: adapter_ids all 0 [batch]."""
    return {ADAPTER_IDS: np.zeros(batch, np.int64)}
