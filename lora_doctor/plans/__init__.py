"""Sync plans: the named sequences of sync phases a trainer performs (`builtin`) and the `Sync` handle
a plan drives (`sync`)."""
