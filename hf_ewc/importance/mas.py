r"""Memory Aware Synapses (Aljundi et al. 2018): sensitivity of the output's squared L2 norm, label-free.

For sample n with counted positions T_n (labels ≠ −100 when labels are given, else the attention mask, else every
position; a classifier has one position) and output f = softmax probabilities (``output="probs"``, as Kutalev's
`ewc-features` code) or raw logits (``output="logits"``):

    m_n(θ) = (1/T_n) · Σ_{t ∈ T_n} ‖f_θ(x_n)_t‖²,        Ω = (1/N) Σ_n |∇_θ m_n|

— the absolute value of each sample's gradient, averaged (not the absolute value of the averaged gradient).
"""

from typing import Any

from torch import Tensor, nn

from ..utils import HfEwcError
from ._collect import build_targets, prepare_inputs
from ._per_sample import PerSampleGradients


OUTPUTS = ("probs", "logits")
OPTIONS = ("output", "shift_labels", "per_sample")


def accumulate(
    model: nn.Module,
    batches,
    params: dict[str, nn.Parameter],
    *,
    output: str = "probs",
    shift_labels: bool,
    per_sample: str = "auto",
) -> tuple[dict[str, Tensor], int]:
    if output not in OUTPUTS:
        raise HfEwcError(f"Unknown MAS output {output!r}; choose one of: {', '.join(OUTPUTS)}.")
    device = next(iter(params.values())).device
    engine = PerSampleGradients(model, params, "abs", per_sample)
    engine.skip_model_loss()  # MAS reads the labels only to know which positions count

    def make_objectives(outputs: Any, inputs: dict[str, Any]):
        targets = build_targets(outputs, inputs, shift_labels=shift_labels, need_labels=False, method="mas")
        values = targets.logits.float()
        if output == "probs":
            values = values.softmax(-1)
        return targets.num_valid, [targets.per_sample_mean(values.square().sum(-1))]

    count = 0
    for batch in batches:
        count += engine.run(prepare_inputs(batch, model, device, categorical=True), make_objectives)
    return engine.sums, count
