#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl), the
# Kubeflow training operator's PyTorchJob controller (tools/training-operator), Kubeflow Trainer v2's and JobSet's
# controllers (tools/trainer-v2), kwok and Kueue (its own cmd/kueue, unchanged; tools/kueue pins the module) from Go
# modules into a per-version cache dir outside the tree, and finds the Kubeflow, JobSet and Kueue CRDs in the Go
# module cache.
# Non-interactive and idempotent: a second run with the binaries present only prints the paths.
#
# Usage: scripts/testenv-build.sh [--helm] [--kwok (always built now; kept for old callers)] [--extras] | --print-bin
# Output (stdout, one KEY=VALUE per line, parsed by tests/fixtures/k8s.py):
#   DDM_TESTENV_BIN=<dir>  PYTORCHJOB_CRD=<file>  TRAINER_V2_CRDS=<dir>  TRAINER_V2_WEBHOOKS=<file>
#   JOBSET_CRDS=<dir>  JOBSET_WEBHOOKS=<file>  KWOK_STAGES=<dir>  KUEUE_CRDS=<dir>  KUEUE_WEBHOOKS=<file>
#   KUEUE_VERSION=<version>
# Env: DDM_K8S_VERSION (v1.37.2), DDM_TESTENV_CACHE (~/.cache/ddm-testenv), DDM_TESTENV_BIN (overrides the bin dir).
set -euo pipefail

K8S_VERSION="${DDM_K8S_VERSION:-v1.37.2}"
TRAINING_OPERATOR_VERSION="v1.9.4"
TRAINER_V2_VERSION="v2.3.0"  # the newest the Go proxy serves (2026-12); keep tools/trainer-v2/go.mod on it
JOBSET_VERSION="v0.12.0"  # what trainer v2.3.0's go.mod requires
HELM_VERSION="v3.22.0"
KWOK_VERSION="v0.8.0"
KUEUE_VERSION="v0.17.0"  # the newest the Go proxy lists (2026-12); keep tools/kueue/go.mod on the same version
CACHE="${DDM_TESTENV_CACHE:-$HOME/.cache/ddm-testenv}"
BIN="${DDM_TESTENV_BIN:-$CACHE/$K8S_VERSION/bin}"
MODULE_DIR="$(cd "$(dirname "$0")/../tools/testenv" && pwd)"
CORE_BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)

BUILD_HELM=0
BUILD_KWOK=0
for arg in "$@"; do
  case "$arg" in
    --helm) BUILD_HELM=1 ;;
    --kwok) BUILD_KWOK=1 ;;
    --extras) BUILD_HELM=1; BUILD_KWOK=1 ;;
    --print-bin) echo "$BIN"; exit 0 ;;
    *) echo "testenv-build: unknown argument '$arg' (expected --helm, --kwok, --extras, --print-bin)" >&2; exit 2 ;;
  esac
done

command -v go >/dev/null || { echo "testenv-build: 'go' not on PATH (need Go >= 1.26 to build Kubernetes $K8S_VERSION)" >&2; exit 1; }
export GOFLAGS=-mod=mod GOMAXPROCS="${GOMAXPROCS:-2}" CGO_ENABLED=0 GOTOOLCHAIN=local
log() { echo "testenv-build: $*" >&2; }

