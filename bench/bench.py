#!/usr/bin/env python3
"""imgbackup benchmarks against qemu-img, cp and QEMU's backup job, in one run.

    cargo build --release
    bench/bench.py [--images DIR] [--size 2G] [--runs 5] [--only NAME ...] [--out BENCHMARKS.md]
    bench/bench.py --baseline OLD_BINARY [...]   # this build (A) against another build (B)

Images come from ../shared/anchors/make_images.sh (made once into --images):
full.raw, sparse.qcow2 (25 %), top.qcow2 over base.raw (10 %), bitmap.qcow2
with a persistent bitmap bm0 (5 % dirty). Each timing pair runs alternately
(A B, B A, A B, ...) after a warm-up, with outputs deleted (untimed) before every
run; the table gives medians, and the median and the geometric mean of the
per-pair ratios A/B (with A B / B A order, the geometric mean cancels what
running second costs).
Wall time is measured around fork..reap; CPU and peak RSS (ru_maxrss, as
/usr/bin/time -v reports it) come from the reaped child's rusage. Guest
write latency (4 KiB random writes at 500/s during a full backup) is read
from imgbackup's JSON summary and from the anchor's RESULT line. Results are
printed and, with --out, appended to a Markdown file.
"""
import argparse
import atexit
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ANCHORS = os.path.join(os.path.dirname(REPO), "shared", "anchors")
BIN = os.path.join(REPO, "target", "release", "imgbackup")
QSD = os.path.join(ANCHORS, "qsd_backup.py")


def timed(cmd, cwd):
    """Run cmd; wall, cpu and peak RSS from wait4."""
    import tempfile
    errf = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    errf.seek(0)
    err = errf.read()
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        sys.exit("command failed (%d): %s\n%s" % (rc, shlex.join(cmd), err.decode(errors="replace")))
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mib": ru.ru_maxrss / 1024.0,
            "out": out.decode(errors="replace")}


def clean(paths, cwd):
    for p in paths:
        for suffix in ("", ".partial", ".manifest", ".manifest.partial"):
            try:
                os.remove(os.path.join(cwd, p + suffix))
            except FileNotFoundError:
                pass
    subprocess.run(["sync"])


