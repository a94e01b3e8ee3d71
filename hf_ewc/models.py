"""What hf_ewc knows about transformers models, in one table each: task ↔ Auto class, where the transformer blocks,
their FFN and their attention heads are, and which weights are pruned by default.

Everything that asks "which Auto class rebuilds this model", "can this model type do that task" or "where are the FFN
neurons of this architecture" reads these tables; nothing else spells them out.
"""

from dataclasses import dataclass

import transformers
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D

from .utils import HfEwcError


# ---------------------------------------------------------------------------------------------- tasks and Auto classes
@dataclass(frozen=True)
class TaskKind:
    """One row of the task table: an `hf-ewc train` task (None: reloaded and exported, not trained), the Auto class
    that builds it, the transformers mapping of the model classes it covers, and the Hub pipeline tag."""

    task: str | None
    auto_class: str
    mapping: str
    pipeline_tag: str | None = None


TASK_TABLE = (
    TaskKind("causal_lm", "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    TaskKind("masked_lm", "AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    TaskKind(
        "sequence_classification",
        "AutoModelForSequenceClassification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "text-classification",
    ),
    TaskKind(None, "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    TaskKind(None, "AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    TaskKind(None, "AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    TaskKind(None, "AutoModel", "MODEL_MAPPING_NAMES"),
)
TASKS = tuple(kind.task for kind in TASK_TABLE if kind.task is not None)
_BY_TASK = {kind.task: kind for kind in TASK_TABLE if kind.task is not None}
_BY_AUTO_CLASS = {kind.auto_class: kind for kind in TASK_TABLE}


def _model_classes(kind: TaskKind) -> dict[str, str]:
    """model type → model class name, for the classes ``kind``'s Auto class builds."""
    return getattr(modeling_auto, kind.mapping, {})


def auto_model_class(task: str):
    """The Auto class of an `hf-ewc train` task (``AutoModelForCausalLM`` for ``"causal_lm"``)."""
    return getattr(transformers, _BY_TASK[task].auto_class)


def auto_class_for(class_name: str):
    """The transformers Auto class whose mapping holds ``class_name`` (e.g. ``LlamaForCausalLM``), or None."""
    for kind in TASK_TABLE:
        if class_name in _model_classes(kind).values():
            return getattr(transformers, kind.auto_class)
    return None


def task_of_auto_class(auto_class_name: str) -> str | None:
    """The `hf-ewc train` task an Auto class serves (None for the Auto classes hf-ewc only reloads)."""
    kind = _BY_AUTO_CLASS.get(auto_class_name)
    return kind.task if kind is not None else None


def pipeline_tag(task_or_auto_class: str) -> str | None:
    """The Hub pipeline tag of a task or an Auto class name (None when the table has none)."""
    kind = _BY_TASK.get(task_or_auto_class) or _BY_AUTO_CLASS.get(task_or_auto_class)
    return kind.pipeline_tag if kind is not None else None


def check_task(task: str, config, where: str) -> None:
    """Refuse a model type that has no class for ``task``, saying which tasks it can do."""
    if getattr(config, "auto_map", None):  # custom code: its own Auto mapping decides
        return
    if config.model_type not in _model_classes(_BY_TASK[task]):
        able = [t for t in TASKS if config.model_type in _model_classes(_BY_TASK[t])]
        hint = f"this model can do: {', '.join(able)}" if able else "choose another model"
        raise HfEwcError(f"{where}: model type {config.model_type!r} cannot do task {task!r}; {hint}.")


def model_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's own loss shifts labels (position t predicts token t+1): 🤗 causal LMs do.

    A model counts as causal when its class is one of transformers' causal-LM classes or its `loss_type` maps to the
    causal-LM loss; encoder-decoders never shift (their decoder inputs are shifted instead)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    causal = set(_model_classes(_BY_TASK["causal_lm"]).values())
    if any(cls.__name__ in causal for cls in type(inner).__mro__):  # (FSDP2's FSDPGPT2LMHeadModel, a user's subclass)
        return True
    return LOSS_MAPPING.get(getattr(inner, "loss_type", None)) is ForCausalLMLoss


# ------------------------------------------------------------------------------------------------ positions
_PADDING_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}  # position ids start after the padding index


def max_positions(config) -> int | None:
    """How many tokens one example may hold: the position table minus the padding offset of RoBERTa-style models."""
    limit = next(
        (getattr(config, k) for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)), None
    )
    return None if limit is None else limit - _PADDING_OFFSET.get(config.model_type, 0)


def check_max_length(config, max_length: int, where: str) -> None:
    """Blocks longer than the model's position table would fail inside the first forward, after the run started."""
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise HfEwcError(
            f"{where}: model.max_length={max_length} exceeds the model's {limit} positions; lower "
            "model.max_length (or raise max_position_embeddings for a model built from config)."
        )


# ------------------------------------------------------------------------------------------------ layers
LINEAR_TYPES = (nn.Linear, Conv1D)  # GPT-2's Conv1D computes z = a·W + b with W stored [in, out]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (weight stored [in, out]), or a remote-code copy of it (same name, same ``nf``)."""
    return isinstance(module, Conv1D) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def neuron_dim(module: nn.Module, role: str) -> int:
    """The weight dimension indexing a layer's units: its outputs (``role="in"``: a projection into the units) or its
    inputs (``role="out"``: a projection that reads them). Linear weights are [out, in], Conv1D weights [in, out]."""
    if is_conv1d(module):
        return 1 if role == "in" else 0
    return 0 if role == "in" else 1


def in_block(module_name: str) -> bool:
    """True inside a ModuleList of blocks (``model.layers.3.mlp.up_proj``, ``transformer.h.0.attn.c_attn``)."""
    return any(part.isdigit() for part in module_name.split("."))


def default_targets(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights pruned (and kept sparse) by default: the ``weight`` of every Linear / ``Conv1D`` inside the
    transformer blocks, named as ``named_parameters`` names them (tied parameters once)."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES) and in_block(module_name):
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                found[f"{module_name}.weight"] = weight
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p for p in found.values() if id(p) in names}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (the longest ModuleList of modules with parameters) and its name."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        blocks = (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(next(m.parameters(), None) is not None for m in module)
        )
        if blocks and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise HfEwcError(f"{type(model).__name__} has no list of transformer blocks; structured pruning needs one.")
    return best


