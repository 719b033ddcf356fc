//! The command line: clap definitions (one definition renders help, the man
//! pages and the completions) and the value parsers.

pub mod complete;
pub mod deprecated;
pub mod docs;
pub mod parse;
pub mod values;

use crate::guest::{GuestSpec, parse_spec};
use crate::node::fault::{Rule, parse_rule};
use crate::node::qcow2::Compression;
use clap::{Args, Parser, Subcommand, ValueEnum};
use parse::{
    parse_cluster_size, parse_compression, parse_duration, parse_jobs, parse_nonzero_size,
    parse_rate, parse_size,
};
use std::path::PathBuf;
use std::time::Duration;
pub use values::{BitmapModeArg, DigestArg, ErrorPolicyArg, FormatArg, OnCbwErrorArg, SyncArg};

/// The exit codes, for `imgbackup --help`.
const AFTER_LONG_HELP: &str = "\
Exit status:
    0        success
    1        failure not covered below (bad or unsupported image, existing target,
             missing directory, a special file)
    2        usage error (bad option or value, a target that would overwrite what
             the backup reads)
    3        finished, but some clusters were skipped by an ignore policy
    4        source read error (a damaged or truncated image, an I/O error, a source
             written during the backup)
    5        target write error, including no space left and a file-size limit
    6        bitmap missing, inconsistent or stale, or a wrong parent
    7        verification mismatch
    8        image or target locked by another process
    9        timeout (--timeout)
    129      stopped by SIGHUP
    130      interrupted by SIGINT
    143      terminated by SIGTERM
A cancelled job (129, 130, 143, 9) leaves no target behind.
See imgbackup(1) for option names, files and examples.";

const AFTER_HELP: &str = "\
Exit status: 0 success, 1 failure, 2 usage error, 3 clusters skipped,
4 source read error, 5 target write error (including no space left),
6 bitmap missing or inconsistent, 7 verification mismatch, 8 locked,
9 timeout, 129/130/143 stopped by SIGHUP/SIGINT/SIGTERM (no target left behind).
See imgbackup(1) for the full table.";

/// Point-in-time backups of raw and qcow2 disk images.
#[derive(Debug, Parser)]
#[command(
    name = "imgbackup",
    version,
    about = "Point-in-time backups of raw and qcow2 disk images",
    long_about = "imgbackup makes point-in-time backups of raw and qcow2 disk images the way \
QEMU's block backup job does: the source is read through an in-process graph of block nodes, \
and the backup is written to TARGET.partial and renamed only once it is complete and flushed.",
    after_help = AFTER_HELP,
    after_long_help = AFTER_LONG_HELP,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    /// Options every command takes.
    pub global: GlobalOpts,
    #[command(subcommand)]
    /// The command to run.
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalOpts {
    /// Print one JSON document on stdout (and nothing else there): the
    /// summary, or `{"ok": false, "exit_code": N, ...}` on failure.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print nothing but errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Say more on stderr: -v what happens, -vv debug details (the graph,
    /// phase timings, policy decisions, lock waits), -vvv every request of
    /// the copy engine. IMGBACKUP_LOG (or RUST_LOG) filters further, e.g.
    /// IMGBACKUP_LOG=imgbackup::copy=trace.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// The control socket of a served image: where `serve` creates it, and
    /// where `backup`, `bitmap` and `info` reach the serving process
    /// [default: IMAGE.ctl beside the image].
    #[arg(long, value_name = "PATH", global = true)]
    pub control: Option<PathBuf>,
}

/// The progress display of commands that copy (backup, restore).
#[derive(Debug, Clone, Args)]
pub struct ProgressOpts {
    /// Progress display: a bar when stderr is a terminal (auto), always a
    /// bar, a plain line every few seconds (for logs and cron mail), or
    /// nothing.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto, value_name = "WHEN")]
    pub progress: ProgressMode,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, nothing otherwise.
    Auto,
    /// A bar on stderr.
    Bar,
    /// A plain line on stderr every few seconds.
    Plain,
    /// Nothing.
    None,
}