def pairs():
    b, q = BIN, [sys.executable, QSD]
    return [
        ("manifest-overhead", "full raw->qcow2 with the manifest (A) vs --no-manifest (B); target <= 1.15",
         [b, "backup", "-q", "full.raw", "out-a.qcow2"],
         [b, "backup", "-q", "--no-manifest", "full.raw", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], None),
        ("manifest-blake3-overhead", "full raw->qcow2 with a --digest blake3 manifest (A) vs --no-manifest (B); "
         "target <= 1.2",
         [b, "backup", "-q", "--digest", "blake3", "full.raw", "out-a.qcow2"],
         [b, "backup", "-q", "--no-manifest", "full.raw", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], None),
        ("manifest-files-overhead", "file-system content raw->qcow2 with the manifest (A) vs --no-manifest (B)",
         [b, "backup", "-q", "files.raw", "out-a.qcow2"],
         [b, "backup", "-q", "--no-manifest", "files.raw", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], "files"),
        ("manifest-blake3-files-overhead", "file-system content raw->qcow2 with a --digest blake3 manifest (A) vs "
         "--no-manifest (B); target <= 1.2",
         [b, "backup", "-q", "--digest", "blake3", "files.raw", "out-a.qcow2"],
         [b, "backup", "-q", "--no-manifest", "files.raw", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], "files"),
        ("full-vs-qemu-img", "full raw->qcow2 (A) vs qemu-img convert -t writeback -O qcow2 (B); target <= 0.8",
         [b, "backup", "-q", "full.raw", "out-a.qcow2"],
         ["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", "full.raw", "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"], None),
        ("full-vs-qemu-job", "full raw->qcow2 (A) vs QEMU's backup job, flushed target (B); target <= 0.6",
         [b, "backup", "-q", "full.raw", "out-a.qcow2"],
         q + ["-f", "raw", "-s", "full", "-O", "qcow2", "--target-cache", "writeback", "full.raw", "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"], None),
        ("raw-vs-cp", "full raw->raw (A) vs cp --sparse=always && sync (B); target <= 1.1",
         [b, "backup", "-q", "full.raw", "out-a.raw"],
         ["sh", "-c", "cp --sparse=always full.raw out-b.raw && sync out-b.raw"], ["out-a.raw", "out-b.raw"], None),
        ("sparse-vs-full", "sparse qcow2 25 % (A) vs full raw (B), both to qcow2; target <= 0.35",
         [b, "backup", "-q", "sparse.qcow2", "out-a.qcow2"],
         [b, "backup", "-q", "full.raw", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], None),
        ("top-vs-qemu-job", "sync top, 10 % (A) vs QEMU's backup job sync top (B)",
         [b, "backup", "-q", "--sync", "top", "top.qcow2", "out-a.qcow2"],
         q + ["-f", "qcow2", "-s", "top", "-O", "qcow2", "--target-cache", "writeback", "--target-backing", "base.raw",
              "--target-backing-format", "raw", "top.qcow2", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], None),
        ("top-no-manifest-vs-qemu-job", "sync top, 10 %, --no-manifest (A) vs QEMU's backup job sync top (B)",
         [b, "backup", "-q", "--no-manifest", "--sync", "top", "top.qcow2", "out-a.qcow2"],
         q + ["-f", "qcow2", "-s", "top", "-O", "qcow2", "--target-cache", "writeback", "--target-backing", "base.raw",
              "--target-backing-format", "raw", "top.qcow2", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], None),
        ("incremental-vs-full", "incremental 5 % (A, bitmap imported afresh, ~1 ms) vs full backup of the same image (B); target <= 0.1",
         ["sh", "-c", "%s bitmap import -q --force bitmap.qcow2 bm0 && %s backup -q --sync bitmap --bitmap bm0 "
          "--bitmap-mode never --backing bitmap-full.qcow2 bitmap.qcow2 out-a.qcow2" % (b, b)],
         [b, "backup", "-q", "bitmap.qcow2", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], "bitmap"),
        ("incremental-vs-qemu-job", "incremental 5 % (A, re-importing the bitmap QEMU's run leaves stale) vs QEMU's backup job sync bitmap (B)",
         ["sh", "-c", "%s bitmap import -q --force bitmap.qcow2 bm0 && %s backup -q --sync bitmap --bitmap bm0 "
          "--bitmap-mode never --backing bitmap-full.qcow2 bitmap.qcow2 out-a.qcow2" % (b, b)],
         q + ["-f", "qcow2", "-s", "bitmap", "--bitmap", "bm0", "--bitmap-mode", "never", "-O", "qcow2",
              "--target-cache", "writeback", "--preserve-bitmap", "bitmap.qcow2", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], "bitmap"),
        ("compress-files-vs-qemu-img", "--compress on file-system content (A) vs qemu-img convert -c -m 8 -W (B); "
         "target <= 0.5, size <= 1.0",
         [b, "backup", "-q", "--compress", "files.raw", "out-a.qcow2"],
         ["qemu-img", "convert", "-c", "-m", "8", "-W", "-O", "qcow2", "files.raw", "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"], "files"),
        ("compress-deflate9-files-vs-qemu-img", "--compress=deflate:9 on file-system content (A) vs qemu-img convert -c "
         "-m 8 -W (B, zlib level 6); size <= 1.0",
         [b, "backup", "-q", "--compress=deflate:9", "files.raw", "out-a.qcow2"],
         ["qemu-img", "convert", "-c", "-m", "8", "-W", "-O", "qcow2", "files.raw", "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"], "files"),
        ("compress-zstd-files-vs-qemu-img", "--compress=zstd on file-system content (A) vs qemu-img convert -c -o "
         "compression_type=zstd -m 8 -W (B); target <= 0.5, size <= 1.0",
         [b, "backup", "-q", "--compress=zstd", "files.raw", "out-a.qcow2"],
         ["qemu-img", "convert", "-c", "-o", "compression_type=zstd", "-m", "8", "-W", "-O", "qcow2", "files.raw",
          "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], "files"),
        ("full-files-vs-qemu-img", "full backup of file-system content (A) vs qemu-img convert -t writeback -O qcow2 (B)",
         [b, "backup", "-q", "files.raw", "out-a.qcow2"],
         ["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", "files.raw", "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"], "files"),
        ("tb-empty-vs-qemu-img", "1 TiB empty qcow2 -> qcow2 (A) vs qemu-img convert -O qcow2 (B); target <= 1.5",
         [b, "backup", "-q", "tb-empty.qcow2", "out-a.qcow2"],
         ["qemu-img", "convert", "-O", "qcow2", "tb-empty.qcow2", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], "scale"),
        ("tb-empty-no-manifest-vs-qemu-img", "the same with --no-manifest (A) vs qemu-img convert (B)",
         [b, "backup", "-q", "--no-manifest", "tb-empty.qcow2", "out-a.qcow2"],
         ["qemu-img", "convert", "-O", "qcow2", "tb-empty.qcow2", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], "scale"),
        ("tb-data-vs-qemu-img", "1 TiB qcow2 with 64 MiB of data -> qcow2 (A) vs qemu-img convert -O qcow2 (B); target <= 1.5",
         [b, "backup", "-q", "tb-data.qcow2", "out-a.qcow2"],
         ["qemu-img", "convert", "-O", "qcow2", "tb-data.qcow2", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], "scale"),
        ("tb-data-no-manifest-vs-qemu-img", "the same with --no-manifest (A) vs qemu-img convert (B)",
         [b, "backup", "-q", "--no-manifest", "tb-data.qcow2", "out-a.qcow2"],
         ["qemu-img", "convert", "-O", "qcow2", "tb-data.qcow2", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], "scale"),
        ("chain-restore-vs-full", "restore of the 30th incremental of a chain (A) vs restore of one full backup of "
         "the same image (B), 512 MiB, to raw; target <= 1.3",
         [b, "restore", "-q", "chain-30.qcow2", "out-a.raw"],
         [b, "restore", "-q", "chain-flat.qcow2", "out-b.raw"], ["out-a.raw", "out-b.raw"], "chain"),
        ("chain-verify-vs-full", "verify of the 30th incremental of a chain (A) vs verify of one full backup of the "
         "same image (B); target <= 1.3",
         [b, "verify", "-q", "chain-30.qcow2"],
         [b, "verify", "-q", "chain-flat.qcow2"], [], "chain"),
        ("chain-restore-vs-qemu-img", "restore of the 30th incremental (A) vs qemu-img convert -t writeback -O raw "
         "of it (B, flushed as restore is)",
         [b, "restore", "-q", "chain-30.qcow2", "out-a.raw"],
         ["qemu-img", "convert", "-t", "writeback", "-O", "raw", "chain-30.qcow2", "out-b.raw"],
         ["out-a.raw", "out-b.raw"], "chain"),
        ("64t-vs-1g", "64 TiB qcow2 holding 1 GiB of data -> qcow2 (A) vs the same data in a 1 GiB qcow2 (B); "
         "target <= 1.5",
         [b, "backup", "-q", "t64-data.qcow2", "out-a.qcow2"],
         [b, "backup", "-q", "g1-data.qcow2", "out-b.qcow2"], ["out-a.qcow2", "out-b.qcow2"], "64t"),
        ("restore-vs-qemu-img", "restore of a full 2 GiB backup to raw, checked against its manifest (A) vs qemu-img "
         "convert -t writeback -O raw of it (B: flushed, as restore is; qemu-img's default cache for convert, unsafe, "
         "does not flush); target <= 1.0",
         [b, "restore", "-q", "full-backup.qcow2", "out-a.raw"],
         ["qemu-img", "convert", "-t", "writeback", "-O", "raw", "full-backup.qcow2", "out-b.raw"],
         ["out-a.raw", "out-b.raw"], "restore"),
        ("nbd-full-vs-qemu-img", "full backup of a 2 GiB export (qemu-nbd -r on the keystream raw file, Unix socket) "
         "-> qcow2 (A) vs qemu-img convert -t writeback -f raw -O qcow2 from the same export (B); target <= 0.8",
         [b, "backup", "-q", nbd_uri("full"), "out-a.qcow2"],
         ["qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", "qcow2", nbd_uri("full"), "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"], "nbd"),
        ("nbd-full-blake3-vs-qemu-img", "the same with --digest blake3 (A) vs qemu-img convert (B)",
         [b, "backup", "-q", "--digest", "blake3", nbd_uri("full"), "out-a.qcow2"],
         ["qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", "qcow2", nbd_uri("full"), "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"], "nbd"),
        ("nbd-full-no-manifest-vs-qemu-img", "the same with --no-manifest (A) vs qemu-img convert (B)",
         [b, "backup", "-q", "--no-manifest", nbd_uri("full"), "out-a.qcow2"],
         ["qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", "qcow2", nbd_uri("full"), "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"], "nbd"),
        ("nbd-files-vs-qemu-img", "full backup of an export of file-system content (1 GiB, a 256 MiB hole) -> "
         "qcow2 (A) vs qemu-img convert -t writeback -f raw -O qcow2 from the same export (B)",
         [b, "backup", "-q", nbd_uri("files"), "out-a.qcow2"],
         ["qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", "qcow2", nbd_uri("files"), "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"], "nbd"),
        ("compress-vs-qemu-img", "--compress (A) vs qemu-img convert -c -m 8 -W (B); target <= 0.5",
         [b, "backup", "-q", "--compress", "full.raw", "out-a.qcow2"],
         ["qemu-img", "convert", "-c", "-m", "8", "-W", "-O", "qcow2", "full.raw", "out-b.qcow2"],
         ["out-a.qcow2", "out-b.qcow2"], "size"),
    ]


def baseline_pairs(base):
    """The same imgbackup commands run by this build (A) and by `base` (B),
    e.g. the previous commit's release binary: a restructuring must keep
    every ratio <= 1.05."""
    cases = [
        ("full raw->qcow2", ["backup", "-q", "full.raw", "OUT.qcow2"], "qcow2", None),
        ("full raw->raw", ["backup", "-q", "full.raw", "OUT.raw"], "raw", None),
        ("sparse qcow2->qcow2", ["backup", "-q", "sparse.qcow2", "OUT.qcow2"], "qcow2", None),
        ("sync top", ["backup", "-q", "--sync", "top", "top.qcow2", "OUT.qcow2"], "qcow2", None),
        ("incremental 5 %", ["backup", "-q", "--sync", "bitmap", "--bitmap", "bm0", "--bitmap-mode", "never",
                             "--backing", "bitmap-full.qcow2", "bitmap.qcow2", "OUT.qcow2"], "qcow2", "bitmap"),
        ("compress", ["backup", "-q", "--compress", "full.raw", "OUT.qcow2"], "qcow2", None),
        ("guest iops=500 during a full backup", ["backup", "-q", "--guest", "iops=500,bs=4K,seed=1", "full.raw",
                                                 "OUT.qcow2"], "qcow2", None),
    ]
    out = []
    for name, args, ext, extra in cases:
        oa, ob = "out-a." + ext, "out-b." + ext
        ca = [BIN] + [x.replace("OUT." + ext, oa) for x in args]
        cb = [base] + [x.replace("OUT." + ext, ob) for x in args]
        if extra == "bitmap":
            # QEMU's runs leave the bitmap stale: each side imports it afresh
            # (about 1 ms), as the incremental pairs do.
            ca = ["sh", "-c", "%s bitmap import -q --force bitmap.qcow2 bm0 && %s" % (BIN, shlex.join(ca))]
            cb = ["sh", "-c", "%s bitmap import -q --force bitmap.qcow2 bm0 && %s" % (base, shlex.join(cb))]
        out.append(("baseline " + name, "this build (A) vs %s (B); target <= 1.05" % base, ca, cb, [oa, ob], extra))
    return out


NBD_SERVERS = {}


def nbd_uri(name):
    """The URI of the qemu-nbd export of NAME.raw that setup_nbd starts."""
    return "nbd+unix:///%s?socket=/tmp/imgbackup-bench-%s.sock" % (name, name)


def setup_nbd(images):
    """qemu-nbd -r serving full.raw and files.raw on Unix sockets (qemu-nbd's
    defaults otherwise: one client at a time, so no multi-conn), stopped at
    exit."""
    import atexit
    setup_files(images)
    for name in ("full", "files"):
        if name in NBD_SERVERS:
            continue
        sock = "/tmp/imgbackup-bench-%s.sock" % name
        if os.path.exists(sock):
            os.remove(sock)
        p = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "raw", "-x", name, "--socket", sock,
                              os.path.join(images, name + ".raw")])
        NBD_SERVERS[name] = p
        atexit.register(p.kill)
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        time.sleep(0.2)


