package main

import "testing"

func TestDispatcherConnectionPoolFromEnv(t *testing.T) {
	c, err := parseConfig([]string{"--manifests", "x", "--channel-port", "1"})
	if err != nil || c.maxIdleConns != 1000 || c.maxIdleConnsPerHost != 1000 {
		t.Fatalf("stock dispatcher defaults: %+v, %v", c, err)
	}
	t.Setenv("MAX_IDLE_CONNS_PER_HOST", "50")
	if c, err = parseConfig([]string{"--manifests", "x", "--channel-port", "1"}); err != nil || c.maxIdleConnsPerHost != 50 {
		t.Fatalf("MAX_IDLE_CONNS_PER_HOST=50: %+v, %v", c, err)
	}
	for _, bad := range []string{"0", "-1", "many"} {
		t.Setenv("MAX_IDLE_CONNS", bad)
		if _, err := parseConfig([]string{"--manifests", "x", "--channel-port", "1"}); err == nil {
			t.Errorf("MAX_IDLE_CONNS=%s accepted", bad)
		}
	}
}
