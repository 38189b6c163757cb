"""LoRA students (``student.lora``): PEFT adapters trained on a frozen base.

What LoRA changes in the distill stage, and why each piece is done this way:

- :func:`attach` wraps the student in a PEFT ``PeftModel`` (LoRA on ``target_modules``); only the
  adapters require gradients, so the training loop's optimiser (built from the parameters that do)
  sees the adapters alone. ``lora_B`` starts at zero: the step-0 student IS the base.
- :class:`AdaptersOff` is the base seen through the same modules with the adapters switched off: the
  reference model (KL to the initial student) and a ``copsd.teacher: self`` teacher are the initial
  student, so they need no second copy of its weights (a 0.5B student in fp32 is 2 GB per copy).
- :func:`adapter_checkpoints` makes ``accelerator.save_state`` write only the adapter tensors (and the
  optimiser holds only theirs), and loads them back checking that the file holds exactly the
  student's adapters: a checkpoint of a 0.5B student with r 16 is ~35 MB, not ~6 GB.
- :func:`merged` is what the stage saves: the base with ``W + (alpha / r) B A`` folded in
  (``merge_and_unload``), a plain model folder that ``from_pretrained`` loads without PEFT; with
  ``keep_adapter`` the adapter folder (PEFT's own format) is written beside it, as ``adapter/``.

PEFT is imported only here and only when LoRA is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from opd.config import LoraConfig
from opd.models import count_parameters

ADAPTER_DIR = "adapter"


def attach(model: torch.nn.Module, cfg: LoraConfig, seed: int) -> torch.nn.Module:
    """``model`` with LoRA adapters (a ``PeftModel``); ``lora_A``'s random init drawn from ``seed``, so every
    rank, and a resumed run, starts from the same adapters."""
    from peft import LoraConfig as PeftLora, get_peft_model

    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    peft_cfg = PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, peft_cfg)
        except ValueError as err:  # e.g. target modules not found in the model: PEFT's message names them
            raise ValueError(f"student.lora: {err}") from None


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a ``PeftModel`` (the adapters are injected into its layers, so its
    forward runs them); any other model as it is."""
    return model.get_base_model() if is_lora(model) else model


class _Off:
    """Calls the decoder of ``student`` with its adapters switched off (``disable_adapter``)."""

    def __init__(self, student: torch.nn.Module):
        self.student = student

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.student.disable_adapter():
            return causal_lm(self.student).base_model(*args, **kwargs)


class AdaptersOff(torch.nn.Module):
    """The initial student of a LoRA run: its base, adapters off, without a copy of its weights.

    It offers what the engine's frozen-model passes read (:func:`opd.scoring.response_hidden`'s
    ``base_model``, the LM head, ``config``, ``device``); the student is kept as a plain attribute, not a
    submodule: this module has no parameters of its own, so nothing done to it (``requires_grad_(False)``,
    ``.to(dtype)``) can freeze or move the student's."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "student", student)

    @property
    def base_model(self) -> _Off:  # type: ignore[override]
        return _Off(self.student)

    @property
    def config(self) -> Any:
        return self.student.config

    def get_output_embeddings(self) -> torch.nn.Module:
        head = self.student.get_output_embeddings()
        return getattr(head, "base_layer", head)  # an adapted LM head: its base layer

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.student.disable_adapter():
            return self.student(*args, **kwargs)


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def adapter_checkpoints(acc: Any) -> None:
    """``acc.save_state`` / ``load_state`` of a LoRA student: the adapters only (see the module docstring)."""
    from safetensors.torch import load_file

    def save(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], _: str) -> None:
        for i, model in enumerate(models):
            keep = trainable(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def load(models: list[torch.nn.Module], input_dir: str) -> None:
        for i, model in enumerate(models):
            path = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
            state = load_file(str(path), device=str(next(model.parameters()).device))
            want = trainable(model)
            if set(state) != want:
                raise ValueError(f"{path} holds {len(state)} tensors, not this student's {len(want)} adapter tensors "
                                 f"(e.g. {sorted(set(state) ^ want)[:2]})")
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here: accelerate's strict full-model load would miss the frozen base

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


def merged(keep_adapter: bool) -> Any:
    """The ``finish`` of :func:`opd.train.save_trained` for a LoRA student: the adapter folder when kept,
    then the merged model to save."""

    def finish(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
        if keep_adapter:
            model.save_pretrained(str(folder / ADAPTER_DIR), safe_serialization=True)
        return model.merge_and_unload()

    return finish


def counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters (the adapters and the whole model, base included)."""
    return {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "parameters": count_parameters(model)}
