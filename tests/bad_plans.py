"""Custom sync plans that are wrong in the ways users get them wrong: each must exit 2 with one line."""


def raises(sync):
    """A plan whose own code fails after the first sync."""
    sync.load_base()
    raise RuntimeError("boom")


def two_arguments(sync, other):
    """A plan with a signature the tool cannot call."""
    sync.load_base()


def never_probes(sync):
    """A plan that syncs but never measures."""
    sync.load_base()


def misuses_the_api(sync):
    """A plan that passes a wrong argument to the sync handle."""
    sync.load_merged(scale="double")
    sync.probe("never")
