"""The trained autoregressive GRU (AR-GRU) benchmark case as a step map.

This is the model behind Figs. 4, 7 and 8 of Gonzalez et al., *Towards Scalable and
Stable Parallelization of Nonlinear RNNs* (NeurIPS 2024): a one-layer GRU (hidden size
3) whose sampled scalar output is fed back as its next input. The parameters and three
noise seeds with float32 reference trajectories are stored as plain arrays in
`shared/cases/argru_sine_L10000.npz`; see `shared/cases/README.md` for the equations.

The packed state is `s = (x, h1, h2, h3)` (D = 4): `x` is the scalar emitted at the
previous step and `h` is the GRU hidden state. One step is driven by a scalar standard
normal noise `eps_t`:

    r = sigmoid(W_ir x + b_r + W_hr h)
    z = sigmoid(W_iz x + b_z + W_hz h)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = n + z * (h - n)
    o = h' + x                         (skip connection, added to all 3 units)
    x' = (w_mu . o + b_mu) + softplus(w_scale . o + b_scale) * eps_t
    s' = (x', h')

The problem a parallel solver faces is: given `s0` and `eps_1..eps_T` (T = 9999), find
`s_1..s_T`. Run this file as a script to print the largest Lyapunov exponent along the
seed-1 reference trajectory:

    python -m benchmarks.argru
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


CASE_FILENAME = "argru_sine_L10000.npz"


def default_case_path() -> Path:
    """The path of the case file: `$PDYN_CASES_DIR/argru_sine_L10000.npz` when the
    environment variable `PDYN_CASES_DIR` is set, otherwise `shared/cases/` next to the
    repository checkout (`<repo>/../shared/cases/`)."""
    cases_dir = os.environ.get("PDYN_CASES_DIR")
    if cases_dir:
        return Path(cases_dir) / CASE_FILENAME
    return Path(__file__).resolve().parents[2] / "shared" / "cases" / CASE_FILENAME


DEFAULT_CASE_PATH: Path = default_case_path()


class ARGRUParams(eqx.Module):
    """The 56 trained numbers of the AR-GRU: GRU weights in equinox/PyTorch convention
    (gate order r, z, n; the reset gate multiplies `W_hn h + b_hn`) and the two readout
    rows (mean and pre-softplus noise scale). Shapes: `W_i*` (3, 1), `W_h*` (3, 3),
    `b_*`, `mu_w`, `scale_w` (3,), `mu_b`, `scale_b` ()."""

    W_ir: Array
    W_iz: Array
    W_in: Array
    W_hr: Array
    W_hz: Array
    W_hn: Array
    b_r: Array
    b_z: Array
    b_in: Array
    b_hn: Array
    mu_w: Array
    mu_b: Array
    scale_w: Array
    scale_b: Array


class ARGRUCase(NamedTuple):
    """One seed of the AR-GRU case.

    - `params`: the [`ARGRUParams`][].
    - `s0`: the packed initial state `(x_1, h_0)`, shape `(4,)`.
    - `drivers`: the noises `eps_1..eps_T`, shape `(T,)` with T = 9999.
    - `reference`: the float32 reference states `s_1..s_T`, shape `(T, 4)`.
    - `noise0`: the noise `eps_0` with `s0 == argru_step(zeros(4), noise0, params)`.
    """

    params: ARGRUParams
    s0: Array
    drivers: Array
    reference: Array
    noise0: Array


_PARAM_KEYS = {
    "W_ir": "gru_W_ir",
    "W_iz": "gru_W_iz",
    "W_in": "gru_W_in",
    "W_hr": "gru_W_hr",
    "W_hz": "gru_W_hz",
    "W_hn": "gru_W_hn",
    "b_r": "gru_b_r",
    "b_z": "gru_b_z",
    "b_in": "gru_b_in",
    "b_hn": "gru_b_hn",
    "mu_w": "readout_mu_w",
    "mu_b": "readout_mu_b",
    "scale_w": "readout_scale_w",
    "scale_b": "readout_scale_b",
}


def load_argru_case(
    path: str | os.PathLike | None = None, seed: int = 1, *, dtype=np.float32
) -> ARGRUCase:
    """Load one seed of the AR-GRU case.

    **Arguments:**

    - `path`: the `.npz` file; defaults to [`default_case_path`][] (which honours the
        `PDYN_CASES_DIR` environment variable).
    - `seed`: 1, 2 or 3.
    - `dtype`: the dtype of every returned array. The stored data are float32; pass
        `np.float64` (with `jax_enable_x64` on) for a float64 study of the same inputs.

    **Returns:**

    An [`ARGRUCase`][].
    """
    path = default_case_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"AR-GRU case file not found at {path}; set PDYN_CASES_DIR to the folder "
            f"holding {CASE_FILENAME}."
        )
    with np.load(path) as data:
        prefix = f"seed{seed}_"
        if prefix + "s0" not in data:
            raise ValueError(f"`seed` must be one of 1, 2, 3; got {seed!r}.")

        def get(key):
            return jnp.asarray(np.asarray(data[key], dtype=dtype))

        params = ARGRUParams(**{name: get(key) for name, key in _PARAM_KEYS.items()})
        return ARGRUCase(
            params=params,
            s0=get(prefix + "s0"),
            drivers=get(prefix + "drivers"),
            reference=get(prefix + "ref_states"),
            noise0=get(prefix + "noise0"),
        )


def argru_step(s_prev: Array, eps_t: Array, params: ARGRUParams) -> Array:
    """One step `s_t = f(s_{t-1}, eps_t)` of the AR-GRU, in the
    `step(y_prev, x_t, args)` convention of `parallel_dynamics` (`args = params`).
    `s_prev` has shape `(4,)` and `eps_t` is a scalar.

    The operations are ordered as in equinox's `GRUCell` (the interpolation is written
    `n + z * (h - n)`), which reproduces the float32 reference bit-for-bit on CPU.
    """
    p = params
    x = s_prev[:1]  # shape (1,): the GRU input
    h = s_prev[1:]
    r = jax.nn.sigmoid(p.W_ir @ x + p.b_r + p.W_hr @ h)
    z = jax.nn.sigmoid(p.W_iz @ x + p.b_z + p.W_hz @ h)
    n = jnp.tanh(p.W_in @ x + p.b_in + r * (p.W_hn @ h + p.b_hn))
    h_new = n + z * (h - n)
    o = h_new + x  # skip connection: the scalar input is added to every unit
    mu = p.mu_w @ o + p.mu_b
    scale = jax.nn.softplus(p.scale_w @ o + p.scale_b)
    x_new = mu + scale * eps_t
    return jnp.concatenate([x_new[None], h_new])


@jax.jit
def sequential_rollout(params: ARGRUParams, s0: Array, drivers: Array) -> Array:
    """The reference sequential evaluation: `s_1..s_T` by `jax.lax.scan` from `s0`."""

    def body(s, eps):
        s_new = argru_step(s, eps, params)
        return s_new, s_new

    _, traj = jax.lax.scan(body, s0, drivers)
    return traj


def mad_x(
    traj: Array,
    reference: Array,
    x1: Array,
) -> Array:
    """Mean absolute difference of the L = T + 1 sampled outputs, the convergence
    criterion of the ELK experiments:

    $$\\mathrm{MAD} = \\frac{1}{L}\\sum_{t=1}^{L} |x_t - x_t^\\star|,$$

    where $x_1$ = `x1` = `s0[0]` is shared (so it contributes 0) and $x_{t+1}$ is the
    x-component (index 0) of state $s_t$. `traj` and `reference` are the states
    `s_1..s_T`, shape `(T, 4)`, or just their x-components, shape `(T,)`.
    """
    traj = jnp.asarray(traj)
    reference = jnp.asarray(reference)
    xs = traj[:, 0] if traj.ndim == 2 else traj
    xs_ref = reference[:, 0] if reference.ndim == 2 else reference
    x1 = jnp.reshape(jnp.asarray(x1, dtype=xs.dtype), (1,))
    xs = jnp.concatenate([x1, xs])
    xs_ref = jnp.concatenate([x1.astype(xs_ref.dtype), xs_ref])
    return jnp.mean(jnp.abs(xs - xs_ref))


def _main() -> None:
    from parallel_dynamics._diagnostics import lyapunov_exponent

    jax.config.update("jax_enable_x64", True)
    for dtype in (np.float64, np.float32):
        case = load_argru_case(seed=1, dtype=dtype)
        lles = lyapunov_exponent(
            argru_step,
            case.s0,
            case.drivers,
            case.params,
            trajectory=case.reference.astype(dtype),
            num_exponents=4,
        )
        name = np.dtype(dtype).name
        print(
            f"seed 1, {name}, along the reference trajectory (T = {len(case.drivers)})"
        )
        print(f"  largest Lyapunov exponent: {float(lles[0]):+.4e} per step")
        print("  all four exponents:        " + ", ".join(f"{v:+.4e}" for v in lles))


if __name__ == "__main__":
    _main()
