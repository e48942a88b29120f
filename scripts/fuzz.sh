#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ and runs each for FUZZ_SECONDS (default 20),
# one after the other, starting from the committed seed corpus in fuzz/corpus/<target>/.
# The corpus is copied to a temporary directory first, so nothing is written into the
# repository. Exits non-zero when any target crashes (panic, sanitizer report, hang longer
# than FUZZ_TIMEOUT seconds on one input, or a failed build); each crash input is printed
# in base64 and, when FUZZ_ARTIFACTS is set, copied to $FUZZ_ARTIFACTS/<target>/.
#
# Needs (scripts/setup.sh): the nightly toolchain, cargo-fuzz and a C++ compiler:
#   rustup toolchain install nightly --profile minimal
#   cargo install cargo-fuzz --locked
#   (g++, or clang++-19 from the eBPF toolchain)
# Optional environment: FUZZ_SECONDS, FUZZ_TARGETS (space-separated subset),
# FUZZ_TIMEOUT (default 10), CARGO_TARGET_DIR (default fuzz/target), FUZZ_ARTIFACTS,
# FUZZ_SANITIZER (default address; "none" builds faster and runs about twice as many
# inputs, still catching panics, hangs and failed assertions).
# Reproduce a crash: cd fuzz && cargo +nightly fuzz run <target> <file>
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${FUZZ_SECONDS:-20}
per_input_timeout=${FUZZ_TIMEOUT:-10}
sanitizer=${FUZZ_SANITIZER:-address}
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

die() {
    echo "fuzz.sh: $*" >&2
    echo "fuzz: 0 targets, 1 crashes"
    exit 2
}

command -v cargo >/dev/null || die "cargo not found: run scripts/setup.sh"
cargo +nightly --version >/dev/null 2>&1 ||
    die "no nightly toolchain: rustup toolchain install nightly --profile minimal"
cargo +nightly fuzz --version >/dev/null 2>&1 ||
    die "cargo-fuzz missing: cargo install cargo-fuzz --locked"
[[ $seconds =~ ^[0-9]+$ ]] || die "FUZZ_SECONDS must be a whole number of seconds, got '$seconds'"
[[ $sanitizer =~ ^(address|leak|none)$ ]] ||
    die "FUZZ_SANITIZER must be address, leak or none, got '$sanitizer'"

# libfuzzer-sys compiles libFuzzer (C++17): g++ when installed, else the clang++-19 that
# scripts/setup.sh installs for the eBPF programs.
if [[ -z ${CXX:-} ]] && ! command -v c++ >/dev/null && command -v clang++-19 >/dev/null; then
    export CXX=clang++-19
fi

cd "$root/fuzz"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/fuzz/target}
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')

if [[ -n ${FUZZ_TARGETS:-} ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
((${#targets[@]} > 0)) || die "no fuzz targets found"

work=$(mktemp -d "${TMPDIR:-/tmp}/spright-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
export SPRIGHT_FUZZ_TMP=$work

build_start=$SECONDS
# -O: release, as deployed. Without FUZZ_TARGETS one build makes every target.
build=(cargo +nightly fuzz build -O --sanitizer "$sanitizer")
if [[ -n ${FUZZ_TARGETS:-} ]]; then
    for t in "${targets[@]}"; do
        "${build[@]}" "$t" >>"$work/build.log" 2>&1 || {
            tail -n 40 "$work/build.log" >&2
            die "building fuzz target $t failed"
        }
    done
elif ! "${build[@]}" >"$work/build.log" 2>&1; then
    tail -n 40 "$work/build.log" >&2
    die "building the fuzz targets failed"
fi
echo "fuzz.sh: built ${#targets[@]} targets in $((SECONDS - build_start)) s" >&2

crashes=0
crashed=()
for t in "${targets[@]}"; do
    bin=$CARGO_TARGET_DIR/$triple/release/$t
    [[ -x $bin ]] || die "target $t was not built ($bin)"
    mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
    if [[ -d corpus/$t ]]; then
        cp -R "corpus/$t/." "$work/corpus/$t/"
    fi
    start=$SECONDS
    # stdout: the request-log targets print their rendered lines; libFuzzer reports on stderr.
    set +e
    "$bin" -max_total_time="$seconds" -timeout="$per_input_timeout" -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$work/artifacts/$t/" \
        "$work/corpus/$t" >/dev/null 2>"$work/$t.log"
    rc=$?
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -n 1)
    if ((rc != 0)); then
        crashes=$((crashes + 1))
        crashed+=("$t")
        echo "fuzz.sh: $t CRASHED (exit $rc) after $((SECONDS - start)) s:" >&2
        # The panic message (or sanitizer/timeout report) and the input, without libFuzzer's
        # progress lines and the long abort backtrace.
        grep -E -A 3 "panicked at|^==[0-9]+==ERROR|ALARM|out-of-memory|^SUMMARY" "$work/$t.log" |
            grep -v '^    #' | head -n 30 >&2 || true
        for a in "$work/artifacts/$t"/*; do
            [[ -f $a ]] || continue
            echo "fuzz.sh: $t input $(basename "$a") (base64):" >&2
            base64 -w 0 "$a" >&2
            echo >&2
        done
        if [[ -n ${FUZZ_ARTIFACTS:-} ]]; then
            mkdir -p "$FUZZ_ARTIFACTS/$t"
            cp -R "$work/artifacts/$t/." "$FUZZ_ARTIFACTS/$t/"
        fi
    else
        echo "fuzz.sh: $t ok: ${runs:-?} inputs in $((SECONDS - start)) s" >&2
    fi
done

if ((crashes > 0)); then
    echo "fuzz.sh: crashed: ${crashed[*]}" >&2
fi
echo "fuzz: ${#targets[@]} targets, $crashes crashes"
((crashes == 0))
