package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
	"go.uber.org/zap"
	"k8s.io/client-go/rest"

	netcfg "knative.dev/networking/pkg/config"
	netprobe "knative.dev/networking/pkg/http/probe"
	fakekubeclient "knative.dev/pkg/client/injection/kube/client/fake"
	_ "knative.dev/pkg/client/injection/kube/informers/core/v1/endpoints/fake"
	_ "knative.dev/pkg/client/injection/kube/informers/core/v1/service/fake"
	"knative.dev/pkg/configmap"
	"knative.dev/pkg/controller"
	"knative.dev/pkg/injection"
	pkglogging "knative.dev/pkg/logging"
	pkgnet "knative.dev/pkg/network"
	"knative.dev/pkg/system"
	"knative.dev/pkg/websocket"
	"knative.dev/serving/pkg/activator"
	activatorconfig "knative.dev/serving/pkg/activator/config"
	activatorhandler "knative.dev/serving/pkg/activator/handler"
	activatornet "knative.dev/serving/pkg/activator/net"
	apiconfig "knative.dev/serving/pkg/apis/config"
	asmetrics "knative.dev/serving/pkg/autoscaler/metrics"
	fakeservingclient "knative.dev/serving/pkg/client/injection/client/fake"
	_ "knative.dev/serving/pkg/client/injection/informers/serving/v1/revision/fake"
	pkghttp "knative.dev/serving/pkg/http"
	"knative.dev/serving/pkg/http/handler"
)

