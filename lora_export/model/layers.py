"""LoRA layers: a frozen base weight W0 plus a trainable low-rank update scaling * B @ A.

Vocabulary follows PEFT / loralib: ``lora_A``, ``lora_B``, ``scaling``, ``merge``, ``unmerge``,
``safe_merge``. ``scaling`` is ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA).

For ONNX export with adapters as graph inputs a layer can be fed its A and B from outside
(:meth:`LoRALayer.use_external_lora`). Those tensors use the transposed, pre-scaled layout that
ONNX Runtime's multi-LoRA API feeds as-is: ``A_t = lora_A.T`` ([in, r]) and
``B_t = scaling * lora_B.T`` ([r, out]), so the graph needs no Transpose and no rank-dependent constant.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class LoRALayer:
    """Mixin with the state shared by the LoRA layers: rank, scaling, merge flag, optional external adapter.

    Like loralib, the concrete layers subclass the torch layer they extend (``LoRALinear`` is an
    ``nn.Linear``) and call :meth:`init_lora` after it. They set ``in_features`` / ``out_features``:
    the sizes the LoRA branch maps between.
    """

    in_features: int
    out_features: int
    weight: nn.Parameter  # W0, frozen once r > 0; merge() updates it in place

    def init_lora(self, r: int, lora_alpha: float, use_rslora: bool) -> None:
        """Set rank, alpha and scaling (alpha / r, or alpha / sqrt(r) with rsLoRA; 0 when r = 0)."""
        if r < 0:
            raise ValueError(f"LoRA rank r must be >= 0, got {r}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = (lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r) if r > 0 else 0.0
        self.merged = False
        self.external_lora: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fold_external_lora = False
        self.lora_slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def new_lora_parameters(self) -> None:
        """Fresh lora_A [r, in_features] (Kaiming-uniform, a = sqrt(5)) and lora_B [out_features, r] (zeros), so
        the update starts at exactly zero."""
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def set_rank(self, r: int, lora_alpha: float) -> None:
        """Give this LoRA layer its own rank and alpha (``ModelConfig.rank_pattern`` / ``alpha_pattern``, PEFT's
        per-layer ranks), with new parameters as at construction."""
        if self.r == 0 or self.merged or r < 1:
            raise ValueError("set_rank needs an unmerged layer that has LoRA (r > 0) and a new r >= 1")
        self.init_lora(r, lora_alpha, self.use_rslora)
        self.new_lora_parameters()

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout."""
        raise NotImplementedError

    def merge(self, safe_merge: bool = False) -> None:
        """Fold scaling * B @ A into W0; forward then skips the LoRA branch. Idempotent.

        With ``safe_merge`` the sum is computed on a copy first and refused (ValueError naming the
        layer) if it holds NaN or Inf, leaving W0 untouched.
        """
        if self.r == 0 or self.merged:
            return
        weight = self.weight
        with torch.no_grad():
            merged = weight + self.delta_weight().to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"safe_merge refused: merging {self.layer_name()} gives NaN or Inf")
            weight.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update merged by merge(), restoring W0. Idempotent."""
        if self.r == 0 or not self.merged:
            return
        weight = self.weight
        with torch.no_grad():
            weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def use_external_lora(self, lora_a_t: torch.Tensor | None, lora_b_t: torch.Tensor | None,
                          fold: bool = False) -> None:
        """Take A_t [in, r] and pre-scaled B_t [r, out] from outside instead of lora_A / lora_B.

        Used by the exporter to make A and B graph inputs; ``None`` returns to the own parameters.
        ``fold`` (linear layers): compute ``x @ (W0^T + A_t @ B_t)``, one product with the weight merged at run
        time, instead of the branch ``x @ W0^T + (x @ A_t) @ B_t``. Folding costs a fixed in x r x out product,
        the branch two thin products per token: fold where many tokens share a run (a scoring pass), not for a
        decoding step of one token. A merged layer refuses (ValueError): its W0 already holds its own update.
        """
        if lora_a_t is not None and self.merged:
            raise ValueError("use_external_lora on a merged layer: unmerge() it first")
        self.external_lora = None if lora_a_t is None else (lora_a_t, lora_b_t)
        self.fold_external_lora = fold

    def use_lora_slots(self, a_stack: torch.Tensor | None, b_stack: torch.Tensor | None = None,
                       adapter_ids: torch.Tensor | None = None) -> None:
        """Give each batch row its own adapter (BGMV, as vLLM's stacked LoRA): A_t stacks a_stack [S, in, r] and
        pre-scaled B_t stacks b_stack [S, r, out], one slot per adapter (smaller ranks zero-padded: exact), and
        adapter_ids int64 [B] naming row b's slot. Row b computes ``x_b @ W0^T + (x_b @ a_stack[id_b]) @
        b_stack[id_b]``; a slot of zeros is the base. Inputs must have the batch first (x [B, N, in], ids
        [B, N]). ``None`` returns to the own parameters. A merged layer refuses (ValueError)."""
        if a_stack is not None and self.merged:
            raise ValueError("use_lora_slots on a merged layer: unmerge() it first")
        self.lora_slots = None if a_stack is None else (a_stack, b_stack, adapter_ids)

    def layer_name(self) -> str:
        """A short name for error messages (the module path is only known to the model)."""
        return f"{type(self).__name__}(r={self.r})"


class LoRALinear(nn.Linear, LoRALayer):
    """y = x W0^T + bias + scaling * dropout(x) A^T B^T, with W0 and bias frozen.

    lora_A: [r, in_features], Kaiming-uniform (a = sqrt(5)); lora_B: [out_features, r], zeros,
    so the update starts at exactly zero. r = 0 is the plain (trainable) nn.Linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = True,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self.init_lora(r, lora_alpha, use_rslora)
        if r > 0:
            self.new_lora_parameters()
            self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
            self.weight.requires_grad = False
            if self.bias is not None:
                self.bias.requires_grad = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        if self.external_lora is not None and self.fold_external_lora:
            lora_a_t, lora_b_t = self.external_lora
            folded = x @ (self.weight.T + lora_a_t @ lora_b_t)
            return folded if self.bias is None else folded + self.bias
        result = F.linear(x, self.weight, self.bias)
        if self.lora_slots is not None:
            a_stack, b_stack, adapter_ids = self.lora_slots
            return result + (x @ a_stack[adapter_ids]) @ b_stack[adapter_ids]  # [B, N, in] @ [B, in, r] @ [B, r, out]
        if self.external_lora is not None:
            lora_a_t, lora_b_t = self.external_lora
            return result + (x @ lora_a_t) @ lora_b_t
        if self.r > 0 and not self.merged:
            result = result + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
        return result

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling:g}"


