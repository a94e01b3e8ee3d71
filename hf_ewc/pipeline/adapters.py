"""PEFT (LoRA) runs: the `peft:` block, wrapping, and adapters saved next to a frozen base model.

With a `peft:` block the base model is frozen and only the adapter (plus PEFT's `modules_to_save`, the classification
head for sequence classification) trains, so the EWC state — importances and anchors — covers exactly those
parameters, under the names `PeftModel.named_parameters()` gives them (``base_model.model.….lora_A.default.weight``).
Those names are the same after `save_pretrained` / `PeftModel.from_pretrained`, so the state travels with the adapter.

A run directory then holds the adapter (``adapter_config.json``, ``adapter_model.safetensors``) at the top and the
frozen base model in ``base_model/``.
"""

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import auto_model_class
from ..utils import HfEwcError, error_line


BASE_MODEL_DIR = "base_model"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "masked_lm": None}


def _import_peft():
    try:
        import peft  # optional dependency (the `peft` extra)
    except ImportError:
        raise HfEwcError(
            "The peft: block needs the peft package: pip install 'hf-ewc[peft]' (or pip install peft)."
        ) from None
    return peft


def check_peft_spec(spec) -> None:
    """Values a `PeftSpec` must hold, checked before anything runs."""
    _import_peft()
    if spec.method != "lora":
        raise HfEwcError(f"peft.method {spec.method!r} is not supported; use 'lora'.")
    if spec.r < 1:
        raise HfEwcError(f"peft.r must be >= 1, got {spec.r}.")
    if not spec.alpha > 0:
        raise HfEwcError(f"peft.alpha must be > 0, got {spec.alpha}.")
    if not 0 <= spec.dropout < 1:
        raise HfEwcError(f"peft.dropout must be in [0, 1), got {spec.dropout}.")
    if spec.bias not in ("none", "all", "lora_only"):
        raise HfEwcError(f"peft.bias must be 'none', 'all' or 'lora_only', got {spec.bias!r}.")
    if isinstance(spec.target_modules, list) and not all(isinstance(m, str) for m in spec.target_modules):
        raise HfEwcError(f"peft.target_modules must be a list of module names, got {spec.target_modules!r}.")


def lora_config(spec, task: str):
    peft = _import_peft()
    task_type = _TASK_TYPES[task]
    return peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=spec.modules_to_save,
        bias=spec.bias,
        task_type=getattr(peft.TaskType, task_type) if task_type else None,
    )


def wrap_model(model: nn.Module, spec, task: str) -> nn.Module:
    """``get_peft_model(model, LoraConfig(...))``; a block that does not fit the model is one clear error."""
    peft = _import_peft()
    try:
        return peft.get_peft_model(model, lora_config(spec, task))
    except (ValueError, TypeError, KeyError) as err:
        message = error_line(err)
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise HfEwcError(
            f"peft: {message} Set peft.target_modules to module names of this model (its Linear layers: "
            f"{', '.join(names[:12])}{', …' if len(names) > 12 else ''}) or 'all-linear'."
        ) from None


def check_wraps(model: nn.Module, spec, task: str) -> None:
    """Wrap a weightless (meta-device) copy of ``model``'s architecture: a bad block fails here, before any file is
    written, without touching ``model``."""
    with torch.device("meta"):
        skeleton = auto_model_class(task).from_config(model.config)
    wrapped = wrap_model(skeleton, spec, task)
    missing = sorted(set(spec.modules_to_save or []) - set(trained_heads(wrapped)))
    if missing:
        raise HfEwcError(
            f"peft.modules_to_save: {', '.join(missing)} is not a module of this model, so nothing of it would "
            "train; name modules the model has (e.g. its head) or drop the key."
        )


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


def load_adapter(base: nn.Module, adapter_dir: str | os.PathLike, *, trainable: bool = True) -> nn.Module:
    peft = _import_peft()
    try:
        return peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise HfEwcError(f"Cannot load the adapter in {adapter_dir}: {error_line(err)}") from None


def check_adapter_matches(model: nn.Module, spec, where: str) -> None:
    """A loaded adapter continues a run only with the LoRA settings the `peft:` block asks for: the adapter keeps its
    own, so a block that says otherwise would be recorded but not applied."""
    config = model.peft_config[model.active_adapter]
    mine = {"r": spec.r, "alpha": float(spec.alpha), "dropout": float(spec.dropout), "bias": spec.bias}
    theirs = {
        "r": config.r,
        "alpha": float(config.lora_alpha),
        "dropout": float(config.lora_dropout),
        "bias": config.bias,
    }
    targets = module_names(spec.target_modules)
    if isinstance(targets, list):  # None (PEFT's default for the model type) and "all-linear" are what PEFT expanded
        mine["target_modules"], theirs["target_modules"] = targets, module_names(config.target_modules)
    if spec.modules_to_save is not None:
        mine["modules_to_save"] = sorted(spec.modules_to_save)
        theirs["modules_to_save"] = trained_heads(model)
    differ = [f"{k}: {theirs[k]!r} there, {mine[k]!r} in the config" for k in mine if mine[k] != theirs[k]]
    if differ:
        raise HfEwcError(f"The adapter in {where} does not match the peft: block ({'; '.join(differ)}).")


def module_names(targets) -> list[str] | str | None:
    """Target modules as the short names a config uses (``q_proj``), whether PEFT saved names or full paths
    (``model.layers.0.self_attn.q_proj``, what "all-linear" expands to); a string such as "all-linear" as is."""
    if targets is None or isinstance(targets, str):
        return targets
    return sorted({t.rsplit(".", 1)[-1] for t in targets})


def trained_heads(model: nn.Module) -> list[str]:
    """The `modules_to_save` this model really trains (PEFT's default list names every known head)."""
    return sorted(
        {
            n.split(".modules_to_save.")[0].rsplit(".", 1)[-1]
            for n, p in model.named_parameters()
            if p.requires_grad and ".modules_to_save." in n
        }
    )


def parameter_summary(model: nn.Module) -> dict[str, Any]:
    """What EWC protects: the trainable parameters (the adapter, for a PEFT model) against the frozen rest."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {
        "trainable_tensors": len(trainable),
        "trainable_parameters": sum(p.numel() for _, p in trainable),
        "total_parameters": total,
    }
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        config = peft_config[model.active_adapter]
        out["peft"] = {
            "method": str(getattr(config.peft_type, "value", config.peft_type)).lower(),
            "r": config.r,
            "alpha": config.lora_alpha,
            "target_modules": module_names(config.target_modules),
            "modules_to_save": trained_heads(model),
        }
    return out


def hub_base_of(adapter_dir: str | os.PathLike) -> str | None:
    """The Hub id an adapter's config names as its base (None for a local path or none)."""
    try:
        name = _import_peft().PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    except (OSError, ValueError, TypeError):
        return None
    return name if name and not os.path.exists(name) else None


def base_model_of(adapter_dir: str | os.PathLike) -> str:
    """Where an adapter's base model is: ``base_model/`` next to it (an `hf-ewc train` run), else the Hub id or path
    its config names."""
    peft = _import_peft()
    local = Path(adapter_dir) / BASE_MODEL_DIR
    if (local / "config.json").is_file():
        return str(local)
    try:
        name = peft.PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    except (OSError, ValueError, TypeError) as err:  # JSON errors are ValueErrors
        raise HfEwcError(f"Cannot read the adapter config in {adapter_dir}: {error_line(err)}") from None
    if not name:
        raise HfEwcError(
            f"{adapter_dir} holds an adapter but no base model ({BASE_MODEL_DIR}/ is missing and the adapter config "
            "names none)."
        )
    return name
