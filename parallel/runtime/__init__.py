"""The background process group: pool lifecycle, worker entry, job protocol, model payload, what a rank
runs, the controller side of a run, settings and leftovers, the live monitor."""