#[derive(Debug, Subcommand)]
/// The commands.
pub enum Command {
    /// Make a backup of SOURCE into TARGET.
    Backup(Box<BackupArgs>),
    /// Check a backup against its manifest (and, optionally, an image).
    Verify(VerifyArgs),
    /// Write the image a backup (and its chain) represents into OUTPUT.
    Restore(RestoreArgs),
    /// Show format, sizes, allocation and backing chain of an image.
    Info(InfoArgs),
    /// Manage the dirty bitmaps kept beside an image.
    #[command(subcommand)]
    Bitmap(BitmapCommand),
    /// Apply a simulated guest workload to IMAGE itself (in place), marking
    /// every enabled bitmap beside it.
    Guest(GuestArgs),
    /// Export IMAGE over NBD (a VM, qemu-io, qemu-img or nbdcopy connect to
    /// it); writes mark every enabled bitmap beside IMAGE.
    Serve(ServeArgs),
    /// List the backups in DIR (or the given backups) by chain: parent,
    /// sync mode, source, times, sizes, root digest, anchored bitmaps, and
    /// what is missing or broken.
    List(ListArgs),
    /// Remove the backups in DIR that no retention rule keeps; a kept
    /// backup whose parent goes is first rewritten self-contained.
    Prune(PruneArgs),
    /// Write a backup's point-in-time image (read through its chain) into
    /// OUTPUT as a new self-contained backup with its own manifest.
    Consolidate(ConsolidateArgs),
    /// Write the man pages and shell completions into DIR (man/ and completions/).
    #[command(hide = true)]
    GenerateDocs {
        /// The repository root (man/ and completions/ are written below it).
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
/// `imgbackup backup`.
pub struct BackupArgs {
    /// The image to back up (raw or qcow2, with its backing chain; a regular
    /// file or a block device such as an LVM volume), or an NBD export
    /// (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH, such as
    /// a running QEMU's point-in-time export). It is opened read-only and
    /// never changed.
    #[arg(add = complete::images())]
    pub source: PathBuf,
    /// The backup to write. It is written as TARGET.partial and renamed to
    /// TARGET once complete and flushed.
    #[arg(add = complete::outputs())]
    pub target: PathBuf,
    /// What to copy.
    #[arg(long, value_enum, default_value_t = SyncArg::Full)]
    pub sync: SyncArg,
    /// The dirty bitmap beside SOURCE. With incremental and bitmap it
    /// selects what to copy; with full and top it (re)anchors the bitmap to
    /// this backup (created if missing, cleared on success).
    #[arg(long, value_name = "NAME", add = complete::bitmaps())]
    pub bitmap: Option<String>,
    /// QEMU's dirty bitmap NAME, read from an NBD SOURCE's
    /// `qemu:dirty-bitmap:NAME` context: with --sync incremental or bitmap,
    /// only its dirty clusters are copied into a qcow2 backed by --backing
    /// PARENT (the previous backup of the same export). The bitmap is
    /// never changed: clearing it stays with the VM's owner.
    #[arg(long, value_name = "NAME", conflicts_with = "bitmap")]
    pub source_bitmap: Option<String>,
    /// What happens to the bitmap after the job [default: on-success].
    #[arg(long, value_enum, value_name = "MODE", requires = "bitmap")]
    pub bitmap_mode: Option<BitmapModeArg>,
    /// Backing file written into a qcow2 TARGET [default: for incremental
    /// and bitmap, the backup the bitmap is anchored to; for top, SOURCE's
    /// backing file].
    #[arg(long, value_name = "FILE", conflicts_with = "no_backing", add = complete::backups())]
    pub backing: Option<PathBuf>,
    /// Write no backing file into TARGET.
    #[arg(long)]
    pub no_backing: bool,
    /// Format of TARGET [default: qcow2 when TARGET ends in .qcow2 or the
    /// sync mode needs qcow2 (top, incremental, bitmap, none), else raw].
    #[arg(short = 'O', long, value_enum, value_name = "FORMAT")]
    pub output_format: Option<FormatArg>,
    /// Cluster size of a qcow2 TARGET.
    #[arg(long, value_parser = parse_cluster_size, default_value = "64K", value_name = "SIZE")]
    pub output_cluster_size: u64,
    /// Backup granularity: the unit the job copies and tracks [default:
    /// max(64K, TARGET's cluster size)].
    #[arg(long, value_parser = parse_cluster_size, value_name = "SIZE")]
    pub granularity: Option<u64>,
    /// Write compressed clusters into a qcow2 TARGET: `--compress` alone is
    /// deflate (QEMU's default zlib type) at level 6, no larger than
    /// qemu-img's and about twice as fast; `--compress=zstd`
    /// writes zstd (compression_type=zstd, read by QEMU 5.1 and later);
    /// a level may follow (deflate 1-9, zstd 1-19, e.g. `--compress=zstd:9`).
    /// Clusters that do not shrink are written as they are.
    #[arg(
        long,
        value_name = "ALGO[:LEVEL]",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "deflate",
        value_parser = parse_compression
    )]
    pub compress: Option<Compression>,
    /// Number of copy workers [default: the number of CPUs; one less for
    /// an image `imgbackup serve` writes, so its clients keep a core; at
    /// least 4 for an NBD source, whose reads wait on the server].
    #[arg(short, long, value_parser = parse_jobs, value_name = "N")]
    pub jobs: Option<usize>,
    /// Largest single request [default: max(2M, cluster size); one cluster
    /// for an image `imgbackup serve` writes, so its clients wait less];
    /// rounded down to whole clusters, at least one.
    #[arg(long, value_parser = parse_nonzero_size, value_name = "SIZE")]
    pub max_chunk: Option<u64>,
    /// Limit copy throughput, in bytes per second (e.g. 100M).
    #[arg(long, value_parser = parse_rate, value_name = "RATE")]
    pub speed: Option<u64>,
    /// Cancel the job after DUR (exit 9; no target is left behind).
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub timeout: Option<Duration>,
    /// Replace an existing TARGET (only once the new backup is complete).
    /// Never the source, its chain, the new backup's parent, or the backup
    /// the bitmap is anchored to.
    #[arg(long)]
    pub force: bool,
    /// On failure, keep TARGET.partial instead of deleting it.
    #[arg(long)]
    pub keep_partial: bool,
    /// Print what would be copied and exit without writing anything.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Format of SOURCE; skips probing (probing reads the qcow2 magic,
    /// anything else is raw).
    #[arg(short, long, value_enum, value_name = "FORMAT")]
    pub format: Option<FormatArg>,
    /// Run a simulated guest that writes into the image while the backup
    /// runs (SPEC: iops=N,bs=SIZE|MIN-MAX,pattern=random|sequential|hotspot,
    /// threads=N,seed=N,count=N|duration=DUR,zero=PCT). Its writes land in
    /// an overlay; the source file is never changed.
    #[arg(long, value_parser = parse_spec, value_name = "SPEC")]
    pub guest: Option<GuestSpec>,
    /// Keep what the guest wrote as a qcow2 image backed by SOURCE.
    #[arg(long, value_name = "FILE", requires = "guest", add = complete::outputs())]
    pub guest_overlay: Option<PathBuf>,
    /// What a failed copy-before-write does: fail the guest write (the
    /// backup stays consistent), or let it through and fail the job. With
    /// --guest, or on an image `imgbackup serve` writes (its clients are
    /// the guest). [default: break-guest-write]
    #[arg(long, value_enum, value_name = "POLICY")]
    pub on_cbw_error: Option<OnCbwErrorArg>,
    /// The longest a guest write may wait for its copy-before-write; past
    /// it the copy counts as failed. With --guest or on a served image.
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub cbw_timeout: Option<Duration>,
    /// RAM for copy-before-write: a guest write waits only until the old
    /// data of its clusters is in this cache, which drains to the target in
    /// the background; when it is full, guest writes copy directly. With
    /// --guest or on a served image [default: 4M per worker; 0 disables].
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub cbw_cache: Option<u64>,
    /// After the job, re-read the backup (through its backing file) and
    /// check it against the manifest; with --guest (or --no-manifest) also
    /// check it equals SOURCE as it was at the start. A mismatch is exit 7
    /// and leaves no TARGET.
    #[arg(long)]
    pub verify: bool,
    /// What a failed read of SOURCE does: report (fail, exit 4), ignore
    /// (skip the cluster, leave it dirty, finish with exit 3), retry (up to
    /// --retries times), or enospc (retry only when the cause is
    /// ENOSPC/EDQUOT/EFBIG).
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = ErrorPolicyArg::Report)]
    pub on_source_error: ErrorPolicyArg,
    /// What a failed write of TARGET does (as --on-source-error; report is
    /// exit 5).
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = ErrorPolicyArg::Report)]
    pub on_target_error: ErrorPolicyArg,
    /// Retries of a failed range under the retry and enospc policies.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub retries: u32,
    /// Wait before the first retry; doubled for each next one.
    #[arg(long, value_parser = parse_duration, value_name = "DUR", default_value = "1s")]
    pub retry_delay: Duration,
    /// The longest wait between retries.
    #[arg(long, value_parser = parse_duration, value_name = "DUR", default_value = "1m")]
    pub retry_max_delay: Duration,
    /// Back up even if another process (such as a running QEMU) holds the
    /// image open for writing. If that process writes the image during the
    /// backup, the backup is not point-in-time: it fails with exit 4 and no
    /// TARGET (writes to a block device cannot be seen).
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// When the image (or TARGET, written by another run) is locked, wait up
    /// to DUR for the lock instead of failing at once (exit 8).
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub wait_lock: Option<Duration>,
    /// Do not write TARGET.manifest (the chunk digests that `verify` and
    /// `restore` check).
    #[arg(long)]
    pub no_manifest: bool,
    /// Chunk digest of the manifest: sha256, or blake3 (several times
    /// cheaper per byte) [default: an incremental's parent's, else sha256].
    #[arg(long, value_enum, value_name = "ALGO", conflicts_with = "no_manifest")]
    pub digest: Option<DigestArg>,
    /// Fault injection for testing error handling, like QEMU's blkdebug
    /// (repeatable): NODE:OP:ERRNO[@WHERE][,once|,count=N|,prob=P,seed=S][,delay=DUR].
    /// See imgbackup(1), FAULT INJECTION.
    #[arg(long, value_parser = parse_rule, value_name = "RULE", hide_short_help = true)]
    pub inject: Vec<Rule>,
    #[command(flatten)]
    /// The progress display.
    pub progress: ProgressOpts,
}

