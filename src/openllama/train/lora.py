"""LoRA through peft on our Llama: low-rank adapters on chosen linear layers, the base frozen.

`apply_lora` wraps the model (peft's `get_peft_model` works on any torch module whose target
layers are `nn.Linear`); `merged_copy` gives a plain `Llama` with the adapters folded into the
weights (B @ A * alpha / r added), which is what checkpoints and the Hugging Face export hold;
`adapter_state` / `load_adapter_state` move only the adapter tensors, which is all a resume
needs on top of the base model.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from ..config import Section
from ..errors import UserError
from ..model import Llama

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoraConfig(Section):
    r: int = 0  # 0 = full fine-tuning; > 0 = LoRA rank
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = Field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])

    @property
    def enabled(self) -> bool:
        return self.r > 0


def apply_lora(model: Llama, cfg: LoraConfig) -> torch.nn.Module:
    """The model wrapped with LoRA adapters; only adapter parameters stay trainable."""
    try:
        import peft
    except ModuleNotFoundError:
        raise UserError("LoRA needs peft: pip install 'openllama[lora]'") from None
    unknown = sorted(set(cfg.targets) - set(TARGETS))
    if unknown:
        raise UserError(f"lora.targets: unknown module(s) {unknown}; expected some of {', '.join(TARGETS)}")
    pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                           bias="none")
    return peft.get_peft_model(model, pcfg)


def is_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def base_llama(model: torch.nn.Module) -> Llama:
    """The Llama inside any wrapper (peft, DDP, compile, reward head)."""
    for module in model.modules():
        if isinstance(module, Llama):
            return module
    raise TypeError(f"no Llama inside {type(model).__name__}")


def merged_copy(model: torch.nn.Module) -> Llama:
    """A plain Llama with the adapters merged in (the training model is left untouched)."""
    if not is_lora(model):
        return base_llama(model)
    clone = copy.deepcopy(model)
    merged = clone.merge_and_unload() if hasattr(clone, "merge_and_unload") else clone
    return base_llama(merged)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing = set(adapter_state(model)) - set(state)
    if missing:
        raise UserError(f"LoRA resume: adapter tensors missing from the checkpoint, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state, strict=False)


class LoraLlama(torch.nn.Module):
    """A Llama with LoRA adapters, as the engine trains it: forward is the adapted model's;
    `save_checkpoint` writes the merged weights as an ordinary (exportable) model directory plus
    the adapters alone in `lora_adapter.safetensors`; `load_checkpoint` restores the adapters
    (the base is rebuilt from the starting model, which the stage records in its config)."""

    ADAPTER_FILE = "lora_adapter.safetensors"

    def __init__(self, llama: Llama, cfg: LoraConfig):
        super().__init__()
        self.cfg = llama.cfg
        self.lora = cfg
        self.peft = apply_lora(llama, cfg)

    def forward(self, *args, **kwargs):
        return self.peft(*args, **kwargs)

    def merged(self) -> Llama:
        return merged_copy(self.peft)

    def save_checkpoint(self, directory) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        from ..model import save_model

        save_model(self.merged(), directory, extra={"lora": self.lora.model_dump(mode="json")})
        save_file(adapter_state(self.peft), str(Path(directory) / self.ADAPTER_FILE))

    def load_checkpoint(self, directory) -> None:
        from pathlib import Path

        from safetensors.torch import load_file

        path = Path(directory) / self.ADAPTER_FILE
        if not path.is_file():
            raise UserError(f"{directory}: no {self.ADAPTER_FILE}; this checkpoint was not trained with LoRA")
        load_adapter_state(self.peft, load_file(str(path)))