def setup_files(images):
    """files.raw, made once: 1 GiB of real file-system content (the files
    under /usr, concatenated in a fixed order; repeated if /usr is
    smaller), with a 256 MiB hole in the middle as a used disk has."""
    path = os.path.join(images, "files.raw")
    if os.path.exists(path):
        return
    want, hole = 1 << 30, 256 << 20
    files = []
    for root, dirs, names in os.walk("/usr"):
        dirs.sort()
        for n in sorted(names):
            f = os.path.join(root, n)
            if os.path.isfile(f) and not os.path.islink(f):
                files.append(f)
    with open(path + ".tmp", "wb") as out:
        written = 0
        while written < want - hole:
            for f in files:
                try:
                    with open(f, "rb") as src:
                        data = src.read(want - hole - written)
                except OSError:
                    continue
                out.write(data)
                written += len(data)
                if written >= want - hole:
                    break
        # The hole: the second half moves up by `hole` bytes.
        out.truncate(want - hole)
    with open(path + ".tmp", "rb") as src, open(path, "wb") as out:
        half = (want - hole) // 2
        out.write(src.read(half))
        out.seek(half + hole)
        out.write(src.read())
        out.truncate(want)
    os.remove(path + ".tmp")


def setup_scale(images):
    """1 TiB qcow2 images, made once: empty, and with 64 MiB of keystream
    data in four 16 MiB pieces spread over the image."""
    empty = os.path.join(images, "tb-empty.qcow2")
    if not os.path.exists(empty):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", empty, "1T"], check=True)
    data = os.path.join(images, "tb-data.qcow2")
    if not os.path.exists(data):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", data, "1T"], check=True)
        piece = os.path.join(images, "tb-piece.raw")
        with open(os.path.join(images, "full.raw"), "rb") as f, open(piece, "wb") as out:
            out.write(f.read(16 << 20))
        for at in ("0", "300G", "700G", "1023G"):
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -s %s %s 16M" % (piece, at), data],
                           check=True, stdout=subprocess.DEVNULL)
        os.remove(piece)