#[derive(Debug, Args)]
/// `imgbackup verify`.
pub struct VerifyArgs {
    /// The backup (its manifest is BACKUP.manifest; its backing chain is
    /// followed).
    #[arg(add = complete::backups())]
    pub backup: PathBuf,
    /// Also compare the backup's content with IMAGE (an image, such as the
    /// source as it is now).
    #[arg(long, value_name = "IMAGE", add = complete::images())]
    pub against_image: Option<PathBuf>,
    /// Format of IMAGE; skips probing.
    #[arg(
        short,
        long,
        value_enum,
        value_name = "FORMAT",
        requires = "against_image"
    )]
    pub format: Option<FormatArg>,
    /// Number of hashing workers [default: the number of CPUs].
    #[arg(short, long, value_parser = parse_jobs, value_name = "N")]
    pub jobs: Option<usize>,
}

#[derive(Debug, Args)]
/// `imgbackup restore`.
pub struct RestoreArgs {
    /// The backup to restore (with its backing chain).
    #[arg(add = complete::backups())]
    pub backup: PathBuf,
    /// The image to write. It is written as OUTPUT.partial and renamed once
    /// complete, flushed and checked. A block device (with --force) is
    /// written in place: the raw image into its first bytes.
    #[arg(add = complete::outputs())]
    pub output: PathBuf,
    /// Format of OUTPUT [default: qcow2 when OUTPUT ends in .qcow2, else raw].
    #[arg(short = 'O', long, value_enum, value_name = "FORMAT")]
    pub output_format: Option<FormatArg>,
    /// Cluster size of a qcow2 OUTPUT.
    #[arg(long, value_parser = parse_cluster_size, default_value = "64K", value_name = "SIZE")]
    pub output_cluster_size: u64,
    /// Do not check the data against the backup's manifest.
    #[arg(long)]
    pub no_verify: bool,
    /// Replace an existing OUTPUT (only once the restored image is
    /// complete), or overwrite a block device's content.
    #[arg(long)]
    pub force: bool,
    /// On failure, keep OUTPUT.partial.
    #[arg(long)]
    pub keep_partial: bool,
    /// Number of copy workers [default: the number of CPUs].
    #[arg(short, long, value_parser = parse_jobs, value_name = "N")]
    pub jobs: Option<usize>,
    #[command(flatten)]
    /// The progress display.
    pub progress: ProgressOpts,
}

