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

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/yaml"
	clienttesting "k8s.io/client-go/testing"

	netcfg "knative.dev/networking/pkg/config"
	"knative.dev/pkg/apis"
	"knative.dev/pkg/system"
	servingv1 "knative.dev/serving/pkg/apis/serving/v1"
)

// objects is what a manifest directory holds: the objects Knative's informers would list.
type objects struct {
	revisions []*servingv1.Revision
	endpoints []*corev1.Endpoints
	services  []*corev1.Service
	network   *corev1.ConfigMap
}

// loadDir reads every *.yaml, *.yml and *.json file of dir (sorted by name, as activator-lite
// does, dot files skipped): multi-document YAML streams and `kind: List` are accepted. Objects
// of other kinds are ignored; an object that does not decode, or a Revision Knative's webhook
// would refuse, is an error naming the file.
func loadDir(dir string) (*objects, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading manifests directory: %w", err)
	}
	var files []string
	for _, e := range entries {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
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
	decode := func(into runtime.Object, meta *metav1.ObjectMeta) error {
		if err := json.Unmarshal(raw, into); err != nil {
			return fmt.Errorf("invalid %s: %w", kind, err)
		}
		if meta.Name == "" {
			return fmt.Errorf("%s without metadata.name", kind)
		}
		if meta.Namespace == "" {
			meta.Namespace = "default"
		}
		return nil
	}
	switch {
	case strings.HasPrefix(apiVersion, "serving.knative.dev/") && kind == "Revision":
		r := &servingv1.Revision{}
		if err := decode(r, &r.ObjectMeta); err != nil {
			return err
		}
		// What Knative's webhook stores: defaults applied (timeoutSeconds and the rest),
		// objects it refuses never reach an informer.
		ctx := apis.WithinCreate(context.Background())
		r.SetDefaults(ctx)
		// Warnings (e.g. the insecure securityContext defaults) are not refusals.
		if err := r.Spec.Validate(apis.WithinSpec(ctx)).Filter(apis.ErrorLevel); err != nil {
			return fmt.Errorf("Revision %s/%s rejected as Knative's webhook would: %w", r.Namespace, r.Name, err)
		}
		o.revisions = append(o.revisions, r)
	case apiVersion == "v1" && kind == "Endpoints":
		e := &corev1.Endpoints{}
		if err := decode(e, &e.ObjectMeta); err != nil {
			return err
		}
		o.endpoints = append(o.endpoints, e)
	case apiVersion == "v1" && kind == "Service":
		s := &corev1.Service{}
		if err := decode(s, &s.ObjectMeta); err != nil {
			return err
		}
		o.services = append(o.services, s)
	case apiVersion == "v1" && kind == "ConfigMap":
		c := &corev1.ConfigMap{}
		if err := decode(c, &c.ObjectMeta); err != nil {
			return err
		}
		if c.Name == netcfg.ConfigMapName && c.Namespace == system.Namespace() {
			if _, err := netcfg.NewConfigFromConfigMap(c); err != nil {
				return fmt.Errorf("ConfigMap %s: %w", c.Name, err)
			}
			o.network = c
		}
	}
	return nil
}

// networkConfigMap is the directory's config-network, or an empty one (Knative's defaults).
func (o *objects) networkConfigMap() *corev1.ConfigMap {
	if o.network != nil {
		return o.network
	}
	return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: netcfg.ConfigMapName, Namespace: system.Namespace()}}
}

// store applies a directory's objects to the fake API server's trackers as creates, updates and
// deletes, so that they reach Knative's informers as a cluster's watch events would.
type store struct {
	kube, serving clienttesting.ObjectTracker
	current       map[schema.GroupVersionResource]map[string]runtime.Object
}

var (
	revisionsGVR = servingv1.SchemeGroupVersion.WithResource("revisions")
	endpointsGVR = corev1.SchemeGroupVersion.WithResource("endpoints")
	servicesGVR  = corev1.SchemeGroupVersion.WithResource("services")
)

func newStore(kube, serving clienttesting.ObjectTracker) *store {
	return &store{kube: kube, serving: serving, current: map[schema.GroupVersionResource]map[string]runtime.Object{}}
}

func (s *store) apply(o *objects) error {
	want := map[schema.GroupVersionResource]map[string]runtime.Object{
		revisionsGVR: {}, endpointsGVR: {}, servicesGVR: {},
	}
	add := func(gvr schema.GroupVersionResource, obj runtime.Object, meta metav1.Object) error {
		key := meta.GetNamespace() + "/" + meta.GetName()
		if _, dup := want[gvr][key]; dup {
			return fmt.Errorf("duplicate %s %s", gvr.Resource, key)
		}
		want[gvr][key] = obj
		return nil
	}
	for _, r := range o.revisions {
		if err := add(revisionsGVR, r, r); err != nil {
			return err
		}
	}
	for _, e := range o.endpoints {
		if err := add(endpointsGVR, e, e); err != nil {
			return err
		}
	}
	for _, sv := range o.services {
		if err := add(servicesGVR, sv, sv); err != nil {
			return err
		}
	}
	for gvr, objs := range want {
		tracker := s.kube
		if gvr == revisionsGVR {
			tracker = s.serving
		}
		old := s.current[gvr]
		for key, obj := range objs {
			ns := obj.(metav1.Object).GetNamespace()
			prev, ok := old[key]
			var err error
			switch {
			case !ok:
				err = tracker.Create(gvr, obj, ns)
			case !equality.Semantic.DeepEqual(prev, obj):
				err = tracker.Update(gvr, obj, ns)
			}
			if err != nil {
				return fmt.Errorf("%s %s: %w", gvr.Resource, key, err)
			}
		}
		for key, obj := range old {
			if _, ok := objs[key]; !ok {
				m := obj.(metav1.Object)
				if err := tracker.Delete(gvr, m.GetNamespace(), m.GetName()); err != nil {
					return fmt.Errorf("%s %s: %w", gvr.Resource, key, err)
				}
			}
		}
	}
	s.current = want
	return nil
}
