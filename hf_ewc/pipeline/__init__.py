"""What `hf-ewc train` and `hf-ewc prune` orchestrate, on top of the library (nothing below imports it).

- `run_config.py` — `RunConfig` and its blocks (`ModelSpec`, `DomainSpec`, `PruneSpec`, `PeftSpec`), validation;
- `config_io.py` — YAML 1.2 reading, ``--key value`` overrides, values checked against field types;
- `data.py` — domain datasets: loading, splitting, tokenizing, collators;
- `prepare.py` — tokenizer and model preparation, resume and `--from`, everything that fails before a write;
- `adapters.py` — the `peft:` block (LoRA adapters on a frozen base model);
- `run_dir.py` — output_dir layout, progress, resume checks, atomic stages;
- `evaluation.py` — one matrix row: every domain evaluated;
- `general_eval.py` — the `general_eval:` block: lm-evaluation-harness scores before the first domain and after each;
- `loop.py` — [`Pipeline`]: the domain loop, top to bottom;
- `results.py`, `card.py` — results, plots and the model card;
- `prune.py` — `hf-ewc prune`, the `prune:` block and a CLNP run's per-domain export (`--clnp-domain`).
"""

from .evaluation import evaluate_model
from .loop import Pipeline, run_pipeline
from .prepare import train_tokenizer
from .prune import export_clnp_domain, prune_pretrained
from .run_config import RunConfig, build_run_config, default_config_path, load_run_config
from .run_dir import config_differences


__all__ = [
    "Pipeline",
    "RunConfig",
    "build_run_config",
    "config_differences",
    "default_config_path",
    "evaluate_model",
    "export_clnp_domain",
    "load_run_config",
    "prune_pretrained",
    "run_pipeline",
    "train_tokenizer",
]
