package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/util/yaml"

	apisconfig "knative.dev/eventing/pkg/apis/config"
	eventingv1 "knative.dev/eventing/pkg/apis/eventing/v1"
	messagingv1 "knative.dev/eventing/pkg/apis/messaging/v1"
)

// objects is what a manifest directory holds: the objects Knative's informers would list,
// status blocks included (the controller's view is taken as given).
type objects struct {
	brokers  []*eventingv1.Broker
	triggers []*eventingv1.Trigger
	channels []*messagingv1.InMemoryChannel
}

// loadDir reads every *.yaml, *.yml and *.json file of dir (sorted by name, as broker-shm does):
// multi-document YAML streams and `kind: List` are accepted. Objects of other API groups are
// ignored; an object that does not decode is an error naming the file.
func loadDir(dir string) (*objects, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading manifests directory: %w", err)
	}
	var files []string
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		switch strings.ToLower(filepath.Ext(e.Name())) {
		case ".yaml", ".yml", ".json":
			files = append(files, filepath.Join(dir, e.Name()))
		}
	}
	sort.Strings(files)
	out := &objects{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		if err := out.addStream(data); err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
	}
	return out, nil
}

func (o *objects) addStream(data []byte) error {
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("invalid YAML: %w", err)
		}
		if doc == nil {
			continue
		}
		if kind, _ := doc["kind"].(string); kind == "List" {
			items, _ := doc["items"].([]any)
			for _, it := range items {
				m, ok := it.(map[string]any)
				if !ok {
					return errors.New("a List item is not an object")
				}
				if err := o.addObject(m); err != nil {
					return err
				}
			}
			continue
		}
		if err := o.addObject(doc); err != nil {
			return err
		}
	}
}

func (o *objects) addObject(m map[string]any) error {
	apiVersion, _ := m["apiVersion"].(string)
	kind, _ := m["kind"].(string)
	raw, err := json.Marshal(m)
	if err != nil {
		return err
	}
	decode := func(into any) error {
		if err := json.Unmarshal(raw, into); err != nil {
			return fmt.Errorf("invalid %s: %w", kind, err)
		}
		return nil
	}
	switch {
	case strings.HasPrefix(apiVersion, "eventing.knative.dev/") && kind == "Broker":
		b := &eventingv1.Broker{}
		if err := decode(b); err != nil {
			return err
		}
		if err := checkMeta(kind, &b.Namespace, b.Name); err != nil {
			return err
		}
		for _, x := range o.brokers {
			if x.Namespace == b.Namespace && x.Name == b.Name {
				return fmt.Errorf("duplicate Broker %s/%s", b.Namespace, b.Name)
			}
		}
		o.brokers = append(o.brokers, b)
	case strings.HasPrefix(apiVersion, "eventing.knative.dev/") && kind == "Trigger":
		t := &eventingv1.Trigger{}
		if err := decode(t); err != nil {
			return err
		}
		if err := checkMeta(kind, &t.Namespace, t.Name); err != nil {
			return err
		}
		for _, x := range o.triggers {
			if x.Namespace == t.Namespace && x.Name == t.Name {
				return fmt.Errorf("duplicate Trigger %s/%s", t.Namespace, t.Name)
			}
		}
		o.triggers = append(o.triggers, t)
	case strings.HasPrefix(apiVersion, "messaging.knative.dev/") && kind == "InMemoryChannel":
		c := &messagingv1.InMemoryChannel{}
		if err := decode(c); err != nil {
			return err
		}
		if err := checkMeta(kind, &c.Namespace, c.Name); err != nil {
			return err
		}
		o.channels = append(o.channels, c)
	}
	return nil
}

// stockBrokerDefaults is the default-br-config entry of Knative's stock ConfigMap
// config-br-defaults (config/core/configmaps/default-broker.yaml): the class the webhook gives a
// Broker without the class annotation.
const stockBrokerDefaults = `clusterDefault:
  brokerClass: MTChannelBasedBroker
  apiVersion: v1
  kind: ConfigMap
  name: config-br-default-channel
  namespace: knative-eventing
  delivery:
    retry: 10
    backoffPolicy: exponential
    backoffDelay: PT0.2S
`

// validate runs Knative's own defaulting and validation (what its admission webhooks apply) on a
// copy of every object; the objects themselves are served as written.
func (o *objects) validate(ctx context.Context) error {
	defaults, err := apisconfig.NewDefaultsConfigFromMap(map[string]string{
		apisconfig.BrokerDefaultsKey: stockBrokerDefaults,
	})
	if err != nil {
		return fmt.Errorf("broker defaults: %w", err)
	}
	ctx = apisconfig.ToContext(ctx, &apisconfig.Config{Defaults: defaults})
	for _, b := range o.brokers {
		b := b.DeepCopy()
		b.SetDefaults(ctx)
		if err := b.Validate(ctx); err != nil {
			return fmt.Errorf("Broker %s/%s rejected as Knative's webhook would: %w", b.Namespace, b.Name, err)
		}
	}
	for _, t := range o.triggers {
		t := t.DeepCopy()
		t.SetDefaults(ctx)
		if err := t.Validate(ctx); err != nil {
			return fmt.Errorf("Trigger %s/%s rejected as Knative's webhook would: %w", t.Namespace, t.Name, err)
		}
	}
	for _, c := range o.channels {
		c := c.DeepCopy()
		c.SetDefaults(ctx)
		if err := c.Validate(ctx); err != nil {
			return fmt.Errorf("InMemoryChannel %s/%s rejected as Knative's webhook would: %w", c.Namespace, c.Name, err)
		}
	}
	return nil
}

// checkMeta defaults the namespace to "default" (as kubectl and broker-shm do) and refuses an
// object without a name.
func checkMeta(kind string, ns *string, name string) error {
	if name == "" {
		return fmt.Errorf("%s without metadata.name", kind)
	}
	if *ns == "" {
		*ns = "default"
	}
	return nil
}
