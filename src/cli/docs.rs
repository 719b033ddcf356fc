//! Man pages and shell completions, rendered from the clap definition.
//!
//! `imgbackup generate-docs .` (or `cargo run -- generate-docs .`) rewrites
//! `man/` and `completions/`; the test `docs_are_current` fails when the
//! committed files differ from what the definition renders.

use super::Cli;
use clap::CommandFactory;
use std::path::{Path, PathBuf};

/// Sections appended to imgbackup(1), in roff.
const EXIT_STATUS: &str = r#".TP
.B 0
success
.TP
.B 1
failure not covered below (bad or unsupported image, existing target, missing directory)
.TP
.B 2
usage error (bad option or value)
.TP
.B 3
finished, but some clusters were skipped by an ignore policy
.TP
.B 4
source read error (a damaged or truncated image, an I/O error)
.TP
.B 5
target write error, including no space left on the device
.TP
.B 6
bitmap missing, inconsistent or stale
.TP
.B 7
verification mismatch
.TP
.B 8
image locked by another process
.TP
.B 9
timeout (\fB\-\-timeout\fR)
.TP
.B 129, 130, 143
stopped by SIGHUP, SIGINT or SIGTERM, in any phase (copy, manifest,
verification, overlay export, restore); the job was cancelled cleanly, no
target was left behind and the bitmap is as it was. A second signal ends the
process at once, after one line on stderr naming what it left behind (the
partial files, a bitmap marked in use) and the command that recovers.
"#;

const FILES_TARGET: &str = r#".TP
.I TARGET.partial
The backup while it is written. It is created exclusively and never through
a symbolic or hard link (a file of that name left by a killed run, or planted,
is unlinked first), with the permission bits of the source (less the umask),
so a backup is never more readable than the image. It holds an exclusive
\fBflock\fR(2) while it is written: a second run writing the same TARGET is
refused with exit 8 (or waits with \fB\-\-wait\-lock\fR). It is flushed
and renamed to TARGET only when complete, and the directory is synced; on
failure it is deleted unless \fB\-\-keep\-partial\fR is given. A file
named TARGET therefore always holds a complete backup.
.TP
.I TARGET (what it may not be)
Neither TARGET nor any file written beside it (its manifest, the partials)
may be the source, a file of its backing chain, a file beside them (their
bitmaps and manifests), the new backup's backing file, or the backup the
bitmap is anchored to; and a backup that another backup's manifest names as
its parent is not replaced. Such a TARGET is a usage error (exit 2), with
\fB\-\-force\fR or without, and nothing is written. TARGET may not be a
directory, device, FIFO or socket.
.TP
.I TARGET
A raw target is sparse: clusters that read as zeros are holes. A qcow2 target
is a version 3 image with 16\-bit refcounts, written by imgbackup itself; it
passes \fBqemu\-img check\fR. Zero and unallocated clusters of the source are
left unallocated.
.TP
.I TARGET.manifest
What the backup holds, written beside it unless \fB\-\-no\-manifest\fR (as
TARGET.manifest.partial, renamed just before TARGET). Format version 2,
integers big\-endian: bytes 0\-7 the magic "IMGBKMAN"; 8\-11 the format
version; 12\-15 the length L of the JSON metadata; 16\-23 the offset T of the
run table (32 + L rounded up to 8); 24\-31 the number of runs R; 32 onwards
the JSON metadata, zero\-padded up to T; at T, R run records of 16 bytes
(first chunk; kind in bits 63\-62 and number of chunks in bits 61\-0; kind 0
zero, 1 data, 2 as in the parent's manifest, 3 as the source's backing file
reads: \fB\-\-sync top\fR records the backing chain by identity in
backing_files and digests it when a check needs it, refusing with exit 7 if
a file of it changed; its root_digest is then empty) that cover the image in
order;
then the 32\-byte digest of every chunk of the data runs, in order; then 32
bytes: the sha256 of every preceding byte of the file. Runs of zero chunks
and an incremental's unchanged chunks take one record each, so the size of
a manifest follows the data. The JSON metadata holds format_version,
virtual_size, chunk_size (64 KiB, or the backup cluster size if smaller),
chunks, root_digest (hex sha256 over "imgbackup\-root\-v2", the algorithm,
the sizes, then 'Z' and a count for each maximal run of zero chunks and 'D'
and the digest for each other chunk: it identifies the image, however the
manifest stores it), digest (sha256 or blake3), data_chunks, runs, source,
source_format, target_format, sync,
bitmap, parent (path and root_digest of the backup an incremental builds on),
started and finished (RFC 3339), created_by, incomplete (byte ranges the
backup does not hold), file (the identity of the data file it describes:
size, mtime seconds and nanoseconds, inode, taken once the file is complete)
and detached (an incremental written with \fB\-\-no\-backing\fR). A
manifest is \fIbound\fR to its file when that identity matches: the
manifest is renamed into place first, so a crash between the two renames of
a \fB\-\-force\fR replacement leaves a manifest that no longer matches the
old file, and \fBverify\fR (exit 7), bitmap anchoring (exit 6) and
\fBbitmap rebuild \-\-against\-backup\fR (exit 7) refuse it. A copied backup keeps
its content but not its inode: \fBverify\fR says so and checks the content.
\fB\-\-force \-\-no\-manifest\fR removes the replaced backup's manifest.
\fBimgbackup verify\fR recomputes the digests of the backup through its
backing chain, reading only what the manifest or the backup says holds
data; \fBimgbackup restore\fR checks every chunk while it writes. Version 1
manifests (a digest for every chunk at offset 16384, root digest the sha256
over all of them) are still read, and may be the parent of a version 2
incremental. docs/manifest.md in the source tree has the byte\-by\-byte
description.
"#;

