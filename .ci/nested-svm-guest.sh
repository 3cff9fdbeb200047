#!/bin/bash
# Runs inside the nested-SVM guest (chrooted into the host's root, shared
# read-only over virtio-9p); .ci/nested-svm-init starts it. Runs the tests
# listed in RESULTS/queue one at a time and appends "START id" and
# "END id rc seconds" lines to RESULTS/progress, which the host driver
# (.ci/nested-svm.py) watches. Each test's output goes to RESULTS/logs/id.log.
#
# Queue lines: id<TAB>kind<TAB>path<TAB>name, kind "test" (a libtest binary
# run with --exact name) or "example" (a program run without arguments).
set -u
RESULTS="$1"
cd "$(dirname "$0")/.." || exit 1

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp TMPDIR=/tmp
# Backtraces take seconds under the emulator.
export RUST_BACKTRACE=0
# A test that cannot open /dev/kvm fails instead of skipping.
export SNAPVM_REQUIRE_KVM=1
# QEMU TCG checks the TSS I/O-permission bitmap only for an available TSS
# (type 9); real CPUs and KVM use a busy one (type 11). Without this switch
# every CPL3 `out` (every hypercall) faults under TCG. Emulator only.
export SNAPVM_TCG_AVAILABLE_TSS=1

mkdir -p "$RESULTS/logs"
echo "RUNNER $(uname -r) $(nproc) cpu(s)" >> "$RESULTS/progress"
while IFS=$'\t' read -r id kind path name; do
    [ -n "$id" ] || continue
    echo "START $id" >> "$RESULTS/progress"
    start=$(date +%s.%N)
    case "$kind" in
        test) "$path" --exact "$name" --test-threads=1 > "$RESULTS/logs/$id.log" 2>&1 < /dev/null ;;
        example) "$path" > "$RESULTS/logs/$id.log" 2>&1 < /dev/null ;;
        *) echo "unknown kind $kind" > "$RESULTS/logs/$id.log"; false ;;
    esac
    rc=$?
    end=$(date +%s.%N)
    echo "END $id $rc $(echo "$end - $start" | awk '{print $1 - $3}')" >> "$RESULTS/progress"
done < "$RESULTS/queue"
echo "DONE" >> "$RESULTS/progress"
