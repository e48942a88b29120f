package main

import (
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// validExtensionName reports whether name can be a CloudEvents context attribute name: lower-case
// ASCII letters and digits only (CloudEvents 1.0, "Attribute Naming Convention"), at most 20
// characters as the spec recommends.
func validExtensionName(name string) error {
	if name == "" || len(name) > 20 {
		return fmt.Errorf("extension name %q must have 1 to 20 characters", name)
	}
	for _, r := range name {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') {
			return fmt.Errorf("extension name %q may only hold lower-case letters and digits", name)
		}
	}
	switch name {
	case "id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject", "time", "data", "data_base64", "schemaurl":
		return fmt.Errorf("extension name %q is a CloudEvents attribute", name)
	}
	return nil
}

// stampIngress wraps the broker ingress handler for benchmarks: a binary-mode CloudEvent (a
// ce-specversion header) without a ce-<name> header gets ce-<name>: <receipt time in ns since
// the Unix epoch> before Knative's handler reads the request, so the time rides on as an
// extension through the channel, the filter and the subscribers' replies. An event that already
// carries the extension (a reply re-entering the ingress) keeps it. Structured and batched
// requests, and every other request, pass untouched. The time is taken when this wrapper is
// called, before Knative parses the event.
func stampIngress(name string, next http.Handler) http.Handler {
	header := http.CanonicalHeaderKey("ce-" + name)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("ce-specversion") != "" && len(r.Header.Values(header)) == 0 {
			r.Header.Set(header, strconv.FormatInt(time.Now().UnixNano(), 10))
		}
		next.ServeHTTP(w, r)
	})
}