const FILE_BITMAP: &str = r#".TP
.I IMAGE.NAME.bitmap
Dirty bitmap NAME of IMAGE, beside it. Version 2, integers big\-endian: bytes
0\-7 the magic "IMGBKBMP"; 8\-11 the format version; 12\-15 flags (bit 0
enabled, bit 1 in use, bit 2 inconsistent; other bits make the file
damaged); 16\-23 the granularity in bytes (a power of two, 512 to 2G); 24\-31
the image's virtual size; 32\-71 the image's identity when the bitmap was last
in sync with it: file size (32\-39), mtime seconds (40\-47), mtime
nanoseconds (48\-51), reserved (52\-55), inode (56\-63), device (64\-71);
72\-75 the length A of the anchored backup's path; 76\-107 that backup's
manifest root digest; 108\-139 that backup file's identity (size, mtime
seconds, mtime nanoseconds, reserved, inode); 140 onwards the path (A bytes),
zero padding to a multiple of 8; then ceil(virtual size / granularity) bits,
bit k of byte j standing for granule 8j+k; then the sha256 of every preceding
byte. Version 1 files (without the anchored file's identity) are read.
Files are replaced atomically (a temporary file .IMAGE.NAME.bitmap.tmpXXXXXX
beside it, fsync, rename, fsync of the directory); a temporary file left by a
killed run is removed by the next command that locks the image. A bitmap is
\fIinconsistent\fR when it is marked in use (a process working with it was
killed), flagged inconsistent, its checksum fails, it does not fit the image,
or, when enabled, the image's identity differs from the recorded one (someone
wrote the image without marking it). Once found inconsistent it stays so
through \fBbitmap enable\fR, \fBdisable\fR, \fBguest\fR and failed
backups (the flag); \fBclear\fR and \fBmerge\fR refuse it. Incremental and
bitmap backups refuse an inconsistent bitmap with exit 6; only
\fBbitmap rebuild\fR or a full or top backup with \fB\-\-bitmap\fR makes it
consistent again. docs/bitmaps.md has the same description.
"#;

const BLOCK_DEVICES: &str = r#".SH "BLOCK DEVICES AND SPECIAL FILES"
A SOURCE (or a backing file) may be a block device such as an LVM volume, a
loop device or a disk: its size is the device's size, it is read like a raw
image (every range is data; zero clusters are still detected and left out of
the target), and \fBverify \-\-against\-image\fR compares with it. \fB\-\-bitmap\fR
is refused for a device (exit 2): the kernel records no modification time
for it, so a bitmap beside it could not tell that something wrote it. A
source written during the backup by a process that does not honour the locks
(its size, mtime or inode differ at the end) is exit 4 with no TARGET; a
device records no modification time, so writes to a volume in use cannot be
seen: back up an LVM snapshot of it, or stop its writer first. \fBrestore \-\-force\fR BACKUP DEVICE
writes the raw image into the first bytes of the device itself (holes as
zeros, the rest of the device untouched, the device opened exclusively so a
mounted one is refused); a device smaller than the image is refused.
Character devices, FIFOs and sockets are refused at once (exit 1) as a
source, a backing file, a target or an output; nothing blocks in
\fBopen\fR(2).
"#;

const CBW: &str = r#".SH "COPY-BEFORE-WRITE AND THE SIMULATED GUEST"
With \fB\-\-guest\fR SPEC a simulated guest writes while the backup runs.
Its writes go through a copy\-before\-write filter into a writable overlay
over the source (in memory for images up to 32 MiB, an unlinked sparse
temporary file beside TARGET otherwise); the source file is never changed.
The job reads through the overlay. Before a guest write reaches a cluster the
job has not copied yet, the filter copies that cluster's old data to the
target; a write to a cluster whose copy is in flight waits for it. No cluster
is copied twice, and the backup equals the image as it was when the job
started. Copy\-before\-write copies are not rate limited by \fB\-\-speed\fR,
and the rate limit never holds a claim while it waits, so a guest write never
waits for a throttled background copy.
.PP
SPEC is comma\-separated key=value: \fBiops\fR=N (total writes per second, 0
as fast as possible; default 100), \fBbs\fR=SIZE or MIN\-MAX (default 4K),
\fBpattern\fR=random|sequential|hotspot (default random; hotspot sends 80%
of the writes into a tenth of the range), \fBthreads\fR=N (default 1),
\fBseed\fR=N (default 1), \fBcount\fR=N or \fBduration\fR=DUR (default:
until the background copy ends), \fBzero\fR=PCT (share of writes that write
zeroes). The same SPEC gives the same writes: thread t of T writes only in its
own stripe of the image with its own seeded generator. Offsets are aligned to
512 bytes when every block size is a multiple of 512, and unaligned otherwise.
.PP
\fB\-\-cbw\-cache\fR SIZE (default 4 MiB per worker; 0 disables) lets a guest
write wait only until the old data of its clusters is in RAM; the cache
drains to the target in the background (writes first, under
\fB\-\-on\-target\-error\fR) and the summary reports its peak use. When it is
full, guest writes copy directly, as without it. A cached range is the only
copy of the old data: if writing it fails for good, the job fails (or, with
\fBignore\fR, the range is listed as skipped), whatever
\fB\-\-on\-cbw\-error\fR says.
.PP
\fB\-\-on\-cbw\-error break\-guest\-write\fR (default) fails a guest write
whose copy\-before\-write failed; the cluster stays to be copied by the job,
and the backup stays consistent. \fBbreak\-snapshot\fR lets the write through
and fails the job (no TARGET). \fB\-\-cbw\-timeout\fR DUR bounds how long a
guest write waits for its copy. The summary reports the guest's writes,
bytes, failed writes and write latency p50/p99/max, and the number of
copy\-before\-write copies.
.PP
\fB\-\-sync none\fR (fleecing) copies nothing in the background: the target
is a qcow2 whose backing file is SOURCE and receives only the
copy\-before\-write copies; the job ends when the guest ends (the SPEC needs
count= or duration=). Read through its backing file, the target is the source
as it was at the start.
.PP
\fB\-\-verify\fR re\-reads the finished backup (through its backing file)
before it is renamed into place and compares it with SOURCE as it was at the
start; a difference is exit 7, names the first differing offset, and leaves no
TARGET.
"#;