// run builds Knative's activator handler chain exactly as cmd/activator/main.go does (the
// request log with no template, metrics and traces to no-op providers, no TLS) and serves it
// until ctx ends, then fails health checks for the drain timeout and shuts down.
func run(ctx context.Context, cfg *config, logger *zap.SugaredLogger) error {
	// client-go's WatchList needs bookmarks that fake clients never send (as Knative's
	// reconciler/testing sets for its unit tests).
	if err := os.Setenv("KUBE_FEATURE_WatchListClient", "false"); err != nil {
		return err
	}
	objs, err := loadDir(cfg.manifests)
	if err != nil {
		return err
	}
	logger.Infow("manifests loaded", zap.String("dir", cfg.manifests),
		zap.Int("revisions", len(objs.revisions)), zap.Int("endpoints", len(objs.endpoints)),
		zap.Int("services", len(objs.services)))

	networkCM := objs.networkConfigMap()
	networkConfig, err := netcfg.NewConfigFromConfigMap(networkCM)
	if err != nil {
		return fmt.Errorf("ConfigMap %s: %w", netcfg.ConfigMapName, err)
	}
	if networkConfig.SystemInternalTLSEnabled() {
		return errors.New("system-internal-tls is not supported by this oracle (it needs the routing-serving-certs Secret)")
	}

	// Knative's fake injection: the same clients and informers its activator unit tests use.
	informerCtx, cancelInformers := context.WithCancel(context.Background())
	defer cancelInformers()
	informerCtx = pkglogging.WithLogger(informerCtx, logger)
	informerCtx = injection.WithConfig(informerCtx, &rest.Config{})
	informerCtx, informers := injection.Fake.SetupInformers(informerCtx, injection.GetConfig(informerCtx))

	st := newStore(fakekubeclient.Get(informerCtx).Tracker(), fakeservingclient.Get(informerCtx).Tracker())
	if err := st.apply(objs); err != nil {
		return err
	}
	if err := controller.StartInformers(informerCtx.Done(), informers...); err != nil {
		return fmt.Errorf("starting informers: %w", err)
	}

	var mp metric.MeterProvider = metricnoop.NewMeterProvider()
	var tp trace.TracerProvider = tracenoop.NewTracerProvider()

	transport := pkgnet.NewProxyAutoTransport(cfg.maxIdle, cfg.maxIdlePerHost)
	activatornet.SetProbeSettings(cfg.probeTimeout, cfg.probeFrequency)
	throttler := activatornet.NewThrottler(informerCtx, cfg.podIP)
	go throttler.Run(informerCtx, transport, networkConfig.EnableMeshPodAddressability, networkConfig.MeshCompatibilityMode)

	configStore := activatorconfig.NewStore(logger)
	configStore.WatchConfigs(configmap.NewStaticWatcher(networkCM))

	statCh := make(chan []asmetrics.StatMessage)
	autoscaler := cfg.autoscaler
	if autoscaler == "" {
		autoscaler = "ws://" + pkgnet.GetServiceHostname("autoscaler", system.Namespace()) + ":8080"
	}
	logger.Infow("Connecting to Autoscaler at " + autoscaler)
	statSink := websocket.NewDurableSendingConnection(autoscaler, logger,
		activator.AutoscalerConnectionOptions(logger, mp)...)
	defer statSink.Shutdown()
	go activator.ReportStats(logger, statSink, statCh)

	concurrencyReporter := activatorhandler.NewConcurrencyReporter(informerCtx, cfg.podName, statCh, mp)
	go concurrencyReporter.Run(informerCtx.Done())

	// The chain of cmd/activator/main.go, innermost first.
	ah := activatorhandler.New(informerCtx, throttler, transport, networkConfig.EnableMeshPodAddressability, logger, false, tp, mp)
	ah = handler.NewTimeoutHandler(ah, "activator request timeout", func(r *http.Request) (time.Duration, time.Duration, time.Duration) {
		if rev := activatorhandler.RevisionFrom(r.Context()); rev != nil {
			responseStartTimeout := 0 * time.Second
			if rev.Spec.ResponseStartTimeoutSeconds != nil {
				responseStartTimeout = time.Duration(*rev.Spec.ResponseStartTimeoutSeconds) * time.Second
			}
			idleTimeout := 0 * time.Second
			if rev.Spec.IdleTimeoutSeconds != nil {
				idleTimeout = time.Duration(*rev.Spec.IdleTimeoutSeconds) * time.Second
			}
			return time.Duration(*rev.Spec.TimeoutSeconds) * time.Second, responseStartTimeout, idleTimeout
		}
		return apiconfig.DefaultRevisionTimeoutSeconds * time.Second,
			apiconfig.DefaultRevisionResponseStartTimeoutSeconds * time.Second,
			apiconfig.DefaultRevisionIdleTimeoutSeconds * time.Second
	}, logger)
	ah = concurrencyReporter.Handler(ah)
	ah = activatorhandler.NewTracingAttributeHandler(tp, ah)
	// config-observability's default request-log template is empty: no request log.
	reqLogHandler, err := pkghttp.NewRequestLogHandler(ah, os.Stdout, "", requestLogInput, false)
	if err != nil {
		return fmt.Errorf("request log handler: %w", err)
	}
	ah = reqLogHandler
	ah = activatorhandler.NewMetricAttributeHandler(cfg.podName, ah)
	ah = activatorhandler.WrapActivatorHandlerWithFullDuplex(ah, logger)
	ah = activatorhandler.NewContextHandler(informerCtx, ah, configStore)
	ah = otelhttp.NewHandler(ah, "handle", otelhttp.WithTracerProvider(tp), otelhttp.WithMeterProvider(mp))
	ah = &activatorhandler.ProbeHandler{NextHandler: ah}
	ah = netprobe.NewHandler(ah)
	health := func() error {
		if ctx.Err() != nil {
			return errors.New("received SIGTERM from kubelet")
		}
		return statSink.Status()
	}
	ah = &activatorhandler.HealthHandler{HealthCheck: health, NextHandler: ah, Logger: logger}

	servers := []*http.Server{pkgnet.NewServer(net.JoinHostPort(cfg.bind, strconv.Itoa(cfg.http1Port)), ah)}
	if cfg.h2cPort != 0 {
		servers = append(servers, pkgnet.NewServer(net.JoinHostPort(cfg.bind, strconv.Itoa(cfg.h2cPort)), ah))
	}
	errCh := make(chan error, len(servers))
	for _, s := range servers {
		if err := serve(ctx, s, errCh); err != nil {
			return err
		}
		logger.Infow("serving", zap.String("addr", s.Addr))
	}

	if err := watchDir(informerCtx, cfg.manifests, logger, func() {
		next, err := loadDir(cfg.manifests)
		if err == nil {
			err = st.apply(next)
		}
		if err != nil {
			logger.Errorw("manifests not reloaded", zap.Error(err))
			return
		}
		logger.Infow("manifests reloaded", zap.Int("revisions", len(next.revisions)),
			zap.Int("endpoints", len(next.endpoints)), zap.Int("services", len(next.services)))
	}); err != nil {
		return err
	}

	select {
	case <-ctx.Done():
		logger.Info("Received SIGTERM")
	case err := <-errCh:
		return err
	}
	logger.Infof("Sleeping %v to allow K8s propagation of non-ready state", cfg.drainTimeout)
	time.Sleep(cfg.drainTimeout)
	for _, s := range servers {
		_ = s.Shutdown(context.Background())
	}
	close(statCh)
	logger.Info("Servers shutdown.")
	return nil
}

// requestLogInput is what the request log template sees (as cmd/activator's getter); only
// called when config-observability sets a template, which this oracle never does.
func requestLogInput(req *http.Request, resp *pkghttp.RequestLogResponse) *pkghttp.RequestLogTemplateInput {
	info := &pkghttp.RequestLogRevision{}
	if rev := activatorhandler.RevisionFrom(req.Context()); rev != nil {
		info.Namespace, info.Name = rev.Namespace, rev.Name
	}
	return &pkghttp.RequestLogTemplateInput{Request: req, Response: resp, Revision: info}
}
