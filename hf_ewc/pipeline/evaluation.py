"""Evaluation of one model on every domain: token-weighted loss and perplexity for language models, accuracy and loss
for classification, plus any `evaluate` metric a domain names."""

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..metrics import perplexity
from ..utils import error_line, logger
from .data import DomainData, eval_collator
from .run_config import RunConfig


def primary_metric(task: str) -> tuple[str, bool]:
    """The matrix's metric and whether higher is better: accuracy for classification, eval loss for LMs."""
    return ("accuracy", True) if task == "sequence_classification" else ("loss", False)


class DomainEvaluator:
    """Evaluates a model on the eval split of every domain of a run (one matrix row), loading each domain's optional
    `evaluate` metric once (by local path, next to the config, or Hub name; skipped with a warning when it cannot
    load)."""

    def __init__(self, run: RunConfig, base_dirs: list[Path], batch_size: int):
        self.run = run
        self.base_dirs = base_dirs
        self.batch_size = batch_size
        self._metrics: dict[str, Any] = {}

    def row(self, model, domains: list[DomainData], tokenizer) -> dict[str, dict[str, float]]:
        return {d.name: self.evaluate(model, d, tokenizer) for d in domains}

    def evaluate(self, model, data: DomainData, tokenizer) -> dict[str, float]:
        spec = next(d for d in self.run.domains if d.name == data.name)
        module = self._metric_module(spec.metric) if spec.metric else None
        return evaluate_model(
            model, data.eval, self.run.task, tokenizer, batch_size=self.batch_size, metric=(spec.metric, module)
        )

    def _metric_module(self, name: str):
        if name not in self._metrics:
            module = None
            path = next((b / name for b in self.base_dirs if (b / name).exists()), None)
            try:
                import evaluate  # optional dependency (the `evaluate` extra): a missing package skips the metric

                module = evaluate.load(str(path) if path is not None else name)
            except Exception as err:  # noqa: BLE001 - missing package, offline Hub, broken script: all mean "skip it"
                logger.warning(
                    f"Metric {name!r} could not be loaded ({error_line(err)}); using the built-in metrics only."
                )
            self._metrics[name] = module
        return self._metrics[name]


@torch.no_grad()
def evaluate_model(
    model, dataset, task: str, tokenizer, *, batch_size: int = 8, metric: tuple[str, Any] | None = None
) -> dict[str, Any]:
    """Token-weighted cross-entropy (and perplexity) for language models, accuracy and loss for classification.

    ``dataset`` is tokenized as by [`tokenize_domain`] (its eval part: masked LM inputs masked once); ``metric`` is an
    optional ``(name, evaluate module)`` computed on the labelled positions.
    """
    name, module = metric if metric is not None else (None, None)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=eval_collator(task, tokenizer))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions: list[int] = []
    references: list[int] = []
    total, count, correct = 0.0, 0, 0
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if task == "causal_lm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((labels != -100).sum())
            if task == "sequence_classification":
                correct += int((logits.argmax(-1) == labels).sum())
            if module is not None:  # labelled positions only (tokens for LMs, one per example otherwise)
                keep = labels != -100
                predictions += logits.argmax(-1)[keep].tolist()
                references += labels[keep].tolist()
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    if task == "sequence_classification":
        cell = {"accuracy": correct / max(count, 1), "loss": loss}
    else:
        cell = {"loss": loss, "perplexity": perplexity(loss)}
    if module is not None:
        values = module.compute(predictions=predictions, references=references) or {}
        cell["extra"] = {f"{name}:{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))}
    return cell