const SYNC: &str = r#".SH "SYNC MODES AND BITMAPS"
\fBfull\fR copies every cluster; \fBtop\fR only the clusters allocated in the
top image of SOURCE's chain (the target, a qcow2, gets SOURCE's backing file
as its own); \fBincremental\fR the clusters dirty in \fB\-\-bitmap\fR, into
a qcow2 whose backing file is the backup the bitmap is anchored to (so
\fBqemu\-img convert\fR of the newest backup restores the chain; a cluster
that became zero is written as a zero cluster so it shadows the parent);
\fBbitmap\fR the same with \fB\-\-bitmap\-mode\fR; \fBnone\fR see above.
\fB\-\-backing\fR FILE and \fB\-\-no\-backing\fR override the backing file.
With full and top, \fB\-\-bitmap\fR NAME (re)anchors the bitmap to the new
backup: it is created if missing and cleared on success.
.PP
During a job the bitmap is frozen and marked in use on disk; writes made
meanwhile (by \fB\-\-guest\fR) go to a successor. At the end, whatever
happens, as in QEMU: if the job succeeded, or the mode is \fBalways\fR, and
the mode is not \fBnever\fR, the bitmap becomes the successor plus every
cluster the job did not copy (skipped by an ignore policy, or left when it
failed); otherwise the successor is merged back into the bitmap. The in\-use
flag is cleared either way. With \fBalways\fR a failed job keeps
TARGET.partial, which holds the clusters the bitmap no longer marks. On
success the bitmap is anchored to the new backup (path and manifest root
digest), except with \fBnever\fR.
.PP
\fBimgbackup guest\fR IMAGE SPEC writes into a raw IMAGE itself, marking
every enabled bitmap beside it (in use while it runs) and recording the
image's new identity once the writes are flushed; a bitmap already
inconsistent is marked but stays inconsistent. \fBbitmap import\fR reads a
persistent bitmap QEMU keeps in a qcow2 image and refuses one QEMU marks in
use, or an image whose autoclear bit says its bitmaps are stale (exit 6).
\fBbitmap rebuild\fR IMAGE NAME \fB\-\-against\-backup\fR BACKUP marks dirty every
chunk of IMAGE whose digest differs from BACKUP's manifest and anchors NAME to
BACKUP.
"#;

const POLICIES: &str = r#".SH "ERROR POLICIES"
\fB\-\-on\-source\-error\fR and \fB\-\-on\-target\-error\fR decide what a failed
copy does. \fBreport\fR (default) fails the job: exit 4 for the source, 5 for
the target, and no TARGET is left. \fBignore\fR skips the clusters that fail
(a failing request is retried cluster by cluster to find them): they keep
their copy bit (and stay dirty in a bitmap), get no progress credit, are
listed in the summary and in the manifest's \fIincomplete\fR ranges, and the
job finishes with exit 3; \fBverify\fR then exits 3 as well.
\fBretry\fR tries the range again up to \fB\-\-retries\fR N times (default
3), waiting \fB\-\-retry\-delay\fR (default 1s) and doubling up to
\fB\-\-retry\-max\-delay\fR (default 1m), then reports; every retry is logged
on stderr with its cause and listed in the JSON summary (retry_events).
\fBenospc\fR retries like retry only when the cause is ENOSPC, EDQUOT or EFBIG
(a full file system or quota, a file size limit) and reports anything else at
once. A failed range always gets its copy bit back, so a copy\-before\-write or
a retry can copy it later.
"#;

const LOCKING: &str = r#".SH LOCKING
A backup takes an exclusive \fBflock\fR(2) on the source image: a second
imgbackup working on the same image (or its bitmaps) exits 8 at once, or
waits with \fB\-\-wait\-lock\fR DUR. It also holds an exclusive lock on
TARGET.partial while it writes it, so two backups of different images into
the same TARGET (two cron jobs sharing a backup directory) cannot write one
file: the second exits 8, or waits with \fB\-\-wait\-lock\fR. It also honours QEMU's image locking
like qemu\-img: it takes QEMU's OFD read locks on every layer (byte 100,
consistent read, and byte 201, write not shared) and refuses, with exit 8, an
image that another process such as a running QEMU holds open for writing
(byte 101). While imgbackup runs, a QEMU cannot open the image for writing;
read\-only inspection such as \fBqemu\-img info\fR still works, as it does
while qemu\-img reads an image. \fB\-\-force\-share\fR takes and checks no QEMU
lock (like \fBqemu\-img \-U\fR); if the other process writes the image during
the backup (its size, modification time or inode change), the backup is not
point\-in\-time and fails with exit 4, leaving no TARGET.
"#;

