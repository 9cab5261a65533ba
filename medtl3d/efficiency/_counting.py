"""Parameter and MAC counting: fvcore under one stated convention, cross-checked by ``torch.utils.flop_counter``.

Convention (``MAC_CONVENTION``): one fused multiply-add = 1 MAC, per sample (batch 1). Convolutions, linear layers
and matrix products (mm, addmm, bmm, matmul, einsum, attention) count their multiply-adds. Pooling and resampling
count by an explicit rule, written in ``RESAMPLING_RULES``, never as a silent zero. Normalisation and element-wise
ops (activations, additions, scaling) are excluded on purpose. Any other op that fvcore meets is neither counted
nor excluded: it is listed as *unsupported* in the report.

``torch.utils.flop_counter`` counts only matrix-product families (FLOPs / 2 = MACs), so the two counts differ by the
pooling/resampling MACs; :class:`MacCount` names the ops whose counts explain any difference above 2%.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from math import prod

import torch
from fvcore.nn.jit_analysis import JitModelAnalysis
from fvcore.nn.jit_handles import (
    addmm_flop_jit, bmm_flop_jit, conv_flop_jit, einsum_flop_jit, get_shape, linear_flop_jit, matmul_flop_jit,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import EfficiencyError

MAC_CONVENTION = (
    "1 fused multiply-add = 1 MAC, per sample (batch 1); conv/linear/matmul/einsum/bmm/attention counted by fvcore; "
    "pooling and upsampling by the rules in `pooling_rules`; normalisation and element-wise ops excluded; "
    "cross-check: torch.utils.flop_counter FLOPs / 2"
)
AGREEMENT_TOLERANCE = 0.02

# Ops excluded by convention (norms and element-wise work), so fvcore neither counts nor reports them.
EXCLUDED_OPS = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::rsub", "aten::mul", "aten::mul_", "aten::div",
    "aten::div_", "aten::neg", "aten::sigmoid", "aten::sigmoid_", "aten::hardsigmoid", "aten::hardsigmoid_",
    "aten::tanh", "aten::gelu", "aten::silu", "aten::silu_", "aten::hardswish", "aten::hardswish_",
    "aten::hardtanh", "aten::hardtanh_", "aten::relu6", "aten::leaky_relu", "aten::leaky_relu_", "aten::elu",
    "aten::elu_", "aten::softmax", "aten::log_softmax", "aten::exp", "aten::sqrt", "aten::rsqrt", "aten::pow",
    "aten::abs", "aten::sum", "aten::mean", "aten::pad", "aten::repeat", "aten::masked_fill_", "aten::where",
    "aten::clone", "aten::linspace", "aten::meshgrid", "aten::feature_dropout", "aten::alpha_dropout",
    "aten::dropout_", "aten::ne", "aten::lt", "aten::le", "aten::fill_", "aten::new_ones", "aten::unflatten",
    "aten::expand_as", "aten::view_as", "aten::reshape_as", "aten::mT", "aten::movedim", "aten::numpy_T",
)


def _pool_over_input(inputs, outputs) -> int:
    """Adaptive pools: each input element is read and accumulated once."""
    return prod(get_shape(inputs[0]))


def _int_list(value) -> list[int]:
    """The ints of a traced list argument (a constant, or a ``prim::ListConstruct`` of constants)."""
    constant = value.toIValue()
    if constant is not None:
        return [int(v) for v in (constant if isinstance(constant, (list, tuple)) else [constant])]
    return [int(v.toIValue()) for v in value.node().inputs()]


def _pool_over_window(inputs, outputs) -> int:
    """Windowed pools: each output element combines its kernel window (kernel volume MACs per output element)."""
    kernel = _int_list(inputs[1])
    dims = len(get_shape(outputs[0])) - 2
    window = prod(kernel) if len(kernel) == dims else kernel[0] ** dims
    return prod(get_shape(outputs[0])) * window


def _resample(weight_per_output: int):
    """Upsampling: ``weight_per_output`` MACs per output element (1 nearest, 2 linear, 4 bilinear, 8 trilinear)."""

    def handle(inputs, outputs) -> int:
        return prod(get_shape(outputs[0])) * weight_per_output

    return handle


def _attention(inputs, outputs) -> int:
    """Scaled dot-product attention: Q K^T plus attention @ V multiply-adds."""
    query, key, value = (get_shape(v) for v in inputs[:3])
    batch = prod(query[:-2])
    return batch * query[-2] * key[-2] * (query[-1] + value[-1])


# op -> (handle, rule as written in the report)
POOLING_RULES = {
    **{f"aten::adaptive_avg_pool{d}d": (_pool_over_input, "1 MAC per input element") for d in (1, 2, 3)},
    **{f"aten::adaptive_max_pool{d}d": (_pool_over_input, "1 MAC per input element") for d in (1, 2, 3)},
    **{f"aten::avg_pool{d}d": (_pool_over_window, "kernel-volume MACs per output element") for d in (1, 2, 3)},
    **{f"aten::max_pool{d}d": (_pool_over_window, "kernel-volume MACs per output element") for d in (1, 2, 3)},
    **{f"aten::max_pool{d}d_with_indices": (_pool_over_window, "kernel-volume MACs per output element")
       for d in (1, 2, 3)},
    **{f"aten::upsample_nearest{d}d": (_resample(1), "1 MAC per output element") for d in (1, 2, 3)},
    **{f"aten::_upsample_nearest_exact{d}d": (_resample(1), "1 MAC per output element") for d in (1, 2, 3)},
    "aten::upsample_linear1d": (_resample(2), "2 MACs per output element"),
    "aten::_upsample_bilinear2d_aa": (_resample(4), "4 MACs per output element"),
    "aten::_upsample_bicubic2d_aa": (_resample(16), "16 MACs per output element"),
    "aten::upsample_bilinear2d": (_resample(4), "4 MACs per output element"),
    "aten::upsample_bicubic2d": (_resample(16), "16 MACs per output element"),
    "aten::upsample_trilinear3d": (_resample(8), "8 MACs per output element"),
    "aten::grid_sampler": (_resample(4), "4 MACs per output element"),
}
# fvcore's own multiply-add handles (those of ``FlopCountAnalysis``), plus attention.
MATMUL_HANDLES = {
    "aten::_convolution": conv_flop_jit,
    "aten::addmm": addmm_flop_jit,
    "aten::bmm": bmm_flop_jit,
    "aten::einsum": einsum_flop_jit,
    "aten::matmul": matmul_flop_jit,
    "aten::mm": matmul_flop_jit,
    "aten::linear": linear_flop_jit,
    "aten::scaled_dot_product_attention": _attention,
}


def op_family(op: str) -> str:
    """Group an op name from either counter (``aten::_convolution``, ``aten.convolution.default``) by what it does."""
    name = op.replace("aten::", "").replace("aten.", "").split(".")[0].lstrip("_")
    if "conv" in name:
        return "convolution"
    if "pool" in name:
        return "pooling"
    if "upsample" in name or "grid_sampler" in name:
        return "resampling"
    if "attention" in name:
        return "attention"
    if name in {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "einsum"}:
        return "matmul"
    return name


@dataclass(frozen=True)
class MacCount:
    """MACs of one model on one input, counted once by both counters and queried many ways."""

    label: str
    fvcore_by_op: dict[str, int]
    flop_counter_by_op: dict[str, int]
    unsupported_ops: dict[str, int] = field(default_factory=dict)

    @property
    def fvcore(self) -> int:
        return sum(self.fvcore_by_op.values())

    @property
    def flop_counter(self) -> int:
        return sum(self.flop_counter_by_op.values())

    @property
    def relative_difference(self) -> float:
        """(fvcore - flop_counter) / fvcore; 0 when both are 0."""
        return (self.fvcore - self.flop_counter) / self.fvcore if self.fvcore else float(self.flop_counter > 0)

    def by_family(self, counts: dict[str, int]) -> dict[str, int]:
        families: dict[str, int] = {}
        for op, macs in counts.items():
            families[op_family(op)] = families.get(op_family(op), 0) + macs
        return families

    @property
    def explaining_ops(self) -> dict[str, int]:
        """fvcore ops of every family the two counters disagree on, with their MACs (empty within tolerance)."""
        if abs(self.relative_difference) <= AGREEMENT_TOLERANCE:
            return {}
        fv, fc = self.by_family(self.fvcore_by_op), self.by_family(self.flop_counter_by_op)
        differing = {f for f in fv.keys() | fc.keys() if fv.get(f, 0) != fc.get(f, 0)}
        named = {op: m for op, m in self.fvcore_by_op.items() if op_family(op) in differing}
        named.update({op: m for op, m in self.flop_counter_by_op.items() if op_family(op) in differing})
        return named

    @property
    def explained(self) -> bool:
        """True when the counts agree, or agree once the families of :attr:`explaining_ops` are set aside."""
        if not self.explaining_ops:
            return True
        families = {op_family(op) for op in self.explaining_ops}
        fv = sum(m for op, m in self.fvcore_by_op.items() if op_family(op) not in families)
        fc = sum(m for op, m in self.flop_counter_by_op.items() if op_family(op) not in families)
        return abs(fv - fc) <= AGREEMENT_TOLERANCE * max(fv, 1)

    def difference_note(self) -> str:
        """One line for reports: empty when the counters agree, else the ops (and MACs) that explain it."""
        if not self.explaining_ops:
            return ""
        ops = ", ".join(f"{op} {m / 1e6:.3f}M" for op, m in sorted(self.explaining_ops.items()))
        return ("" if self.explained else "UNEXPLAINED; ") + ops


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor, label: str) -> MacCount:
    """Count ``model``'s MACs on ``example`` (batch 1) with flop_counter, then fvcore; ``label`` names it in errors.

    A forward pass that fails (e.g. an input too small for the strides) and a model fvcore cannot trace each raise
    :class:`EfficiencyError` naming ``label``.
    """
    model = model.eval()
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                model(example)
        except RuntimeError as exc:  # the first forward pass: a shape error means the input does not fit
            raise EfficiencyError(
                f"{label} cannot run on input {'x'.join(map(str, example.shape[1:]))}: the input is too small for the "
                f"network's strides or does not fit it ({exc})"
            ) from exc
        # JitModelAnalysis is FlopCountAnalysis without its default handles: set_op_handle(op=None) cannot remove
        # a default handle (fvcore 0.1.5 only adds the op to the ignore list), so norms would still be counted.
        analysis = JitModelAnalysis(model, example)
        analysis.set_op_handle(**{op: None for op in EXCLUDED_OPS}, **MATMUL_HANDLES)
        analysis.set_op_handle(**{op: handle for op, (handle, _) in POOLING_RULES.items()})
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fvcore_by_op = {op: int(m) for op, m in analysis.by_operator().items() if m}
        except Exception as exc:  # jit tracing raises many types; all mean the same to the user
            raise EfficiencyError(f"fvcore cannot trace {label}: {type(exc).__name__}: {exc}") from exc
        unsupported = dict(analysis.unsupported_ops())
    flop_counter_by_op = {str(op): int(f) // 2 for op, f in counter.get_flop_counts().get("Global", {}).items() if f}
    return MacCount(label, fvcore_by_op, flop_counter_by_op, unsupported)


def pooling_rules() -> dict[str, str]:
    """The written rule of every pooling/resampling op counted (for the JSON report)."""
    return {op: rule for op, (_, rule) in POOLING_RULES.items()}
