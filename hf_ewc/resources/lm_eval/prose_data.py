"""Data of the shipped lm-evaluation-harness tasks (``custom_dataset: !function prose_data.NAME`` in their YAML):
read from the files next to this one, wherever the package is installed. Rebuild them with
``python scripts/build_general_tasks.py`` (provenance and licence: README.md here)."""

from pathlib import Path

import datasets


HERE = Path(__file__).resolve().parent


def _splits(name: str) -> datasets.DatasetDict:
    data = datasets.load_dataset("json", data_files=str(HERE / name), split="train")
    return datasets.DatasetDict({s: data.filter(lambda r, s=s: r["split"] == s) for s in ("validation", "test")})


def cloze(**kwargs) -> datasets.DatasetDict:
    """``hf_ewc_prose_cloze``: context, four choices, the label of the true ending."""
    return _splits("prose_cloze.jsonl.gz")


def paragraphs(**kwargs) -> datasets.DatasetDict:
    """``hf_ewc_prose_ppl``: whole paragraphs (``text``)."""
    return _splits("prose_paragraphs.jsonl.gz")