const NBD_SOURCES: &str = r#".SH "NBD SOURCES"
SOURCE may be an NBD export: \fBnbd://\fIHOST\fR[\fB:\fIPORT\fR][\fB/\fIEXPORT\fR] or
\fBnbd+unix:///\fIEXPORT\fB?socket=\fIPATH\fR (QEMU's and libnbd's syntax; TLS,
vsock and other query parameters are refused). This is how a running QEMU
hands out a point\-in\-time view of a disk: libvirt's pull\-mode
\fBvirsh backup\-begin\fR, qemu\-storage\-daemon with a \fBcopy\-before\-write\fR
filter and a \fBsnapshot\-access\fR export, or \fBqemu\-nbd\fR for an image no
VM is running (recipes: docs/live\-vms.md). The export is read with
structured replies and \fBbase:allocation\fR block status: ranges it reports
as zeros are never read and stay unallocated in a qcow2 TARGET. Several
requests are in flight on one connection; a server that advertises
multi\-conn gets more connections. Under \fB\-\-on\-source\-error ignore\fR, a
request whose connection was lost is sent once more, alone, on a new
connection before it counts as failed: QEMU's server drops the connection
when a read fails in its image, failing every request in flight with it, and
only the damaged clusters should be skipped. imgbackup takes no lock on an export
(its server owns the image) and keeps no bitmap files for it.
.PP
\fB\-\-sync full\fR copies the export. \fB\-\-sync top\fR copies what
\fBbase:allocation\fR reports allocated; for a QEMU export that is every
range some layer of the exported chain holds (the export has no backing
file of its own), so holes read as zeros and TARGET gets no backing file
unless \fB\-\-backing\fR names one. \fB\-\-sync incremental\fR and \fBbitmap\fR
need \fB\-\-source\-bitmap\fR \fINAME\fR (the export's
\fBqemu:dirty\-bitmap:\fINAME\fR context; exit 6 if the server offers none)
and \fB\-\-backing\fR \fIPARENT\fR, the previous backup of the same export:
its manifest must name the same URI and virtual size (exit 6 otherwise).
Only the bitmap's dirty clusters are read, into a qcow2 backed by PARENT.
QEMU's bitmap is never changed: clearing it (or starting a new one) after a
successful backup is the VM owner's step (libvirt checkpoints, or QMP
\fBblock\-dirty\-bitmap\-clear\fR). \fB\-\-bitmap\fR, \fB\-\-bitmap\-mode\fR,
\fB\-\-guest\fR and \fB\-f qcow2\fR are refused (exit 2).
.PP
A connection that drops, or an error reply, is a source read error: the
\fB\-\-on\-source\-error\fR policy applies; with \fBretry\fR the next attempt
connects again (with the policy's backoff). \fB\-\-timeout\fR and signals
end the job even while a read waits on a server that stopped answering,
and \fB\-\-timeout\fR also while connecting (a handshake gives up after
20 seconds otherwise). A server that cannot be reached when the job starts
is exit 1, as a missing file is.
"#;

const BACKUP_EXAMPLES: &str = r#".TP
Back up a qcow2 image into a sparse raw file:
.B imgbackup backup disk.qcow2 disk-backup.raw
.TP
Describe an image and its backing chain as JSON:
.B imgbackup info \-\-json overlay.qcow2
.TP
Check a backup, and restore it:
.B imgbackup verify backup.qcow2 && imgbackup restore backup.qcow2 disk.raw
"#;

const INJECTION: &str = r#".SH "FAULT INJECTION"
\fB\-\-inject\fR RULE (repeatable) places a fault\-injection node under the
source or the target, like QEMU's blkdebug. RULE is
\fINODE\fB:\fIOP\fB:\fIERRNO\fR[\fB@\fIWHERE\fR][\fB,once\fR|\fB,count=\fIN\fR|\fB,prob=\fIP\fB,seed=\fIS\fR][\fB,delay=\fIDUR\fR]:
.TP
.I NODE
\fBsource\fR or \fBtarget\fR.
.TP
.I OP
\fBread\fR, \fBwrite\fR (writes and write\-zeroes) or \fBflush\fR.
.TP
.I ERRNO
EIO, ENOSPC, EDQUOT, EROFS, EFBIG, EPERM, EACCES, EAGAIN, EBUSY, EINVAL,
ENOMEM, ENXIO, ENODEV, ETIMEDOUT, ECONNRESET, ESTALE, or a number.
.TP
.I WHERE
OFFSET or OFFSET\-END in bytes (SIZE units allowed): requests touching the
range fail. \fBnth=\fIN\fR: requests of that kind from the N\-th on
(counted from 1 for each rule). Without WHERE every request matches.
.TP
.B once, count=N, prob=P, seed=S, delay=DUR
fail one matching request, at most N, or each with probability P from a
generator seeded with S (repeatable runs); wait DUR before failing.
.PP
Only requests that do I/O count: unallocated and zero ranges are not read.
With \fB\-\-jobs 1\fR and \fB\-\-max\-chunk\fR equal to the cluster size,
requests happen in offset order, one cluster each, so a rule hits a
predictable cluster. Example: \fB\-\-inject source:read:EIO@nth=2,once\fR.
"#;

const NOTES: &str = r#".SH NOTES
Source images are opened read\-only and never changed. An image served by
\fBimgbackup serve\fR is backed up inside the serving process, while its
clients write (see \fBimgbackup\-serve\fR(1), BACKUPS OF A SERVED IMAGE).
Formats are probed by
their magic (qcow2, or else raw) unless \fB\-\-source\-format\fR is given.
Backing files are resolved relative to the directory of the image that names
them, as QEMU does; raw and qcow2 backing files are followed, and a backing
file shorter than its overlay reads as zeros past its end.
.PP
Compressed clusters are read in deflate and zstd (compression_type=zstd).
qcow2 images that use encryption, extended L2 entries, an
external data file or unknown incompatible features are refused as
unsupported (exit 1), as are images marked corrupt by QEMU and images whose
persistent bitmaps QEMU would refuse to load. L1 and L2 entries are checked
the way \fBqemu\-img check\fR checks them before they are followed: reserved
bits, alignment (also of zero clusters that keep an offset), zero clusters in
a version 2 image, COPIED compressed clusters, entries outside the file, and
data or L2 tables on top of other metadata. Such damage found while copying
is a source read error (exit 4) naming the guest offset; it is never read as
zeros. A file\-size limit (\fBulimit \-f\fR, systemd's LimitFSIZE) is a
target write error (exit 5): imgbackup ignores SIGXFSZ. A closed stdout or
stderr (\fB| head\fR) loses the text, never the job: the exit code still
tells how the job ended.
.PP
Sizes take the units K, M, G, T (powers of 1024); durations are humantime
forms such as 500ms, 30s or 2h 5m; rates are sizes per second (100M).
"#;

const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
.B IMGBACKUP_PROGRESS_INTERVAL
Interval between \fB\-\-progress plain\fR lines, as a duration (default 5s).
"#;

/// How options are named, in every command.
const OPTION_NAMES: &str = r#".SH "OPTION NAMES"
One word means one thing in every command:
.TP
.BR \-f ", " \-\-format " FORMAT"
the format of an image the command reads (SOURCE, IMAGE, the image of
\fB\-\-against\-image\fR); probed from its magic when left out.
.TP
.BR \-O ", " \-\-output\-format " FORMAT"
the format of the file the command writes (a backup's TARGET, a restore's
OUTPUT).
.TP
.B \-\-output\-cluster\-size \fISIZE\fR
the qcow2 cluster size of the file the command writes.
.TP
.B \-\-granularity \fISIZE\fR
the unit a backup copies and tracks, and the bytes per bit of a bitmap.
.TP
.B \-\-against\-image \fIIMAGE\fR, \-\-against\-backup \fIBACKUP\fR
an image to compare content with (\fBverify\fR), and a backup whose manifest
to compare with (\fBbitmap rebuild\fR).
.PP
Short options follow qemu\-img where it has one (\fB\-f\fR, \fB\-O\fR,
\fB\-U\fR for \fB\-\-force\-share\fR, \fB\-q\fR) and restic otherwise
(\fB\-n\fR for \fB\-\-dry\-run\fR, \fB\-v\fR); \fB\-j\fR is
\fB\-\-jobs\fR. \fB\-\-force\fR has no short form. The spellings of
imgbackup 0.1 (\fB\-\-target\-format\fR, \fB\-\-source\-format\fR,
\fB\-\-target\-cluster\-size\fR, backup's \fB\-\-cluster\-size\fR,
restore's \fB\-\-format\fR and \fB\-\-cluster\-size\fR, \fB\-\-against\fR,
\fB\-\-against\-format\fR) still work in 0.2, with a deprecation note on
stderr.
.PP
Global options (\fB\-\-json\fR, \fB\-q\fR, \fB\-v\fR) go before or after
the command; \fB\-q\fR and \fB\-v\fR exclude each other. Sizes take the
units K, M, G, T, P, meaning KiB, MiB, GiB, TiB, PiB (powers of 1024; KiB,
MiB ... are accepted too); durations are humantime forms such as 500ms, 30s
or 2h 5m; rates are sizes per second (100M).
"#;

/// The sections a page adds after what clap renders: (files, body,
/// examples, see also).
const SERVE_IMAGE: &str = r#".TP
.I IMAGE
written in place by the clients (a raw file, or a qcow2 image with its
backing chain, written through the in\-place qcow2 writer (see QCOW2
WRITTEN IN PLACE); any image with \fB\-\-read\-only\fR, read through its
backing chain; never a backup, which has a manifest beside it), locked like a
running QEMU locks its disk, flushed when a client flushes and when the
server stops.
.TP
.I IMAGE.ctl
the control socket of a writable export (or \fB\-\-control PATH\fR):
\fBimgbackup backup IMAGE\fR finds the server here and runs its job inside it (see BACKUPS OF A SERVED IMAGE).
Removed when the server stops; a stale one left by a killed server is
ignored by \fBbackup\fR and replaced by the next server.
"#;

const SERVE_BITMAPS: &str = r#"Every enabled bitmap beside a writable IMAGE is marked in use while the
server runs, marked before each write is issued (so before the client sees
it acknowledged), saved on a client flush when it changed, and saved with the image's
new identity when the server stops: an incremental backup after a served
session copies exactly what the clients wrote. A server killed with
SIGKILL leaves the bitmaps in use, which the next backup refuses (exit 6)
until \fBbitmap rebuild\fR.
"#;

const SERVE_PROTOCOL: &str = r#".SH PROTOCOL
NBD fixed newstyle negotiation with the options GO, INFO, EXPORT_NAME, LIST,
ABORT, STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (STARTTLS is
refused: there is no TLS); the commands READ, WRITE (with FUA), WRITE_ZEROES
(with NO_HOLE), TRIM, FLUSH, BLOCK_STATUS and DISC. Metadata contexts:
\fBbase:allocation\fR (holes and zero clusters are reported as holes that
read as zeros) and \fBqemu:dirty\-bitmap:NAME\fR for every bitmap beside
IMAGE (dirty ranges flagged 1, as QEMU reports them). Requests of one
connection are carried out concurrently and answered as they finish;
several connections may be open at once (multi\-conn is advertised:
flushes reach the file all clients share). Reads and writes may be up to
32 MiB. A client that breaks the protocol is disconnected; the others go
on. SIGINT and SIGTERM stop the server: no new connections or requests,
requests in flight finish, the image and bitmaps are flushed and saved, and
the exit status is 0.
.SH BACKUPS OF A SERVED IMAGE
\fBimgbackup backup IMAGE TARGET\fR on an image a writable server serves
(its \fIIMAGE.ctl\fR answers) runs the job inside the serving process,
while the clients keep writing. The job inserts its copy\-before\-write
filter between the clients and the image once every write in flight has
finished and before the next one starts: that instant is the backup's
point in time (\fBpoint_in_time\fR in the summary, microseconds). Every
write the clients saw completed before it is in the backup; none they sent
after it is. The same options, progress, \fB\-\-json\fR summary and exit
codes as a local backup; the summary adds \fBclients\fR: the clients'
writes during the job and their latency at the server (like the simulated
guest's). Relative paths are taken from the directory \fBbackup\fR runs
in. With \fB\-\-bitmap\fR the job takes the server's live bitmap: the
bits it copies are frozen at the point in time, and the live bitmap goes
on recording from there, so the next incremental copies exactly what the
clients wrote since. One job at a time: a second is refused (exit 8).
Ctrl\-C (SIGINT, SIGTERM, SIGHUP) of \fBbackup\fR, or its end, cancels
the job and never the server; stopping the server cancels a running job
(its \fBbackup\fR exits 143 or 130, no TARGET is left). Refused on a
served image (exit 2): \fB\-\-guest\fR (the clients are the guest),
\fB\-\-sync top\fR and \fBnone\fR, and \fB\-\-verify \-\-no\-manifest\fR
(the image changes while the job runs: only the manifest can tell what
the backup must hold). Log lines (\fB\-v\fR) of the job are written by
the server.
.PP
\fBinfo\fR and \fBbitmap list\fR/\fBshow\fR of a served image show its
bitmaps as the server holds them (\fBserved\fR in \fB\-\-json\fR), not the
files it keeps marked in use; \fBbitmap add\fR, \fBremove\fR, \fBclear\fR,
\fBenable\fR and \fBdisable\fR are carried out by the server, with the
clients' writes drained (refused while a backup runs there, exit 8);
\fBbitmap merge\fR, \fBimport\fR and \fBrebuild\fR are refused while the
image is served (exit 8: stop the server first).
.PP
\fB\-\-control PATH\fR puts the control socket at PATH instead of
\fIIMAGE.ctl\fR (a read\-only directory, a fixed place under /run); then
\fBbackup\fR, \fBbitmap\fR and \fBinfo\fR reach the server only when
given the same \fB\-\-control PATH\fR, and refuse (exit 2) an image the
server at PATH does not serve.
"#;

const QCOW2_IN_PLACE: &str = r#".SH QCOW2 WRITTEN IN PLACE
qcow2 images are written in place through the imago crate (with one
ordering fix: a crash or SIGKILL at any moment leaves nothing worse than
leaked clusters). While they are written their dirty bit is set (QEMU's
lazy\-refcounts marker), cleared once every table is flushed when the
server or guest stops: after a crash, QEMU rebuilds the refcounts when it
opens the image read\-write (\fBqemu\-img check \-r leaks\fR does the same).
Persistent bitmaps QEMU keeps inside the image are invalidated (their
autoclear bit is cleared), since they are not updated. Refused (exit 1,
the image unchanged): version 2 images (\fBqemu\-img amend \-o
compat=1.1\fR upgrades them), internal snapshots, zstd compression, an
image already marked dirty. See docs/qcow2.md for the measurements.
"#;

const SERVE_EXAMPLES: &str = r#".TP
Serve a raw disk to a VM, then back up what it wrote:
.B imgbackup serve /vm/disk.raw \-\-socket /run/disk.sock
.br
.B qemu\-system\-x86_64 \-drive driver=nbd,server.type=unix,server.path=/run/disk.sock ...
.TP
Back it up while the VM runs: a full that anchors a bitmap, then incrementals:
.B imgbackup backup \-\-bitmap nightly /vm/disk.raw /backup/full.qcow2
.br
.B imgbackup backup \-\-sync incremental \-\-bitmap nightly /vm/disk.raw /backup/inc1.qcow2
.TP
Boot a VM from a backup at once; its writes land in an overlay, the backup never changes:
.B imgbackup serve /backup/inc3.qcow2 \-\-overlay /vm/restored.qcow2 \-\-socket /run/r.sock
.TP
Look at a backup with qemu\-img, read\-only:
.B imgbackup serve \-\-read\-only /backup/inc.qcow2 \-\-socket /tmp/b.sock &
.br
.B qemu\-img map nbd+unix:///?socket=/tmp/b.sock
"#;

const SETS: &str = r#".SH "BACKUP SETS"
A backup set is a directory of backups, each with its manifest
(\fINAME\fB.manifest\fR): the manifests say which backup builds on which
(\fBparent\fR), what was backed up (\fBsource\fR; several sources may
share a directory), when (\fBstarted\fR) and what the point\-in\-time
image is (\fBroot digest\fR). A file without a manifest is not part of
the set.
.PP
\fBlist\fR shows each chain, oldest first, with what is wrong: an
\fIorphan\fR (a manifest whose file is gone), a \fImissing parent\fR (the
backup cannot be restored), a manifest not bound to its file (the file
was copied or replaced), a damaged manifest. A backup that cannot be
restored as listed (an orphan, a missing parent, an unreadable manifest)
makes \fBlist\fR exit 7 with one line on stderr naming it, so a cron job
sees a broken set by its exit code. The bitmaps anchored to a backup are
found beside the sources its manifest names.
.PP
\fBprune\fR applies its rules to the backups of each source, with
restic's \fBforget\fR semantics: a backup is kept if any rule keeps it;
\fB\-\-keep\-daily\fR N keeps the newest backup of each of the N newest
days that have one (hours, weeks from Monday, months alike, in UTC);
\fB\-\-keep\-within\fR counts back from the newest backup. A backup a
bitmap is anchored to is always kept. When a kept backup's parent is to
be removed, the kept backup is first rewritten as a self\-contained
qcow2 holding the same point\-in\-time image (read through its chain,
compressed if it was), written as NAME.partial and renamed over
NAME: its children's backing links and its manifest (same root digest,
no parent any more, bound to the new file) stay valid, and bitmaps
anchored to it follow it. Only then are the other backups removed,
newest first.
.PP
The plan is written to \fIDIR\fB/.imgbackup\-prune\fR before anything
changes. After a kill or a power loss at any moment every kept backup is
restorable (by \fBimgbackup restore\fR and by \fBqemu\-img\fR), and the
next \fBprune\fR, or \fBlist \-\-repair\fR, finishes the interrupted
plan first. \fBprune\fR holds DIR locked exclusively; a \fBbackup\fR
writing into DIR holds it shared, so each waits for the other
(\fB\-\-wait\-lock\fR) or is refused with exit 8: a prune never removes
what a running backup builds on. \fBprune\fR sees the manifests in DIR
only: keep each chain in one directory (a backup elsewhere whose parent is
in DIR is not protected).
.PP
\fBconsolidate\fR \fIBACKUP OUTPUT\fR writes the same kind of
self\-contained copy into a new file with its own manifest (BACKUP's
source, times and root digest, no parent): a synthetic full backup made
without reading the source again, so an incremental\-forever schedule
never re\-reads a VM's disk.
"#;

/// The extra sections of the backup-set pages.
fn sets_extras(page: &str) -> Option<(String, String, &'static str, Vec<&'static str>)> {
    let see = [
        "imgbackup-list",
        "imgbackup-prune",
        "imgbackup-consolidate",
        "imgbackup-backup",
    ];
    let see_others = |me: &str| see.iter().copied().filter(|p| *p != me).collect::<Vec<_>>();
    Some(match page {
        "imgbackup-list" => (
            String::new(),
            SETS.to_string(),
            r#".TP
The chains in a backup directory, and what is wrong with them:
.B imgbackup list /backup/vm
.TP
Check every backup too (exit 7 if one does not match its manifest):
.B imgbackup list \-\-verify \-\-json /backup/vm
.TP
Finish a prune that a power loss interrupted:
.B imgbackup list \-\-repair /backup/vm
"#,
            see_others("imgbackup-list"),
        ),
        "imgbackup-prune" => (
            String::new(),
            SETS.to_string(),
            r#".TP
See what a retention policy would do:
.B imgbackup prune \-\-dry\-run \-\-keep\-daily 7 \-\-keep\-weekly 4 \-\-keep\-monthly 6 /backup/vm
.TP
Nightly incrementals with retention (a crontab):
.B 0 1 * * * imgbackup backup \-q \-\-sync incremental \-\-bitmap nightly /vm/disk.raw /backup/vm/inc\-$(date +\e%FT\e%T).qcow2 && imgbackup prune \-q \-\-keep\-daily 7 \-\-keep\-weekly 4 /backup/vm
"#,
            see_others("imgbackup-prune"),
        ),
        "imgbackup-consolidate" => (
            String::new(),
            SETS.to_string(),
            r#".TP
A synthetic full from last night's incremental:
.B imgbackup consolidate /backup/vm/inc\-2026\-11\-20.qcow2 /backup/vm/full\-2026\-11\-20.qcow2
"#,
            see_others("imgbackup-consolidate"),
        ),
        _ => return None,
    })
}

fn extras(page: &str) -> (String, String, &'static str, Vec<&'static str>) {
    if let Some(e) = sets_extras(page) {
        return e;
    }
    let bitmap_file = FILE_BITMAP.to_string();
    match page {
        "imgbackup" => (
            String::new(),
            [OPTION_NAMES, BLOCK_DEVICES, LOCKING, NOTES, ENVIRONMENT].concat(),
            BACKUP_EXAMPLES,
            vec![],
        ),
        "imgbackup-backup" => (
            [FILES_TARGET, &bitmap_file].concat(),
            [
                CBW,
                SYNC,
                POLICIES,
                LOCKING,
                NBD_SOURCES,
                INJECTION,
                BLOCK_DEVICES,
            ]
            .concat(),
            r#".TP
Back up a qcow2 image into a sparse raw file:
.B imgbackup backup disk.qcow2 disk-backup.raw
.TP
From cron, with a log line every few seconds and a bounded run time:
.B imgbackup backup \-\-progress plain \-\-timeout 2h /var/lib/vm/disk.qcow2 /backup/disk.qcow2
.TP
A weekly full and daily incrementals under date\-stamped names (a crontab; a ':' in a name is fine):
.B 0 1 * * 0 imgbackup backup \-q \-\-bitmap nightly /vm/disk.raw /backup/full\-$(date +\e%FT\e%T).qcow2
.br
.B 0 1 * * 1\-6 imgbackup backup \-q \-\-sync incremental \-\-bitmap nightly /vm/disk.raw /backup/inc\-$(date +\e%FT\e%T).qcow2
.TP
A backup while a simulated guest writes, checked afterwards:
.B imgbackup backup \-\-guest iops=500,bs=4K,threads=2 \-\-verify disk.qcow2 backup.qcow2
.TP
Fleecing: keep only what the guest overwrites, over the unchanged source:
.B imgbackup backup \-\-sync none \-\-guest duration=30s disk.qcow2 fleece.qcow2
.TP
Back up an LVM volume:
.B imgbackup backup /dev/vg0/data /backup/data.qcow2
.TP
A running VM's point\-in\-time export (full, then an incremental with QEMU's bitmap):
.B imgbackup backup 'nbd+unix:///vda?socket=/run/backup.sock' full.qcow2
.br
.B imgbackup backup \-\-sync incremental \-\-source\-bitmap b1 \-\-backing full.qcow2 'nbd+unix:///vda?socket=/run/backup.sock' inc1.qcow2
.TP
Test a script's error handling: fail the second read once:
.B imgbackup backup \-\-inject source:read:EIO@nth=2,once disk.raw t.raw; echo $?
"#,
            vec![
                "imgbackup-verify",
                "imgbackup-restore",
                "imgbackup-bitmap",
                "imgbackup-guest",
            ],
        ),
        "imgbackup-verify" => (
            String::new(),
            String::new(),
            r#".TP
Check a backup (and its chain) against its manifest:
.B imgbackup verify /backup/inc\-2026\-01\-02.qcow2
.TP
Also compare it with the image it was made from, as it is now:
.B imgbackup verify \-\-against\-image disk.raw backup.qcow2
"#,
            vec!["imgbackup-backup", "imgbackup-restore"],
        ),
        "imgbackup-restore" => (
            r#".TP
.I OUTPUT.partial
The restored image while it is written: created exclusively, never through
a link, with the backup's permission bits; renamed to OUTPUT once complete,
flushed and checked against the manifest. A block device OUTPUT (with
\fB\-\-force\fR) is written in place instead: the raw image into its first
bytes, holes as zeros, the rest of the device untouched.
"#
            .to_string(),
            String::new(),
            r#".TP
Restore the newest backup of a chain into a raw image:
.B imgbackup restore /backup/inc\-2026\-01\-02.qcow2 disk.raw
.TP
Restore onto an LVM volume:
.B imgbackup restore \-\-force /backup/data.qcow2 /dev/vg0/data
"#,
            vec!["imgbackup-backup", "imgbackup-verify"],
        ),
        "imgbackup-info" => (
            String::new(),
            String::new(),
            r#".TP
Format, sizes, allocation, chain, bitmaps and manifest of a backup:
.B imgbackup info /backup/full.qcow2
"#,
            vec!["imgbackup-bitmap", "imgbackup-verify"],
        ),
        "imgbackup-guest" => (
            format!(
                r#".TP
.I IMAGE
written in place (a raw file, or a qcow2 image through the in\-place
qcow2 writer, see \fBimgbackup\-serve\fR(1)), flushed at the end.
{bitmap_file}"#
            ),
            String::new(),
            r#".TP
Dirty a bitmap between two backups with 200 seeded 4 KiB writes:
.B imgbackup guest disk.raw iops=0,count=200,bs=4K,seed=7
"#,
            vec!["imgbackup-backup", "imgbackup-bitmap"],
        ),
        "imgbackup-serve" => (
            format!("{SERVE_IMAGE}{bitmap_file}{SERVE_BITMAPS}"),
            [SERVE_PROTOCOL, QCOW2_IN_PLACE].concat(),
            SERVE_EXAMPLES,
            vec!["imgbackup-backup", "imgbackup-bitmap", "imgbackup-guest"],
        ),
        "imgbackup-bitmap" => (
            bitmap_file,
            String::new(),
            r#".TP
List the bitmaps beside an image and whether they can be trusted:
.B imgbackup bitmap list disk.raw
.TP
The way back after a bitmap went stale:
.B imgbackup bitmap rebuild disk.raw nightly \-\-against\-backup /backup/full.qcow2
"#,
            BITMAP_PAGES.to_vec(),
        ),
        p if p.starts_with("imgbackup-bitmap-") => (
            if matches!(p, "imgbackup-bitmap-list" | "imgbackup-bitmap-show") {
                String::new()
            } else {
                bitmap_file
            },
            String::new(),
            bitmap_example(p),
            vec!["imgbackup-bitmap"],
        ),
        _ => (String::new(), String::new(), "", vec![]),
    }
}

const BITMAP_PAGES: &[&str] = &[
    "imgbackup-bitmap-add",
    "imgbackup-bitmap-remove",
    "imgbackup-bitmap-clear",
    "imgbackup-bitmap-enable",
    "imgbackup-bitmap-disable",
    "imgbackup-bitmap-list",
    "imgbackup-bitmap-show",
    "imgbackup-bitmap-merge",
    "imgbackup-bitmap-import",
    "imgbackup-bitmap-rebuild",
];

fn bitmap_example(page: &str) -> &'static str {
    match page {
        "imgbackup-bitmap-add" => {
            ".TP\nA bitmap with 4 KiB granularity:\n.B imgbackup bitmap add disk.raw fine \\-\\-granularity 4K\n"
        }
        "imgbackup-bitmap-remove" => ".TP\n.B imgbackup bitmap remove disk.raw old\n",
        "imgbackup-bitmap-clear" => ".TP\n.B imgbackup bitmap clear disk.raw nightly\n",
        "imgbackup-bitmap-enable" => ".TP\n.B imgbackup bitmap enable disk.raw nightly\n",
        "imgbackup-bitmap-disable" => ".TP\n.B imgbackup bitmap disable disk.raw nightly\n",
        "imgbackup-bitmap-list" => ".TP\n.B imgbackup bitmap list \\-\\-json disk.raw\n",
        "imgbackup-bitmap-show" => {
            ".TP\nCounts and dirty ranges:\n.B imgbackup bitmap show disk.raw nightly\n"
        }
        "imgbackup-bitmap-merge" => {
            ".TP\nAdd the bits of weekly and extra into nightly:\n.B imgbackup bitmap merge disk.raw weekly extra \\-\\-into nightly\n"
        }
        "imgbackup-bitmap-import" => {
            ".TP\nCopy QEMU's persistent bitmap bm0 of a qcow2 image:\n.B imgbackup bitmap import disk.qcow2 bm0 \\-\\-as nightly\n"
        }
        _ => {
            ".TP\n.B imgbackup bitmap rebuild disk.raw nightly \\-\\-against\\-backup /backup/full.qcow2\n"
        }
    }
}

