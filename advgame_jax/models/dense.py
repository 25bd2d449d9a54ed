"""The projections of the layer body (q/k/v, o, gate/up, down) with a backward pass laid out
for XLA:CPU.

:func:`dense` is ``jnp.einsum(spec, x, w)`` — the forward pass is exactly that einsum on every
backend. Only its gradient differs, and only on CPU: there, the weight gradient
``dW = xᵀ · g`` contracts the leading (row) axis of both operands, which XLA:CPU's dot does
not take as it is; it then copies a transposed ``g`` (``[rows, F]`` → ``[F, rows]``) fused into
the elementwise producer of ``g`` (for the gate projection: the SwiGLU backward), a strided
fusion that measured slower than the matmul it feeds (SmolLM2-135M, 512 tokens: 28 ms vs
4 ms per layer). The CPU backward instead materialises ``xᵀ`` (the smaller operand, shared by
q/k/v and by gate/up) behind an ``optimization_barrier`` so that XLA does not fold the
transpose back, and runs two plain row-major matmuls; the MLP block's forward+backward went
from 67 to 52 CPU-ms at that shape. Other backends, and any program over a mesh, keep the
einsum's own gradient.
"""

from __future__ import annotations

import functools
import math
from typing import cast

import jax
import jax.numpy as jnp


def dense(spec: str, x, w, n_contract: int = 1, *, cpu_grad: bool = False) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` where ``spec`` contracts the last ``n_contract`` axes of
    ``x`` with the first ``n_contract`` axes of ``w`` and keeps the rest in order (e.g.
    ``"btd,dnh->btnh"``, ``"btnh,nhd->btd"`` with ``n_contract=2``). ``cpu_grad``: use the
    CPU backward (:func:`cpu_grad_applies` says when: on the CPU backend, without a mesh);
    otherwise the einsum's own gradient, so a sharded program (e.g. the planner's, lowered
    on virtual CPU devices for a GPU cluster) is the one every backend runs."""
    if not cpu_grad:
        return jnp.einsum(spec, x, w)
    # functools.partial(jax.custom_vjp, ...) hides the wrapped function's return type.
    return cast(jax.Array, _cpu_dense(spec, n_contract, x, w))


def cpu_grad_applies(mesh) -> bool:
    """Whether :func:`dense` should take its CPU backward: the CPU backend and no mesh (one
    device, where it was measured; a mesh's program keeps the portable gradient)."""
    return mesh is None and jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cpu_dense(spec, n_contract, x, w):
    return jnp.einsum(spec, x, w)


def _cpu_dense_fwd(spec, n_contract, x, w):
    return jnp.einsum(spec, x, w), (x, w)


def _cpu_dense_bwd(spec, n_contract, res, g):
    x, w = res
    k = math.prod(w.shape[:n_contract])
    rows = math.prod(x.shape[: x.ndim - n_contract])
    x2, w2 = x.reshape(rows, k), w.reshape(k, -1)
    g2 = g.reshape(rows, -1).astype(x.dtype)
    dx = jnp.dot(g2, w2.T, preferred_element_type=jnp.float32).astype(x.dtype)
    xt = jax.lax.optimization_barrier(x2.T)
    dw = jnp.dot(xt, g2, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx.reshape(x.shape), dw.reshape(w.shape)


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)
