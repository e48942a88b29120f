#!/usr/bin/env bash
# The whole test suite: installs what is needed, checks formatting and lints, builds every
# binary, runs every test (unit, kernel eBPF, end-to-end against the real peers), runs the
# main job (scripts/run-stack.sh) once, then fuzzes every parser for a short while
# (scripts/fuzz.sh).
# Needs root (the eBPF and network-namespace tests load real programs).
set -euo pipefail
# Toolchains where this kind of machine installs them, in case PATH lacks them.
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin:$HOME/go/bin"
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/go/bin:$PATH"
if [[ $(id -u) -ne 0 ]]; then
  echo "test.sh: the eBPF tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run as root" >&2
  exit 1
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Binaries first: the end-to-end tests start the real executables from target/debug.
cargo build --workspace --bins --locked
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee /tmp/spright-test.log
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' /tmp/spright-test.log | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' /tmp/spright-test.log | awk '{s+=$1} END {print s+0}')
# The main job itself (README's first command) as a smoke test, after the tests (it binds the
# components' default ports, which some tests use too): every path of the local stack,
# ONCE=1 fails unless every sample behaved as expected.
set +e
SPRIGHT_PROFILE=debug SKIP_SETUP=1 ONCE=1 scripts/run-stack.sh >/tmp/spright-stack.log 2>&1
stack_status=$?
set -e
if [[ "$stack_status" -ne 0 ]]; then
  tail -40 /tmp/spright-stack.log
  echo "stack: scripts/run-stack.sh failed (exit $stack_status); log in /tmp/spright-stack.log"
else
  echo "stack: scripts/run-stack.sh, every sample as expected"
fi
# Every parser under libFuzzer for FUZZ_SECONDS each (fuzz/README.md); any crash fails the run.
set +e
scripts/fuzz.sh
fuzz_status=$?
set -e
echo "tests: $passed passed, $failed failed"
if [[ "$passed" -eq 0 ]]; then
  echo "test.sh: no test ran" >&2
  exit 1
fi
if [[ "$status" -ne 0 ]]; then exit "$status"; fi
if [[ "$stack_status" -ne 0 ]]; then exit "$stack_status"; fi
exit "$fuzz_status"
