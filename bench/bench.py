#!/usr/bin/env python3
"""imgbackup benchmarks: each pair of commands runs alternately (A B A B ...)
on the same images in one run, after a warm-up; medians and per-pair ratios.

    bench/bench.py [--images DIR] [--size 2G] [--runs 5] [--only NAME ...] [--out FILE]

Images come from ../shared/anchors/make_images.sh (made once into --images).
Outputs are deleted before every timed run (untimed), so neither side pays
for freeing the previous output. Wall time is measured around fork..reap;
CPU and peak RSS (ru_maxrss, as /usr/bin/time -v reports it) come from the
reaped child's rusage. Results are printed and, with --out, appended to a
Markdown file.
"""
import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ANCHORS = os.path.join(os.path.dirname(REPO), "shared", "anchors")
BIN = os.path.join(REPO, "target", "release", "imgbackup")


def run_once(cmd, cwd):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        sys.exit("command failed (%d): %s\n%s" % (rc, shlex.join(cmd), err.decode(errors="replace")))
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mib": ru.ru_maxrss / 1024.0}


def clean(paths, cwd):
    for p in paths:
        for suffix in ("", ".partial", ".manifest", ".manifest.partial"):
            try:
                os.remove(os.path.join(cwd, p + suffix))
            except FileNotFoundError:
                pass
    subprocess.run(["sync"])


def pairs(img):
    b = BIN
    return [
        ("manifest-overhead",
         "full raw->qcow2 with the manifest (A) vs --no-manifest (B)",
         [b, "backup", "-q", "full.raw", "out-a.qcow2"],
         [b, "backup", "-q", "--no-manifest", "full.raw", "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"]),
        ("full-vs-qemu-img",
         "full raw->qcow2 (A) vs qemu-img convert -t writeback -O qcow2 (B)",
         [b, "backup", "-q", "full.raw", "out-a.qcow2"],
         ["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", "full.raw", "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"]),
        ("raw-vs-cp",
         "full raw->raw (A) vs cp --sparse=always && sync (B)",
         [b, "backup", "-q", "full.raw", "out-a.raw"],
         ["sh", "-c", "cp --sparse=always full.raw out-b.raw && sync out-b.raw"],
         ["out-a.raw", "out-b.raw"]),
        ("sparse-vs-full",
         "sparse qcow2 (25 %) (A) vs full raw (B), both to qcow2",
         [b, "backup", "-q", "sparse.qcow2", "out-a.qcow2"],
         [b, "backup", "-q", "full.raw", "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"]),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="/tmp/imgbackup-bench")
    ap.add_argument("--size", default="2G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out")
    a = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    os.makedirs(a.images, exist_ok=True)
    if not os.path.exists(os.path.join(a.images, "manifest.txt")):
        subprocess.run([os.path.join(ANCHORS, "make_images.sh"), a.images, a.size], check=True)
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    head = "## %s — %s, nproc %d, %s images, %d pairs after a warm-up\n" % (
        time.strftime("%Y-%m-%d"), cpu, os.cpu_count(), a.size, a.runs)
    lines = [head, "| pair | A median s | B median s | A/B median | A peak RSS MiB | B peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    print(head)
    for name, what, ca, cb, outs in pairs(a.images):
        if a.only and name not in a.only:
            continue
        ra, rb, ratios = [], [], []
        for i in range(a.runs + 1):
            clean(outs, a.images)
            x = run_once(ca, a.images)
            clean(outs, a.images)
            y = run_once(cb, a.images)
            if i == 0:
                continue  # warm-up
            ra.append(x)
            rb.append(y)
            ratios.append(x["wall"] / y["wall"])
        clean(outs, a.images)
        med = lambda rs, k: statistics.median(r[k] for r in rs)
        row = "| %s: %s | %.3f | %.3f | %.3f | %.1f | %.1f |" % (
            name, what, med(ra, "wall"), med(rb, "wall"), statistics.median(ratios),
            max(r["rss_mib"] for r in ra), max(r["rss_mib"] for r in rb))
        print(row)
        print("    A: %s\n    B: %s" % (shlex.join(ca), shlex.join(cb)))
        lines.append(row)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
