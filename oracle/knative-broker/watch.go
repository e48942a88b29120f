package main

import (
	"context"
	"fmt"
	"time"

	"github.com/fsnotify/fsnotify"
	"go.uber.org/zap"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	eventingv1 "knative.dev/eventing/pkg/apis/eventing/v1"
	eventingfake "knative.dev/eventing/pkg/client/clientset/versioned/fake"
)

// store holds what the fake API server was last given, and applies a newer directory content
// to it as creates, updates and deletes: Knative's informers then deliver them to the handlers
// exactly as a cluster's watch would.
type store struct {
	client   *eventingfake.Clientset
	brokers  map[string]*eventingv1.Broker
	triggers map[string]*eventingv1.Trigger
}

func newStore(client *eventingfake.Clientset, objs *objects) *store {
	s := &store{client: client, brokers: map[string]*eventingv1.Broker{}, triggers: map[string]*eventingv1.Trigger{}}
	for _, b := range objs.brokers {
		s.brokers[b.Namespace+"/"+b.Name] = b
	}
	for _, t := range objs.triggers {
		s.triggers[t.Namespace+"/"+t.Name] = t
	}
	return s
}

func (s *store) apply(ctx context.Context, objs *objects) error {
	brokers := map[string]*eventingv1.Broker{}
	for _, b := range objs.brokers {
		key := b.Namespace + "/" + b.Name
		brokers[key] = b
		api := s.client.EventingV1().Brokers(b.Namespace)
		old, ok := s.brokers[key]
		var err error
		switch {
		case !ok:
			_, err = api.Create(ctx, b, metav1.CreateOptions{})
		case !equality.Semantic.DeepEqual(old, b):
			_, err = api.Update(ctx, b, metav1.UpdateOptions{})
		}
		if err != nil {
			return fmt.Errorf("Broker %s: %w", key, err)
		}
	}
	for key, b := range s.brokers {
		if _, ok := brokers[key]; !ok {
			if err := s.client.EventingV1().Brokers(b.Namespace).Delete(ctx, b.Name, metav1.DeleteOptions{}); err != nil {
				return fmt.Errorf("Broker %s: %w", key, err)
			}
		}
	}
	s.brokers = brokers
	triggers := map[string]*eventingv1.Trigger{}
	for _, t := range objs.triggers {
		key := t.Namespace + "/" + t.Name
		triggers[key] = t
		api := s.client.EventingV1().Triggers(t.Namespace)
		old, ok := s.triggers[key]
		var err error
		switch {
		case !ok:
			_, err = api.Create(ctx, t, metav1.CreateOptions{})
		case !equality.Semantic.DeepEqual(old, t):
			_, err = api.Update(ctx, t, metav1.UpdateOptions{})
		}
		if err != nil {
			return fmt.Errorf("Trigger %s: %w", key, err)
		}
	}
	for key, t := range s.triggers {
		if _, ok := triggers[key]; !ok {
			if err := s.client.EventingV1().Triggers(t.Namespace).Delete(ctx, t.Name, metav1.DeleteOptions{}); err != nil {
				return fmt.Errorf("Trigger %s: %w", key, err)
			}
		}
	}
	s.triggers = triggers
	return nil
}

// watchDir calls reload after the files of dir change (events within 100 ms are taken as one
// change). It returns when ctx ends.
func watchDir(ctx context.Context, dir string, logger *zap.Logger, reload func()) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watching %s: %w", dir, err)
	}
	if err := w.Add(dir); err != nil {
		_ = w.Close()
		return fmt.Errorf("watching %s: %w", dir, err)
	}
	go func() {
		defer w.Close()
		changed := make(chan struct{}, 1)
		var debounce *time.Timer
		for {
			select {
			case <-ctx.Done():
				return
			case ev, ok := <-w.Events:
				if !ok {
					return
				}
				if ev.Op == fsnotify.Chmod {
					continue
				}
				if debounce != nil {
					debounce.Stop()
				}
				debounce = time.AfterFunc(100*time.Millisecond, func() {
					select {
					case changed <- struct{}{}:
					default:
					}
				})
			case err, ok := <-w.Errors:
				if !ok {
					return
				}
				logger.Warn("manifest watch error", zap.Error(err))
			case <-changed:
				reload()
			}
		}
	}()
	return nil
}
