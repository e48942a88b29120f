#!/usr/bin/env bash
# The main job: installs what is needed, builds, and runs the local stack on 127.0.0.1 with
# embedded defaults, in edge mode (no Kubernetes):
#
#   MQTT device -> mqtt-adaptor (embedded rumqttd) -> broker-shm ingress -> mmap log -> triggers
#       -> HTTP subscriber (spright-sample-display; retries, dead letter)
#       -> shm function `motion` (spright-sample-motion) -> reply -> trigger -> display
#   client -> activator-lite -> queue-proxy-ebpf -> user app (spright-sample-motion http)
#       stats: queue-proxy-ebpf :9090 (Knative's Stat, protobuf) and :9091 request metrics
#   client -> spright-gateway -> the four-function motion chain over shared memory
#
# It sends samples down every path, prints what happens, checks it, and keeps serving until
# Ctrl-C; on exit it stops every process it started. Logs: <run dir>/logs/<component>.log.
#
#   ONCE=1             stop after the samples; exit 0 only if every sample behaved as expected
#   SKIP_SETUP=1       do not run scripts/setup.sh
#   SPRIGHT_PROFILE    release (default) or debug
#   SPRIGHT_RUN_DIR    run directory (default: a new /tmp/spright-run.XXXXXX)
#   ports: SPRIGHT_LISTEN (gateway, 127.0.0.1:8080), BROKER_PORT (8081), BROKER_METRICS_PORT
#   (9092), MQTT_PORT (1883), MQTT_ADAPTOR_PORT (8082), APP_PORT (8083), DISPLAY_PORT (8084),
#   ACTIVATOR_PORT (8012), ACTIVATOR_H2C_PORT (8013), ACTIVATOR_METRICS_PORT (9093),
#   ACTIVATOR_PROFILING_PORT (8008), QUEUE_SERVING_PORT (8092), QUEUE_ADMIN_PORT (8022),
#   QUEUE_METRICS_PORT (9090), QUEUE_USER_METRICS_PORT (9091)
set -euo pipefail
# Toolchains where this kind of machine installs them, in case PATH lacks them.
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin:$HOME/go/bin"
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { printf '%s\n' "$*"; }
die() {
  printf 'run-stack: %s\n' "$*" >&2
  exit 1
}

if [[ -z "${SKIP_SETUP:-}" ]]; then scripts/setup.sh; fi

PROFILE="${SPRIGHT_PROFILE:-release}"
case "$PROFILE" in
  release) PROFILE_FLAG=(--release) ;;
  debug) PROFILE_FLAG=() ;;
  *) die "SPRIGHT_PROFILE=$PROFILE: use release or debug" ;;
esac
cargo build "${PROFILE_FLAG[@]}" -p spright-gateway -p spright-sample-chain -p broker-shm \
  -p mqtt-adaptor -p activator-lite -p queue-proxy-ebpf
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"

# ---- ports ----------------------------------------------------------------------------
GATEWAY_LISTEN="${SPRIGHT_LISTEN:-127.0.0.1:8080}"
BROKER_PORT="${BROKER_PORT:-8081}"
BROKER_METRICS_PORT="${BROKER_METRICS_PORT:-9092}"
MQTT_PORT="${MQTT_PORT:-1883}"
MQTT_ADAPTOR_PORT="${MQTT_ADAPTOR_PORT:-8082}"
APP_PORT="${APP_PORT:-8083}"
DISPLAY_PORT="${DISPLAY_PORT:-8084}"
ACTIVATOR_PORT="${ACTIVATOR_PORT:-8012}"
ACTIVATOR_H2C_PORT="${ACTIVATOR_H2C_PORT:-8013}"
ACTIVATOR_METRICS_PORT="${ACTIVATOR_METRICS_PORT:-9093}"
ACTIVATOR_PROFILING_PORT="${ACTIVATOR_PROFILING_PORT:-8008}"
QUEUE_SERVING_PORT="${QUEUE_SERVING_PORT:-8092}"
QUEUE_ADMIN_PORT="${QUEUE_ADMIN_PORT:-8022}"
QUEUE_METRICS_PORT="${QUEUE_METRICS_PORT:-9090}"
QUEUE_USER_METRICS_PORT="${QUEUE_USER_METRICS_PORT:-9091}"
# activator-lite reports to Knative's autoscaler; the edge stack has none, so it retries
# (with backoff) against this address and logs that it is not connected.
ACTIVATOR_AUTOSCALER="${ACTIVATOR_AUTOSCALER:-ws://127.0.0.1:8098/}"

