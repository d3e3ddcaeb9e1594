"""The background process group (pool, worker entry, job protocol) and patch-parallel primitives."""
