package main

import (
	"context"
	"fmt"
	"net/http"
	"strconv"

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

// newChannelHandler serves Knative's in-memory channel dispatcher fan-out for every
// InMemoryChannel of the manifests, each at /<namespace>/<name> (the path-keyed handler the
// IMC dispatcher registers; the host-keyed one needs cluster DNS names). Subscribers come from
// spec.subscribers (subscriberUri, replyUri, delivery) as the Subscription reconciler writes them.
func newChannelHandler(
	logger *zap.Logger,
	imcs []*messagingv1.InMemoryChannel,
	trustBundles corev1listers.ConfigMapNamespaceLister,
	withContext func(context.Context) context.Context,
	mp metric.MeterProvider,
	tp trace.TracerProvider,
) (http.Handler, error) {
	clientConfig := eventingtls.ClientConfig{TrustBundleConfigMapLister: trustBundles}
	dispatcher := kncloudevents.NewDispatcher(clientConfig, nil,
		kncloudevents.WithMeterProvider(mp), kncloudevents.WithTraceProvider(tp))
	multi := multichannelfanout.NewEventHandler(context.Background(), logger)
	for _, imc := range imcs {
		subs := make([]fanout.Subscription, 0, len(imc.Spec.Subscribers))
		for i, s := range imc.Spec.Subscribers {
			if s.SubscriberURI == nil {
				return nil, fmt.Errorf("InMemoryChannel %s/%s: spec.subscribers[%d] has no subscriberUri", imc.Namespace, imc.Name, i)
			}
			conf, err := fanout.SubscriberSpecToFanoutConfig(s)
			if err != nil {
				return nil, fmt.Errorf("InMemoryChannel %s/%s: spec.subscribers[%d]: %w", imc.Namespace, imc.Name, i, err)
			}
			conf.Namespace = imc.Namespace
			subs = append(subs, *conf)
			kncloudevents.AddOrUpdateAddressableHandler(clientConfig, conf.Subscriber, mp, tp)
		}
		async := false
		if v, ok := imc.Annotations[messagingv1.AsyncHandlerAnnotation]; ok {
			if b, err := strconv.ParseBool(v); err == nil {
				async = b
			}
		}
		uid := imc.UID
		h, err := fanout.NewFanoutEventHandler(
			logger,
			fanout.Config{AsyncHandler: async, Subscriptions: subs},
			nil, // EventType auto-creation off
			&duckv1.KReference{Kind: "InMemoryChannel", APIVersion: messagingv1.SchemeGroupVersion.String(), Namespace: imc.Namespace, Name: imc.Name},
			&uid,
			dispatcher,
			mp,
			tp,
			channel.ResolveChannelFromPath(channel.ParseChannelFromPath),
			channel.ReceiverWithContextFunc(withContext),
		)
		if err != nil {
			return nil, fmt.Errorf("InMemoryChannel %s/%s: %w", imc.Namespace, imc.Name, err)
		}
		multi.SetChannelHandler(imc.Namespace+"/"+imc.Name, h)
		logger.Info("channel", zap.String("path", "/"+imc.Namespace+"/"+imc.Name), zap.Int("subscribers", len(subs)))
	}
	return multi, nil
}
