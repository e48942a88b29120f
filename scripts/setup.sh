#!/usr/bin/env bash
# Installs everything spright-rs needs on a fresh Debian machine (run as root):
# the eBPF toolchain, the real peers the tests and benchmarks run against, and Knative's own
# binaries as the oracle. Safe to run again: it skips what is already there.
set -euo pipefail
# Toolchains where this kind of machine installs them, in case PATH lacks them.
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin:$HOME/go/bin"

APT_PACKAGES=(
  clang-19 llvm-19 libbpf-dev linux-libc-dev bpftool   # eBPF programs, built from source by ebpf/build.rs
  iproute2 util-linux                                   # network namespaces, setpriv (capability tests)
  wrk nginx-light                                       # load generator and the reverse-proxy peer
  mosquitto mosquitto-clients                           # the real MQTT broker in tests
  openssl curl ca-certificates                          # test certificates, the run script
  protobuf-compiler                                     # protoc for prost builds
)
# Knative's binaries, the oracle the differential tests and benchmarks compare against.
GO_BINARIES=(
  "knative.dev/serving/cmd/queue@v0.50.0"         # queue-proxy of Knative v1.23.0
  "knative.dev/eventing/cmd/mqttsource@v0.49.2"   # the MQTT source prototype of Knative eventing v1.22.2
)

log() { printf 'setup: %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  [[ "$p" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    log "missing Debian packages: ${missing[*]}; run this script as root"
    exit 1
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian starts packaged daemons on install where it can; the tests start their own on loopback.
for svc in mosquitto nginx; do
  if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done

export GOBIN="${GOBIN:-$HOME/go/bin}"
mkdir -p "$GOBIN"
# `go install pkg@version` first; where the module proxy refuses the version-list lookup that
# go install makes (seen for knative.dev/eventing), build the same version inside a throwaway
# module that requires it.
go_build_pinned() {
  local mod=$1 pkg=${1%@*} ver=${1#*@} bin=$2 dir
  dir=$(mktemp -d)
  (
    cd "$dir"
    go mod init spright-oracle >/dev/null 2>&1
    printf '//go:build tools\npackage tools\nimport _ "%s"\n' "$pkg" > tools.go
    go get "$pkg@$ver" >/dev/null
    go build -o "$bin" "$pkg"
  )
  local rc=$?
  rm -rf "$dir"
  return $rc
}
for mod in "${GO_BINARIES[@]}"; do
  bin="$GOBIN/$(basename "${mod%@*}")"
  if [[ ! -x "$bin" ]]; then
    log "go install $mod"
    if ! (cd /tmp && GOFLAGS=-mod=mod go install "$mod"); then
      log "go install refused; building $mod in a throwaway module"
      go_build_pinned "$mod" "$bin"
    fi
  fi
done

# The broker oracle (oracle/knative-broker): Knative's own mt-broker-ingress/filter handlers
# run without an API server, for broker-shm's drop-in tests. Rebuilt when a source is newer.
oracle_src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/oracle/knative-broker"
oracle_bin="$GOBIN/knative-broker-oracle"
if [[ ! -x "$oracle_bin" || -n $(find "$oracle_src" -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -newer "$oracle_bin" -print -quit) ]]; then
  log "go build knative-broker-oracle (oracle/knative-broker)"
  (cd "$oracle_src" && GOFLAGS=-mod=mod go build -o "$oracle_bin" .)
fi

# The activator oracle (oracle/knative-activator): Knative's own activator handler chain and
# Throttler run without an API server, for activator-lite/tests/oracle.rs. Same rebuild rule.
act_oracle_src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/oracle/knative-activator"
act_oracle_bin="$GOBIN/knative-activator-oracle"
if [[ ! -x "$act_oracle_bin" || -n $(find "$act_oracle_src" -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -newer "$act_oracle_bin" -print -quit) ]]; then
  log "go build knative-activator-oracle (oracle/knative-activator)"
  (cd "$act_oracle_src" && GOFLAGS=-mod=mod go build -o "$act_oracle_bin" .)
fi

# The fuzz targets (fuzz/, run by scripts/fuzz.sh) need the nightly toolchain and cargo-fuzz.
if ! cargo +nightly --version >/dev/null 2>&1; then
  log "rustup toolchain install nightly"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  log "cargo install cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# bpffs for pinned maps (the loader mounts it too, this makes it visible to bpftool early).
if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
  mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf 2>/dev/null || log "could not mount bpffs at /sys/fs/bpf (needs root)"
fi
log "ready"