/// The command as the man pages show it: without the `help` subcommands.
fn man_command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd = cmd.mut_subcommand("bitmap", |b| b.disable_help_subcommand(true));
    cmd.build();
    cmd
}

/// Render one page: clap's NAME, SYNOPSIS, DESCRIPTION, OPTIONS and
/// SUBCOMMANDS, then EXIT STATUS, FILES, the page's own sections, EXAMPLES
/// and SEE ALSO.
fn page(cmd: clap::Command, name: &str, all: &[String]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).date("").render(&mut out)?;
    let (files, body, examples, see) = extras(name);
    out.extend_from_slice(b".SH \"EXIT STATUS\"\n");
    out.extend_from_slice(EXIT_STATUS.as_bytes());
    if !files.is_empty() {
        out.extend_from_slice(b".SH FILES\n");
        out.extend_from_slice(files.as_bytes());
    }
    out.extend_from_slice(body.as_bytes());
    if !examples.is_empty() {
        out.extend_from_slice(b".SH EXAMPLES\n");
        out.extend_from_slice(examples.as_bytes());
    }
    let mut refs: Vec<String> = if name == "imgbackup" {
        all.iter().filter(|p| *p != "imgbackup").cloned().collect()
    } else {
        std::iter::once("imgbackup".to_string())
            .chain(see.iter().map(|s| s.to_string()))
            .collect()
    };
    refs.dedup();
    let refs: Vec<String> = refs.iter().map(|r| format!("{r}(1)")).collect();
    out.extend_from_slice(format!(".SH \"SEE ALSO\"\n{}\n", refs.join(", ")).as_bytes());
    Ok(out)
}

