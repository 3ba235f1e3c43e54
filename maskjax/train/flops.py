"""Model FLOPs of a training step, counted from its jaxpr (for throughput and MFU logs and the planner).

XLA's `compiled.cost_analysis()` counts a while loop's body once, not once per iteration, so it undercounts any
program with `lax.scan` (scanned layers, gradient accumulation) by the loop length. Here matmuls and convolutions
are counted in the jaxpr, scan bodies times their length and Pallas kernels times their grid:

    flops = model_flops_per_step(lambda p, b: task.loss(p, b, key, True, step)[0], abstract_params, abstract_batch)

Model FLOPs (the MFU numerator) are the matmul FLOPs of the forward and backward pass with rematerialisation
switched off (`layers.remat_disabled`): recomputed work is not model work, and parts that are not differentiated
(a frozen tokenizer or teacher) count their forward only. Elementwise work is not counted.
"""

from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jcore

from maskjax.models.layers import remat_disabled


def matmul_flops(jaxpr: Any) -> tuple[float, int]:
    """(2 x multiply-adds of every dot_general and convolution in `jaxpr`, number of while loops whose bodies were
    counted once because their trip count is unknown). Sub-jaxprs (pjit, remat, custom rules, scan, cond, Pallas
    kernels) are walked: scan bodies count `length` times, Pallas kernels once per grid point, cond its most
    expensive branch."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr
    total, whiles = 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in lhs_contract])
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_features
        groups = []
        for value in eqn.params.values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            found = [v for v in items if isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr))]
            if found:
                groups.append(found)
        for group in groups:
            counted = [matmul_flops(j) for j in group]
            whiles += sum(w for _, w in counted)
            flops = max(f for f, _ in counted) if name == "cond" else sum(f for f, _ in counted)
            if name == "scan":
                flops *= eqn.params["length"]
            elif name == "while":
                whiles += 1
            elif name == "pallas_call":
                flops *= float(np.prod(eqn.params["grid_mapping"].grid))
            total += flops
    return float(total), whiles


def model_flops_per_step(loss_fn: Callable, abstract_params: Any, *abstract_args: Any) -> tuple[float, int]:
    """(matmul FLOPs of `jax.value_and_grad(loss_fn)(params, *args)` traced without remat, unbounded while loops)
    for one step on the global batch; the arguments may be `jax.ShapeDtypeStruct`s (nothing is computed)."""
    with remat_disabled():
        jaxpr = jax.make_jaxpr(jax.value_and_grad(loss_fn))(abstract_params, *abstract_args)
    return matmul_flops(jaxpr)
