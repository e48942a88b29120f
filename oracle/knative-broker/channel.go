package main

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"sync"

	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
	corev1listers "k8s.io/client-go/listers/core/v1"

	messagingv1 "knative.dev/eventing/pkg/apis/messaging/v1"
	"knative.dev/eventing/pkg/channel"
	"knative.dev/eventing/pkg/channel/fanout"
	"knative.dev/eventing/pkg/channel/multichannelfanout"
	"knative.dev/eventing/pkg/eventingtls"
	"knative.dev/eventing/pkg/kncloudevents"
	duckv1 "knative.dev/pkg/apis/duck/v1"
)

// channels serves Knative's in-memory channel dispatcher fan-out for every InMemoryChannel of
// the manifests, each at /<namespace>/<name> (the path-keyed handler the IMC dispatcher
// registers; the host-keyed one needs cluster DNS names). Subscribers come from
// spec.subscribers (subscriberUri, replyUri, delivery) as the Subscription reconciler writes them.
type channels struct {
	logger       *zap.Logger
	clientConfig eventingtls.ClientConfig
	dispatcher   *kncloudevents.Dispatcher
	withContext  func(context.Context) context.Context
	mp           metric.MeterProvider
	tp           trace.TracerProvider
	multi        *multichannelfanout.EventHandler

	mu   sync.Mutex
	keys map[string]bool
}

func newChannels(
	logger *zap.Logger,
	trustBundles corev1listers.ConfigMapNamespaceLister,
	withContext func(context.Context) context.Context,
	mp metric.MeterProvider,
	tp trace.TracerProvider,
) *channels {
	clientConfig := eventingtls.ClientConfig{TrustBundleConfigMapLister: trustBundles}
	return &channels{
		logger:       logger,
		clientConfig: clientConfig,
		dispatcher: kncloudevents.NewDispatcher(clientConfig, nil,
			kncloudevents.WithMeterProvider(mp), kncloudevents.WithTraceProvider(tp)),
		withContext: withContext,
		mp:          mp,
		tp:          tp,
		multi:       multichannelfanout.NewEventHandler(context.Background(), logger),
		keys:        map[string]bool{},
	}
}

func (c *channels) handler() http.Handler { return c.multi }

// set replaces the served channels with imcs; nothing changes when one of them is refused.
func (c *channels) set(imcs []*messagingv1.InMemoryChannel) error {
	handlers := map[string]fanout.EventHandler{}
	for _, imc := range imcs {
		h, err := c.fanout(imc)
		if err != nil {
			return fmt.Errorf("InMemoryChannel %s/%s: %w", imc.Namespace, imc.Name, err)
		}
		handlers[imc.Namespace+"/"+imc.Name] = h
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for key, h := range handlers {
		c.multi.SetChannelHandler(key, h)
		c.logger.Info("channel", zap.String("path", "/"+key), zap.Int("subscribers", len(h.GetSubscriptions(context.Background()))))
	}
	for key := range c.keys {
		if _, ok := handlers[key]; !ok {
			c.multi.DeleteChannelHandler(key)
			c.logger.Info("channel removed", zap.String("path", "/"+key))
		}
	}
	c.keys = map[string]bool{}
	for key := range handlers {
		c.keys[key] = true
	}
	return nil
}

func (c *channels) fanout(imc *messagingv1.InMemoryChannel) (*fanout.FanoutEventHandler, error) {
	subs := make([]fanout.Subscription, 0, len(imc.Spec.Subscribers))
	for i, s := range imc.Spec.Subscribers {
		if s.SubscriberURI == nil {
			return nil, fmt.Errorf("spec.subscribers[%d] has no subscriberUri", i)
		}
		conf, err := fanout.SubscriberSpecToFanoutConfig(s)
		if err != nil {
			return nil, fmt.Errorf("spec.subscribers[%d]: %w", i, err)
		}
		conf.Namespace = imc.Namespace
		subs = append(subs, *conf)
		kncloudevents.AddOrUpdateAddressableHandler(c.clientConfig, conf.Subscriber, c.mp, c.tp)
	}
	async := false
	if v, ok := imc.Annotations[messagingv1.AsyncHandlerAnnotation]; ok {
		if b, err := strconv.ParseBool(v); err == nil {
			async = b
		}
	}
	uid := imc.UID
	return fanout.NewFanoutEventHandler(
		c.logger,
		fanout.Config{AsyncHandler: async, Subscriptions: subs},
		nil, // EventType auto-creation off
		&duckv1.KReference{Kind: "InMemoryChannel", APIVersion: messagingv1.SchemeGroupVersion.String(), Namespace: imc.Namespace, Name: imc.Name},
		&uid,
		c.dispatcher,
		c.mp,
		c.tp,
		channel.ResolveChannelFromPath(channel.ParseChannelFromPath),
		channel.ReceiverWithContextFunc(c.withContext),
	)
}
