// Command knative-broker-oracle runs Knative Eventing's own MT channel-based broker data plane
// (the mt-broker-ingress and mt-broker-filter HTTP handlers, and optionally the in-memory
// channel's fan-out) without a Kubernetes API server. The handlers are Knative's code, imported
// as libraries from knative.dev/eventing; their informers are fed from Knative's fake clientsets,
// seeded with the Broker, Trigger and InMemoryChannel objects (status blocks included) of a
// directory of YAML manifests. spright-rs runs its black-box drop-in tests against this process
// and against broker-shm's drop-in modes with the same test bodies.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"
	"k8s.io/apimachinery/pkg/runtime"
	kubeinformers "k8s.io/client-go/informers"
	kubefake "k8s.io/client-go/kubernetes/fake"

	"knative.dev/eventing/pkg/apis/feature"
	"knative.dev/eventing/pkg/broker"
	"knative.dev/eventing/pkg/broker/filter"
	"knative.dev/eventing/pkg/broker/ingress"
	eventingfake "knative.dev/eventing/pkg/client/clientset/versioned/fake"
	"knative.dev/eventing/pkg/client/informers/externalversions"
	"knative.dev/eventing/pkg/kncloudevents"
	"knative.dev/pkg/network"
	"knative.dev/pkg/system"
)

const systemNamespace = "knative-eventing"

type config struct {
	manifests   string
	ingressPort int
	filterPort  int
	channelPort int
	maxTTL      int
	logLevel    string
	// The in-memory channel dispatcher's HTTP connection pool (env MAX_IDLE_CONNS,
	// MAX_IDLE_CONNS_PER_HOST; the stock dispatcher Deployment sets both to 1000).
	maxIdleConns        int
	maxIdleConnsPerHost int
	// stampExtension, when set, names the extension the ingress stamps with its receipt time
	// (stamp.go); empty keeps Knative's handler exactly as it is.
	stampExtension string
}

func envInt(name string, def int) (int, error) {
	v, ok := os.LookupEnv(name)
	if !ok || v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, fmt.Errorf("%s=%q is not an integer", name, v)
	}
	return n, nil
}

func parseConfig(args []string) (*config, error) {
	// Defaults follow the stock deployments' env: INGRESS_PORT (8080), MAX_TTL (255). The filter
	// also listens on 8080 in Knative; here it has its own flag and is off unless given.
	ingressDef, err := envInt("INGRESS_PORT", 8080)
	if err != nil {
		return nil, err
	}
	filterDef, err := envInt("FILTER_PORT", 0)
	if err != nil {
		return nil, err
	}
	ttlDef, err := envInt("MAX_TTL", 255)
	if err != nil {
		return nil, err
	}
	c := &config{}
	if c.maxIdleConns, err = envInt("MAX_IDLE_CONNS", 1000); err != nil {
		return nil, err
	}
	if c.maxIdleConnsPerHost, err = envInt("MAX_IDLE_CONNS_PER_HOST", 1000); err != nil {
		return nil, err
	}
	if c.maxIdleConns <= 0 || c.maxIdleConnsPerHost <= 0 {
		return nil, fmt.Errorf("MAX_IDLE_CONNS (%d) and MAX_IDLE_CONNS_PER_HOST (%d) must be greater than 0", c.maxIdleConns, c.maxIdleConnsPerHost)
	}
	fs := flag.NewFlagSet("knative-broker-oracle", flag.ContinueOnError)
	// Errors are logged by main as JSON; -h prints the usage on stdout.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(&c.manifests, "manifests", "", "directory of Broker, Trigger and InMemoryChannel manifests (required)")
	fs.IntVar(&c.ingressPort, "ingress-port", ingressDef, "port of Knative's broker ingress handler; 0 disables it (env INGRESS_PORT)")
	fs.IntVar(&c.filterPort, "filter-port", filterDef, "port of Knative's broker filter handler; 0 disables it (env FILTER_PORT)")
	fs.IntVar(&c.channelPort, "channel-port", 0, "port of Knative's in-memory channel fan-out (channels at /<namespace>/<name>); 0 disables it")
	fs.IntVar(&c.maxTTL, "max-ttl", ttlDef, "TTL given to events without knativebrokerttl (env MAX_TTL)")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.stampExtension, "stamp-ingress-extension", "", "for benchmarks: give every binary-mode event reaching the ingress without this extension the extension, set to the receipt time in ns since the Unix epoch (off when empty)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stdout)
			fmt.Println("usage: knative-broker-oracle --manifests DIR [flags]")
			fs.PrintDefaults()
		}
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if c.manifests == "" {
		return nil, errors.New("--manifests DIR is required")
	}
	for name, p := range map[string]int{"--ingress-port": c.ingressPort, "--filter-port": c.filterPort, "--channel-port": c.channelPort} {
		if p < 0 || p > 65535 {
			return nil, fmt.Errorf("%s %d is not a port (0 disables)", name, p)
		}
	}
	if c.ingressPort == 0 && c.filterPort == 0 && c.channelPort == 0 {
		return nil, errors.New("every server is disabled: give --ingress-port, --filter-port or --channel-port")
	}
	if c.stampExtension != "" {
		if err := validExtensionName(c.stampExtension); err != nil {
			return nil, fmt.Errorf("--stamp-ingress-extension: %w", err)
		}
	}
	if c.maxTTL <= 0 || c.maxTTL > 1<<31-1 {
		return nil, fmt.Errorf("MAX_TTL must be > 0, was %d", c.maxTTL)
	}
	return c, nil
}