def submodule(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


# ------------------------------------------------------------------------------------------------ block layouts
@dataclass(frozen=True)
class FFNLayout:
    """Where a block's FFN is: the projections whose outputs are the FFN neurons, those that read them, and the config
    key holding the FFN width."""

    family: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    width_key: str

    def matches(self, block: nn.Module) -> bool:
        return all(submodule(block, p) is not None for p in self.inputs + self.outputs)


FFN_LAYOUTS = (
    FFNLayout(
        "Llama, Mistral, Qwen2, Gemma", ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), "intermediate_size"
    ),
    FFNLayout("BERT, RoBERTa, ELECTRA", ("intermediate.dense",), ("output.dense",), "intermediate_size"),
    FFNLayout("GPT-2 (Conv1D)", ("mlp.c_fc",), ("mlp.c_proj",), "n_inner"),
    FFNLayout("GPT-NeoX", ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",), "intermediate_size"),
    FFNLayout("OPT", ("fc1",), ("fc2",), "ffn_dim"),
)


@dataclass(frozen=True)
class AttentionLayout:
    """Where a block's attention heads are. Head h owns rows ``h·head_dim …`` of the ``query`` projections (and of the
    ``key_value`` ones unless key/value heads are shared, as in grouped-query attention) and the matching input
    columns of ``output``. ``fused``: one projection holds q, k and v side by side (GPT-2's ``c_attn``).
    ``removable``: the config can say "fewer heads" (an explicit ``head_dim``), so heads leave the shapes; otherwise
    their weights are zeroed."""

    family: str
    path: str
    query: tuple[str, ...]
    key_value: tuple[str, ...]
    output: str
    fused: bool = False
    removable: bool = False

    def find(self, block: nn.Module) -> nn.Module | None:
        """The attention module of ``block`` when it has this layout."""
        attn = submodule(block, self.path)
        if attn is None or any(submodule(attn, p) is None for p in (*self.query, *self.key_value, self.output)):
            return None
        return attn


ATTENTION_LAYOUTS = (
    AttentionLayout("Llama-style self_attn.{q,k,v,o}_proj", "self_attn", ("q_proj",), ("k_proj", "v_proj"), "o_proj",
                    removable=True),
    AttentionLayout("BERT-style attention.self.{query,key,value}", "attention", ("self.query",),
                    ("self.key", "self.value"), "output.dense"),
    AttentionLayout("GPT-2 attn.c_attn", "attn", ("c_attn",), (), "c_proj", fused=True),
)  # fmt: skip


def ffn_layout(block: nn.Module) -> FFNLayout | None:
    return next((layout for layout in FFN_LAYOUTS if layout.matches(block)), None)


def attention_layout(block: nn.Module) -> AttentionLayout | None:
    return next((layout for layout in ATTENTION_LAYOUTS if layout.find(block) is not None), None)