class LoRAEmbedding(nn.Embedding, LoRALayer):
    """Embedding table E0 [num_embeddings, dim] frozen, plus delta = (B A)^T * scaling.

    lora_A: [r, num_embeddings] (Kaiming-uniform), lora_B: [dim, r] (zeros): the update starts at zero.
    Looking up ids gives E0[ids] + A^T[ids] B^T * scaling, never materialising the delta.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1.0,
        use_rslora: bool = False,
    ) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim)
        self.init_lora(r, lora_alpha, use_rslora)
        self.in_features, self.out_features = num_embeddings, embedding_dim
        if r > 0:
            self.new_lora_parameters()
            self.weight.requires_grad = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).T * self.scaling

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (int64) -> [..., embedding_dim]."""
        result = F.embedding(ids, self.weight)
        if self.lora_slots is not None:
            a_stack, b_stack, adapter_ids = self.lora_slots
            a_rows = a_stack[adapter_ids]  # [B, vocab, r]: each row's own A_t, looked up by its token ids
            picked = torch.gather(a_rows, 1, ids.unsqueeze(-1).expand(-1, -1, a_rows.shape[-1]))
            return result + picked @ b_stack[adapter_ids]
        if self.external_lora is not None:
            lora_a_t, lora_b_t = self.external_lora
            return result + F.embedding(ids, lora_a_t) @ lora_b_t
        if self.r > 0 and not self.merged:
            result = result + (F.embedding(ids, self.lora_A.T) @ self.lora_B.T) * self.scaling
        return result

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, scaling={self.scaling:g}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(module path, layer) for every LoRA layer with r > 0, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer) and module.r > 0:
            yield name, module


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze everything but lora_A / lora_B."""
    for name, param in model.named_parameters():
        param.requires_grad = name.endswith(("lora_A", "lora_B"))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed like model.state_dict()."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything but the LoRA tensors (the frozen base model)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}


def merge_lora(model: nn.Module, safe_merge: bool = False) -> None:
    """merge() every LoRA layer.

    With safe_merge, every merged weight is checked first: if any would hold NaN or Inf, nothing is merged
    and ValueError names the layer.
    """
    if safe_merge:
        with torch.no_grad():
            for name, layer in lora_layers(model):
                if not layer.merged and not torch.isfinite(layer.weight + layer.delta_weight()).all():
                    raise ValueError(f"safe_merge refused: merging {name} gives NaN or Inf")
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """unmerge() every LoRA layer."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{'total', 'trainable', 'lora'} parameter counts."""
    params = list(model.named_parameters())
    return {
        "total": sum(p.numel() for _, p in params),
        "trainable": sum(p.numel() for _, p in params if p.requires_grad),
        "lora": sum(p.numel() for n, p in params if n.endswith(("lora_A", "lora_B"))),
    }
