"""``ddm-launch``: torchrun, exiting with the workers' most telling exit code instead of always 1.

torchrun exits 1 whenever a worker fails, whatever the worker's own code (its ``ChildFailedError`` carries the codes
and is then turned into 1). Under the operator, 1 means "permanent": a preempted (143) or OOM-killed (137) multi-GPU
stage would never be retried, and a bad config (2) could not be told from a crash. This launcher runs torchrun's own
``main`` in-process with the same arguments and exits with one of the failed workers' codes: a retryable one (128-255,
the highest; a worker killed by signal N counts as 128 + N, as a container runtime reports it) if any worker has one,
since a worker that dies makes its peers' collectives fail with plain errors (exit 1: measured, tests/integration/
test_expert_resume.py), else the first permanent one (1-127, e.g. a bad config on every rank). A SIGTERM to the
launcher itself (a preemption; torchrun passes it to the workers, which checkpoint) exits 128 + the signal.

    ddm-launch --standalone --nproc-per-node=8 -m ddm_trainer.cli expert --config /etc/ddm/config.yaml
"""
from __future__ import annotations

import signal
import sys

__all__ = ["main", "telling_exit_code"]


def telling_exit_code(exitcodes: list[int]) -> int:
    """Failed workers' exit codes (negative: killed by that signal) -> the one code the stage exits with.

    A worker that ended by SIGTERM while the launcher itself got no signal was stopped by torchrun, which SIGTERMs
    the still-running peers of the first failed worker and records their -15 next to it (``_poll`` then ``_close``
    in torch/distributed/elastic/multiprocessing/api.py); so those codes count only when nothing else failed.
    """
    torchrun_teardown = -int(signal.SIGTERM)
    if any(c != torchrun_teardown for c in exitcodes):
        exitcodes = [c for c in exitcodes if c != torchrun_teardown]
    codes = [128 - c if c < 0 else c for c in exitcodes]
    retryable = [c for c in codes if c >= 128]
    if retryable:  # a killed worker explains its peers' failures
        return max(retryable)
    permanent = [c for c in codes if 1 <= c <= 127]
    return permanent[0] if permanent else 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as err:
        codes = [f.exitcode for _, f in sorted(err.failures.items())]
        code = telling_exit_code(codes)
        print(f"ddm-launch: workers failed with exit codes {codes}; exiting {code}", file=sys.stderr, flush=True)
        return code
    except SignalException as err:
        code = 128 + int(err.sigval)
        print(f"ddm-launch: stopped by signal {int(err.sigval)}; exiting {code}", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
