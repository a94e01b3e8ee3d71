"""Where a model comes from — a local directory or a Hub id — and what is wrong with one that cannot be loaded.

`from_pretrained` fails on a bad `model.name_or_path` with messages about the first file it happened to look for (a
tokenizer backend, a repo-id syntax rule). These checks run first and name the actual problem: a local directory
that does not exist, a directory that is not a saved model, or a Hub id that is not cached while the Hub is offline.
"""

import os
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache

from ..utils import HfEwcError, error_line


SAVED_MODEL_FILES = ("config.json", "adapter_config.json")  # a save_pretrained model, or a LoRA adapter


def looks_local(name: str) -> bool:
    """A path, not a Hub id (``name`` or ``org/name``): absolute, ``./``/``../``/``~``, or more than one ``/``."""
    return (
        os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    )


def check_model_source(name: str, *, revision: str | None = None, key: str = "model.name_or_path") -> None:
    """Refuse, in one line with its fix, a model source that cannot load (see the module docstring)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HfEwcError(
                f"{key} {name!r} is a file, not a model directory; give the directory save_pretrained wrote "
                "(config.json and the weights)."
            )
        if not any((path / f).is_file() for f in SAVED_MODEL_FILES):
            raise HfEwcError(
                f"{key} {name!r} is a directory but not a saved model (no config.json); give a directory written by "
                "save_pretrained, or a Hub id such as 'openai-community/gpt2'."
            )
        return
    if looks_local(name):
        relative = "" if os.path.isabs(name) else f" (relative to {os.getcwd()})"
        raise HfEwcError(
            f"{key} {name!r}: no such directory{relative}; fix the path, or give a Hub id such as "
            "'openai-community/gpt2'."
        )
    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError as err:  # huggingface_hub's HFValidationError: not a repo id either
        raise HfEwcError(
            f"{key} {name!r} is neither a local directory nor a valid Hub id ({error_line(err)}); fix it."
        ) from None
    if constants.is_offline_mode() and not isinstance(cached, str):
        raise HfEwcError(
            f"{key} {name!r} is a Hub id that is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
            f"downloading it; run once with network access (or `hf download {name}`), or give a local directory."
        )
