"""What people read: `summary` (summary.md), `status` (the trial table), `html` (`cxr-search report`, one
self-contained page), `figures` (matplotlib figures shared with the notebooks) and `study` (the published study's
figures beside ours)."""
