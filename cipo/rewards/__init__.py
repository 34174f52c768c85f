"""Verifiable rewards: math answers (math-verify) and code in a sandbox; hostile-output safe.

Public API:

* :class:`RewardResult` -- ``(score, reason, details)``, what every verifier returns.
* :class:`MathVerifier` -- ``MathVerifier().verify(response, ground_truth)``.
* :class:`CodeVerifier` -- ``CodeVerifier(timeout_s=..., memory_mb=...).verify(response, tests)``.
* :func:`verify_batch`, :class:`VerifierPool` -- parallel worker processes with a per-item deadline.
* :func:`compute_score` -- verl's ``compute_score(data_source, solution_str, ground_truth, extra_info=None)``.
* :class:`LocalSandbox`, :class:`SandboxFusionBackend` -- where code runs; :func:`detect_capabilities`.

This package imports neither torch nor math-verify at import time (math-verify loads on first math verification).
"""

from .batch import NoMainGuardError, VerifierPool, verify_batch
from .code_verifier import CodeVerifier, extract_code, parse_tests
from .math_verifier import MathVerifier, extract_answer
from .sandbox import ExecResult, LocalSandbox, SandboxCapabilities, SandboxUnavailable, detect_capabilities
from .sandbox_fusion import SandboxFusionBackend
from .types import RewardResult, Verifier
from .verl import compute_score

__all__ = [
    "CodeVerifier",
    "ExecResult",
    "LocalSandbox",
    "MathVerifier",
    "NoMainGuardError",
    "RewardResult",
    "SandboxCapabilities",
    "SandboxFusionBackend",
    "SandboxUnavailable",
    "Verifier",
    "VerifierPool",
    "compute_score",
    "detect_capabilities",
    "extract_answer",
    "extract_code",
    "parse_tests",
    "verify_batch",
]