/// Every generated file: path relative to the repository root, and content.
pub fn render() -> std::io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let cmd = man_command();
    // Every page: (name, the command as it is shown on it).
    let mut pages: Vec<(String, clap::Command)> = vec![("imgbackup".into(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("imgbackup-{}", sub.get_name());
        let shown = sub
            .clone()
            .name(name.clone())
            .bin_name(name.replace('-', " "));
        for nested in sub.get_subcommands().filter(|s| !s.is_hide_set()) {
            let n = format!("{name}-{}", nested.get_name());
            let s = nested.clone().name(n.clone()).bin_name(n.replace('-', " "));
            pages.push((n, s));
        }
        pages.push((name, shown));
    }
    let names: Vec<String> = pages.iter().map(|(n, _)| n.clone()).collect();
    let mut out = Vec::new();
    for (name, c) in pages {
        out.push((
            PathBuf::from(format!("man/{name}.1")),
            page(c, &name, &names)?,
        ));
    }
    for (shell, file) in [
        ("bash", "imgbackup.bash"),
        ("zsh", "_imgbackup"),
        ("fish", "imgbackup.fish"),
    ] {
        out.push((
            PathBuf::from(format!("completions/{file}")),
            super::complete::registration(shell)?,
        ));
    }
    Ok(out)
}

/// Write every generated file below `root`.
pub fn write_all(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (rel, content) in render()? {
        let p = root.join(&rel);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&p, content)?;
        written.push(rel);
    }
    Ok(written)
}
