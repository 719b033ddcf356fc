complete --keep-order --exclusive --command imgbackup --arguments "(COMPLETE=fish imgbackup -- (commandline --current-process --tokenize --cut-at-cursor) (commandline --current-token))"
