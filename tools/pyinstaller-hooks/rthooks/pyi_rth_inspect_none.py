# Replaces PyInstaller's run-time hook for `inspect` in the daemons' builds: nothing to do at start.
