// Command knative-activator-oracle runs Knative Serving's own activator request path (the
// handler chain cmd/activator/main.go builds, with its Throttler, concurrency reporter and
// stat reporter) without a Kubernetes API server. The handlers are Knative's code, imported as
// libraries from knative.dev/serving; their informers (Revisions, core/v1 Endpoints, Services)
// are Knative's fake injection informers, seeded from a directory of YAML manifests in the
// format activator-lite reads. spright-rs runs activator-lite's black-box tests against this
// process and against activator-lite with the same test bodies.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

type config struct {
	manifests      string
	autoscaler     string
	bind           string
	http1Port      int
	h2cPort        int
	drainTimeout   time.Duration
	logLevel       string
	podName        string
	podIP          string
	probeTimeout   time.Duration
	probeFrequency time.Duration
	maxIdle        int
	maxIdlePerHost int
}

func envString(name, def string) string {
	if v, ok := os.LookupEnv(name); ok && v != "" {
		return v
	}
	return def
}

func envInt(name string, def int) (int, error) {
	v := envString(name, "")
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, fmt.Errorf("%s=%q is not an integer", name, v)
	}
	return n, nil
}

func envDuration(name, def string) (time.Duration, error) {
	v := envString(name, def)
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("%s=%q is not a duration", name, v)
	}
	return d, nil
}

// parseConfig reads the environment as the stock activator Deployment sets it (POD_NAME and
// POD_IP required; MAX_IDLE_PROXY_CONNS, MAX_IDLE_PROXY_CONNS_PER_HOST, PROBE_TIMEOUT,
// PROBE_FREQUENCY optional; SYSTEM_NAMESPACE required as Knative's system.Namespace() needs it) and flags for what comes from the cluster in Knative.
func parseConfig(args []string) (*config, error) {
	c := &config{podName: envString("POD_NAME", ""), podIP: envString("POD_IP", "")}
	if c.podName == "" {
		return nil, errors.New("environment variable POD_NAME is required but not set")
	}
	if c.podIP == "" {
		return nil, errors.New("environment variable POD_IP is required but not set")
	}
	// Knative's system.Namespace() panics without it; the stock Deployment sets it.
	if envString("SYSTEM_NAMESPACE", "") == "" {
		return nil, errors.New("environment variable SYSTEM_NAMESPACE is required but not set")
	}
	var err error
	if c.maxIdle, err = envInt("MAX_IDLE_PROXY_CONNS", 1000); err != nil {
		return nil, err
	}
	if c.maxIdlePerHost, err = envInt("MAX_IDLE_PROXY_CONNS_PER_HOST", 100); err != nil {
		return nil, err
	}
	if c.probeTimeout, err = envDuration("PROBE_TIMEOUT", "300ms"); err != nil {
		return nil, err
	}
	if c.probeFrequency, err = envDuration("PROBE_FREQUENCY", "200ms"); err != nil {
		return nil, err
	}
	fs := flag.NewFlagSet("knative-activator-oracle", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(&c.manifests, "manifests", "", "directory of Revision, Endpoints, Service and config-network ConfigMap manifests (required)")
	fs.StringVar(&c.autoscaler, "autoscaler", "", "autoscaler websocket URL (default ws://autoscaler.<SYSTEM_NAMESPACE>.svc.<cluster-domain>:8080)")
	fs.StringVar(&c.bind, "bind", "0.0.0.0", "address to bind the listeners to")
	fs.IntVar(&c.http1Port, "http1-port", 8012, "HTTP/1.1 + h2c port (Knative's http1 port)")
	fs.IntVar(&c.h2cPort, "h2c-port", 8013, "h2c port (Knative's h2c port); 0 disables it")
	fs.DurationVar(&c.drainTimeout, "drain-timeout", 45*time.Second, "time to keep serving after SIGTERM while health checks fail (network.DefaultDrainTimeout)")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stdout)
			fmt.Println("usage: knative-activator-oracle --manifests DIR [flags]")
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
	if net.ParseIP(c.bind) == nil {
		return nil, fmt.Errorf("--bind %q is not an IP address", c.bind)
	}
	if c.http1Port <= 0 || c.http1Port > 65535 {
		return nil, fmt.Errorf("--http1-port %d is not a port", c.http1Port)
	}
	if c.h2cPort < 0 || c.h2cPort > 65535 {
		return nil, fmt.Errorf("--h2c-port %d is not a port (0 disables)", c.h2cPort)
	}
	if c.drainTimeout < 0 {
		return nil, fmt.Errorf("--drain-timeout %v is negative", c.drainTimeout)
	}
	if c.autoscaler != "" {
		u, err := url.Parse(c.autoscaler)
		if err != nil || (u.Scheme != "ws" && u.Scheme != "wss") || u.Host == "" {
			return nil, fmt.Errorf("--autoscaler %q is not a ws:// or wss:// URL", c.autoscaler)
		}
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
	return l.Named("knative-activator-oracle"), nil
}

func main() {
	fail := func(err error) {
		l, lerr := newLogger("info")
		if lerr != nil {
			fmt.Fprintf(os.Stderr, "knative-activator-oracle: %v\n", err)
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
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, logger.Sugar()); err != nil {
		logger.Error("knative-activator-oracle failed", zap.Error(err))
		_ = logger.Sync()
		os.Exit(1)
	}
	_ = logger.Sync()
}

// serve runs s until ctx ends, then shuts it down gracefully.
func serve(_ context.Context, s *http.Server, errCh chan<- error) error {
	l, err := net.Listen("tcp", s.Addr)
	if err != nil {
		return err
	}
	go func() {
		if err := s.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errCh <- fmt.Errorf("server on %s: %w", s.Addr, err)
		}
	}()
	return nil
}
