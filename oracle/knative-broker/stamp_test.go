package main

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"
)

func stampedHeader(t *testing.T, req *http.Request) string {
	t.Helper()
	var got string
	h := stampIngress("benchin", http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
		got = r.Header.Get("ce-benchin")
	}))
	h.ServeHTTP(httptest.NewRecorder(), req)
	return got
}

func TestStampAddsReceiptTimeToBinaryEvents(t *testing.T) {
	before := time.Now().UnixNano()
	req := httptest.NewRequest(http.MethodPost, "/ns/default", nil)
	req.Header.Set("Ce-Specversion", "1.0")
	got := stampedHeader(t, req)
	ns, err := strconv.ParseInt(got, 10, 64)
	if err != nil {
		t.Fatalf("stamp %q is not an integer: %v", got, err)
	}
	if ns < before || ns > time.Now().UnixNano() {
		t.Fatalf("stamp %d is not the receipt time", ns)
	}
}

func TestStampKeepsAnExistingStamp(t *testing.T) {
	req := httptest.NewRequest(http.MethodPost, "/ns/default", nil)
	req.Header.Set("ce-specversion", "1.0")
	req.Header.Set("ce-benchin", "42")
	if got := stampedHeader(t, req); got != "42" {
		t.Fatalf("stamp = %q, want the first one (42)", got)
	}
}

func TestStampLeavesNonBinaryRequestsAlone(t *testing.T) {
	req := httptest.NewRequest(http.MethodPost, "/ns/default", nil)
	req.Header.Set("Content-Type", "application/cloudevents+json")
	if got := stampedHeader(t, req); got != "" {
		t.Fatalf("a structured request got stamp %q", got)
	}
}

func TestStampFlag(t *testing.T) {
	c, err := parseConfig([]string{"--manifests", "x", "--ingress-port", "1"})
	if err != nil || c.stampExtension != "" {
		t.Fatalf("off by default: %+v, %v", c, err)
	}
	c, err = parseConfig([]string{"--manifests", "x", "--ingress-port", "1", "--stamp-ingress-extension", "benchin"})
	if err != nil || c.stampExtension != "benchin" {
		t.Fatalf("--stamp-ingress-extension benchin: %+v, %v", c, err)
	}
	for _, bad := range []string{"Bench", "bench-in", "type", "abcdefghijklmnopqrstu"} {
		if _, err := parseConfig([]string{"--manifests", "x", "--stamp-ingress-extension", bad}); err == nil {
			t.Errorf("--stamp-ingress-extension %q accepted", bad)
		}
	}
}
