#!/usr/bin/env bash
# The nested-SVM stage: snapvm's real test binaries on hardware-virtualized
# KVM (kvm_amd), inside a Linux guest that QEMU's TCG emulator runs with SVM
# exposed (`-cpu max`). See .ci/README.md.
#
#   bash .ci/nested-svm.sh [--only SUBSTRING]...   # as root, on Debian 12
#
# Installs what it needs from Debian's packages (QEMU from the release's
# backports where it can, busybox-static, kmod, cpio), takes a Debian kernel
# image with kvm_amd and virtio-9p out of its package without installing it,
# builds a busybox initramfs, builds the test
# binaries (unless NESTED_SVM_PREBUILT names the JSON of a build already
# made, as .ci/run does) and hands over to .ci/nested-svm.py, which boots the
# guest, runs the tests one at a time and watches it from the host.
#
# Environment:
#   NESTED_SVM_PREBUILT   `cargo test --no-run --message-format=json` output
#                         of a build already made (skip the build here)
#   NESTED_SVM_WORK       work directory (default target/nested-svm)
#   NESTED_SVM_BUDGET     seconds for the whole stage (default 2700 = 45 min)
#   NESTED_SVM_TEST_LIMIT seconds one test may run before it is a hang (300)
#   NESTED_SVM_STALL_LIMIT seconds without a guest heartbeat before the guest
#                         counts as stalled (120)
#   NESTED_SVM_SMP        guest vCPUs (default 1: QEMU then uses one core)
set -euo pipefail
STAGE_START=$(date +%s.%N)
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${NESTED_SVM_WORK:-$REPO/target/nested-svm}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
case "$REPO/" in
    /tmp/*) echo "the repository must not be under /tmp (the guest mounts a tmpfs there)" >&2; exit 2 ;;
esac
case "$WORK/" in
    /tmp/*) echo "NESTED_SVM_WORK must not be under /tmp (the guest mounts a tmpfs there)" >&2; exit 2 ;;
esac
step() { echo "[nested-svm $(date +%H:%M:%S)] $*"; }

# The subset: test binaries (tests/NAME.rs) and the example.
TESTS=(capture lifecycle vm hostile snapshot snapshot_file policy polling transactions)
EXAMPLES=(quickstart)

# --prepare-only: packages, kernel and initramfs, then stop (.ci/run does
# this in the foreground so that no apt-get runs in the background later);
# --prepared: skip that part (done by an earlier --prepare-only).
PHASE=all
case "${1:-}" in
    --prepare-only) PHASE=prepare; shift ;;
    --prepared) PHASE=run; shift ;;
esac

if [ "$PHASE" != run ]; then
step "packages"
export DEBIAN_FRONTEND=noninteractive
APT_INSTALL=(apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends)
need=()
for p in busybox-static kmod cpio; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
# QEMU comes from the release's backports when they can be had (10.x for
# Debian 12, against 7.2 in the release): the stage's results in
# .ci/README.md were measured with it. The backports source is made at run
# time from the machine's own Debian source (same mirror, same key); no
# mirror is named in this repository.
# shellcheck disable=SC1091
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
BPO=${CODENAME:+$CODENAME-backports}
BPO_FILE=/etc/apt/sources.list.d/snapvm-backports.sources
if [ -n "$BPO" ] && [ ! -e "$BPO_FILE" ]; then
    python3 .ci/apt-backports.py "$CODENAME" "$BPO_FILE" ||
        step "no $BPO source made (above): QEMU from $CODENAME"
fi
# The kernel package is looked up (and fetched) even when the tools are
# installed, so the package lists must be current. A backports source made
# here that does not answer is dropped again.
apt_rc=0
apt-get update -qq > "$WORK/apt-update.log" 2>&1 || apt_rc=$?
cat "$WORK/apt-update.log"
if [ -e "$BPO_FILE" ] && { [ $apt_rc != 0 ] || grep -Eq "^(W|E):.*[ /]$BPO[/ ]" "$WORK/apt-update.log"; }; then
    step "$BPO unavailable (above): dropping $BPO_FILE, QEMU from $CODENAME"
    rm -f "$BPO_FILE"
    apt-get update -qq
elif [ $apt_rc != 0 ]; then
    exit 1
fi
if [ ${#need[@]} -gt 0 ]; then
    "${APT_INSTALL[@]}" "${need[@]}" > "$WORK/apt.log" || { cat "$WORK/apt.log"; exit 1; }
fi
# (Not `apt-cache ... | grep -q`: with pipefail, grep's early exit fails it.)
qemu_bpo=0
if [ -n "$BPO" ] && [[ $(apt-cache madison qemu-system-x86) == *" $BPO/"* ]]; then
    # Installs or upgrades; a no-op when the backports version is there.
    if "${APT_INSTALL[@]}" -t "$BPO" qemu-system-x86 > "$WORK/apt.log" 2>&1; then
        qemu_bpo=1
    else
        cat "$WORK/apt.log"
        step "qemu-system-x86 from $BPO failed to install (above)"
    fi
else
    step "no qemu-system-x86 in ${BPO:-backports}"
fi
if [ $qemu_bpo = 0 ]; then
    step "falling back to the release's QEMU (not the version .ci/README.md's results were measured with)"
    dpkg-query -W -f='${Status}\n' qemu-system-x86 2>/dev/null | grep -q 'install ok installed' ||
        { "${APT_INSTALL[@]}" qemu-system-x86 > "$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log"; exit 1; }; }
fi
step "$(qemu-system-x86_64 --version | head -n 1)"

step "kernel"
# linux-image-amd64 depends on the versioned image package (the cloud
# flavour has no 9p modules). Unpacked into the work dir, never installed.
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$KPKG" ] || { echo "no versioned kernel behind linux-image-amd64" >&2; exit 1; }
KVER=${KPKG#linux-image-}
KDIR=$WORK/kernel-$KVER
if [ ! -e "$KDIR/.done" ]; then
    rm -rf "$KDIR" && mkdir -p "$KDIR/deb"
    (cd "$KDIR/deb" && apt-get download "$KPKG" 2>&1 | grep -v 'unsandboxed' || true)
    dpkg-deb -x "$KDIR"/deb/*.deb "$KDIR/root"
    rm -rf "$KDIR/deb"
    depmod -b "$KDIR/root" "$KVER"
    touch "$KDIR/.done"
fi
KERNEL=$KDIR/root/boot/vmlinuz-$KVER

step "initramfs"
IRD=$WORK/initramfs
rm -rf "$IRD" && mkdir -p "$IRD/bin" "$IRD/modules"
cp /bin/busybox "$IRD/bin/busybox"
cp .ci/nested-svm-init "$IRD/init"
chmod 755 "$IRD/init"
: > "$IRD/modules.list"
for m in virtio_pci 9pnet_virtio 9p kvm_amd; do
    modprobe -d "$KDIR/root" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
    base=$(basename "$ko")
    case "$ko" in
        *.ko.xz) xz -dc "$ko" > "$IRD/modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$ko" > "$IRD/modules/${base%.zst}"; base=${base%.zst} ;;
        *) cp "$ko" "$IRD/modules/$base" ;;
    esac
    params=
    [ "$base" = kvm-amd.ko ] && params="npt=1"
    echo "$base $params" >> "$IRD/modules.list"
done
INITRD=$WORK/initramfs.cpio.gz
(cd "$IRD" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD"
echo "KERNEL=$KERNEL" > "$WORK/prepared"
[ "$PHASE" = prepare ] && { step "prepared"; exit 0; }
fi
# shellcheck disable=SC1091
. "$WORK/prepared" || { echo "run .ci/nested-svm.sh --prepare-only first" >&2; exit 2; }
INITRD=$WORK/initramfs.cpio.gz

step "test binaries"
JSON=${NESTED_SVM_PREBUILT:-}
if [ -z "$JSON" ]; then
    JSON=$WORK/build.json
    targets=()
    for t in "${TESTS[@]}"; do targets+=(--test "$t"); done
    cargo test --no-run --message-format=json "${targets[@]}" > "$JSON"
    # Built as programs (`cargo test --example` would build a test harness).
    for e in "${EXAMPLES[@]}"; do
        cargo build --message-format=json --example "$e" >> "$JSON"
    done
fi
# Copies, so that a later build in the same target dir (other features,
# clippy, benches) cannot replace a binary while the guest runs it. The
# guest programs stay where build.rs put them (SNAPVM_GUESTS_DIR).
BIN=$WORK/bin
rm -rf "$BIN" && mkdir -p "$BIN"
python3 - "$JSON" "$BIN" "${TESTS[*]}" "${EXAMPLES[*]}" > "$WORK/plan" <<'EOF'
import json, shutil, sys
path, bindir, tests, examples = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
found = {}
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind, name = m["target"]["kind"][0], m["target"]["name"]
    if kind == "example" and m["profile"]["test"]:
        continue  # an example built as a test harness
    if (kind == "test" and name in tests) or (kind == "example" and name in examples):
        found[(kind, name)] = m["executable"]
for kind, names in (("test", tests), ("example", examples)):
    for name in names:
        if (kind, name) not in found:
            sys.exit(f"no {kind} {name} in {path}")
        dst = f"{bindir}/{name}"
        shutil.copy2(found[(kind, name)], dst)
        print(f"{kind}\t{name}\t{dst}")
EOF

step "run"
RESULTS=$WORK/results
rm -rf "$RESULTS" && mkdir -p "$RESULTS"
rm -f "$WORK"/console-*.log "$WORK/summary.txt"
exec python3 .ci/nested-svm.py \
    --work "$WORK" --results "$RESULTS" \
    --kernel "$KERNEL" --initrd "$INITRD" \
    --runner "$REPO/.ci/nested-svm-guest.sh" \
    --plan "$WORK/plan" --skip .ci/nested-svm.skip \
    --stage-start "$STAGE_START" \
    --budget "${NESTED_SVM_BUDGET:-2700}" \
    --test-limit "${NESTED_SVM_TEST_LIMIT:-300}" \
    --stall-limit "${NESTED_SVM_STALL_LIMIT:-120}" \
    --smp "${NESTED_SVM_SMP:-1}" \
    "$@"
