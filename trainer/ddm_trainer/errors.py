"""One error vocabulary for every stage, and the exit codes that tell a retry from a give-up.

The codes follow Kubeflow's PyTorchJob ``restartPolicy: ExitCode`` convention: 1-127 are permanent
(the same input will fail again), 128-255 are retryable (the same input may succeed on another try).
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # Permanent: retrying cannot help.
    BAD_CONFIG = 2  # unknown key, wrong type, bad URI, unknown encoder/preset/strategy
    BAD_DATA = 3  # missing shard, corrupt image, empty cluster
    NON_FINITE_LOSS = 4  # training diverged
    MISSING_ARTIFACT = 5  # an upstream stage's manifest is absent (e.g. no assignments yet)
    # Retryable: infrastructure, not input.
    STORE_IO = 150  # object store unreachable, timeouts, connection resets
    OUT_OF_MEMORY = 151
    PREEMPTED = 143  # SIGTERM (128 + 15): node drain / preemption; checkpoint was saved


def is_retryable(code: int) -> bool:
    return code >= 128


class DDMError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code: ExitCode = ExitCode.BAD_CONFIG


class ConfigError(DDMError):
    exit_code = ExitCode.BAD_CONFIG


class DataError(DDMError):
    exit_code = ExitCode.BAD_DATA


class NonFiniteLossError(DDMError):
    exit_code = ExitCode.NON_FINITE_LOSS


class MissingArtifactError(DDMError):
    exit_code = ExitCode.MISSING_ARTIFACT


class StoreError(DDMError):
    """Transient store failure (network, server). Missing buckets are ConfigError, not this."""

    exit_code = ExitCode.STORE_IO


class PreemptedError(DDMError):
    exit_code = ExitCode.PREEMPTED
