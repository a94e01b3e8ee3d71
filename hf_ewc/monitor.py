"""What EWC reports while a domain trains: the ``ewc/*`` metrics of the active penalty at every logging step, and the
warnings worth giving once — a penalty that diverged, and a domain the penalty did not protect.

| key | what |
|---|---|
| ``ewc/penalty`` | the penalty now: ``Σ c·(θ − θ*)²`` (stabilized, vanilla) or ``Σ ½·λ·Ω·(θ − θ*)²`` (proximal) |
| ``ewc/task_loss`` | the Trainer's loss (mean over the logging window) without the penalty |
| ``ewc/penalty_ratio`` | penalty / task loss: below about 1e-3 over a domain, EWC did nothing |
| ``ewc/coef_max`` | max η·2c (or the largest proximal weight): the share of the way to the anchor one step covers |
| ``ewc/lambda_omega_mean`` | λ·Ω̄, the penalty's mean strength (λ with mean-normalized importances) |
"""

import math

from .penalty import Penalty
from .utils import logger


NO_EFFECT_RATIO = 1e-3  # a domain whose penalty stays below this share of the task loss was not protected


class PenaltyMonitor:
    """The ``ewc/*`` metrics of the active penalty at each logging step, and the warnings that are given once: a
    diverging penalty, and a domain the penalty did not protect (its mean ``ewc/penalty_ratio`` below 1e-3)."""

    def __init__(self, ewc_mode: str):
        self.ewc_mode = ewc_mode
        self.ratios: list[float] = []
        self.warned: set[str] = set()

    def metrics(self, penalty: Penalty, loss: float, *, in_loss: bool) -> dict[str, float]:
        """``ewc/*`` at this logging step; ``loss`` becomes the task loss (the Trainer's mean over the logging
        window) plus the penalty now."""
        if penalty.penalized:
            value = penalty.value()
            task = loss - value if in_loss else loss
            loss = task + value
        else:
            value, task = penalty.quadratic_value(), loss
        ratio = value / task if task else float("inf")
        if not math.isfinite(value) and "diverged" not in self.warned:
            # The Trainer's logging_nan_inf_filter hides a diverging loss; the penalty does not.
            hint = "use ewc_mode='stabilized'" if self.ewc_mode == "vanilla" else "lower the learning rate"
            logger.warning(f"The EWC penalty is {value}: training has diverged; {hint} or λ.")
            self.warned.add("diverged")
        self.ratios.append(ratio)
        return {
            "loss": loss,
            "ewc/penalty": value,
            "ewc/task_loss": task,
            "ewc/penalty_ratio": ratio,
            "ewc/coef_max": penalty.coef_max,
            "ewc/lambda_omega_mean": penalty.ewc_lambda * penalty.omega_mean,
        }

    def domain_finished(self, penalty: Penalty | None) -> None:
        """After `train()`: warn (once) when the penalty stayed too weak to protect anything."""
        ratios, self.ratios = [r for r in self.ratios if math.isfinite(r)], []
        if penalty is None or not ratios or "no effect" in self.warned:
            return
        mean = sum(ratios) / len(ratios)
        if mean < NO_EFFECT_RATIO:
            logger.warning(
                f"The EWC penalty stayed at {mean:.1e} of the task loss on average during this domain "
                f"(ewc/penalty_ratio < {NO_EFFECT_RATIO:g}): it protected nothing. Raise ewc_lambda (λ·Ω̄ = "
                f"{penalty.ewc_lambda * penalty.omega_mean:.3g} now; `hf-ewc sweep` measures the trade-off)."
            )
            self.warned.add("no effect")
