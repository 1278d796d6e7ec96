"""Float math that gives the same bits on every CPU, for the embedded dataset generator.

numpy's ``sin``, ``cos``, ``exp``, ``arctan2``, ``hypot`` and the normal sampler's tail are
dispatched at run time to SSE, AVX2 or AVX-512 code (and libm to FMA or plain variants) that
differ in the last bit; a generated image that differs in one pixel changes the dataset's hash and
with it every feature bank, score and metric DVC has cached. IEEE 754 requires ``+ - * /``,
``sqrt`` and ``floor`` to be exactly rounded, so functions built from those alone, evaluated
one numpy operation at a time (no fused multiply-add), are bit-identical on any machine. The
polynomials below are accurate to about 1e-13, far below the 1/255 of an 8-bit pixel.
"""

from __future__ import annotations

from math import factorial

import numpy as np

TWO_PI = 2.0 * np.pi
LN2 = 0.6931471805599453  # log(2) rounded to the nearest double
# (-1)^k / (2k+1)! for the sine's Taylor series up to u^17 (|u| <= pi/2: truncation error < 5e-14);
# each is one correctly rounded division of exact integers
_SINE_COEFFICIENTS = tuple((-1) ** k / factorial(2 * k + 1) for k in range(9))
# 1/k! for the exponential's Taylor series up to r^13 (|r| <= ln2/2: truncation error < 1e-17)
_EXP_COEFFICIENTS = tuple(1 / factorial(k) for k in range(14))


def _horner(x: np.ndarray, coefficients: tuple[float, ...]) -> np.ndarray:
    """sum_k coefficients[k] * x**k, one rounded multiply and one rounded add per step."""
    result = np.full_like(x, coefficients[-1])
    for coefficient in reversed(coefficients[:-1]):
        result = result * x + coefficient
    return result


def sin(x) -> np.ndarray:
    """sin(x) for float64 input (any shape): reduced to a quarter turn, then a Taylor polynomial."""
    x = np.asarray(x, dtype=np.float64)
    turns = x / TWO_PI
    turns = turns - np.floor(turns + 0.5)  # [-0.5, 0.5]
    # sin(2*pi*t) = sin(2*pi*(+-0.5 - t)) folds the outer quarters in: t in [-0.25, 0.25]
    turns = np.where(turns > 0.25, 0.5 - turns, np.where(turns < -0.25, -0.5 - turns, turns))
    u = turns * TWO_PI
    return u * _horner(u * u, _SINE_COEFFICIENTS)


def cos(x) -> np.ndarray:
    """cos(x) = sin(x + pi/2)."""
    return sin(np.asarray(x, dtype=np.float64) + np.pi / 2)


def exp(x) -> np.ndarray:
    """exp(x) = 2**k * exp(r) with r = x - k ln2 in [-ln2/2, ln2/2]; ldexp is exact."""
    x = np.maximum(np.asarray(x, dtype=np.float64), -745.0)  # below this exp underflows to 0 anyway
    k = np.floor(x / LN2 + 0.5)
    r = x - k * LN2
    return np.ldexp(_horner(r, _EXP_COEFFICIENTS), k.astype(np.int32))


def hypot(dx, dy) -> np.ndarray:
    """sqrt(dx^2 + dy^2) (numpy's hypot calls libm)."""
    dx, dy = np.asarray(dx, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    return np.sqrt(dx * dx + dy * dy)


def angular_harmonic(dx, dy, order: int, phase: float) -> np.ndarray:
    """cos(order * theta + phase) with theta = atan2(dy, dx), without atan2.

    (cos theta + i sin theta)^order is multiplied out from the unit vector (dx, dy) / r, then
    rotated by the phase; at r = 0 theta is taken as 0.
    """
    radius = hypot(dx, dy)
    safe_radius = np.where(radius > 0, radius, 1.0)
    unit_cos = np.where(radius > 0, np.asarray(dx, dtype=np.float64) / safe_radius, 1.0)
    unit_sin = np.where(radius > 0, np.asarray(dy, dtype=np.float64) / safe_radius, 0.0)
    power_cos, power_sin = np.ones_like(unit_cos), np.zeros_like(unit_sin)
    for _ in range(order):
        power_cos, power_sin = power_cos * unit_cos - power_sin * unit_sin, power_cos * unit_sin + power_sin * unit_cos
    return power_cos * float(cos(phase)) - power_sin * float(sin(phase))


def normal_noise(rng: np.random.Generator, scale: float, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean noise with standard deviation ``scale``: the centred sum of three uniforms
    (Irwin-Hall, close to Gaussian). ``rng.normal`` is not portable: its ziggurat tail calls
    libm's exp and log."""
    uniforms = rng.random((3, *shape))
    return (uniforms[0] + uniforms[1] + uniforms[2] - 1.5) * (2.0 * scale)
