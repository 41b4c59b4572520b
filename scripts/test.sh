#!/usr/bin/env bash
# Runs the full test suite: unit, integration (real S3 server, real kube-apiserver) and end-to-end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
# Real Kubernetes control plane for the k8s tests: built from Go modules once, cached outside the tree.
# helm too: chart tests render with it. DDM_TESTENV_BIN tells tests where the binaries are.
scripts/testenv-build.sh --helm >/dev/null || { echo "scripts/testenv-build.sh failed: cannot run the k8s tests" >&2; exit 1; }
DDM_TESTENV_BIN="$(scripts/testenv-build.sh --print-bin)"
export DDM_TESTENV_BIN
.venv/bin/python -m pytest "$@"
rc=$?
# pytest exit code 5 = no tests collected: treat as a failure of the suite's wiring, not a pass.
if [ "$rc" = 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
