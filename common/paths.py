"""Names of what silorec keeps on disk, importable without pandas or torch (a ClientApp process starts for every
message under Flower's deployment, so what it imports costs every stage)."""

STATE_DIR = ".silorec-state"  # inside a silo: what silorec keeps for it (ledger, keys, local state)
