# The two commands of the README.
.PHONY: demo test install crd

install:
	scripts/install.sh

# Install, then run the whole DDM pipeline locally on Fashion-MNIST, ending in runs/fashion-mnist/report/index.html
demo: install
	.venv/bin/ddm run examples/local-fashion-mnist.yaml

# Install, build/start the real test services (kube-apiserver, etcd, S3), run every test.
test: install
	scripts/test.sh

crd: install
	.venv/bin/ddm crd --write
