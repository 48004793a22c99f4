"""The small controller core: client setup, informers, work queue, Lease leader election, metrics and health."""