def setup_chain(images):
    """A 512 MiB raw image of file-system content (the first half of
    files.raw), a full backup with bitmap b0, then 30 nights of guest writes
    (4-64 KiB, 1 % zeros) each followed by an incremental: chain-00.qcow2 ..
    chain-30.qcow2. Beside them, chain-flat.qcow2: one full backup of the
    image as it is after the last night, the reference for restore time.
    Made once, untimed."""
    last = os.path.join(images, "chain-30.qcow2")
    if os.path.exists(last) and os.path.exists(os.path.join(images, "chain-flat.qcow2")):
        return
    setup_files(images)
    disk = os.path.join(images, "chain.raw")
    # In pieces: the harness's peak RSS would carry a large read (a forked
    # child starts with its parent's high-water mark).
    with open(os.path.join(images, "files.raw"), "rb") as src, open(disk, "wb") as out:
        for _ in range(32):
            out.write(src.read(16 << 20))
    for f in os.listdir(images):
        if f.startswith("chain-") or f.startswith("chain.raw."):
            os.remove(os.path.join(images, f))
    run = lambda *a: subprocess.run([BIN] + list(a), cwd=images, check=True, stdout=subprocess.DEVNULL)
    run("backup", "-q", "--bitmap", "b0", "chain.raw", "chain-00.qcow2")
    for night in range(1, 31):
        run("guest", "chain.raw", "iops=0,count=200,bs=4K-64K,zero=1,seed=%d" % night)
        run("backup", "-q", "--sync", "incremental", "--bitmap", "b0", "chain.raw", "chain-%02d.qcow2" % night)
    run("backup", "-q", "chain.raw", "chain-flat.qcow2")


