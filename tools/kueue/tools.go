//go:build tools

// Kueue's own manager binary, built unchanged from its module: scripts/testenv-build.sh runs
// `go build sigs.k8s.io/kueue/cmd/kueue` here. This file only pins the module in go.mod (a main package
// cannot be imported; the blank import of a library package of the module keeps `go mod tidy` from dropping it).
package tools

import _ "sigs.k8s.io/kueue/pkg/controller/jobs"
