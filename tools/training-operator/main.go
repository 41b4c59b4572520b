// The Kubeflow training operator's PyTorchJob controller, as upstream's cmd/training-operator.v1 runs it, without
// its webhook: upstream's main starts the controllers only after cert-controller has written a Secret for, and
// patched the caBundle of, a webhook Service the test control plane does not have. Everything that decides what
// happens to a PyTorchJob (pkg/controller.v1/pytorch, pkg/controller.v1/common) is the upstream module's, unchanged.
package main

import (
	"flag"
	"os"

	"go.uber.org/zap/zapcore"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/util/flowcontrol"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	schedulerpluginsv1alpha1 "sigs.k8s.io/scheduler-plugins/apis/scheduling/v1alpha1"
	"volcano.sh/apis/pkg/apis/scheduling/v1beta1"

	kubeflowv1 "github.com/kubeflow/training-operator/pkg/apis/kubeflow.org/v1"
	"github.com/kubeflow/training-operator/pkg/config"
	controllerv1 "github.com/kubeflow/training-operator/pkg/controller.v1"
	"github.com/kubeflow/training-operator/pkg/controller.v1/common"
)

func main() {
	var threads, qps, burst int
	flag.IntVar(&threads, "controller-threads", 4, "worker threads of the PyTorchJob controller")
	flag.IntVar(&qps, "kube-api-qps", 50, "client QPS")
	flag.IntVar(&burst, "kube-api-burst", 100, "client burst")
	// the PyTorch flags of upstream's main, with its defaults: a Worker's init container (waiting for the master's
	// DNS name, pkg/controller.v1/pytorch/initcontainer.go) takes its image from them, and without one the pod is
	// invalid (spec.initContainers[0].image: Required value)
	flag.StringVar(&config.Config.PyTorchInitContainerImage, "pytorch-init-container-image",
		config.PyTorchInitContainerImageDefault, "The image for pytorch init container")
	flag.StringVar(&config.Config.PyTorchInitContainerTemplateFile, "pytorch-init-container-template-file",
		config.PyTorchInitContainerTemplateFileDefault, "The template file for pytorch init container")
	flag.IntVar(&config.Config.PyTorchInitContainerMaxTries, "pytorch-init-container-max-tries",
		config.PyTorchInitContainerMaxTriesDefault, "The number of tries for the pytorch init container")
	opts := zap.Options{Development: true, StacktraceLevel: zapcore.DPanicLevel}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts)))
	log := ctrl.Log.WithName("setup")

	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(kubeflowv1.AddToScheme(scheme))
	utilruntime.Must(v1beta1.AddToScheme(scheme))
	utilruntime.Must(schedulerpluginsv1alpha1.AddToScheme(scheme))

	cfg := ctrl.GetConfigOrDie() // --kubeconfig
	cfg.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(float32(qps), burst)
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
	})
	if err != nil {
		log.Error(err, "unable to create the manager")
		os.Exit(1)
	}
	setup := controllerv1.SupportedSchemeReconciler[kubeflowv1.PyTorchJobKind]
	if err := setup(mgr, common.GenNonGangSchedulerSetupFunc(), threads); err != nil {
		log.Error(err, "unable to set up the PyTorchJob controller")
		os.Exit(1)
	}
	log.Info("starting the PyTorchJob controller")
	if err := mgr.Start(ctrl.SetupSignalHandler()); err != nil {
		log.Error(err, "manager stopped")
		os.Exit(1)
	}
}
