#!/usr/bin/env python3
"""Host driver of the nested-SVM stage (.ci/nested-svm.sh prepares its inputs).

Boots a Linux guest under QEMU TCG with SVM (`-cpu max`), in which
.ci/nested-svm-init loads kvm_amd and .ci/nested-svm-guest.sh runs snapvm's
test binaries one test at a time against the nested /dev/kvm. The guest
reports "START id" / "END id rc secs" lines and a heartbeat through a
writable virtio-9p share (the results directory); this driver watches them
from the host, because under TCG the guest kernel now and then stalls and
then no timeout inside it fires.

When a test makes no progress past the per-test limit, or the guest's
heartbeat stops, QEMU is killed, the test is recorded as a hang, the guest is
booted again and the remaining tests go on. A hung test is retried once; a
hang never counts as a pass. Prints a summary per binary and ends with the
line "nested-svm: N passed, N failed" (hangs and tests not run count as
failed); exits 1 if any test failed, hung or did not run.
"""

import argparse
import collections
import os
import shlex
import signal
import subprocess
import sys
import time


def log(msg):
    print(f"[nested-svm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_secs(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def qemu_version():
    """"QEMU 10.0.2" (what the first line of `--version` says), or "QEMU"."""
    try:
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True
        ).stdout.split()
        return "QEMU " + out[out.index("version") + 1]
    except (OSError, ValueError, IndexError):
        return "QEMU"


def read_skip(path):
    """The skip list: "binary::test  reason" per line, # comments."""
    skip = {}
    if not path or not os.path.exists(path):
        return skip
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) < 2:
                sys.exit(f"{path}: every skipped test needs a reason: {line!r}")
            skip[parts[0]] = parts[1]
    return skip


