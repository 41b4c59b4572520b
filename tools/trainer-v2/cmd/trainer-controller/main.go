// Kubeflow Trainer v2's controllers (TrainJob, TrainingRuntime, ClusterTrainingRuntime) as upstream's
// cmd/trainer-controller-manager runs them, with the upstream webhooks served on a loopback port from a
// certificate directory the caller provides instead of cert-controller's rotation (which needs a Secret and a
// Service the test control plane does not have). Everything that decides what a TrainJob becomes (pkg/runtime,
// pkg/controller, pkg/webhooks) is the upstream module's, unchanged.
package main

import (
	"flag"
	"os"

	"go.uber.org/zap/zapcore"
	apiruntime "k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	ctrlpkg "sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	jobsetv1alpha2 "sigs.k8s.io/jobset/api/jobset/v1alpha2"
	schedulerpluginsv1alpha1 "sigs.k8s.io/scheduler-plugins/apis/scheduling/v1alpha1"
	volcanov1beta1 "volcano.sh/apis/pkg/apis/scheduling/v1beta1"

	configapi "github.com/kubeflow/trainer/v2/pkg/apis/config/v1alpha1"
	trainer "github.com/kubeflow/trainer/v2/pkg/apis/trainer/v1alpha1"
	"github.com/kubeflow/trainer/v2/pkg/config"
	"github.com/kubeflow/trainer/v2/pkg/controller"
	runtimecore "github.com/kubeflow/trainer/v2/pkg/runtime/core"
	"github.com/kubeflow/trainer/v2/pkg/webhooks"
)

func main() {
	var webhookPort int
	var certDir, probeAddr string
	flag.IntVar(&webhookPort, "webhook-port", 0, "serve the upstream webhooks on 127.0.0.1:PORT (0: no webhooks)")
	flag.StringVar(&certDir, "cert-dir", "", "directory holding tls.crt and tls.key for the webhook server")
	flag.StringVar(&probeAddr, "health-probe-bind-address", "0", "healthz/readyz address (0: off)")
	opts := zap.Options{Development: true, StacktraceLevel: zapcore.DPanicLevel}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts)))
	log := ctrl.Log.WithName("setup")

	scheme := apiruntime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(configapi.AddToScheme(scheme))
	utilruntime.Must(trainer.AddToScheme(scheme))
	utilruntime.Must(jobsetv1alpha2.AddToScheme(scheme))
	utilruntime.Must(schedulerpluginsv1alpha1.AddToScheme(scheme))
	utilruntime.Must(volcanov1beta1.AddToScheme(scheme))

	// upstream's defaults (pkg/apis/config/v1alpha1 defaults.go); only where the manager listens is ours
	options, cfg, err := config.Load(scheme, "")
	if err != nil {
		log.Error(err, "unable to load the default configuration")
		os.Exit(1)
	}
	options.Metrics = metricsserver.Options{BindAddress: "0"}
	options.HealthProbeBindAddress = probeAddr
	options.LeaderElection = false
	options.WebhookServer = nil
	if webhookPort > 0 {
		options.WebhookServer = webhook.NewServer(webhook.Options{Host: "127.0.0.1", Port: webhookPort, CertDir: certDir})
	}
	restCfg := ctrl.GetConfigOrDie() // --kubeconfig
	config.ApplyClientConnection(restCfg, &cfg)
	mgr, err := ctrl.NewManager(restCfg, options)
	if err != nil {
		log.Error(err, "unable to create the manager")
		os.Exit(1)
	}
	ctx := ctrl.SetupSignalHandler()
	runtimes, err := runtimecore.New(ctx, mgr.GetClient(), mgr.GetFieldIndexer(), &cfg)
	if err != nil {
		log.Error(err, "could not initialize the runtimes")
		os.Exit(1)
	}
	if name, err := controller.SetupControllers(mgr, runtimes, ctrlpkg.Options{}); err != nil {
		log.Error(err, "could not create the controller", "controller", name)
		os.Exit(1)
	}
	if webhookPort > 0 {
		if name, err := webhooks.Setup(mgr, runtimes); err != nil {
			log.Error(err, "could not create the webhook", "webhook", name)
			os.Exit(1)
		}
		utilruntime.Must(mgr.AddReadyzCheck("webhook", mgr.GetWebhookServer().StartedChecker()))
	}
	utilruntime.Must(mgr.AddHealthzCheck("healthz", healthz.Ping))
	log.Info("starting the Trainer v2 controllers", "webhookPort", webhookPort)
	if err := mgr.Start(ctx); err != nil {
		log.Error(err, "manager stopped")
		os.Exit(1)
	}
}
