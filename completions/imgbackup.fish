# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_imgbackup_global_optspecs
    string join \n json q/quiet v/verbose progress= h/help V/version
end

function __fish_imgbackup_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_imgbackup_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_imgbackup_using_subcommand
    set -l cmd (__fish_imgbackup_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c imgbackup -n "__fish_imgbackup_needs_command" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_needs_command" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -f -a "backup" -d 'Make a backup of SOURCE into TARGET'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -f -a "verify" -d 'Check a backup against its manifest (and, optionally, an image)'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -f -a "restore" -d 'Write the image a backup (and its chain) represents into OUTPUT'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -f -a "info" -d 'Show format, sizes, allocation and backing chain of an image'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -f -a "bitmap" -d 'Manage the dirty bitmaps kept beside an image'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -f -a "guest" -d 'Apply a simulated guest workload to IMAGE itself (in place), marking every enabled bitmap beside it'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -f -a "generate-docs" -d 'Write the man pages and shell completions into DIR (man/ and completions/)'
complete -c imgbackup -n "__fish_imgbackup_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l sync -d 'What to copy' -r -f -a "full\t'Copy every cluster of the image'
top\t'Copy only the clusters allocated in the top image of SOURCE\'s backing chain (the target\'s backing file is SOURCE\'s backing file)'
incremental\t'Copy the clusters dirty in --bitmap; clear them on success (bitmap with --bitmap-mode on-success)'
bitmap\t'Copy the clusters dirty in --bitmap, with --bitmap-mode'
none\t'Copy only what the guest is about to overwrite (fleecing; needs --guest with count= or duration=, and a qcow2 target backed by SOURCE)'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l bitmap -d 'The dirty bitmap beside SOURCE. With incremental and bitmap it selects what to copy; with full and top it (re)anchors the bitmap to this backup (created if missing, cleared on success)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l bitmap-mode -d 'What happens to the bitmap after the job [default: on-success]' -r -f -a "on-success\t'Clear what was copied only if the job succeeds'
always\t'Clear what was copied even if the job fails'
never\t'Leave the bitmap as it was (differential backups)'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l backing -d 'Backing file written into a qcow2 TARGET [default: for incremental and bitmap, the backup the bitmap is anchored to; for top, SOURCE\'s backing file]' -r -F
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l target-format -d 'Format of TARGET [default: qcow2 when TARGET ends in .qcow2 or the sync mode needs qcow2 (top, incremental, bitmap, none), else raw]' -r -f -a "raw\t''
qcow2\t''"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l target-cluster-size -d 'Cluster size of a new qcow2 TARGET' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l cluster-size -d 'Backup granularity [default: max(64K, the target\'s cluster size)]' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l jobs -d 'Number of copy workers [default: the number of CPUs]' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l max-chunk -d 'Largest single request [default: max(2M, cluster size)]; rounded down to whole clusters, at least one' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l speed -d 'Limit copy throughput, in bytes per second (e.g. 100M)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l timeout -d 'Cancel the job after DUR (exit 9; no target is left behind)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l source-format -d 'Format of SOURCE; skips probing (probing reads the qcow2 magic, anything else is raw)' -r -f -a "raw\t''
qcow2\t''"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l guest -d 'Run a simulated guest that writes into the image while the backup runs (SPEC: iops=N,bs=SIZE|MIN-MAX,pattern=random|sequential|hotspot, threads=N,seed=N,count=N|duration=DUR,zero=PCT). Its writes land in an overlay; the source file is never changed' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l guest-overlay -d 'Keep what the guest wrote as a qcow2 image backed by SOURCE' -r -F
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l on-cbw-error -d 'What a failed copy-before-write does: fail the guest write (the backup stays consistent), or let it through and fail the job. [default: break-guest-write]' -r -f -a "break-guest-write\t'The guest write fails; the backup stays consistent'
break-snapshot\t'The guest write proceeds and the job fails'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l cbw-timeout -d 'The longest a guest write may wait for its copy-before-write; past it the copy counts as failed' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l cbw-cache -d 'RAM for copy-before-write: a guest write waits only until the old data of its clusters is in this cache, which drains to the target in the background; when it is full, guest writes copy directly [default: 4M per worker; 0 disables]' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l on-source-error -d 'What a failed read of SOURCE does: report (fail, exit 4), ignore (skip the cluster, leave it dirty, finish with exit 3), retry (up to --retries times), or enospc (retry only when the cause is ENOSPC/EDQUOT/EFBIG)' -r -f -a "report\t''
ignore\t''
retry\t''
enospc\t''"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l on-target-error -d 'What a failed write of TARGET does (as --on-source-error; report is exit 5)' -r -f -a "report\t''
ignore\t''
retry\t''
enospc\t''"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l retries -d 'Retries of a failed range under the retry and enospc policies' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l retry-delay -d 'Wait before the first retry; doubled for each next one' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l retry-max-delay -d 'The longest wait between retries' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l wait-lock -d 'When the image (or TARGET, written by another run) is locked, wait up to DUR for the lock instead of failing at once (exit 8)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l inject -d 'Fault injection for testing error handling, like QEMU\'s blkdebug (repeatable): NODE:OP:ERRNO[@WHERE][,once|,count=N|,prob=P,seed=S][,delay=DUR]. See imgbackup(1), FAULT INJECTION' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l no-backing -d 'Write no backing file into TARGET'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l compress -d 'Write compressed clusters (deflate, as QEMU\'s default zlib type) into a qcow2 TARGET; clusters that do not shrink are written as they are'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l force -d 'Replace an existing TARGET (only once the new backup is complete). Never the source, its chain, the new backup\'s parent, or the backup the bitmap is anchored to'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l keep-partial -d 'On failure, keep TARGET.partial instead of deleting it'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l dry-run -d 'Print what would be copied and exit without writing anything'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l verify -d 'After the job, re-read the backup (through its backing file) and check it against the manifest; with --guest (or --no-manifest) also check it equals SOURCE as it was at the start. A mismatch is exit 7 and leaves no TARGET'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l force-share -d 'Back up even if another process (such as a running QEMU) holds the image open for writing. If that process writes the image during the backup, the backup is not point-in-time: it fails with exit 4 and no TARGET (writes to a block device cannot be seen)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l no-manifest -d 'Do not write TARGET.manifest (the chunk digests that `verify` and `restore` check)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand backup" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand verify" -l against -d 'Also compare the backup\'s content with IMAGE' -r -F
complete -c imgbackup -n "__fish_imgbackup_using_subcommand verify" -l against-format -d 'Format of IMAGE; skips probing' -r -f -a "raw\t''
qcow2\t''"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand verify" -l jobs -d 'Number of hashing workers [default: the number of CPUs]' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand verify" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand verify" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand verify" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand verify" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand verify" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand verify" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -l format -d 'Format of OUTPUT [default: qcow2 when OUTPUT ends in .qcow2, else raw]' -r -f -a "raw\t''
qcow2\t''"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -l cluster-size -d 'Cluster size of a qcow2 OUTPUT' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -l jobs -d 'Number of copy workers [default: the number of CPUs]' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -l no-verify -d 'Do not check the data against the backup\'s manifest'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -l force -d 'Replace an existing OUTPUT (only once the restored image is complete), or overwrite a block device\'s content'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -l keep-partial -d 'On failure, keep OUTPUT.partial'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand restore" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand info" -l format -d 'Format of IMAGE; skips probing' -r -f -a "raw\t''
qcow2\t''"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand info" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand info" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand info" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand info" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand info" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand info" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "add" -d 'Create a bitmap (clean, recording the image as it is now)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "remove" -d 'Delete a bitmap'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "clear" -d 'Mark every bit clean (the bitmap must be consistent)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "enable" -d 'Let writes mark the bitmap again (from now on)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "disable" -d 'Stop writes from marking the bitmap'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "list" -d 'List the bitmaps beside IMAGE'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "show" -d 'Show one bitmap: counts and dirty ranges'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "merge" -d 'Set in NAME every bit set in the SRC bitmaps'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "import" -d 'Copy a persistent dirty bitmap that QEMU keeps inside the qcow2 IMAGE'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "rebuild" -d 'Mark dirty every chunk of IMAGE that differs from BACKUP\'s manifest, and anchor the bitmap to BACKUP: the way back after a bitmap went stale'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and not __fish_seen_subcommand_from add remove clear enable disable list show merge import rebuild help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from add" -l granularity -d 'Bytes per bit' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from add" -l wait-lock -d 'When the image is locked, wait up to DUR for the lock instead of failing at once (exit 8)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from add" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from add" -l disabled -d 'Create it disabled (not marked by writes)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from add" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from add" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from add" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from add" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from add" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from remove" -l wait-lock -d 'When the image is locked, wait up to DUR for the lock instead of failing at once (exit 8)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from remove" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from remove" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from remove" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from remove" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from remove" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from remove" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from clear" -l wait-lock -d 'When the image is locked, wait up to DUR for the lock instead of failing at once (exit 8)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from clear" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from clear" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from clear" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from clear" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from clear" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from clear" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from enable" -l wait-lock -d 'When the image is locked, wait up to DUR for the lock instead of failing at once (exit 8)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from enable" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from enable" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from enable" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from enable" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from enable" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from enable" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from disable" -l wait-lock -d 'When the image is locked, wait up to DUR for the lock instead of failing at once (exit 8)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from disable" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from disable" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from disable" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from disable" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from disable" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from disable" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from list" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from list" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from list" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from list" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from list" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from show" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from show" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from show" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from show" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from show" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from merge" -l into -d 'The bitmap to merge into (it must exist)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from merge" -l wait-lock -d 'When the image is locked, wait up to DUR for the lock instead of failing at once (exit 8)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from merge" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from merge" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from merge" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from merge" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from merge" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from merge" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from import" -l as -d 'Name of the imported bitmap [default: its name in the image]' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from import" -l wait-lock -d 'When the image is locked, wait up to DUR for the lock instead of failing at once (exit 8)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from import" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from import" -l force -d 'Replace an existing bitmap of that name'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from import" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from import" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from import" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from import" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from import" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from rebuild" -l against -d 'The backup to compare with (its manifest is read)' -r -F
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from rebuild" -l granularity -d 'Granularity if the bitmap has to be created' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from rebuild" -l wait-lock -d 'When the image is locked, wait up to DUR for the lock instead of failing at once (exit 8)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from rebuild" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from rebuild" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from rebuild" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from rebuild" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from rebuild" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from rebuild" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "add" -d 'Create a bitmap (clean, recording the image as it is now)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "remove" -d 'Delete a bitmap'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "clear" -d 'Mark every bit clean (the bitmap must be consistent)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "enable" -d 'Let writes mark the bitmap again (from now on)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "disable" -d 'Stop writes from marking the bitmap'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "list" -d 'List the bitmaps beside IMAGE'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "show" -d 'Show one bitmap: counts and dirty ranges'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "merge" -d 'Set in NAME every bit set in the SRC bitmaps'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "import" -d 'Copy a persistent dirty bitmap that QEMU keeps inside the qcow2 IMAGE'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "rebuild" -d 'Mark dirty every chunk of IMAGE that differs from BACKUP\'s manifest, and anchor the bitmap to BACKUP: the way back after a bitmap went stale'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand bitmap; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand guest" -l format -d 'Format of IMAGE; skips probing' -r -f -a "raw\t''
qcow2\t''"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand guest" -l wait-lock -d 'When the image is locked, wait up to DUR for the lock instead of failing at once (exit 8)' -r
complete -c imgbackup -n "__fish_imgbackup_using_subcommand guest" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand guest" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand guest" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand guest" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand guest" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand guest" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand generate-docs" -l progress -d 'Progress display: a bar on a terminal (auto), always a bar, a plain line every few seconds (for logs and cron mail), or nothing' -r -f -a "auto\t'A bar when stderr is a terminal, nothing otherwise'
bar\t'A bar on stderr'
plain\t'A plain line on stderr every few seconds'
none\t'Nothing'"
complete -c imgbackup -n "__fish_imgbackup_using_subcommand generate-docs" -l json -d 'Print one JSON document on stdout (and nothing else there)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand generate-docs" -s q -l quiet -d 'Print nothing but errors'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand generate-docs" -s v -l verbose -d 'Say more about what happens (repeat for more)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand generate-docs" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand generate-docs" -s V -l version -d 'Print version'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and not __fish_seen_subcommand_from backup verify restore info bitmap guest generate-docs help" -f -a "backup" -d 'Make a backup of SOURCE into TARGET'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and not __fish_seen_subcommand_from backup verify restore info bitmap guest generate-docs help" -f -a "verify" -d 'Check a backup against its manifest (and, optionally, an image)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and not __fish_seen_subcommand_from backup verify restore info bitmap guest generate-docs help" -f -a "restore" -d 'Write the image a backup (and its chain) represents into OUTPUT'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and not __fish_seen_subcommand_from backup verify restore info bitmap guest generate-docs help" -f -a "info" -d 'Show format, sizes, allocation and backing chain of an image'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and not __fish_seen_subcommand_from backup verify restore info bitmap guest generate-docs help" -f -a "bitmap" -d 'Manage the dirty bitmaps kept beside an image'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and not __fish_seen_subcommand_from backup verify restore info bitmap guest generate-docs help" -f -a "guest" -d 'Apply a simulated guest workload to IMAGE itself (in place), marking every enabled bitmap beside it'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and not __fish_seen_subcommand_from backup verify restore info bitmap guest generate-docs help" -f -a "generate-docs" -d 'Write the man pages and shell completions into DIR (man/ and completions/)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and not __fish_seen_subcommand_from backup verify restore info bitmap guest generate-docs help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "add" -d 'Create a bitmap (clean, recording the image as it is now)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "remove" -d 'Delete a bitmap'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "clear" -d 'Mark every bit clean (the bitmap must be consistent)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "enable" -d 'Let writes mark the bitmap again (from now on)'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "disable" -d 'Stop writes from marking the bitmap'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "list" -d 'List the bitmaps beside IMAGE'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "show" -d 'Show one bitmap: counts and dirty ranges'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "merge" -d 'Set in NAME every bit set in the SRC bitmaps'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "import" -d 'Copy a persistent dirty bitmap that QEMU keeps inside the qcow2 IMAGE'
complete -c imgbackup -n "__fish_imgbackup_using_subcommand help; and __fish_seen_subcommand_from bitmap" -f -a "rebuild" -d 'Mark dirty every chunk of IMAGE that differs from BACKUP\'s manifest, and anchor the bitmap to BACKUP: the way back after a bitmap went stale'