#[derive(Debug, Subcommand)]
/// `imgbackup bitmap ...`.
pub enum BitmapCommand {
    /// Create a bitmap (clean, recording the image as it is now).
    Add {
        /// The image (its bitmaps are the files IMAGE.NAME.bitmap beside it).
        #[arg(add = complete::images())]
        image: PathBuf,
        /// The bitmap's name (letters, digits, '_', '-', '.').
        #[arg(add = complete::bitmaps())]
        name: String,
        /// Bytes per bit.
        #[arg(long, value_parser = parse_cluster_size, default_value = "64K", value_name = "SIZE")]
        granularity: u64,
        /// Create it disabled (not marked by writes).
        #[arg(long)]
        disabled: bool,
        #[command(flatten)]
        /// Locking options.
        lock: LockOpts,
    },
    /// Delete a bitmap.
    Remove {
        /// The image (its bitmaps are the files IMAGE.NAME.bitmap beside it).
        #[arg(add = complete::images())]
        image: PathBuf,
        /// The bitmap's name (letters, digits, '_', '-', '.').
        #[arg(add = complete::bitmaps())]
        name: String,
        #[command(flatten)]
        /// Locking options.
        lock: LockOpts,
    },
    /// Mark every bit clean (the bitmap must be consistent).
    Clear {
        /// The image (its bitmaps are the files IMAGE.NAME.bitmap beside it).
        #[arg(add = complete::images())]
        image: PathBuf,
        /// The bitmap's name (letters, digits, '_', '-', '.').
        #[arg(add = complete::bitmaps())]
        name: String,
        #[command(flatten)]
        /// Locking options.
        lock: LockOpts,
    },
    /// Let writes mark the bitmap again (from now on).
    Enable {
        /// The image (its bitmaps are the files IMAGE.NAME.bitmap beside it).
        #[arg(add = complete::images())]
        image: PathBuf,
        /// The bitmap's name (letters, digits, '_', '-', '.').
        #[arg(add = complete::bitmaps())]
        name: String,
        #[command(flatten)]
        /// Locking options.
        lock: LockOpts,
    },
    /// Stop writes from marking the bitmap.
    Disable {
        /// The image (its bitmaps are the files IMAGE.NAME.bitmap beside it).
        #[arg(add = complete::images())]
        image: PathBuf,
        /// The bitmap's name (letters, digits, '_', '-', '.').
        #[arg(add = complete::bitmaps())]
        name: String,
        #[command(flatten)]
        /// Locking options.
        lock: LockOpts,
    },
    /// List the bitmaps beside IMAGE.
    List {
        /// The image whose bitmaps to list.
        #[arg(add = complete::images())]
        image: PathBuf,
    },
    /// Show one bitmap: counts and dirty ranges.
    Show {
        /// The image (its bitmaps are the files IMAGE.NAME.bitmap beside it).
        #[arg(add = complete::images())]
        image: PathBuf,
        /// The bitmap's name.
        #[arg(add = complete::bitmaps())]
        name: String,
    },
    /// Set in NAME every bit set in the SRC bitmaps.
    Merge {
        /// The image (its bitmaps are the files IMAGE.NAME.bitmap beside it).
        #[arg(add = complete::images())]
        image: PathBuf,
        /// The bitmaps whose bits are added (they must be consistent).
        #[arg(required = true, value_name = "SRC", add = complete::bitmaps())]
        sources: Vec<String>,
        /// The bitmap to merge into (it must exist).
        #[arg(long, value_name = "NAME", add = complete::bitmaps())]
        into: String,
        #[command(flatten)]
        /// Locking options.
        lock: LockOpts,
    },
    /// Copy a persistent dirty bitmap that QEMU keeps inside the qcow2 IMAGE.
    Import {
        /// The qcow2 image that holds the persistent bitmap (the imported
        /// bitmap is written beside it).
        #[arg(add = complete::images())]
        image: PathBuf,
        /// The bitmap's name inside the qcow2 image.
        qcow2_bitmap: String,
        /// Name of the imported bitmap [default: its name in the image].
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
        /// Replace an existing bitmap of that name.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        /// Locking options.
        lock: LockOpts,
    },
    /// Mark dirty every chunk of IMAGE that differs from BACKUP's manifest,
    /// and anchor the bitmap to BACKUP: the way back after a bitmap went
    /// stale.
    Rebuild {
        /// The image (its bitmaps are the files IMAGE.NAME.bitmap beside it).
        #[arg(add = complete::images())]
        image: PathBuf,
        /// The bitmap's name (letters, digits, '_', '-', '.').
        #[arg(add = complete::bitmaps())]
        name: String,
        /// The backup to compare with (its manifest is read; the bitmap is
        /// anchored to it).
        #[arg(long, value_name = "BACKUP", add = complete::backups())]
        against_backup: PathBuf,
        /// Granularity if the bitmap has to be created.
        #[arg(long, value_parser = parse_cluster_size, default_value = "64K", value_name = "SIZE")]
        granularity: u64,
        #[command(flatten)]
        /// Locking options.
        lock: LockOpts,
    },
}

