"""Everything that touches the migrated process: /proc (proctree, maps), page tables (pagemap),
bulk memory reads (vmread), dirty trackers, ptrace injection and the CRIU driver."""
