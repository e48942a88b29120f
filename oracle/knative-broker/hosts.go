package main

import (
	"context"
	"net"
	"net/http"
	"strconv"
)

// Knative's data-plane Services, as the controllers write them into Broker status.address,
// InMemoryChannel spec.subscribers (subscriberUri, replyUri) and Subscriptions.
const (
	ingressServiceHost = "broker-ingress." + systemNamespace + ".svc.cluster.local"
	filterServiceHost  = "broker-filter." + systemNamespace + ".svc.cluster.local"
)

// serviceDialer returns a DialContext that connects the stock Services' names (port 80 or none,
// as in a cluster) to this process's ingress and filter ports on loopback, so manifests can
// carry exactly the URLs Knative's controllers write. This also keeps the dispatcher's own rule
// working: it recognises the filter by the host broker-filter.knative-eventing.svc.cluster.local
// and fills the dead-letter extensions from the filter's error body
// (pkg/kncloudevents/event_dispatcher.go dispatchExecutionInfoTransformers). Any other address
// is dialled as given.
func serviceDialer(ingressPort, filterPort int, next func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	targets := map[string]int{}
	if ingressPort != 0 {
		targets[ingressServiceHost] = ingressPort
	}
	if filterPort != 0 {
		targets[filterServiceHost] = filterPort
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(addr)
		if err == nil && port == "80" {
			if p, ok := targets[host]; ok {
				addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
			}
		}
		return next(ctx, network, addr)
	}
}

// routeServiceHosts installs serviceDialer on http.DefaultTransport, which every client of
// Knative's kncloudevents package clones (pkg/kncloudevents/http_client.go createNewClient).
func routeServiceHosts(ingressPort, filterPort int) {
	t, ok := http.DefaultTransport.(*http.Transport)
	if !ok {
		return
	}
	next := t.DialContext
	if next == nil {
		next = (&net.Dialer{}).DialContext
	}
	t.DialContext = serviceDialer(ingressPort, filterPort, next)
}