/// Locking options of commands that change an image or its bitmaps.
#[derive(Debug, Clone, Args)]
pub struct LockOpts {
    /// When the image is locked, wait up to DUR for the lock instead of
    /// failing at once (exit 8).
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub wait_lock: Option<Duration>,
}

#[derive(Debug, Args)]
/// `imgbackup guest`.
pub struct GuestArgs {
    /// The image to write into (a raw file, or a qcow2 image written in
    /// place; never a backup).
    #[arg(add = complete::images())]
    pub image: PathBuf,
    /// The workload (see backup --guest); it needs count= or duration=.
    #[arg(value_parser = parse_spec)]
    pub spec: GuestSpec,
    /// Format of IMAGE; skips probing.
    #[arg(short, long, value_enum, value_name = "FORMAT")]
    pub format: Option<FormatArg>,
    #[command(flatten)]
    /// Locking options.
    pub lock: LockOpts,
}

#[derive(Debug, Args)]
/// `imgbackup list` (exit 7 when a listed backup cannot be restored: its
/// file or its parent is missing, or its manifest cannot be read).
pub struct ListArgs {
    /// A directory of backups, or backup files (their directories are
    /// read; only they are shown).
    #[arg(required = true, add = complete::backups())]
    pub paths: Vec<PathBuf>,
    /// Also verify each backup against its manifest, oldest first (an
    /// incremental whose parent verified reads only what it holds
    /// itself); exit 7 if one does not match.
    #[arg(long)]
    pub verify: bool,
    /// First finish a prune that was interrupted in DIR (a kill, a power
    /// loss), as the next prune would.
    #[arg(long)]
    pub repair: bool,
    /// With --repair: wait up to DUR for a prune or backup in DIR to end
    /// instead of failing at once (exit 8).
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub wait_lock: Option<Duration>,
}

