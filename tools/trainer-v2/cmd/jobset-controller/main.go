// The JobSet controller (sigs.k8s.io/jobset), which Kubeflow Trainer v2 needs: a TrainJob becomes a JobSet, a
// JobSet becomes batch Jobs. Run as upstream's main.go runs it, with its webhooks (defaulting of the success
// policy, completion mode and restart policy; validation) served on a loopback port from a certificate directory
// the caller provides instead of its internal cert rotation. The reconcilers and webhooks are upstream's, unchanged.
package main

import (
	"flag"
	"os"

	"go.uber.org/zap/zapcore"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	configapi "sigs.k8s.io/jobset/api/config/v1alpha1"
	jobset "sigs.k8s.io/jobset/api/jobset/v1alpha2"
	"sigs.k8s.io/jobset/pkg/config"
	"sigs.k8s.io/jobset/pkg/controllers"
	"sigs.k8s.io/jobset/pkg/metrics"
	"sigs.k8s.io/jobset/pkg/webhooks"
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
	metrics.Register()

	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(jobset.AddToScheme(scheme))
	utilruntime.Must(configapi.AddToScheme(scheme))

	options, cfg, err := config.Load(scheme, "") // upstream's defaults
	if err != nil {
		log.Error(err, "unable to load the default configuration")
		os.Exit(1)
	}
	utilruntime.Must(utilfeature.DefaultMutableFeatureGate.SetFromMap(cfg.FeatureGates))
	options.Metrics = metricsserver.Options{BindAddress: "0"}
	options.HealthProbeBindAddress = probeAddr
	options.LeaderElection = false
	options.WebhookServer = nil
	if webhookPort > 0 {
		options.WebhookServer = webhook.NewServer(webhook.Options{Host: "127.0.0.1", Port: webhookPort, CertDir: certDir})
	}
	kubeConfig := ctrl.GetConfigOrDie() // --kubeconfig
	kubeConfig.QPS = *cfg.ClientConnection.QPS
	kubeConfig.Burst = int(*cfg.ClientConnection.Burst)
	mgr, err := ctrl.NewManager(kubeConfig, options)
	if err != nil {
		log.Error(err, "unable to create the manager")
		os.Exit(1)
	}
	ctx := ctrl.SetupSignalHandler()
	utilruntime.Must(controllers.SetupJobSetIndexes(ctx, mgr.GetFieldIndexer()))
	utilruntime.Must(controllers.SetupPodIndexes(ctx, mgr.GetFieldIndexer()))
	if err := controllers.NewJobSetReconciler(mgr.GetClient(), mgr.GetScheme(), mgr.GetEventRecorder("jobset")).SetupWithManager(mgr); err != nil {
		log.Error(err, "unable to create the JobSet controller")
		os.Exit(1)
	}
	if err := controllers.NewPodReconciler(mgr.GetClient(), mgr.GetScheme(), mgr.GetEventRecorder("pod")).SetupWithManager(mgr); err != nil {
		log.Error(err, "unable to create the pod controller")
		os.Exit(1)
	}
	if webhookPort > 0 {
		utilruntime.Must(webhooks.Setup(mgr))
		utilruntime.Must(mgr.AddReadyzCheck("webhook", mgr.GetWebhookServer().StartedChecker()))
	}
	utilruntime.Must(mgr.AddHealthzCheck("healthz", healthz.Ping))
	log.Info("starting the JobSet controller", "webhookPort", webhookPort)
	if err := mgr.Start(ctx); err != nil {
		log.Error(err, "manager stopped")
		os.Exit(1)
	}
}