func newLogger(level string) (*zap.Logger, error) {
	var lvl zapcore.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	cfg := zap.NewProductionConfig()
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.OutputPaths = []string{"stderr"}
	cfg.ErrorOutputPaths = []string{"stderr"}
	cfg.Sampling = nil
	cfg.DisableStacktrace = true
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	l, err := cfg.Build()
	if err != nil {
		return nil, err
	}
	return l.Named("knative-broker-oracle"), nil
}

func main() {
	fail := func(err error) {
		l, lerr := newLogger("info")
		if lerr != nil {
			fmt.Fprintf(os.Stderr, "knative-broker-oracle: %v\n", err)
		} else {
			l.Error("invalid configuration", zap.Error(err))
			_ = l.Sync()
		}
		os.Exit(2)
	}
	cfg, err := parseConfig(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fail(err)
	}
	logger, err := newLogger(cfg.logLevel)
	if err != nil {
		fail(err)
	}
	if err := run(cfg, logger); err != nil {
		logger.Error("knative-broker-oracle failed", zap.Error(err))
		_ = logger.Sync()
		os.Exit(1)
	}
}

func run(cfg *config, logger *zap.Logger) error {
	// Knative's handlers name the system namespace (e.g. the ingress's OIDC service account,
	// unused with OIDC off; the channel dispatcher recognises the filter by its Service host
	// broker-filter.<system namespace>.svc.cluster.local); it comes from the downward API in a
	// cluster. knative.dev/eventing/pkg/apis/messaging/v1 imports knative.dev/pkg/system/testing,
	// whose init sets an unset SYSTEM_NAMESPACE to "knative-testing" before main runs: that
	// value is taken as unset too.
	if ns := os.Getenv("SYSTEM_NAMESPACE"); ns == "" || ns == "knative-testing" {
		if err := os.Setenv("SYSTEM_NAMESPACE", systemNamespace); err != nil {
			return err
		}
	}
	// The stock Services' names reach this process's servers (see hosts.go).
	routeServiceHosts(cfg.ingressPort, cfg.filterPort)
	logger.Info("system namespace", zap.String("namespace", system.Namespace()),
		zap.String("filterService", network.GetServiceHostname("broker-filter", system.Namespace())))
	// Feature flags at Knative's defaults: OIDC authentication, transport encryption and EventType
	// auto-creation off, so no token verifier or token provider is ever used.
	flags := feature.FromContextOrDefaults(context.Background())
	withFeatures := func(ctx context.Context) context.Context { return feature.ToContext(ctx, flags) }
	objs, err := loadDir(cfg.manifests)
	if err != nil {
		return err
	}
	logger.Info("manifests loaded", zap.String("dir", cfg.manifests),
		zap.Int("brokers", len(objs.brokers)), zap.Int("triggers", len(objs.triggers)),
		zap.Int("channels", len(objs.channels)))

	// Knative's webhook refuses invalid objects before any informer sees them; do the same.
	if err := objs.validate(withFeatures(context.Background())); err != nil {
		return err
	}

	seed := make([]runtime.Object, 0, len(objs.brokers)+len(objs.triggers)+len(objs.channels))
	for _, b := range objs.brokers {
		seed = append(seed, b)
	}
	for _, t := range objs.triggers {
		seed = append(seed, t)
	}
	for _, c := range objs.channels {
		seed = append(seed, c)
	}
	//nolint:staticcheck // the simple fake keeps status blocks exactly as given, which is the point
	eventingClient := eventingfake.NewSimpleClientset(seed...)
	factory := externalversions.NewSharedInformerFactory(eventingClient, 0)
	//nolint:staticcheck
	kubeClient := kubefake.NewSimpleClientset()
	kubeFactory := kubeinformers.NewSharedInformerFactoryWithOptions(kubeClient, 0, kubeinformers.WithNamespace(systemNamespace))
	// Trust bundles (none: every target here is plain HTTP).
	trustBundles := kubeFactory.Core().V1().ConfigMaps().Lister().ConfigMaps(systemNamespace)

	var mp metric.MeterProvider = metricnoop.NewMeterProvider()
	var tp trace.TracerProvider = tracenoop.NewTracerProvider()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	g, ctx := errgroup.WithContext(ctx)

	var servers []namedHandler
	if cfg.ingressPort != 0 {
		h, err := ingress.NewHandler(
			logger.Named("ingress"),
			broker.TTLDefaulter(logger, int32(cfg.maxTTL)),
			factory.Eventing().V1().Brokers(),
			nil, // token verifier: only called into with OIDC on
			nil, // OIDC token provider: only used for targets with an audience and OIDC on
			trustBundles,
			withFeatures,
			mp,
			tp,
		)
		if err != nil {
			return fmt.Errorf("ingress handler: %w", err)
		}
		var ih http.Handler = h
		if cfg.stampExtension != "" {
			ih = stampIngress(cfg.stampExtension, h)
			logger.Info("ingress stamps events", zap.String("extension", cfg.stampExtension))
		}
		servers = append(servers, namedHandler{"ingress", cfg.ingressPort, ih})
	}
	if cfg.filterPort != 0 {
		h, err := filter.NewHandler(
			logger.Named("filter"),
			nil,
			nil,
			factory.Eventing().V1().Triggers(),
			factory.Eventing().V1().Brokers(),
			factory.Messaging().V1().Subscriptions(),
			trustBundles,
			withFeatures,
			mp,
			tp,
		)
		if err != nil {
			return fmt.Errorf("filter handler: %w", err)
		}
		servers = append(servers, namedHandler{"filter", cfg.filterPort, h})
	}
	var chans *channels
	if cfg.channelPort != 0 {
		// The connection pool is one per process in kncloudevents. Knative's ingress and filter
		// handlers set theirs in their constructors (1000 idle connections; 1000 per host for
		// the ingress, 100 for the filter); the IMC dispatcher sets its own from its env. A
		// process that serves only the channel is the dispatcher and gets the dispatcher's
		// (without it, Go's default of 2 idle connections per host would close most
		// connections after one request); with the ingress or filter also on, theirs stay.
		if cfg.ingressPort == 0 && cfg.filterPort == 0 {
			kncloudevents.ConfigureConnectionArgs(&kncloudevents.ConnectionArgs{
				MaxIdleConns:        cfg.maxIdleConns,
				MaxIdleConnsPerHost: cfg.maxIdleConnsPerHost,
			})
		}
		chans = newChannels(logger.Named("channel"), trustBundles, withFeatures, mp, tp)
		if err := chans.set(objs.channels); err != nil {
			return fmt.Errorf("in-memory channel: %w", err)
		}
		servers = append(servers, namedHandler{"channel", cfg.channelPort, chans.handler()})
	}
	// Informers are registered by the handlers' constructors; start them and wait for the lists.
	kubeFactory.Core().V1().ConfigMaps().Informer()
	factory.Start(ctx.Done())
	kubeFactory.Start(ctx.Done())
	for typ, ok := range factory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("informer for %v did not sync", typ)
		}
	}
	for typ, ok := range kubeFactory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("informer for %v did not sync", typ)
		}
	}
	// Changes to the directory reach the handlers as the API server's watch events would; a
	// change that does not load or validate is logged and leaves everything as it was.
	st := newStore(eventingClient, objs)
	reload := func() {
		next, err := loadDir(cfg.manifests)
		if err == nil {
			err = next.validate(withFeatures(ctx))
		}
		if err == nil && chans != nil {
			err = chans.set(next.channels)
		}
		if err == nil {
			err = st.apply(ctx, next)
		}
		if err != nil {
			logger.Error("manifests not reloaded", zap.Error(err))
			return
		}
		logger.Info("manifests reloaded", zap.Int("brokers", len(next.brokers)),
			zap.Int("triggers", len(next.triggers)), zap.Int("channels", len(next.channels)))
	}
	if err := watchDir(ctx, cfg.manifests, logger, reload); err != nil {
		return err
	}

	for _, s := range servers {
		// Knative's receiver: its Drainer answers kubelet probes (User-Agent kube-probe/...)
		// with 200 and drains on shutdown.
		recv := kncloudevents.NewHTTPEventReceiver(s.port, kncloudevents.WithDrainQuietPeriod(time.Second))
		g.Go(func() error {
			if err := recv.StartListen(ctx, s.h); err != nil {
				return fmt.Errorf("%s on port %d: %w", s.name, s.port, err)
			}
			return nil
		})
		logger.Info("serving", zap.String("component", s.name), zap.Int("port", s.port))
	}
	err = g.Wait()
	if err != nil {
		return err
	}
	logger.Info("stopped")
	return nil
}

type namedHandler struct {
	name string
	port int
	h    http.Handler
}