#[derive(Debug, Args)]
/// `imgbackup prune`.
pub struct PruneArgs {
    /// The directory that holds the backups (chains of several sources
    /// may share it; the rules apply per source).
    pub dir: PathBuf,
    /// Keep the N newest backups.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Keep the backups started within DUR of the newest one (e.g. 14d).
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub keep_within: Option<Duration>,
    /// Keep the newest backup of each of the N newest hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<usize>,
    /// Keep the newest backup of each of the N newest days (UTC) that have
    /// one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<usize>,
    /// Keep the newest backup of each of the N newest weeks (Monday to
    /// Sunday, UTC) that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<usize>,
    /// Keep the newest backup of each of the N newest months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<usize>,
    /// Print the plan (keep, consolidate, remove, with the reasons) and
    /// change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// When a backup is writing into DIR (or another prune runs there),
    /// wait up to DUR instead of failing at once (exit 8).
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub wait_lock: Option<Duration>,
}

#[derive(Debug, Args)]
/// `imgbackup consolidate`.
pub struct ConsolidateArgs {
    /// The backup (an incremental: its chain is read).
    #[arg(add = complete::backups())]
    pub backup: PathBuf,
    /// The new backup (qcow2 unless it ends in .raw/.img), written as
    /// OUTPUT.partial and renamed once complete.
    #[arg(add = complete::outputs())]
    pub output: PathBuf,
    /// Replace an existing OUTPUT (only once the new one is complete).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
/// `imgbackup serve`.
#[command(group(clap::ArgGroup::new("endpoint").required(true).args(["socket", "listen"])))]
pub struct ServeArgs {
    /// The image to export: a raw or qcow2 image (written in place), or
    /// with --read-only any image or backup (read through its chain).
    #[arg(add = complete::images())]
    pub image: PathBuf,
    /// Listen on this Unix socket (clients use nbd+unix:///NAME?socket=PATH).
    /// A stale socket left by a killed server is replaced.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Listen on TCP HOST:PORT (a bare PORT listens on 127.0.0.1 only).
    /// There is no TLS: use it on loopback or a trusted network.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// The export's name.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub export_name: String,
    /// Refuse writes (any image format; the image is locked shared).
    #[arg(long)]
    pub read_only: bool,
    /// Export IMAGE (a backup, say) writable with the writes landing in
    /// FILE, a qcow2 backed by IMAGE (created if missing; an existing one
    /// must be backed by IMAGE): a VM boots from a backup at once while the
    /// backup itself never changes.
    #[arg(long, value_name = "FILE", conflicts_with = "read_only", add = complete::outputs())]
    pub overlay: Option<PathBuf>,
    /// Format of IMAGE; skips probing.
    #[arg(short, long, value_enum, value_name = "FORMAT")]
    pub format: Option<FormatArg>,
    #[command(flatten)]
    /// Locking options.
    pub lock: LockOpts,
}

#[derive(Debug, Args)]
/// `imgbackup info`.
pub struct InfoArgs {
    /// The image to describe.
    #[arg(add = complete::images())]
    pub image: PathBuf,
    /// Format of IMAGE; skips probing.
    #[arg(short, long, value_enum, value_name = "FORMAT")]
    pub format: Option<FormatArg>,
}
