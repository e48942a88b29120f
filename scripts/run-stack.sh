#!/usr/bin/env bash
# The main job: installs what is needed, builds, and runs the local stack with embedded
# defaults. Today that is the spright gateway with the sample 4-function motion-detection chain
# over shared memory (sk_msg when the kernel allows, else Unix sockets). It sends a few sample
# requests, prints what happens, and keeps serving on http://127.0.0.1:8080 until Ctrl-C.
#   ONCE=1 scripts/run-stack.sh   stops after the sample requests.
set -euo pipefail
# Toolchains where this kind of machine installs them, in case PATH lacks them.
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin:$HOME/go/bin"
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p spright-gateway -p spright-sample-chain
LISTEN="${SPRIGHT_LISTEN:-127.0.0.1:8080}"
RUN_DIR="${SPRIGHT_RUN_DIR:-$(mktemp -d /tmp/spright-run.XXXXXX)}"
target/release/spright-gateway --chain config/chains/motion.yaml --listen "$LISTEN" \
  --run-dir "$RUN_DIR" --access-log &
GW=$!
trap 'kill $GW 2>/dev/null; wait $GW 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 100); do
  curl -sf "http://$LISTEN/healthz" >/dev/null 2>&1 && break
  kill -0 $GW 2>/dev/null || { echo "gateway exited; see its log above" >&2; exit 1; }
  sleep 0.1
done
echo
echo "== sample: 64 accelerometer samples with one jolt"
body=$(for i in $(seq 0 63); do if [ "$i" = 32 ]; then echo "0.01,-0.02,3.0"; else echo "0.01,-0.02,1.0"; fi; done)
curl -s -w '   (HTTP %{http_code}, %{time_total}s)\n' --data-binary "$body" "http://$LISTEN/motion"
echo "== sample: a sensor at rest"
curl -s -w '   (HTTP %{http_code})\n' --data-binary $'0,0,1\n0,0,1\n0,0,1\n' "http://$LISTEN/motion"
echo "== sample: a malformed reading"
curl -s -w '   (HTTP %{http_code})\n' --data-binary $'0,0,1\n0,oops,1\n' "http://$LISTEN/motion"
echo "== metrics"
curl -s "http://$LISTEN/metrics" | grep -v '^#'
echo
if [[ -n "${ONCE:-}" ]]; then exit 0; fi
echo "serving the chain at http://$LISTEN/motion (POST x,y,z lines); Ctrl-C to stop"
wait $GW