def setup_64t(images):
    """A 64 TiB qcow2 holding 1 GiB of keystream data in four 256 MiB
    pieces (at 0, 10 TiB, 40 TiB, 63 TiB), and a 1 GiB qcow2 holding the
    same four pieces back to back. Made once."""
    piece = os.path.join(images, "piece-256m.raw")
    for name, size, spots in (("t64-data.qcow2", "64T", ("0", "10T", "40T", "63T")),
                              ("g1-data.qcow2", "1G", ("0", "256M", "512M", "768M"))):
        path = os.path.join(images, name)
        if os.path.exists(path):
            continue
        if not os.path.exists(piece):
            with open(os.path.join(images, "full.raw"), "rb") as f, open(piece, "wb") as out:
                for _ in range(16):
                    out.write(f.read(16 << 20))
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, size], check=True)
        for at in spots:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -s %s %s 256M" % (piece, at), path],
                           check=True, stdout=subprocess.DEVNULL)
    if os.path.exists(piece):
        os.remove(piece)


def setup_restore(images):
    """A full backup of full.raw (with its manifest) to restore. Made once."""
    if not os.path.exists(os.path.join(images, "full-backup.qcow2")):
        subprocess.run([BIN, "backup", "-q", "full.raw", "full-backup.qcow2"], cwd=images, check=True)


def setup_bitmap(images):
    """A full backup of bitmap.qcow2 to be the incremental's backing file, and
    its QEMU bitmap imported beside it (both untimed, once)."""
    full = os.path.join(images, "bitmap-full.qcow2")
    if not os.path.exists(full):
        subprocess.run([BIN, "backup", "-q", "bitmap.qcow2", "bitmap-full.qcow2"], cwd=images, check=True)
    if not os.path.exists(os.path.join(images, "bitmap.qcow2.bm0.bitmap")):
        subprocess.run([BIN, "bitmap", "import", "-q", "bitmap.qcow2", "bm0"], cwd=images, check=True)


def latency(images, runs):
    """Guest 4 KiB random writes at 500/s during a full backup."""
    rows = []
    ours = {"p50": [], "p99": [], "wall": []}
    for i in range(runs):
        clean(["lat.qcow2"], images)
        r = timed([BIN, "backup", "--json", "--guest", "iops=500,bs=4K,threads=1,seed=%d" % (i + 1),
                   "full.raw", "lat.qcow2"], images)
        doc = json.loads(r["out"])
        ours["p50"].append(doc["guest"]["latency_ms"]["p50"])
        ours["p99"].append(doc["guest"]["latency_ms"]["p99"])
        ours["wall"].append(r["wall"])
    clean(["lat.qcow2"], images)
    rows.append(("imgbackup (--cbw-cache default)", ours))
    ours0 = {"p50": [], "p99": [], "wall": []}
    for i in range(runs):
        clean(["lat.qcow2"], images)
        r = timed([BIN, "backup", "--json", "--cbw-cache", "0", "--guest", "iops=500,bs=4K,threads=1,seed=%d" % (i + 1),
                   "full.raw", "lat.qcow2"], images)
        doc = json.loads(r["out"])
        ours0["p50"].append(doc["guest"]["latency_ms"]["p50"])
        ours0["p99"].append(doc["guest"]["latency_ms"]["p99"])
        ours0["wall"].append(r["wall"])
    clean(["lat.qcow2"], images)
    rows.append(("imgbackup --cbw-cache 0", ours0))
    for label, extra in (("QEMU backup job, defaults", []), ("QEMU backup job, --max-workers 4", ["--max-workers", "4"])):
        res = {"p50": [], "p99": [], "wall": []}
        for i in range(runs):
            clean(["lat-q.qcow2"], images)
            r = timed([sys.executable, QSD, "-s", "full", "-O", "qcow2", "--target-cache", "writeback",
                       "--guest-writes", "100000", "--guest-iops", "500", "--guest-seed", str(i + 1)] + extra +
                      ["full.raw", "lat-q.qcow2"], images)
            line = [l for l in r["out"].splitlines() if l.startswith("RESULT ")][-1]
            doc = json.loads(line[len("RESULT "):])
            lat = doc.get("guest_lat_during_job") or {}
            res["p50"].append((lat.get("p50_us") or 0) / 1000.0)
            res["p99"].append((lat.get("p99_us") or 0) / 1000.0)
            res["wall"].append(r["wall"])
        clean(["lat-q.qcow2"], images)
        rows.append((label, res))
    return rows


