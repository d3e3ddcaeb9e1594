"""How one model call is split over devices: band layout and plan, exchanges with byte accounting, band
primitives, the stale engine (displaced / partial), the UNet split, per-device memory estimates."""