# Staging modules (k8s.io/api, client-go, ...) are required at v0.0.0 and replaced by ./staging paths upstream;
# point each replace at its published v0.<minor>.<patch> instead. The list comes from upstream's go.mod.
write_go_mod() {
  local upstream_mod staging_version
  upstream_mod="$(cd "$MODULE_DIR" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
  [ -f "$upstream_mod" ] || { log "no go.mod for k8s.io/kubernetes@$K8S_VERSION from the module proxy"; exit 1; }
  staging_version="v0.${K8S_VERSION#v1.}"
  local -a edits=(-require "k8s.io/kubernetes@$K8S_VERSION")
  local path count=0
  for path in $(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$upstream_mod" | sort -u); do
    edits+=(-replace "$path=$path@$staging_version")
    count=$((count + 1))
  done
  [ "$count" -gt 0 ] || { log "found no ./staging replaces in $upstream_mod"; exit 1; }
  # etcd server at the version Kubernetes itself requires (it is in its module graph already).
  local etcd_version
  etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' "$upstream_mod")"
  [ -n "$etcd_version" ] || { log "k8s.io/kubernetes@$K8S_VERSION go.mod does not require go.etcd.io/etcd/server/v3"; exit 1; }
  edits+=(-require "go.etcd.io/etcd/server/v3@$etcd_version")
  (cd "$MODULE_DIR" && go mod edit "${edits[@]}" && go mod tidy)
  log "go.mod: k8s.io/kubernetes $K8S_VERSION, $count staging replaces at $staging_version, etcd $etcd_version"
}

build_core() {
  local ldflags="-s -w" key value
  # Upstream's hack/lib/version.sh sets the same variables in both packages; /version and `kubectl version` read them.
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  for kv in "gitVersion=$K8S_VERSION" "gitMajor=1" "gitMinor=$minor" "gitTreeState=clean" "buildDate=1970-01-01T00:00:00Z"; do
    key="${kv%%=*}"; value="${kv#*=}"
    ldflags+=" -X k8s.io/component-base/version.$key=$value -X k8s.io/client-go/pkg/version.$key=$value"
  done
  local staging="$BIN.partial"
  rm -rf "$staging" && mkdir -p "$staging"
  # One invocation so shared packages are compiled once.
  (cd "$MODULE_DIR" && nice go build -trimpath -ldflags "$ldflags" -o "$staging/" ./cmd/...)
  for name in "${CORE_BINARIES[@]}"; do
    [ -x "$staging/$name" ] || { log "go build produced no $name"; exit 1; }
  done
  mkdir -p "$BIN" && mv "$staging"/* "$BIN/" && rmdir "$staging"
}

build_helm() {
  # Helm's Makefile link flags: its version, and the Kubernetes version `helm template` and lint assume (else 1.20).
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  local pkg
  for pkg in pkg/lint/rules pkg/chartutil; do
    helm_ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$minor"
  done
  [ -x "$BIN/helm" ] || GOBIN="$BIN" nice go install -trimpath -ldflags "$helm_ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

build_training_operator() {
  # upstream's controller from github.com/kubeflow/training-operator, run by a main without its webhook
  # (built again when its main is newer than the binary; built aside and moved, so running tests keep theirs)
  local dir="$MODULE_DIR/../training-operator"
  [ -x "$BIN/training-operator" ] && [ "$BIN/training-operator" -nt "$dir/main.go" ] || (cd "$dir" &&
    go mod download && nice go build -trimpath -ldflags "-s -w" -o "$BIN/training-operator.new" . &&
    mv "$BIN/training-operator.new" "$BIN/training-operator")
}

build_kueue() {
  # Kueue's own main (sigs.k8s.io/kueue/cmd/kueue), built from the module tools/kueue/go.mod pins. A cold build
  # compiles about 1,500 packages (client-go, apiserver, every job framework's API): roughly 20 minutes on 2 cores.
  local have
  have="$(cd "$MODULE_DIR/../kueue" && go list -m -f '{{.Version}}' sigs.k8s.io/kueue)"
  [ "$have" = "$KUEUE_VERSION" ] || { log "tools/kueue/go.mod pins sigs.k8s.io/kueue $have, expected $KUEUE_VERSION"; exit 1; }
  [ -x "$BIN/kueue-$KUEUE_VERSION" ] && return
  local started=$(date +%s)
  log "building Kueue $KUEUE_VERSION into $BIN (cold build takes about 20 minutes on 2 cores)"
  (cd "$MODULE_DIR/../kueue" && go mod download && nice go build -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
    -o "$BIN/kueue-$KUEUE_VERSION.partial" sigs.k8s.io/kueue/cmd/kueue)
  mv "$BIN/kueue-$KUEUE_VERSION.partial" "$BIN/kueue-$KUEUE_VERSION"
  ln -sfn "kueue-$KUEUE_VERSION" "$BIN/kueue"
  log "built kueue $KUEUE_VERSION in $(( $(date +%s) - started ))s"
}

build_trainer_v2() {
  # Trainer v2's TrainJob/TrainingRuntime controllers and the JobSet controller they need, upstream's reconcilers
  # and webhooks run by two small mains (tools/trainer-v2/cmd). Most packages are shared with Kueue and the
  # training operator (client-go, controller-runtime): about 2 minutes on 2 cores once those are built.
  local have_trainer have_jobset
  have_trainer="$(cd "$MODULE_DIR/../trainer-v2" && go list -m -f '{{.Version}}' github.com/kubeflow/trainer/v2)"
  have_jobset="$(cd "$MODULE_DIR/../trainer-v2" && go list -m -f '{{.Version}}' sigs.k8s.io/jobset)"
  [ "$have_trainer" = "$TRAINER_V2_VERSION" ] && [ "$have_jobset" = "$JOBSET_VERSION" ] || {
    log "tools/trainer-v2/go.mod pins trainer $have_trainer, jobset $have_jobset; expected $TRAINER_V2_VERSION, $JOBSET_VERSION"
    exit 1; }
  local trainer="trainer-controller-$TRAINER_V2_VERSION" jobset="jobset-controller-$JOBSET_VERSION"
  [ -x "$BIN/$trainer" ] && [ -x "$BIN/$jobset" ] && return
  local started=$(date +%s) staging="$BIN/trainer-v2.partial"
  rm -rf "$staging" && mkdir -p "$staging"
  (cd "$MODULE_DIR/../trainer-v2" && go mod download && nice go build -trimpath -ldflags "-s -w" -o "$staging/" ./cmd/...)
  mv "$staging/trainer-controller" "$BIN/$trainer" && mv "$staging/jobset-controller" "$BIN/$jobset" && rmdir "$staging"
  ln -sfn "$trainer" "$BIN/trainer-controller" && ln -sfn "$jobset" "$BIN/jobset-controller"
  log "built Trainer $TRAINER_V2_VERSION and JobSet $JOBSET_VERSION controllers in $(( $(date +%s) - started ))s"
}

build_kwok() {
  [ -x "$BIN/kwok" ] || GOBIN="$BIN" nice go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

module_dir() {  # prints the module cache dir of module@version, downloading it if needed
  (cd "$MODULE_DIR" && go mod download -json "$1" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
}

# Concurrent runs (several pytest sessions, make test) wait for one build instead of racing on the same dir.
mkdir -p "$(dirname "$BIN")"
exec 9>"$BIN.lock"
flock 9

missing=0
for name in "${CORE_BINARIES[@]}"; do [ -x "$BIN/$name" ] || missing=1; done
if [ "$missing" = 1 ]; then
  started=$(date +%s)
  log "building Kubernetes $K8S_VERSION control plane into $BIN (cold build takes tens of minutes on 2 cores)"
  write_go_mod
  build_core
  log "built ${CORE_BINARIES[*]} in $(( $(date +%s) - started ))s"
fi
build_training_operator
build_kwok  # nodes and pods of the simulated GPU fleet
build_kueue  # admission of queued jobs (tests/fixtures/k8s.py start_kueue)
build_trainer_v2  # the TrainJob backend (tests/fixtures/k8s.py start_trainer_v2)
if [ "$BUILD_HELM" = 1 ]; then build_helm; fi

training_operator_dir="$(module_dir "github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION")"
trainer_v2_dir="$(module_dir "github.com/kubeflow/trainer/v2@$TRAINER_V2_VERSION")"
pytorchjob_crd="$training_operator_dir/manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
[ -f "$pytorchjob_crd" ] || { log "PyTorchJob CRD not found at $pytorchjob_crd"; exit 1; }
echo "DDM_TESTENV_BIN=$BIN"
echo "PYTORCHJOB_CRD=$pytorchjob_crd"
[ -d "$trainer_v2_dir/manifests/base/crds" ] || { log "Trainer v2 CRDs not found under $trainer_v2_dir"; exit 1; }
echo "TRAINER_V2_CRDS=$trainer_v2_dir/manifests/base/crds"
echo "TRAINER_V2_WEBHOOKS=$trainer_v2_dir/manifests/base/webhook/manifests.yaml"
jobset_dir="$(module_dir "sigs.k8s.io/jobset@$JOBSET_VERSION")"
[ -d "$jobset_dir/config/components/crd/bases" ] || { log "JobSet CRDs not found under $jobset_dir"; exit 1; }
echo "JOBSET_CRDS=$jobset_dir/config/components/crd/bases"
echo "JOBSET_WEBHOOKS=$jobset_dir/config/components/webhook/manifests.yaml"
echo "KWOK_STAGES=$(module_dir "sigs.k8s.io/kwok@$KWOK_VERSION")/kustomize/stage"
kueue_dir="$(module_dir "sigs.k8s.io/kueue@$KUEUE_VERSION")"
[ -d "$kueue_dir/config/components/crd/bases" ] || { log "Kueue CRDs not found under $kueue_dir"; exit 1; }
echo "KUEUE_CRDS=$kueue_dir/config/components/crd/bases"
echo "KUEUE_WEBHOOKS=$kueue_dir/config/components/webhook/manifests.yaml"
echo "KUEUE_VERSION=$KUEUE_VERSION"