def max_rss_kib(cmd, cwd):
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, cwd=cwd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit("command failed: %s\n%s" % (shlex.join(cmd), r.stderr))
    for line in r.stderr.splitlines():
        if "Maximum resident set size" in line:
            return int(line.split(":")[1])
    return 0


def rss(images):
    """Peak RSS for an 8 GiB fully written image and a 64 GiB sparse one
    (1 GiB of data), made once with qemu-img/qemu-io (not in the pairs)."""
    big = os.path.join(images, "rss8.raw")
    if not os.path.exists(big):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", big, "8G"], check=True)
        for i in range(8):
            subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P %d %dG 1G" % (i + 1, i), big],
                           check=True, stdout=subprocess.DEVNULL)
    sparse = os.path.join(images, "rss64.qcow2")
    if not os.path.exists(sparse):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", sparse, "64G"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2"] + sum((["-c", "write -P %d %dG 256M" % (i + 1, g)]
                                                       for i, g in enumerate((0, 20, 40, 63))), []) + [sparse],
                       check=True, stdout=subprocess.DEVNULL)
    setup_64t(images)
    rows = []
    for label, cmd, outs in (
        ("8 GiB raw -> qcow2", [BIN, "backup", "-q", "rss8.raw", "rss-out.qcow2"], ["rss-out.qcow2"]),
        ("8 GiB raw -> qcow2 with --guest iops=500", [BIN, "backup", "-q", "--guest", "iops=500", "rss8.raw", "rss-out.qcow2"], ["rss-out.qcow2"]),
        ("64 GiB sparse qcow2 -> qcow2", [BIN, "backup", "-q", "rss64.qcow2", "rss-out.qcow2"], ["rss-out.qcow2"]),
        ("64 GiB sparse qcow2 -> raw", [BIN, "backup", "-q", "rss64.qcow2", "rss-out.raw"], ["rss-out.raw"]),
        ("64 TiB sparse qcow2 (1 GiB of data) -> qcow2", [BIN, "backup", "-q", "t64-data.qcow2", "rss-out.qcow2"],
         ["rss-out.qcow2"]),
    ):
        clean(outs, images)
        kib = max_rss_kib(cmd, images)
        clean(outs, images)
        row = "* %s: peak RSS %.1f MiB (target <= 64 MiB)" % (label, kib / 1024.0)
        print(row, flush=True)
        rows.append(row)
    return rows


def serve_latency(images, runs):
    """The anchors' seeded NBD write stream (nbd_guest.py: 4 KiB writes,
    open loop) against `imgbackup serve` and against qemu-nbd, serving the
    same 512 MiB raw image, at 500 and 5000 writes/s, 8 s each."""
    rows = []
    img = os.path.join(images, "serve.raw")
    sock = os.path.join(images, "serve.sock")
    with open(os.path.join(images, "full.raw"), "rb") as f, open(img, "wb") as out:
        for _ in range(32):
            out.write(f.read(16 << 20))
    servers = (("imgbackup serve", [BIN, "serve", "-q", img, "--socket", sock]),
               ("qemu-nbd", ["qemu-nbd", "-f", "raw", "-t", "-k", sock, img]))
    for label, cmd in servers:
        for iops in (500, 5000):
            p50, p99 = [], []
            for r in range(runs):
                if os.path.exists(sock):
                    os.remove(sock)
                srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for _ in range(100):
                    if os.path.exists(sock):
                        break
                    time.sleep(0.05)
                time.sleep(0.3)
                out = subprocess.run([sys.executable, os.path.join(ANCHORS, "nbd_guest.py"), "--socket", sock,
                                      "--iops", str(iops), "--duration", "8", "--seed", str(r + 1)],
                                     capture_output=True, text=True).stdout
                srv.terminate()
                srv.wait()
                res = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])["during_cmd"]
                p50.append(res["p50_us"] / 1000.0)
                p99.append(res["p99_us"] / 1000.0)
            row = "| %s | %d | %.2f | %.2f |" % (label, iops, statistics.median(p50), statistics.median(p99))
            print(row, flush=True)
            rows.append(row)
    os.remove(img)
    return rows


