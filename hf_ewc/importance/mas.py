r"""Memory Aware Synapses (Aljundi et al. 2018): sensitivity of the output's squared L2 norm, label-free.

For sample n with counted positions T_n (labels ≠ −100 when labels are given, else the attention mask, else every
position; a classifier has one position) and output f = softmax probabilities (``output="probs"``, as Kutalev's
`ewc-features` code) or raw logits (``output="logits"``):

    m_n(θ) = (1/T_n) · Σ_{t ∈ T_n} ‖f_θ(x_n)_t‖²,        Ω = (1/N) Σ_n |∇_θ m_n|

(`masx`: ``(max_c f_θ(x_n)_{t,c})²`` in place of ``‖f_θ(x_n)_t‖²``, Benzing's variant.)

— the absolute value of each sample's gradient, averaged (not the absolute value of the averaged gradient). Unlike
the Fisher (whose per-position gradients have mean 0 and are weighted by 1/√T_n), the positions' gradients of
``‖f_t‖²`` share a common direction, so ``|Σ_t|`` grows about as T and the mean over positions keeps Ω level: on a
small Llama trained on the shipped Python docs, Ω̄ of 128-token blocks is 0.95× that of 32-token blocks with the
mean, 1.9× with the 1/√T weighting.
"""

from typing import Any

from torch import Tensor, nn

from ..models import model_shifts_labels
from ..utils import HfEwcError
from ._loop import ImportanceMethod
from ._per_sample import PerSampleGradients
from ._targets import MEAN_OVER_T, build_targets


OUTPUTS = ("probs", "logits")


class MAS(ImportanceMethod):
    """Sums of per-sample absolute gradients of the mean squared output norm; the count is of samples."""

    name = "mas"
    options = ("output", "shift_labels", "per_sample")

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        *,
        seed: int | None = 0,
        output: str = "probs",
        shift_labels: bool | None = None,
        per_sample: str = "auto",
    ):
        super().__init__(model, params, seed=seed)
        if output not in OUTPUTS:
            raise HfEwcError(f"Unknown MAS output {output!r}; choose one of: {', '.join(OUTPUTS)}.")
        self.output = output
        self.shift_labels = model_shifts_labels(model) if shift_labels is None else shift_labels
        self.recorded = {"shift_labels": self.shift_labels, "sample_objective": MEAN_OVER_T}
        self.engine = PerSampleGradients(model, params, "abs", per_sample)
        self.engine.skip_model_loss()  # MAS reads the labels only to know which positions count
        self.sums = self.engine.sums

    def accumulate(self, inputs: dict[str, Any]) -> int:
        return self.engine.run(inputs, self._objectives)

    def _objectives(self, outputs: Any, inputs: dict[str, Any]):
        targets = build_targets(outputs, inputs, shift_labels=self.shift_labels, need_labels=False, method="mas")
        values = targets.logits.float()
        if self.output == "probs":
            values = values.softmax(-1)
        return targets.num_valid, [targets.per_sample(self._reduce(values), MEAN_OVER_T)]

    @staticmethod
    def _reduce(values: Tensor) -> Tensor:
        return values.square().sum(-1)


class MASX(MAS):
    """Benzing's `MASX`: MAS on the largest output only, ``m_n = (1/T_n) Σ_t (max_c f_θ(x_n)_{t,c})²`` (the max class
    probability with ``output="probs"``; the max logit with ``"logits"``, Benzing's `MASX2`)."""

    name = "masx"

    @staticmethod
    def _reduce(values: Tensor) -> Tensor:
        return values.max(-1).values.square()