def list_tests(path):
    """The tests of a libtest binary, without the #[ignore]d ones."""

    def names(*extra):
        out = subprocess.run(
            [path, "--list", "--format", "terse", *extra],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return [l[: -len(": test")] for l in out.splitlines() if l.endswith(": test")]

    ignored = set(names("--ignored"))
    return [n for n in names() if n not in ignored]


class Item:
    def __init__(self, binary, kind, path, name):
        self.binary, self.kind, self.path, self.name = binary, kind, path, name
        self.id = f"{binary}::{name}" if kind == "test" else binary
        self.attempts = 0  # boots in which it started
        self.hangs = []  # reasons, one per hung attempt
        self.status = None  # passed | failed | hang | not-run
        self.rc = None
        self.secs = 0.0  # host-side seconds of the last attempt
        self.detail = ""


class Driver:
    def __init__(self, args):
        self.a = args
        self.results = os.path.abspath(args.results)
        self.progress = os.path.join(self.results, "progress")
        self.heartbeat = os.path.join(self.results, "heartbeat")
        self.boots = []  # (seconds to BOOTED or None, how it ended)
        self.boot_failures = 0
        self.qemu = None

    def deadline_left(self):
        return self.a.stage_start + self.a.budget - time.time()

    def qemu_cmd(self, console):
        append = " ".join(
            [
                "console=ttyS0",
                "panic=-1",
                "loglevel=4",
                "mitigations=off",
                f"svm_results={self.results}",
                f"svm_runner={os.path.abspath(self.a.runner)}",
            ]
        )
        return [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-cpu", "max",
            "-m", self.a.mem,
            "-smp", str(self.a.smp),
            "-nodefaults",
            "-no-reboot",
            "-display", "none",
            "-monitor", "none",
            "-serial", f"file:{console}",
            "-kernel", self.a.kernel,
            "-initrd", self.a.initrd,
            "-append", append,
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=results,path={self.results},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=results,mount_tag=results",
        ]  # fmt: skip

    def boot_and_run(self, pending):
        """One boot: runs the queue until it ends, hangs or the guest dies.
        Returns the item that hung (or None) and why."""
        n = len(self.boots)
        with open(os.path.join(self.results, "queue"), "w") as f:
            for it in pending:
                f.write(f"{it.id}\t{it.kind}\t{it.path}\t{it.name}\n")
        for p in (self.progress, self.heartbeat):
            if os.path.exists(p):
                os.remove(p)
        open(self.progress, "w").close()
        console = os.path.join(self.a.work, f"console-{n}.log")
        cmd = self.qemu_cmd(console)
        if n == 0:
            log("qemu: " + shlex.join(cmd))
        log(f"boot {n}: {len(pending)} test(s) queued")
        t0 = time.time()
        qemu = self.qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        booted_at = None
        current, current_start = None, None
        last_beat, last_beat_change = None, t0
        offset = 0
        buf = ""
        by_id = {it.id: it for it in pending}
        hung, why = None, None
        done = False
        while True:
            exited = qemu.poll() is not None
            with open(self.progress) as f:
                f.seek(offset)
                data = f.read()
                offset += len(data.encode())
            buf += data
            *lines, buf = buf.split("\n")
            now = time.time()
            for line in lines:
                w = line.split()
                if not w:
                    continue
                if w[0] == "BOOTED":
                    booted_at = now
                    log(f"boot {n}: booted in {fmt_secs(now - t0)}")
                elif w[0] == "RUNNER":
                    log(f"boot {n}: guest {' '.join(w[1:])}")
                elif w[0] == "START":
                    current, current_start = by_id[w[1]], now
                    current.attempts += 1
                elif w[0] == "END":
                    it = by_id[w[1]]
                    it.rc = int(w[2])
                    it.secs = now - current_start
                    it.status, it.detail = self.judge(it)
                    pending.remove(it)
                    log(
                        f"{it.status:6} {it.id} ({fmt_secs(it.secs)}, guest "
                        f"{float(w[3]):.0f} s){' ' + it.detail if it.detail else ''}"
                    )
                    current = None
                elif w[0] == "DONE":
                    done = True
            if done or exited:
                break
            # Heartbeat: the guest's uptime, rewritten every 5 s.
            try:
                with open(self.heartbeat) as f:
                    beat = f.read().strip()
            except FileNotFoundError:
                beat = None
            if beat != last_beat:
                last_beat, last_beat_change = beat, now
            if booted_at is None and now - t0 > self.a.boot_limit:
                why = f"no boot within {self.a.boot_limit} s"
                break
            if current is not None and now - current_start > self.a.test_limit:
                hung, why = current, f"no END within {self.a.test_limit} s"
                break
            if booted_at is not None and now - last_beat_change > self.a.stall_limit:
                hung, why = current, f"guest heartbeat stopped for {self.a.stall_limit} s"
                break
            if self.deadline_left() < 0:
                hung, why = current, "stage budget spent"
                break
            time.sleep(1)
        if qemu.poll() is None:
            if done:
                try:
                    qemu.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
        if why is None and not done:
            # QEMU exited by itself before the queue ended.
            why = f"guest ended before the queue (qemu exit {qemu.returncode})"
            hung = current
        if hung is not None and hung is current:
            hung.secs = time.time() - current_start
        self.boots.append(
            (None if booted_at is None else booted_at - t0, why or "queue done")
        )
        if why:
            log(f"boot {n}: {why}" + (f" during {hung.id}" if hung else ""))
            tail = self.tail(console, 15)
            if tail:
                log(f"boot {n}: console tail:\n{tail}")
        return hung, why, booted_at is not None

    def judge(self, it):
        logf = os.path.join(self.results, "logs", f"{it.id}.log")
        try:
            with open(logf, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if it.rc != 0:
            return "failed", f"exit {it.rc}"
        if it.kind == "test" and "test result: ok. 1 passed" not in text:
            return "failed", "exit 0 but the test did not run and pass"
        return "passed", ""

    def excerpt(self, it, n=20):
        """A failed test's output without libtest's boilerplate."""
        path = os.path.join(self.results, "logs", f"{it.id}.log")
        try:
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return ["(no output)"]
        noise = ("running 1 test", "failures:", "note: run with `RUST_BACKTRACE",
                 "test result:", f"test {it.name} ...", f"---- {it.name} stdout",
                 f"    {it.name}")
        keep = [l for l in lines if l.strip() and not l.startswith(noise)]
        return keep[:n] + ([f"... ({len(keep) - n} more lines in {path})"] if len(keep) > n else [])

    @staticmethod
    def tail(path, n):
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-n:]).rstrip()
        except FileNotFoundError:
            return ""

    def run(self, items):
        pending = collections.deque(items)
        while pending:
            if self.deadline_left() < self.a.boot_limit:
                log("stage budget spent: the remaining tests are not run")
                break
            hung, why, booted = self.boot_and_run(pending)
            if not booted and hung is None and why:
                self.boot_failures += 1
                if self.boot_failures >= 3:
                    log("the guest failed to boot 3 times: giving up")
                    break
                continue
            if hung is not None:
                hung.hangs.append(why)
                if len(hung.hangs) >= 2 or why == "stage budget spent":
                    hung.status, hung.detail = "hang", "; ".join(hung.hangs)
                    pending.remove(hung)
                    log(f"hang   {hung.id} ({hung.detail})")
                else:
                    log(f"retry  {hung.id} after a fresh boot (hung: {why})")
        for it in pending:
            it.status, it.detail = "not-run", "stage budget spent or the guest did not boot"

    def summary(self, items, skipped):
        total = time.time() - self.a.stage_start
        out = ["", f"== nested-svm summary ({qemu_version()} TCG, -cpu max, kvm_amd npt=1)"]
        bad = [it for it in items if it.status != "passed"]
        for it in bad:
            out.append(f"-- {it.status}: {it.id} ({it.detail})")
            out += ["   " + l for l in self.excerpt(it)]
        for it in items:
            if it.status == "passed" and it.hangs:
                out.append(f"note: {it.id} passed on retry after a hang ({it.hangs[0]})")
        if skipped:
            out.append(f"skipped ({len(skipped)}, .ci/nested-svm.skip):")
            out += [f"  {k}: {v}" for k, v in skipped]
        for i, (secs, how) in enumerate(self.boots):
            b = "did not boot" if secs is None else f"booted in {fmt_secs(secs)}"
            out.append(f"boot {i}: {b}; ended: {how}")
        by_bin = collections.OrderedDict()
        for it in items:
            by_bin.setdefault(it.binary, []).append(it)
        for b, its in by_bin.items():
            c = collections.Counter(it.status for it in its)
            secs = sum(it.secs for it in its)
            extra = "".join(f", {c[s]} {s}" for s in ("hang", "not-run") if c[s])
            out.append(
                f"{b}: {c['passed']} passed, {c['failed']} failed{extra}"
                f" ({len(its)} run, {fmt_secs(secs)})"
            )
        passed = sum(it.status == "passed" for it in items)
        out.append(f"stage time: {fmt_secs(total)} (budget {fmt_secs(self.a.budget)})")
        out.append(f"nested-svm: {passed} passed, {len(items) - passed} failed")
        text = "\n".join(out)
        print(text, flush=True)
        with open(os.path.join(self.a.work, "summary.txt"), "w") as f:
            f.write(text + "\n")
        return not bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--runner", required=True)
    ap.add_argument("--plan", required=True, help="lines: kind<TAB>binary<TAB>path")
    ap.add_argument("--skip")
    ap.add_argument("--only", action="append", default=[],
                    help="run only tests whose id contains this (repeatable)")
    ap.add_argument("--stage-start", type=float, default=time.time())
    ap.add_argument("--budget", type=float, default=45 * 60)
    ap.add_argument("--test-limit", type=float, default=300)
    ap.add_argument("--stall-limit", type=float, default=120)
    ap.add_argument("--boot-limit", type=float, default=360)
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--mem", default="4G")
    a = ap.parse_args()

    skip = read_skip(a.skip)
    items, skipped = [], []
    with open(a.plan) as f:
        for line in f:
            if not line.strip():
                continue
            kind, binary, path = line.rstrip("\n").split("\t")
            names = list_tests(path) if kind == "test" else [binary]
            for name in names:
                it = Item(binary, kind, path, name)
                if it.id in skip:
                    skipped.append((it.id, skip[it.id]))
                elif a.only and not any(o in it.id for o in a.only):
                    continue
                else:
                    items.append(it)
    unknown = set(skip) - {k for k, _ in skipped}
    if unknown and not a.only:
        sys.exit(f"the skip list names tests that do not exist: {sorted(unknown)}")
    log(f"{len(items)} test(s) to run, {len(skipped)} skipped")
    d = Driver(a)

    def stop(signum, _frame):
        # Never leave QEMU behind (.ci/run stops the stage this way when an
        # earlier step fails).
        if d.qemu is not None and d.qemu.poll() is None:
            d.qemu.kill()
        log(f"stopped by signal {signum}")
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    d.run(items)
    sys.exit(0 if d.summary(items, skipped) else 1)


if __name__ == "__main__":
    main()