def served_backup_latency(images, runs):
    """SPEC 8's latency target: the anchors' seeded 4 KiB random write stream
    at 500/s (open loop) against `imgbackup serve` while `imgbackup backup`
    of the served 2 GiB image runs inside the server, and against
    qemu-storage-daemon's export during QEMU's backup job (defaults, and
    --max-workers 4), in the same run; plus both exports with no backup."""
    src = os.path.join(images, "served.raw")
    sock = os.path.join(images, "served.sock")
    out = os.path.join(images, "served-out.qcow2")
    if not os.path.exists(src):
        subprocess.run(["cp", "--sparse=always", os.path.join(images, "full.raw"), src], check=True)

    def result(text):
        return json.loads(text.split("RESULT ", 1)[1].splitlines()[0])

    def serve():
        if os.path.exists(sock):
            os.remove(sock)
        srv = subprocess.Popen([BIN, "serve", "-q", src, "--socket", sock],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        return srv

    def ours(r, backup):
        srv = serve()
        clean([os.path.basename(out), os.path.basename(out) + ".manifest"], images)
        cmd = ([BIN, "backup", "-q", src, out] if backup else ["sleep", "4"])
        o = subprocess.run([sys.executable, os.path.join(ANCHORS, "nbd_guest.py"), "--socket", sock,
                            "--iops", "500", "--seed", str(r + 1), "--"] + cmd,
                           capture_output=True, text=True)
        srv.terminate()
        srv.wait()
        clean([os.path.basename(out), os.path.basename(out) + ".manifest"], images)
        if o.returncode != 0:
            sys.exit("served backup failed: %s" % o.stderr[-400:])
        return result(o.stdout)["during_cmd"]

    def qemu(r, extra, backup):
        if os.path.exists(out):
            os.remove(out)
        args = [sys.executable, os.path.join(ANCHORS, "qsd_backup.py"), src]
        args += ([out, "--guest-writes", "100000"] if backup else ["--no-backup", "--guest-writes", "2000"])
        args += ["--guest-iops", "500", "--guest-seed", str(r + 1)] + extra
        o = subprocess.run(args, capture_output=True, text=True)
        if os.path.exists(out):
            os.remove(out)
        if o.returncode != 0:
            sys.exit("qsd_backup.py failed: %s" % o.stderr[-400:])
        res = result(o.stdout)
        return res["guest_lat_during_job" if backup else "guest_lat"]

    cases = (("imgbackup serve + backup in the server", lambda r: ours(r, True)),
             ("qemu-storage-daemon + backup job (defaults)", lambda r: qemu(r, [], True)),
             ("qemu-storage-daemon + backup job (--max-workers 4)", lambda r: qemu(r, ["--max-workers", "4"], True)),
             ("imgbackup serve, no backup", lambda r: ours(r, False)),
             ("qemu-storage-daemon export, no backup", lambda r: qemu(r, [], False)))
    got = {label: ([], [], []) for label, _ in cases}
    for r in range(runs):
        for label, fn in cases:
            st = fn(r)
            got[label][0].append(st["p50_us"] / 1000.0)
            got[label][1].append(st["p99_us"] / 1000.0)
            got[label][2].append(st["max_us"] / 1000.0)
    rows = []
    med = {label: [statistics.median(v) for v in got[label]] for label, _ in cases}
    for label, _ in cases:
        row = "| %s | %.2f | %.2f | %.2f |" % ((label,) + tuple(med[label]))
        print(row, flush=True)
        rows.append(row)
    ours_p99 = med[cases[0][0]][1]
    q4_p99 = med[cases[2][0]][1]
    base = med[cases[3][0]][0] / med[cases[4][0]][0]
    rows += ["", "p99 during a backup: %.2f ms (target <= 10 ms), %.3fx QEMU with 4 workers (target <= 0.5); "
             "p50 with no backup %.2fx qemu-storage-daemon's (target <= 1.5)" % (ours_p99, ours_p99 / q4_p99, base)]
    print(rows[-1], flush=True)
    return rows


PAGE_REPORTING = "/sys/module/page_reporting/parameters/page_reporting_order"


def pause_page_reporting():
    """On a VM whose virtio-balloon reports free pages to the host, pause the
    reporting for this run and restore it at exit.

    A reported page is handed back to the host; the next allocation that
    gets it (a page-cache page of the next run's output) faults on the host
    first. Which run pays depends on when the reporting thread last passed,
    so the same command took 0.6 s or 1.1-5.6 s (full.raw, --no-manifest)
    and same-run ratios swung by 2x. Raising the order above the largest
    free block the kernel keeps (order 10) reports nothing; both sides of
    every pair then run as on a machine without a balloon.
    """
    try:
        with open(PAGE_REPORTING) as f:
            old = f.read().strip()
    except OSError:
        return "no free page reporting"
    if old.isdigit() and int(old) > 10:
        return "free page reporting paused (order %s)" % old
    try:
        with open(PAGE_REPORTING, "w") as f:
            f.write("11")
    except OSError:
        print("warning: free page reporting is on (%s) and cannot be paused without root: "
              "timings will swing" % PAGE_REPORTING, file=sys.stderr)
        return "free page reporting ON (order %s; not root)" % old

    def restore():
        with open(PAGE_REPORTING, "w") as f:
            f.write(old)
    atexit.register(restore)
    return "free page reporting paused (order %s -> 11)" % old


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="/tmp/imgbackup-bench")
    ap.add_argument("--size", default="2G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out")
    ap.add_argument("--baseline", help="another imgbackup binary to compare this build with (only those pairs run)")
    ap.add_argument("--keep-page-reporting", action="store_true",
                    help="leave a virtio-balloon's free page reporting on (see pause_page_reporting)")
    a = ap.parse_args()
    reporting = "free page reporting: as the machine has it"
    if not a.keep_page_reporting:
        reporting = pause_page_reporting()
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
    head = "## %s — %s, nproc %d, %s images, %d pairs after a warm-up; %s" % (
        time.strftime("%Y-%m-%d"), cpu, os.cpu_count(), a.size, a.runs, reporting)
    lines = [head, "", "| pair | A median s | B median s | A/B median | A/B geomean | A peak RSS MiB | B peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    print(head)
    commands = []
    for name, what, ca, cb, outs, extra in (baseline_pairs(a.baseline) if a.baseline else pairs()):
        if a.only and name not in a.only:
            continue
        if extra == "bitmap":
            setup_bitmap(a.images)
        if extra == "scale":
            setup_scale(a.images)
        if extra == "files":
            setup_files(a.images)
        if extra == "chain":
            setup_chain(a.images)
        if extra == "64t":
            setup_64t(a.images)
        if extra == "restore":
            setup_restore(a.images)
        if extra == "nbd":
            setup_nbd(a.images)
        runs = a.runs if extra not in ("size", "files") else max(2, a.runs // 2)
        ra, rb, ratios = [], [], []
        for i in range(runs + 1):
            clean(outs, a.images)
            # A B, then B A: a run that is slower for following another
            # (writeback of the last run's output) is not always the same side.
            if i % 2 == 1:
                x = timed(ca, a.images)
                sa = os.path.getsize(os.path.join(a.images, outs[0])) if outs else 0
                clean(outs[:1], a.images)
                y = timed(cb, a.images)
                sb = os.path.getsize(os.path.join(a.images, outs[1])) if outs else 0
            else:
                y = timed(cb, a.images)
                sb = os.path.getsize(os.path.join(a.images, outs[1])) if outs else 0
                clean(outs[1:], a.images)
                x = timed(ca, a.images)
                sa = os.path.getsize(os.path.join(a.images, outs[0])) if outs else 0
            clean(outs, a.images)
            if i == 0:
                continue  # warm-up
            ra.append(x)
            rb.append(y)
            ratios.append(x["wall"] / y["wall"])
        med = lambda rs, k: statistics.median(r[k] for r in rs)
        geo = statistics.geometric_mean(ratios)
        row = "| %s: %s | %.3f | %.3f | %.3f | %.3f | %.1f | %.1f |" % (
            name, what, med(ra, "wall"), med(rb, "wall"), statistics.median(ratios), geo,
            max(r["rss_mib"] for r in ra), max(r["rss_mib"] for r in rb))
        if extra in ("size", "files"):
            row += " sizes A/B = %.3f |" % (sa / sb)
        print(row, flush=True)
        lines.append(row)
        commands.append("* %s: A `%s`; B `%s`" % (name, shlex.join(ca), shlex.join(cb)))
    if not a.baseline and (not a.only or "latency" in a.only):
        lines += ["", "Guest 4 KiB random writes at 500/s during a full raw->qcow2 backup (medians over %d runs):" % a.runs, "",
                  "| backup | guest p50 ms | guest p99 ms | backup wall s |", "| --- | --- | --- | --- |"]
        for label, res in latency(a.images, a.runs):
            row = "| %s | %.2f | %.2f | %.2f |" % (label, statistics.median(res["p50"]), statistics.median(res["p99"]),
                                                  statistics.median(res["wall"]))
            print(row, flush=True)
            lines.append(row)
    if not a.baseline and (not a.only or "speed" in a.only):
        clean(["spd.qcow2"], a.images)
        rate = 256 << 20
        r = timed([BIN, "backup", "--json", "--speed", str(rate), "full.raw", "spd.qcow2"], a.images)
        doc = json.loads(r["out"])
        got = doc["virtual_size"] / doc["elapsed_seconds"]
        clean(["spd.qcow2"], a.images)
        row = "--speed 256M on full.raw: %.1f MiB/s measured over the job, %.2f %% off" % (got / 2**20, abs(got - rate) * 100 / rate)
        print(row)
        lines += ["", row]
    if a.only and "served-backup" in a.only:
        lines += ["", "4 KiB random writes at 500/s (nbd_guest.py / qsd_backup.py, open loop) while a full backup "
                  "of the served 2 GiB image runs (medians over %d runs):" % a.runs, "",
                  "| export and job | p50 ms | p99 ms | max ms |", "| --- | --- | --- | --- |"] + \
            served_backup_latency(a.images, a.runs)
    if a.only and "serve" in a.only:
        lines += ["", "NBD write stream (nbd_guest.py, 4 KiB, open loop, 8 s) served by imgbackup and by qemu-nbd "
                  "(medians over %d runs):" % a.runs, "", "| server | writes/s | p50 ms | p99 ms |",
                  "| --- | --- | --- | --- |"] + serve_latency(a.images, a.runs)
    if a.only and "rss" in a.only:
        lines += ["", "Peak RSS (/usr/bin/time -v) for large images:", ""] + rss(a.images)
    lines += ["", "Commands:", ""] + commands
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