PORT_VARS=(BROKER_PORT BROKER_METRICS_PORT MQTT_PORT MQTT_ADAPTOR_PORT APP_PORT DISPLAY_PORT
  ACTIVATOR_PORT ACTIVATOR_H2C_PORT ACTIVATOR_METRICS_PORT ACTIVATOR_PROFILING_PORT
  QUEUE_SERVING_PORT QUEUE_ADMIN_PORT QUEUE_METRICS_PORT QUEUE_USER_METRICS_PORT)
declare -A SEEN=()
check_port() { # check_port VAR PORT
  local var=$1 port=$2 who
  if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    die "$var=$port is not a port number"
  fi
  [[ -z "${SEEN[$port]:-}" ]] || die "$var and ${SEEN[$port]} are both port $port"
  SEEN[$port]=$var
  if command -v ss >/dev/null 2>&1; then
    who=$(ss -Hltnp "sport = :$port" 2>/dev/null || true)
    [[ -z "$who" ]] || die "port $port ($var) is busy: ${who//$'\n'/; }. Stop that process or set $var to a free port."
  elif (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port ($var) is busy. Stop that process or set $var to a free port."
  fi
}
[[ "$GATEWAY_LISTEN" =~ ^(.+):([0-9]+)$ ]] || die "SPRIGHT_LISTEN=$GATEWAY_LISTEN is not host:port"
check_port SPRIGHT_LISTEN "${BASH_REMATCH[2]}"
for v in "${PORT_VARS[@]}"; do check_port "$v" "${!v}"; done

# ---- run directory and manifests -------------------------------------------------------
# A run directory of our own keeps only the logs after exit (the broker's log segments are
# preallocated, 16 MiB each); one given in SPRIGHT_RUN_DIR is left as it is.
OWN_RUN_DIR=""
if [[ -z "${SPRIGHT_RUN_DIR:-}" ]]; then OWN_RUN_DIR=1; fi
RUN_DIR="${SPRIGHT_RUN_DIR:-$(mktemp -d /tmp/spright-run.XXXXXX)}"
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
LOGS="$RUN_DIR/logs"
mkdir -p "$LOGS" "$RUN_DIR/broker" "$RUN_DIR/serving" "$RUN_DIR/broker-data" "$RUN_DIR/shm" \
  "$RUN_DIR/gateway"
DISPLAY_URL="http://127.0.0.1:$DISPLAY_PORT"
render() { # render SRC_DIR DST_DIR: copies the manifests, filling in the @...@ placeholders
  local f
  for f in "$1"/*.yaml; do
    sed -e "s|@DISPLAY_URL@|$DISPLAY_URL|g" \
      -e "s|@QUEUE_SERVING_PORT@|$QUEUE_SERVING_PORT|g" \
      -e "s|@QUEUE_ADMIN_PORT@|$QUEUE_ADMIN_PORT|g" "$f" >"$2/$(basename "$f")"
  done
}
render config/stack/broker "$RUN_DIR/broker"
render config/stack/serving "$RUN_DIR/serving"

# ---- process management ----------------------------------------------------------------
PIDS=()
NAMES=()
stop_all() {
  local i pid
  trap - EXIT INT TERM
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    # Each component runs in its own process group (setsid), with whatever it spawned.
    kill -TERM -- "-${PIDS[i]}" 2>/dev/null || true
  done
  for _ in $(seq 1 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n "$OWN_RUN_DIR" ]]; then rm -rf "$RUN_DIR/broker-data" "$RUN_DIR/shm" "$RUN_DIR/gateway"; fi
}
trap 'stop_all' EXIT
trap 'say; say "stopping the stack"; exit 130' INT
trap 'say; say "stopping the stack"; exit 143' TERM

start() { # start NAME CMD...: runs CMD in its own process group, output to $LOGS/NAME.log
  local name=$1
  shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  PIDS+=($!)
  NAMES+=("$name")
}
died() { # died NAME PID: fails with the tail of the component's log if it exited
  if ! kill -0 "$2" 2>/dev/null; then
    say "---- last lines of $LOGS/$1.log" >&2
    tail -n 20 "$LOGS/$1.log" >&2 || true
    die "$1 exited during start-up (log above: $LOGS/$1.log)"
  fi
}
wait_for() { # wait_for NAME SECONDS CMD...: until CMD succeeds, or NAME dies or time runs out
  local name=$1 secs=$2 pid="${PIDS[-1]}" i
  shift 2
  for ((i = 0; i < secs * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    died "$name" "$pid"
    sleep 0.1
  done
  say "---- last lines of $LOGS/$name.log" >&2
  tail -n 20 "$LOGS/$name.log" >&2 || true
  die "$name did not become ready within ${secs}s (log: $LOGS/$name.log)"
}
http_ok() { curl -sf -o /dev/null --max-time 2 "$@"; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

say
say "== starting the local stack (logs in $LOGS)"

# The HTTP subscriber of the broker's triggers, and the broker's dead-letter sink.
start display "$BIN/spright-sample-display" "127.0.0.1:$DISPLAY_PORT"
wait_for display 20 http_ok "$DISPLAY_URL/healthz"

# broker-shm in edge mode, with the shared-memory function `motion` as a trigger subscriber.
start broker-shm "$BIN/broker-shm" --manifests "$RUN_DIR/broker" --data-dir "$RUN_DIR/broker-data" \
  --port "$BROKER_PORT" --metrics-port "$BROKER_METRICS_PORT" \
  --shm-functions motion --shm-run-dir "$RUN_DIR/shm"
BROKER_PID="${PIDS[-1]}"
wait_for broker-shm 30 http_ok "http://127.0.0.1:$BROKER_PORT/healthz"
wait_for broker-shm 10 test -S "$RUN_DIR/shm/control.sock"
start motion-fn env SPRIGHT_CONTROL="$RUN_DIR/shm/control.sock" SPRIGHT_FUNCTION=motion \
  "$BIN/spright-sample-motion" shm
joined() {
  died broker-shm "$BROKER_PID"
  grep -q "shared-memory function joined" "$LOGS/broker-shm.log"
}
wait_for motion-fn 20 joined

# mqtt-adaptor with its embedded rumqttd (MQTT 5), posting to the broker's ingress.
INGRESS_URL="http://127.0.0.1:$BROKER_PORT/demo/default"
start mqtt-adaptor "$BIN/mqtt-adaptor" --embedded-listen "127.0.0.1:$MQTT_PORT" \
  --http-port "$MQTT_ADAPTOR_PORT" --topic 'sensors/#' --sink "$INGRESS_URL"
wait_for mqtt-adaptor 30 http_ok "http://127.0.0.1:$MQTT_ADAPTOR_PORT/readyz"

# The user app, queue-proxy-ebpf in front of it (the environment Knative sets), and
# activator-lite in front of that, learning the revision's pod from the manifests.
start app "$BIN/spright-sample-motion" http "127.0.0.1:$APP_PORT"
wait_for app 20 http_ok "http://127.0.0.1:$APP_PORT/"
# As root the sidecar loads the in-kernel request accounting itself (standalone). Knative's
# 30 s drain quiet period (45 s for the activator) lets load balancers notice a terminating
# pod; on one machine 1 s is enough, so Ctrl-C stops the stack quickly.
QP_ACCOUNTING="${SPRIGHT_ACCOUNTING:-$([[ $(id -u) -eq 0 ]] && echo standalone || echo userspace)}"
start queue-proxy env SERVING_NAMESPACE=demo SERVING_SERVICE=motion SERVING_CONFIGURATION=motion \
  SERVING_REVISION=motion-00001 SERVING_POD=motion-00001-deployment-local-0 \
  SERVING_POD_IP=127.0.0.1 QUEUE_SERVING_PORT="$QUEUE_SERVING_PORT" \
  QUEUE_SERVING_TLS_PORT=$((QUEUE_SERVING_PORT + 100)) USER_PORT="$APP_PORT" \
  CONTAINER_CONCURRENCY=0 REVISION_TIMEOUT_SECONDS=300 SERVING_LOGGING_CONFIG= \
  SERVING_LOGGING_LEVEL= SYSTEM_NAMESPACE=knative-serving ENABLE_HTTP2_AUTO_DETECTION=false \
  ENABLE_MULTI_CONTAINER_PROBES=false \
  SERVING_READINESS_PROBE="{\"tcpSocket\":{\"port\":$APP_PORT,\"host\":\"127.0.0.1\"},\"successThreshold\":1}" \
  OBSERVABILITY_CONFIG='{"requestMetrics":{"protocol":"prometheus"}}' \
  QUEUE_ADMIN_PORT="$QUEUE_ADMIN_PORT" QUEUE_AUTOSCALING_METRICS_PORT="$QUEUE_METRICS_PORT" \
  QUEUE_USER_METRICS_PORT="$QUEUE_USER_METRICS_PORT" SPRIGHT_ACCOUNTING="$QP_ACCOUNTING" \
  SPRIGHT_DRAIN_QUIET_PERIOD="${QUEUE_DRAIN_QUIET_PERIOD:-1s}" \
  "$BIN/queue-proxy-ebpf"
# The activator's own readiness probe: answered "queue" once the app is ready, never proxied
# (so it is not counted as a request).
qp_ready() {
  [[ "$(curl -s --max-time 2 -A Knative-Activator-Probe -H 'K-Network-Probe: queue' \
    "http://127.0.0.1:$QUEUE_SERVING_PORT/")" == queue ]]
}
wait_for queue-proxy 30 qp_ready
start activator env POD_NAME=activator-local-0 POD_IP=127.0.0.1 SYSTEM_NAMESPACE=knative-serving \
  "$BIN/activator-lite" --manifests "$RUN_DIR/serving" --autoscaler "$ACTIVATOR_AUTOSCALER" \
  --bind 127.0.0.1 --http1-port "$ACTIVATOR_PORT" --h2c-port "$ACTIVATOR_H2C_PORT" \
  --metrics-port "$ACTIVATOR_METRICS_PORT" --profiling-port "$ACTIVATOR_PROFILING_PORT" \
  --drain-timeout-secs 1
wait_for activator 30 listening "$ACTIVATOR_PORT"

# The spright gateway with the sample four-function chain over shared memory.
start gateway "$BIN/spright-gateway" --chain config/chains/motion.yaml --listen "$GATEWAY_LISTEN" \
  --run-dir "$RUN_DIR/gateway" --access-log
wait_for gateway 30 http_ok "http://$GATEWAY_LISTEN/healthz"

say "   started: ${NAMES[*]}"
transport() { # the dataplane transport a shared-memory host chose (sk_msg or unix) and why
  local line
  line=$(grep -m1 '"dataplane transport selected"' "$LOGS/$1.log" || true)
  [[ "$line" =~ \"reason\":\"([^\"]*)\".*\"transport\":\"([^\"]*)\" ]] &&
    printf '%s (%s)' "${BASH_REMATCH[2]}" "${BASH_REMATCH[1]}"
}
say "   descriptors: broker-shm <-> motion over $(transport broker-shm); gateway chain over $(transport gateway)"
if grep -q '"request accounting in the kernel"' "$LOGS/queue-proxy.log"; then
  say "   queue-proxy-ebpf request accounting: in the kernel (eBPF, loaded by the sidecar: $QP_ACCOUNTING)"
else
  say "   queue-proxy-ebpf request accounting: in the proxy ($QP_ACCOUNTING)"
fi

# ---- samples ---------------------------------------------------------------------------
FAILED=()
check() { # check WHAT CONDITION-CMD...: prints ok/FAILED for one expectation
  local what=$1
  shift
  if "$@"; then
    say "   ok: $what"
  else
    say "   FAILED: $what"
    FAILED+=("$what")
  fi
}
contains() { [[ "$1" == *"$2"* ]]; }
indent() { sed 's/^/     /'; }
metric() { # metric URL NAME{LABELS}: the value of one Prometheus sample, or empty
  curl -s --max-time 2 "$1" | awk -v k="$2" '$1 == k { print $2; exit }'
}
eventually() { # eventually SECONDS CMD...: retries CMD every 0.1 s
  local i
  for ((i = 0; i < $1 * 10; i++)); do
    "${@:2}" && return 0
    sleep 0.1
  done
  return 1
}
metric_is() { [[ "$(metric "$1" "$2")" == "$3" ]]; }
DISPLAY_METRICS="$DISPLAY_URL/metrics"
BROKER_METRICS="http://127.0.0.1:$BROKER_METRICS_PORT/metrics"
MOTION_BODY=$(for i in $(seq 0 63); do if [ "$i" = 32 ]; then echo "0.01,-0.02,3.0"; else echo "0.01,-0.02,1.0"; fi; done)

say
say "== MQTT: a device publishes 64 accelerometer samples with one jolt (QoS 1, topic sensors/dev1/accel)"
mosquitto_pub -V mqttv5 -h 127.0.0.1 -p "$MQTT_PORT" -q 1 -i spright-demo-device \
  -t sensors/dev1/accel -m "$MOTION_BODY"
check "the event reached the HTTP subscriber (trigger sensor-to-display)" \
  eventually 15 metric_is "$DISPLAY_METRICS" 'spright_sample_display_events_total{path="/sensor",type="dev.spright.mqtt.message"}' 1
check "the shm function's reply reached the subscriber (sensor-to-motion -> motion -> motion-to-display)" \
  eventually 15 metric_is "$DISPLAY_METRICS" 'spright_sample_display_events_total{path="/motion",type="dev.spright.sample.motion"}' 1
say "   what the subscriber received (path, type, data; full JSON lines in $LOGS/display.log):"
received() { # one line per event from the display's JSON log (its fields come in name order)
  grep '"event received"' "$LOGS/display.log" |
    sed -E -e 's/.*"data":"(([^"\\]|\\.)*)".*"path":"([^"]*)".*"type":"([^"]*)".*/\3  \4  \1/' \
      -e 's/\\"/"/g' |
    cut -c1-150 | indent || true
}
received
reply_says_motion() { grep '"path":"/motion"' "$LOGS/display.log" | grep -q '\\"motion\\":true'; }
check "the function's reply says motion was detected" reply_says_motion

say
say "== MQTT: a malformed reading; the function refuses it (400), the broker dead-letters it"
mosquitto_pub -V mqttv5 -h 127.0.0.1 -p "$MQTT_PORT" -q 1 -i spright-demo-device \
  -t sensors/dev1/accel -m $'0,0,1\n0,oops,1\n'
check "the event reached the HTTP subscriber" \
  eventually 15 metric_is "$DISPLAY_METRICS" 'spright_sample_display_events_total{path="/sensor",type="dev.spright.mqtt.message"}' 2
check "the refused event reached the dead-letter sink" \
  eventually 15 metric_is "$DISPLAY_METRICS" 'spright_sample_display_events_total{path="/dead-letter",type="dev.spright.mqtt.message"}' 1
say "   what the subscriber received:"
received | tail -n 2
say "   broker-shm metrics (:$BROKER_METRICS_PORT):"
curl -s "$BROKER_METRICS" | grep -E '^broker_shm_(ingress_requests|deliveries|replies)_total' | indent || true
broker_counted() {
  local m
  m=$(curl -s --max-time 2 "$BROKER_METRICS")
  grep -q '^broker_shm_ingress_requests_total{broker="[^"]*default",code="202"} 2$' <<<"$m" &&
    grep -q '^broker_shm_deliveries_total{trigger="demo[.]sensor-to-motion[.][^"]*",outcome="delivered"} 1$' <<<"$m" &&
    grep -q '^broker_shm_deliveries_total{trigger="demo[.]sensor-to-motion[.][^"]*",outcome="dead_lettered"} 1$' <<<"$m" &&
    grep -q '^broker_shm_replies_total{trigger="demo[.]sensor-to-motion[.][^"]*",outcome="stored"} 1$' <<<"$m"
}
check "broker-shm counted 2 ingress 202s, a delivery, a dead letter and a stored reply for the function" \
  eventually 5 broker_counted

say
say "== HTTP: POST through activator-lite (:$ACTIVATOR_PORT) -> queue-proxy-ebpf (:$QUEUE_SERVING_PORT) -> app (:$APP_PORT)"
answer=$(curl -s --max-time 30 -w '\n%{http_code}' -H 'Knative-Serving-Namespace: demo' \
  -H 'Knative-Serving-Revision: motion-00001' --data-binary "$MOTION_BODY" \
  "http://127.0.0.1:$ACTIVATOR_PORT/") || true
body=${answer%$'\n'*}
say "   answer: ${body%$'\n'}   (HTTP ${answer##*$'\n'})"
check "the app answered 200 with motion detected" contains "$answer" $'"motion":true'
check "the app answered 200" contains "${answer##*$'\n'}" 200
stat() {
  curl -s --max-time 2 "http://127.0.0.1:$QUEUE_METRICS_PORT/metrics" |
    protoc --decode=spright.stack.Stat -I config/stack config/stack/stat.proto 2>/dev/null
}
# proto3 leaves zero fields out: the line is there only when the window counted requests.
stat_counted() { STAT=$(stat) && grep -q '^proxied_request_count: ' <<<"$STAT"; }
STAT=""
check "queue-proxy's :$QUEUE_METRICS_PORT Stat counted the request as proxied by the activator" \
  eventually 5 stat_counted
say "   queue-proxy :$QUEUE_METRICS_PORT/metrics (the autoscaler's Stat, protobuf, decoded; counts are"
say "   per second over the last 1 s window, and one request may straddle two windows):"
indent <<<"$STAT"
say "   queue-proxy :$QUEUE_USER_METRICS_PORT/metrics (request metrics):"
USER_METRICS=$(curl -s --max-time 2 "http://127.0.0.1:$QUEUE_USER_METRICS_PORT/metrics" |
  grep -E '^kn_serving_invocation_duration_seconds_(count|sum)' || true)
indent <<<"$USER_METRICS"
check "queue-proxy's :$QUEUE_USER_METRICS_PORT request metrics counted one 200" \
  grep -qE '^kn_serving_invocation_duration_seconds_count[{].*http_response_status_code="200".*[}] 1$' <<<"$USER_METRICS"
say "   activator-lite :$ACTIVATOR_METRICS_PORT/metrics (no autoscaler runs in the edge stack, hence reachable 0):"
curl -s "http://127.0.0.1:$ACTIVATOR_METRICS_PORT/metrics" | grep -v '^#' | head -n 8 | indent || true

say
say "== gateway: 64 accelerometer samples with one jolt, through the shared-memory chain"
gw() { # gw BODY: prints the answer and sets GW_CODE / GW_BODY
  local out
  out=$(curl -s --max-time 10 -w '\n%{http_code}' --data-binary "$1" "http://$GATEWAY_LISTEN/motion") || true
  GW_BODY=${out%$'\n'*}
  GW_BODY=${GW_BODY%$'\n'}
  GW_CODE=${out##*$'\n'}
  say "   answer: $GW_BODY   (HTTP $GW_CODE)"
}
gw "$MOTION_BODY"
check "200 with motion detected" contains "$GW_CODE $GW_BODY" $'200 {"motion":true'
say "== gateway: a sensor at rest"
gw $'0,0,1\n0,0,1\n0,0,1\n'
check "200 with no motion" contains "$GW_CODE $GW_BODY" $'200 {"motion":false'
say "== gateway: a malformed reading"
gw $'0,0,1\n0,oops,1\n'
check "400 for the malformed reading" test "$GW_CODE" = 400
say "== gateway metrics"
curl -s "http://$GATEWAY_LISTEN/metrics" | grep -v '^#' | sed 's/^/   /' || true

say
for i in "${!PIDS[@]}"; do
  kill -0 "${PIDS[i]}" 2>/dev/null || FAILED+=("${NAMES[i]} is no longer running")
done
if ((${#FAILED[@]})); then
  say "run-stack: ${#FAILED[@]} expectation(s) failed:" >&2
  printf '  - %s\n' "${FAILED[@]}" >&2
  say "logs: $LOGS" >&2
  exit 1
fi
say "all samples behaved as expected (logs: $LOGS)"
if [[ -n "${ONCE:-}" ]]; then exit 0; fi

cat <<EOF

The stack is serving until Ctrl-C. Try:
  # an MQTT device; the event display's log and counters, the broker's counters
  mosquitto_pub -V mqttv5 -p $MQTT_PORT -q 1 -t sensors/dev2/accel -m \$'0,0,1\\n0,0,3\\n0,0,1'
  tail -f $LOGS/display.log
  curl -s $DISPLAY_METRICS; curl -s $BROKER_METRICS | grep _total
  # a request through activator-lite -> queue-proxy-ebpf -> the app, then queue-proxy's Stat
  curl -s -H 'Knative-Serving-Namespace: demo' -H 'Knative-Serving-Revision: motion-00001' \\
    --data-binary \$'0,0,1\\n0,0,3\\n0,0,1' http://127.0.0.1:$ACTIVATOR_PORT/
  curl -s http://127.0.0.1:$QUEUE_METRICS_PORT/metrics | protoc --decode=spright.stack.Stat -I $ROOT/config/stack $ROOT/config/stack/stat.proto
  # the gateway's shared-memory chain
  printf '0,0,1\\n0,0,3\\n0,0,1\\n' | curl --data-binary @- http://$GATEWAY_LISTEN/motion
EOF
# Keep serving; a component that exits ends the run with its name.
set +e
wait -n "${PIDS[@]}"
for i in "${!PIDS[@]}"; do
  kill -0 "${PIDS[i]}" 2>/dev/null || die "${NAMES[i]} exited; see $LOGS/${NAMES[i]}.log"
done
